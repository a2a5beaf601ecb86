"""Verification of an export: each GGUF against the merged 16-bit model, in memory that does not grow with it.

- `probe_tokens`: each fixed prompt through the training chat template as the HF tokenizer's ids, then a greedy
  continuation written by the 16-bit GGUF (llama.cpp is fast at any size; which tokens the probe holds matters
  less than that every file is scored on the same ones);
- `reference_logprobs`: the merged model's next-token log-probabilities at every position of every probe, run
  layer by layer: one decoder layer's weights are read from the safetensors at a time (fp32), the embedding
  row by row and the lm_head in vocabulary blocks, so memory is one layer plus the activations, whatever the
  model's size. Architectures without the usual decoder layout (`model.embed_tokens`, `model.layers`,
  `model.norm`, `lm_head`) are run whole;
- `verify_gguf`: the file loads in llama.cpp, carries the training chat template and EOS, tokenizes the prompts
  as the HF tokenizer does, and its next-token distributions match the reference (`compare_logprobs`).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Sequence


VOCAB_BLOCK = 8192  # lm_head rows per matrix product


def probe_tokens(merged_dir: Path, prompts: list[str], new_tokens: int, gguf: Path, threads: int = 0) -> dict[str, Any]:
    """{texts, prompt_ids (the HF tokenizer's ids of each text), token_lists (prompt + the GGUF's greedy answer)}."""
    from transformers import AutoTokenizer

    from distillery.export.llama_child import LlamaChild

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    texts, prompt_ids = rendered_prompts(tokenizer, prompts)
    token_lists = [list(ids) for ids in prompt_ids]
    if new_tokens:
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        n_ctx = max(256, max(len(ids) for ids in prompt_ids) + new_tokens + 8)
        with LlamaChild(gguf, "writing the verification probes with", n_ctx=n_ctx, threads=threads or None) as llama:
            token_lists = [ids + llama.call(greedy_ids, ids, new_tokens, eos) for ids in prompt_ids]
    return {"texts": texts, "prompt_ids": prompt_ids, "token_lists": token_lists}


def rendered_prompts(tokenizer: Any, prompts: list[str]) -> tuple[list[str], list[list[int]]]:
    """Each prompt as one user turn through the training chat template: the texts and their HF token ids (the
    template emits any BOS itself)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return texts, [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def greedy_ids(state: dict[str, Any], emit: Any, ids: list[int], tokens: int, eos: int) -> list[int]:
    """In the llama.cpp child: up to `tokens` greedy tokens after `ids`, ending at (and including) `eos`."""
    llm = state["llm"]
    llm.reset()
    llm.eval(list(ids))
    out: list[int] = []
    for _ in range(tokens):
        token = int(llm.sample(temp=0.0))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


# ---- the merged model, layer by layer -----------------------------------------------------------------------


class Weights:
    """The tensors of a safetensors model directory by name, read on demand (memory-mapped files)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(path), framework="pt") for path in sorted(directory.glob("*.safetensors"))]
        self.where = {name: handle for handle in self.handles for name in handle.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> Any:
        return self.where[name].get_tensor(name).float()

    def rows(self, name: str, start: int, stop: int) -> Any:
        return self.where[name].get_slice(name)[start:stop].float()

    def shape(self, name: str) -> list[int]:
        return self.where[name].get_slice(name).get_shape()


def load_module(module: Any, weights: Weights, prefix: str) -> None:
    """Give a module built on the meta device its weights (fp32, on the CPU) from `prefix`."""
    import torch

    module.to_empty(device="cpu")
    state = {name: weights.get(prefix + name) for name, _ in module.named_parameters()}
    module.load_state_dict(state, strict=True, assign=True)
    module.to(torch.float32)


def layered(model: Any) -> bool:
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")) and hasattr(model, "lm_head")


def reference_logprobs(model_dir: Path, token_lists: Sequence[Sequence[int]]) -> list[Any]:
    """float32 numpy log-probabilities of the next token at every position of each token list, from the model
    in `model_dir` run one decoder layer at a time (fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = Weights(model_dir)
    if not layered(model) or "model.embed_tokens.weight" not in weights:
        return whole_model_logprobs(model_dir, token_lists)
    inner = model.model
    with torch.no_grad():
        hidden = [torch.cat([weights.rows("model.embed_tokens.weight", t, t + 1) for t in tokens]).unsqueeze(0)
                  for tokens in token_lists]
        rotary = type(inner.rotary_emb)(config=config)  # built on the CPU: its frequencies are computed, not stored
        positions = [torch.arange(len(tokens)).unsqueeze(0) for tokens in token_lists]
        cos_sin = [rotary(h, p) for h, p in zip(hidden, positions)]
        for index, layer in enumerate(inner.layers):
            load_module(layer, weights, f"model.layers.{index}.")
            hidden = [layer(h, attention_mask=None, position_ids=p, position_embeddings=cs)
                      for h, p, cs in zip(hidden, positions, cos_sin)]
            hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
            layer.to("meta")  # its weights go (freed by reference count: a gc.collect() here cost 0.24 s a layer)
        load_module(inner.norm, weights, "model.norm.")
        hidden = [inner.norm(h)[0] for h in hidden]
        head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"  # tied embeddings
        vocab = weights.shape(head)[0]
        logits = [torch.empty(h.shape[0], vocab) for h in hidden]
        for start in range(0, vocab, VOCAB_BLOCK):
            block = weights.rows(head, start, min(start + VOCAB_BLOCK, vocab))
            for out, h in zip(logits, hidden):
                out[:, start:start + block.shape[0]] = h @ block.T
        return [torch.log_softmax(x.double(), dim=-1).float().numpy() for x in logits]


def whole_model_logprobs(model_dir: Path, token_lists: Sequence[Sequence[int]]) -> list[Any]:
    """The same from the whole model in memory (fp32), for architectures the layered path does not know."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for tokens in token_lists:
            logits = model(torch.tensor([list(tokens)])).logits[0]
            results.append(torch.log_softmax(logits.double(), dim=-1).float().numpy())
    del model
    gc.collect()
    return results


# ---- each GGUF ----------------------------------------------------------------------------------------------


def verify_gguf(path: Path, template: str, eos: str, eos_id: int, probe: dict[str, Any], max_kl: float,
                min_top1: float | None, threads: int) -> dict[str, Any]:
    """Load one GGUF and check its metadata, its tokenizer and its next-token distributions."""
    from distillery.export.llama_child import LlamaChild

    n_ctx = max(len(t) for t in probe["token_lists"]) + 8
    with LlamaChild(path, "verifying", n_ctx=max(n_ctx, 256), logits_all=True, threads=threads or None) as llama:
        meta = llama.metadata
        tokenizer_match = llama.tokenize(probe["texts"], add_bos=False, special=True) == probe["prompt_ids"]
        stats = compare_logprobs(probe["reference"], gguf_logprobs(llama, probe["token_lists"]))
    checks = {
        "loads": True,
        "chat_template": meta["chat_template"] == template,
        "eos": meta["eos_token_id"] == eos_id and meta["eos_token"] == eos,
        "tokenizer": tokenizer_match,
        "kl": stats["mean_kl"] <= max_kl,
    }
    if min_top1 is not None:
        checks["top1"] = stats["top1_agreement"] >= min_top1
    return {"file": path.name, "bytes": path.stat().st_size, **stats, "max_kl_bound": max_kl,
            "min_top1_bound": min_top1, "eos_token": meta["eos_token"], "checks": checks,
            "passed": all(checks.values())}


# ---- log-probabilities and their comparison -----------------------------------------------------------------


def gguf_logprobs(llama: Any, token_lists: Sequence[Sequence[int]]) -> list[Any]:
    """float32 log-probabilities of the next token at every position of each token list (teacher forcing), from
    a LlamaChild loaded with logits_all."""
    import numpy as np

    return [log_softmax(np.asarray(logits, dtype=np.float64)).astype(np.float32)
            for logits in llama.call(_logits, token_lists)]


def _logits(state: dict[str, Any], emit: Any, token_lists: Sequence[Sequence[int]]) -> list[Any]:
    """In the child: the raw logits (float32) at every position of each token list, each from a fresh cache."""
    import numpy as np

    llm, results = state["llm"], []
    for tokens in token_lists:
        llm.reset()
        llm.eval(list(tokens))
        results.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    return results


def log_softmax(logits):
    import numpy as np

    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logprobs(reference: Sequence[Any], candidate: Sequence[Any]) -> dict[str, float]:
    """Top-1 agreement and KL(reference || candidate) in nats over all positions of all prompts (one prompt's
    arrays at a time, in float64)."""
    import numpy as np

    positions = agree = 0
    kl_sum, kl_max = 0.0, 0.0
    for ref, cand in zip(reference, candidate):
        ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
        kl = (np.exp(ref) * (ref - cand)).sum(axis=-1)
        positions += ref.shape[0]
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
    return {
        "positions": positions,
        "top1_agreement": round(agree / positions, 4),
        "mean_kl": float(f"{kl_sum / positions:.6g}"),
        "max_kl": float(f"{kl_max:.6g}"),
    }
