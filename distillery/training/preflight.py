"""What the finetune stage checks and chooses before any weights load: the model is there and has the LoRA
target modules, the hardware decides 4-bit / precision / optimizer, and every example keeps a completion token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distillery.core.errors import UserError
from distillery.core.models import resolve_model_path
from distillery.training import tokens
from distillery.core.userinput import read_yaml_file, require_file

log = logging.getLogger(__name__)

GPU_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


# ---- 1. the model --------------------------------------------------------------------------------------------


def locate_model(path: str, timeout_s: float = 10.0) -> str:
    """A local directory, or a Hub id that is cached or reachable; anything else is a UserError, fast."""
    resolved = resolve_model_path(path)
    if Path(resolved).expanduser().is_dir():
        return str(Path(resolved).expanduser())
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return snapshot_download(resolved, local_files_only=True)  # in the local Hub cache: no network needed
    except Exception:
        pass
    try:
        HfApi().model_info(resolved, timeout=timeout_s)
    except RepositoryNotFoundError:
        raise UserError(f"model.path: {resolved} is not a model on the Hugging Face Hub (or it is private: set "
                        "HF_TOKEN in the environment or .env).") from None
    except Exception as err:
        raise UserError(f"model.path: {resolved} is a Hub id, and the Hub cannot be reached ({type(err).__name__}). "
                        f"Download it where there is network (`hf download {resolved} --local-dir DIR`) and set "
                        "model.path to that directory.") from None
    return resolved


def linear_layer_names(model: Any) -> list[str]:
    """Distinct last-name parts of the model's linear layers (what LoRA target_modules match)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name})


def check_target_modules(model_path: str, targets: list[str], trust_remote_code: bool = False) -> None:
    """Refuse target modules the model lacks, naming its linear layers; built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = linear_layer_names(model)
    missing = [t for t in targets if t not in names and t not in ("embed_tokens", "lm_head")]
    if missing:
        raise UserError(f"finetune.lora.target_modules: {', '.join(missing)} not in {model_path}. "
                        f"Its linear layers are: {', '.join(names)}.")


# ---- 2. hardware choices -------------------------------------------------------------------------------------


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def choose_4bit(setting: Any, cuda: bool) -> bool:
    """auto: 4-bit (QLoRA) on CUDA, 16-bit elsewhere. true without CUDA is refused: the config insists."""
    if setting is True and not cuda:
        raise UserError("finetune.load_in_4bit: true needs a CUDA GPU (bitsandbytes 4-bit), and this machine has "
                        "none. Set it to auto (16-bit on CPU) or false.")
    return cuda if setting == "auto" else bool(setting)


def choose_precision(setting: str, cuda: bool, bf16_ok: bool) -> str:
    """auto: bf16 where the hardware has it, else fp16 on CUDA and fp32 on CPU."""
    if setting == "auto":
        return "bf16" if bf16_ok else ("fp16" if cuda else "fp32")
    if setting == "bf16" and cuda and not bf16_ok:
        raise UserError("finetune.precision: bf16 is not supported by this GPU. Use fp16 or auto.")
    if setting == "fp16" and not cuda:
        raise UserError("finetune.precision: fp16 training needs a CUDA GPU. Use auto, bf16 or fp32 on CPU.")
    return setting


def choose_optimizer(setting: str, cuda: bool) -> str:
    if setting in GPU_OPTIMIZERS and not cuda:
        log.warning("finetune.optimizer %s needs CUDA (bitsandbytes); using adamw_torch on CPU", setting)
        return "adamw_torch"
    return setting


# ---- 3. length check -----------------------------------------------------------------------------------------


def completion_tokens_kept(rows: list[dict], tokenizer: Any, max_length: int) -> list[int]:
    """Per row, how many completion tokens survive truncation to max_length, tokenized as training does
    (training/tokens.py)."""
    return [tokens.completion_tokens_kept(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]


def check_completions_fit(rows: list[dict], tokenizer: Any, max_length: int) -> None:
    """Every example must keep >= 1 trained token; otherwise say how many would lose their whole completion."""
    kept = completion_tokens_kept(rows, tokenizer, max_length)
    lost = [r["id"] for r, k in zip(rows, kept) if k == 0]
    if lost:
        raise UserError(f"format.max_length {max_length} is shorter than the prompts: {len(lost)} of {len(rows)} "
                        f"training examples would lose their whole completion (e.g. id {lost[0]}). Raise "
                        "format.max_length, or shorten / drop those prompts (ingest max_records, a shorter "
                        "system_prompt).")


def check_multiple_choice(rows: list[dict]) -> None:
    if not any(r.get("choices") for r in rows):
        raise UserError("finetune.objective multiple_choice needs math_mc training rows (with choices and label); "
                        "format's train.jsonl has none. Add a source with format: mathqa.")


def check_accelerate_config(path: str | None, cuda: bool, backend: str = "hf") -> None:
    """Refuse, before anything loads, an accelerate config this machine (or this backend) cannot launch."""
    if not path:
        return
    file = Path(path)
    require_file(file, "finetune.accelerate_config:", "See configs/accelerate/.")
    config = read_yaml_file(file) or {}
    if not isinstance(config, dict):
        raise UserError(f"finetune.accelerate_config: {path} is not an accelerate config (a mapping of settings); "
                        "see configs/accelerate/.")
    kind, on_cpu = str(config.get("distributed_type", "NO")).upper(), bool(config.get("use_cpu"))
    if backend == "unsloth" and kind in ("FSDP", "DEEPSPEED"):
        # Unsloth trains one whole model per process (DDP); its patched modules are not shardable.
        raise UserError(f"finetune.accelerate_config: {path} shards the model ({kind}), which the unsloth backend "
                        "does not support: it runs one whole model per process (DDP, configs/accelerate/ddp.yaml). "
                        "Set finetune.backend: hf to shard with FSDP or DeepSpeed.")
    if kind == "DEEPSPEED" and not cuda:
        raise UserError(f"finetune.accelerate_config: {path} uses DeepSpeed ZeRO, which needs CUDA GPUs (and `pip "
                        "install deepspeed`). Without a GPU use configs/accelerate/ddp_cpu.yaml or fsdp_cpu.yaml.")
    if kind in ("MULTI_GPU", "FSDP") and not on_cpu and not cuda:
        raise UserError(f"finetune.accelerate_config: {path} runs one process per GPU and this machine has no CUDA "
                        "GPU. Use configs/accelerate/ddp_cpu.yaml or fsdp_cpu.yaml (use_cpu: true) to run the same "
                        "code on CPU processes.")
