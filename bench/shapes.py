"""Random-weight Qwen2 models of real shapes, with DeepSeek-R1-Distill-Qwen's tokenizer (bundled:tiny-qwen2-r1):
speed and memory do not depend on weight values, so these are how scale is measured without a model hub.
Not a benchmark itself; bench/gpu.py and bench/export.py build their models with it."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# config.json of each release: untied embeddings from 1.5B up (R1-Distill-Qwen), tied at Qwen2.5-0.5B and 3B.
SHAPES = {
    "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True},
    "1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": False},
    "3b": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
           "intermediate_size": 11008, "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False},
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False},  # Kanana-1.5-8B's shape
    "14b": {"hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
            "intermediate_size": 13824, "vocab_size": 152064, "tie_word_embeddings": False},
    "32b": {"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
            "intermediate_size": 27648, "vocab_size": 152064, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 152064, "tie_word_embeddings": False},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def parameters(shape: str) -> int:
    """Parameters of a shape, from its dimensions (q/k/v biases and norms included)."""
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + h + 2 * kv + 3 * h * i + 2 * h
    return layers * per_layer + v * h * (1 if s["tie_word_embeddings"] else 2) + h


def tokenizer_dir() -> Path:
    """bundled:tiny-qwen2-r1's directory: DeepSeek-R1-Distill-Qwen's tokenizer and chat template."""
    from distillery.core.models import materialize_bundled

    return materialize_bundled("tiny-qwen2-r1")


def build_model(shape: str, out: Path, device: str | None = None) -> dict[str, Any]:
    """A random-weight Qwen2ForCausalLM of `shape`, built in bf16 on the GPU (CPU without one), saved as bf16
    safetensors (1 GB shards) with the R1 tokenizer beside it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    started = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = tokenizer_dir()
    tiny = json.loads((source / "config.json").read_text())
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=tiny.get("rope_theta", 10000.0),
                         rms_norm_eps=1e-6, bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"],
                         dtype=torch.bfloat16)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy of billions of parameters
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size="1GB")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    result = {"shape": shape, "parameters": params, "bytes": size, "seconds": round(time.time() - started, 1)}
    print(f"built {shape}: {params / 1e9:.2f}B parameters, {size / 2**30:.1f} GiB bf16 in {result['seconds']} s "
          f"({device})", flush=True)
    return result
