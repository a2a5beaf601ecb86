"""The 16-bit merge: LoRA adapter + the base model's original 16-bit weights -> one HF directory.

- `read_finetune` checks the finetune stage left an adapter and reads its summary.json (backend, base model);
- `merge_adapter` merges with Unsloth's save_pretrained_merged(save_method="merged_16bit") on the unsloth
  backend, PEFT's merge_and_unload on the hf backend; the base is always loaded in 16 bits (never a
  dequantized 4-bit copy), offline when it is a local directory; the tokenizer (training chat template, EOS)
  and a generation config whose eos is the training EOS go beside the sharded safetensors. Unsloth's merge runs
  in a child process: importing Unsloth patches transformers for the whole process (on a GPU machine its rotary
  embeddings then live on CUDA, and a model verified on the CPU afterwards fails), so the export process, which
  goes on to verify with plain transformers, never imports it;
- `verify_merge` proves the adapter survived: on fixed tokens the merged model's next-token distribution is
  much closer to base+adapter (unmerged) than the base's is (only 16-bit rounding apart).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from distillery.core.errors import UserError
from distillery.core.models import torch_dtype

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# verify_merge: KL(base+adapter || merged) must stay below this share of KL(base+adapter || base).
MAX_MERGE_KL_RATIO = 0.5


def read_finetune(adapter: Path, summary_path: Path) -> dict[str, Any]:
    """finetune's summary, after checking its adapter is there."""
    missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
    if missing:
        raise UserError(f"no LoRA adapter in {adapter} (missing {', '.join(missing)}): run `distillery finetune` "
                        "(just finetune) first.")
    if not summary_path.is_file():
        raise UserError(f"{summary_path} is missing: the finetune stage did not finish; run `distillery finetune`.")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    for key in ("backend", "base_model"):
        if not summary.get(key):
            raise UserError(f"{summary_path}: no {key!r}; rerun `distillery finetune --force`.")
    return summary


def merged_dtype_name(requested: str, base_model: str) -> str:
    """auto: the base's own 16-bit dtype (config.json), bf16 when it is stored in 32 bits."""
    if requested != "auto":
        return requested
    config_path = Path(base_model) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        stored = config.get("dtype") or config.get("torch_dtype")
        if stored == "float16":
            return "fp16"
    return "bf16"


def merge_adapter(summary: dict[str, Any], adapter_dir: Path, out_dir: Path, dtype: str, max_shard_size: str,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Merge into 16-bit weights and save to `out_dir` (written beside it, renamed when complete)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    if summary["backend"] == "unsloth":
        _merge_with_unsloth(adapter_dir, tmp, dtype, max_shard_size)
    else:
        _merge_with_peft(summary["base_model"], adapter_dir, tmp, dtype, max_shard_size, trust_remote_code)
    finish_merged_dir(tmp, adapter_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {"backend": summary["backend"], "dtype": dtype, "seconds": round(time.time() - started, 2),
            "bytes": size, "shards": len(list(out_dir.glob("*.safetensors")))}


def _merge_with_peft(base_model: str, adapter_dir: Path, out: Path, dtype: str, max_shard_size: str,
                     trust_remote_code: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype(dtype),
                                                trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)


def _merge_with_unsloth(adapter_dir: Path, out: Path, dtype: str, max_shard_size: str) -> None:
    from distillery.core.isolation import Child

    with Child("Unsloth", f"merging {adapter_dir} into 16-bit weights",
               hint="If it ran out of memory, merge on a machine with more RAM or set finetune.backend: hf.") as child:
        child.call(unsloth_merge, str(adapter_dir), str(out), dtype, max_shard_size)


def unsloth_merge(state: dict, emit: Any, adapter_dir: str, out: str, dtype: str, max_shard_size: str) -> None:
    """In the merge's child process (core/isolation.py): Unsloth's 16-bit merge of the adapter into its base."""
    import unsloth  # noqa: F401  -- before transformers, as Unsloth asks
    from unsloth import FastLanguageModel

    # load_in_4bit=False: the merge goes into the base's original 16-bit weights, never a dequantized copy.
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=adapter_dir, load_in_4bit=False,
                                                         dtype=torch_dtype(dtype))
    model.save_pretrained_merged(out, tokenizer, save_method="merged_16bit", max_shard_size=max_shard_size)


def finish_merged_dir(out: Path, adapter_dir: Path) -> None:
    """Tokenizer (the training chat template and EOS) and a generation config that stops at that EOS."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(out)
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    try:
        generation = GenerationConfig.from_pretrained(out)
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = eos_id
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["eos_token_id"] = eos_id
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def next_token_logprobs(model, token_lists: Sequence[Sequence[int]]) -> list[Any]:
    """float64 numpy log-probabilities of the next token at every position of each token list."""
    import torch

    results = []
    with torch.no_grad():
        for tokens in token_lists:
            logits = model(torch.tensor([list(tokens)], device=model.device)).logits[0].float()
            results.append(torch.log_softmax(logits.double(), dim=-1).cpu().numpy())
    return results


def load_causal_lm(path: str, dtype: str = "fp32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    return model.eval()


def verify_merge(base_model: str, adapter_dir: Path, token_lists: Sequence[Sequence[int]], merged_lp: list[Any],
                 compute_dtype: str = "fp32", trust_remote_code: bool = False) -> dict[str, Any]:
    """Next-token distributions of base and base+adapter (unmerged) against the merged model's (`merged_lp`,
    computed by the caller on the same tokens in the same dtype).

    The merge kept the adapter when the merged model is much closer to base+adapter than the base is: mean
    KL(base+adapter || merged) below half of KL(base+adapter || base). A merge that lost the adapter scores a
    ratio of 1, a merge into other weights more; what remains is the 16-bit rounding of W + BA (a ratio of
    ~0.004 for a strong adapter, ~0.25 after 5 CPU steps on the demo, where the update is near bf16's
    resolution). The largest |log p| change over the whole vocabulary is reported too, but tail tokens make it
    too noisy to decide on.
    """
    import gc

    from peft import PeftModel

    from distillery.export.gguf import compare_logprobs

    base = load_causal_lm(base_model, compute_dtype, trust_remote_code)
    base_lp = next_token_logprobs(base, token_lists)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    adapted_lp = next_token_logprobs(adapted, token_lists)
    del base, adapted
    gc.collect()
    adapter_effect = max(float(abs(a - b).max()) for a, b in zip(adapted_lp, base_lp))
    merge_error = max(float(abs(a - m).max()) for a, m in zip(adapted_lp, merged_lp))
    vs_merged = compare_logprobs(adapted_lp, merged_lp)
    vs_base = compare_logprobs(adapted_lp, base_lp)
    ratio = vs_merged["mean_kl"] / vs_base["mean_kl"] if vs_base["mean_kl"] > 0 else float("inf")
    return {
        "passed": vs_base["mean_kl"] > 0 and ratio < MAX_MERGE_KL_RATIO,
        "compute_dtype": compute_dtype,
        "merge_kl_ratio": round(ratio, 6),
        "max_merge_kl_ratio": MAX_MERGE_KL_RATIO,
        "adapter_effect_max_abs_logprob": round(adapter_effect, 6),
        "merge_error_max_abs_logprob": round(merge_error, 6),
        "merged_vs_base_plus_adapter": vs_merged,
        "base_vs_base_plus_adapter": vs_base,
    }
