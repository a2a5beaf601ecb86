"""Distillery: ingest -> (distill) -> format -> finetune -> export -> evaluate, over one YAML config."""

import logging

# Every Distillery process imports this package first (the CLI, `accelerate launch`'s ranks, the isolated children
# that merge, verify and score). bitsandbytes, imported by PEFT, logs a warning at import on a CPU with AVX512-BF16
# that an optional kernel package is missing: nothing a user can act on (4-bit training needs CUDA here anyway).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
