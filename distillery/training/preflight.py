"""What the finetune stage checks and chooses before any weights load: the model is there and has the LoRA
target modules, the hardware decides 4-bit / precision / optimizer, every example keeps a completion token, and
full fine-tuning fits in the machine's memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillery.core.errors import UserError
from distillery.core.models import meta_model, resolve_model_path, text_config
from distillery.training import tokens
from distillery.training.settings import FULL_IN_4BIT
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


def linear_layers(model: Any) -> list[str]:
    """The full names of the model's linear layers: nn.Linear, and GPT-2's Conv1D (c_attn, c_proj, c_fc), which
    PEFT adapts as well."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D)) and name]


def linear_layer_names(model: Any) -> list[str]:
    """Distinct last-name parts of the model's linear layers (what LoRA target_modules usually name)."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)})


def targets_a_layer(target: str, layers: list[str]) -> bool:
    """PEFT's rule for a list of target_modules: a module is adapted when its full name is the target or ends with
    `.` + the target (`q_proj`, `self_attn.q_proj`, `model.layers.0.self_attn.q_proj`)."""
    return any(name == target or name.endswith("." + target) for name in layers)


EMBEDDING_MODULES = ("embed_tokens", "lm_head")


def embedding_target_refusal(targets: list[str], backend: str, objective: str) -> str | None:
    """Why embedding targets cannot train as asked (each stopped the training child with a traceback): Unsloth
    trains embed_tokens and lm_head whole (modules_to_save), not as LoRA, so with no other target there is no adapter;
    TRL's SFTTrainer computes the log-probabilities from lm_head.weight directly, so it refuses LoRA on lm_head."""
    leaves = [t.rsplit(".", 1)[-1] for t in targets]
    if backend == "unsloth" and all(leaf in EMBEDDING_MODULES for leaf in leaves):
        return (f"finetune.lora.target_modules: {', '.join(targets)} only: the unsloth backend trains embed_tokens "
                "and lm_head as whole modules, not as LoRA adapters, which leaves no module to adapt. Add at least one "
                "projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).")
    if backend == "hf" and objective == "sft" and "lm_head" in leaves:
        return ("finetune.lora.target_modules: lm_head: TRL's SFTTrainer computes the log-probabilities from "
                "lm_head.weight directly, so a LoRA adapter on it would never train (TRL refuses it). Remove lm_head "
                "from target_modules.")
    return None


def check_target_modules(model_path: str, targets: list[str], trust_remote_code: bool = False,
                         backend: str = "hf", objective: str = "sft") -> None:
    """Refuse target modules the model lacks, naming its linear layers; built on the meta device (no weights);
    and embedding targets the backend or trainer cannot train as LoRA (embedding_target_refusal)."""
    refusal = embedding_target_refusal(targets, backend, objective)
    if refusal:
        raise UserError(refusal)
    _, model = meta_model(model_path, trust_remote_code)
    layers = linear_layers(model)
    missing = [t for t in targets if not targets_a_layer(t, layers) and t not in EMBEDDING_MODULES]
    if missing:
        raise UserError(f"finetune.lora.target_modules: {', '.join(missing)} not in {model_path}. "
                        f"Its linear layers are: {', '.join(linear_layer_names(model))} (a name may also be a "
                        "layer's dotted path or its end, e.g. self_attn.q_proj).")


# ---- 2. hardware choices -------------------------------------------------------------------------------------


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def choose_4bit(setting: Any, cuda: bool, method: str = "lora") -> bool:
    """auto: 4-bit (QLoRA) on CUDA, 16-bit elsewhere; full fine-tuning never in 4 bits. true without CUDA is
    refused: the config insists."""
    if method == "full":
        if setting is True:
            raise UserError(FULL_IN_4BIT)
        return False
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


def completions_lost(rows: list[dict], tokenizer: Any, max_length: int) -> list[str]:
    """The ids of the examples that keep no completion token within max_length."""
    return [r["id"] for r, kept in zip(rows, completion_tokens_kept(rows, tokenizer, max_length)) if kept == 0]


def check_completions_fit(rows: list[dict], tokenizer: Any, max_length: int) -> None:
    """Every example must keep >= 1 trained token; otherwise say how many would lose their whole completion."""
    lost = completions_lost(rows, tokenizer, max_length)
    if lost:
        raise UserError(f"format.max_length {max_length} is shorter than the prompts: {len(lost)} of {len(rows)} "
                        f"training examples would lose their whole completion (e.g. id {lost[0]}). Raise "
                        "format.max_length, or shorten / drop those prompts (ingest max_records, a shorter "
                        "system_prompt).")


def check_eval_rows_fit(rows: list[dict], tokenizer: Any, max_length: int, eval_steps: int) -> str | None:
    """eval_loss is read from the eval examples that keep a completion token within max_length (TRL drops the
    others quietly): none is a UserError, before the model loads (the run trained with no eval_loss and said
    nothing); some is a note, returned."""
    lost = completions_lost(rows, tokenizer, max_length)
    if not lost:
        return None
    if len(lost) == len(rows):
        raise UserError(f"finetune.eval_steps is {eval_steps}, but all {len(rows)} of format's eval examples lose their "
                        f"whole completion to format.max_length {max_length} (e.g. id {lost[0]}), so no eval loss "
                        "can be computed. Raise format.max_length, or unset eval_steps.")
    return (f"finetune: {len(lost)} of {len(rows)} eval examples lose their whole completion to format.max_length "
            f"{max_length} (e.g. id {lost[0]}); eval_loss leaves them out")


def prompts_that_fit(rows: list[dict], count: int, tokenizer: Any, max_length: int) -> list[str]:
    """The first `count` eval prompts that leave room for a completion token within max_length, for the samples
    generated before and after training: one of 36k tokens at max_length 64 asked for 10 GB of attention and ended
    the run after it had trained."""
    chosen: list[str] = []
    for row in rows:
        if len(chosen) == count:
            break
        if tokens.completion_tokens_kept(tokenizer, row["prompt"], row["completion"], max_length) > 0:
            chosen.append(row["prompt"])
    return chosen


def check_multiple_choice(rows: list[dict]) -> None:
    if not any(r.get("choices") for r in rows):
        raise UserError("finetune.objective multiple_choice needs math_mc training rows (with choices and label); "
                        "format's train.jsonl has none. Add a source with format: mathqa.")


def check_accelerate_config(path: str | None, cuda: bool, backend: str = "hf") -> None:
    """Refuse, before anything loads, an accelerate config this machine (or this backend) cannot launch."""
    if not path:
        return
    file = Path(path)
    require_file(file, "finetune.accelerate_config", "See configs/accelerate/.")
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


# ---- 4. memory of full fine-tuning ---------------------------------------------------------------------------

GIB = 1024**3
# Bytes per parameter of optimizer state: AdamW keeps two fp32 moments; the 8-bit optimizers two 8-bit ones.
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
BASELINE_BYTES = 1 << 30  # Python, torch, the tokenizer, the data and the allocator's slack of one process


@dataclass
class ModelShape:
    parameters: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def model_shape(model_path: str, trust_remote_code: bool = False) -> ModelShape:
    """The model's size from its config alone: built on the meta device, no weights read."""
    config, model = meta_model(model_path, trust_remote_code)
    text = text_config(config)
    parameters = sum(p.numel() for p in model.parameters())  # a tied embedding counts once
    hidden = text.hidden_size
    return ModelShape(parameters, hidden, getattr(text, "intermediate_size", None) or 4 * hidden,
                      text.num_hidden_layers, text.vocab_size)


def activation_bytes(shape: ModelShape, tokens: int, checkpointing: bool) -> int:
    """Activations kept for the backward pass of one batch of `tokens` under 16-bit autocast.

    A decoder layer keeps about 36·hidden + 8·intermediate bytes per token (fp32 residual stream and norms,
    16-bit projections and attention output, the MLP's four intermediate tensors); with gradient checkpointing,
    only each layer's fp32 input (4·hidden) plus one layer recomputed at a time. The logits add 10 bytes per
    token and vocabulary entry (fp32 logits and their gradient, a 16-bit copy)."""
    per_layer = 36 * shape.hidden + 8 * shape.intermediate
    layers = 4 * shape.hidden * shape.layers + per_layer if checkpointing else per_layer * shape.layers
    return tokens * (layers + 10 * shape.vocab)


def full_finetune_bytes(shape: ModelShape, tokens: int, checkpointing: bool, optimizer: str, mixed: bool,
                        shards: tuple[int, int, int] = (1, 1, 1)) -> dict[str, int]:
    """One process's memory for full fine-tuning: fp32 weights and the 16-bit copies autocast keeps during a step
    (4 + 2 bytes per parameter), fp32 gradients (4), the optimizer's state, each divided by what shards it
    (`shards`: weights, gradients, optimizer state); the batch's activations; a baseline."""
    weights, gradients, optimizer_state = shards
    states = (shape.parameters * (4 + (2 if mixed else 0)) // weights + shape.parameters * 4 // gradients
              + shape.parameters * OPTIMIZER_BYTES.get(optimizer, 8) // optimizer_state)
    activations = activation_bytes(shape, tokens, checkpointing)
    return {"states": states, "activations": activations, "baseline": BASELINE_BYTES,
            "total": states + activations + BASELINE_BYTES}


def lora_bytes(shape: ModelShape, tokens: int, checkpointing: bool, four_bit: bool) -> int:
    """LoRA's memory for comparison: the frozen base in 16 (or about 4.5) bits, the same activations; the adapter
    and its optimizer state are a few percent at most."""
    weights = shape.parameters * (0.56 if four_bit else 2)
    return int(weights * 1.05) + activation_bytes(shape, tokens, checkpointing) + BASELINE_BYTES


def accelerate_layout(path: str | None) -> tuple[int, tuple[int, int, int]]:
    """(processes, what shards weights / gradients / optimizer state across them) of an accelerate config: FSDP
    and ZeRO-3 shard all three, ZeRO-2 gradients and optimizer state, ZeRO-1 the optimizer state, DDP nothing."""
    if not path:
        return 1, (1, 1, 1)
    config = read_yaml_file(Path(path)) or {}
    kind = str(config.get("distributed_type", "NO")).upper()
    n = max(1, int(config.get("num_processes", 1) or 1)) if kind != "NO" else 1
    stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 0) or 0) if kind == "DEEPSPEED" else 0
    if kind == "FSDP" or stage == 3:
        return n, (n, n, n)
    return n, (1, n if stage == 2 else 1, n if stage >= 1 else 1)


def memory_available(cuda: bool) -> tuple[int | None, str]:
    """Free memory of one GPU (the first), or MemAvailable on a CPU machine, and where it was read. The GPU is
    asked from a short-lived process: a CUDA context made here would hold GPU memory through training."""
    if cuda:
        import subprocess
        import sys

        asked = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.mem_get_info(0)[0])"],
                               capture_output=True, text=True, timeout=120)
        free = asked.stdout.strip().splitlines()[-1:] if asked.returncode == 0 else []
        return (int(free[0]) if free and free[0].isdigit() else None), "free on GPU 0"
    from distillery.core.machine import available_memory

    return available_memory(), "available (MemAvailable)"


def refuse_quantized_base(model_path: str, trust_remote_code: bool = False) -> None:
    """Full fine-tuning trains 16-bit weights: a model published quantized (bnb-4bit) cannot be its base."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        raise UserError(f"finetune.method: full trains every weight in 16-bit mixed precision, and model.path "
                        f"{model_path} is stored quantized ({method}). Set model.path to the original 16-bit model, "
                        "or use method: lora (QLoRA trains adapters on the quantized base).")


def check_full_finetune_memory(model_path: str, ft: Any, max_length: int, cuda: bool, mixed: bool,
                               trust_remote_code: bool = False, available: int | None = None) -> dict[str, Any]:
    """Estimate what full fine-tuning needs (per process; on a CPU machine, every process shares its memory) and
    refuse, before anything loads, when it is more than is available, with the figure and what would fit."""
    shape = model_shape(model_path, trust_remote_code)
    processes, shards = accelerate_layout(ft.accelerate_config)
    tokens = ft.batch_size * max_length
    need = full_finetune_bytes(shape, tokens, ft.gradient_checkpointing, ft.optimizer if cuda else "adamw_torch",
                               mixed, shards)
    where = "available (MemAvailable)"
    if available is None:
        available, where = memory_available(cuda)
    sharing = 1 if cuda else processes  # CPU processes share one machine's memory; each GPU has its own
    estimate = {"parameters": shape.parameters, "needed_gib": round(need["total"] * sharing / GIB, 2),
                "states_gib": round(need["states"] / GIB, 2), "activations_gib": round(need["activations"] / GIB, 2),
                "available_gib": round(available / GIB, 2) if available else None, "processes": processes}
    if available is None or need["total"] * sharing <= available:
        return estimate
    raise UserError(memory_refusal(shape, ft, tokens, max_length, need, sharing, available, where, cuda, shards, mixed))


def memory_refusal(shape: ModelShape, ft: Any, tokens: int, max_length: int, need: dict[str, int], sharing: int,
                   available: int, where: str, cuda: bool, shards: tuple[int, int, int], mixed: bool) -> str:
    """The refusal: the estimate, its parts, and each alternative's own figure against what is available."""
    def gib(n: float) -> str:
        return f"{n / GIB:.1f} GiB"

    def fits(n: float) -> str:
        return "fits" if n * sharing <= available else "does not fit either"

    optimizer = ft.optimizer if cuda else "adamw_torch"
    alternatives = [("finetune.method: lora", lora_bytes(shape, tokens, ft.gradient_checkpointing, cuda))]
    if ft.batch_size > 1:
        one = full_finetune_bytes(shape, max_length, ft.gradient_checkpointing, optimizer, mixed, shards)
        alternatives.append((f"finetune.batch_size: 1 with gradient_accumulation_steps x{ft.batch_size}", one["total"]))
    if not ft.gradient_checkpointing:
        alternatives.append(("finetune.gradient_checkpointing: true",
                             need["total"] - need["activations"] + activation_bytes(shape, tokens, True)))
    if OPTIMIZER_BYTES.get(optimizer, 8) == 8:
        alternatives.append(("finetune.optimizer: adamw_8bit (CUDA only)",
                             need["total"] - shape.parameters * 6 // shards[2]))
    if shards == (1, 1, 1):
        alternatives.append(("FSDP over 4 GPUs (finetune.accelerate_config: configs/accelerate/fsdp.yaml, "
                             "backend: hf)", need["total"] - need["states"] * 3 // 4))
    lines = "; ".join(f"{name}: about {gib(n * sharing)} ({fits(n)})" for name, n in alternatives)
    return (f"finetune.method: full needs about {gib(need['total'] * sharing)} for this model "
            f"({shape.parameters / 1e9:.2f}B parameters: weights, gradients and optimizer state "
            f"{gib(need['states'])}, activations {gib(need['activations'])} at batch {ft.batch_size} x "
            f"{max_length} tokens, {gib(need['baseline'])} for the process"
            f"{f', times {sharing} processes' if sharing > 1 else ''}), and {gib(available)} {where}. "
            f"What would need less: {lines}.")
