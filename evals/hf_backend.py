"""Log-likelihoods and generation with a transformers model (base, base + PEFT adapter, or merged).

Scoring reuses each context: a batch of contexts runs once (right-padded, cache kept), the cache is repeated
once per choice, and only the continuation tokens run again. The numbers are those of one full forward pass
over context + continuation, which is what lm-evaluation-harness computes (per choice, five times over).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from evals.scoring import Request, batches, longest_first
from pipeline.errors import UserError

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16")


class HFModel:
    """A causal LM and its tokenizer; `adapter` wraps the base model in a PEFT adapter."""

    def __init__(self, model_path: str, dtype: str = "float32", adapter: Path | None = None,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # On a CUDA machine the model runs there; everything else (and every test here) runs on the CPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer_path = str(adapter) if adapter and (adapter / "tokenizer_config.json").is_file() else model_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), device_map=self.device,
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the model {model_path}: {str(err).splitlines()[0]}. "
                            "Check model.path (a local HF directory or a Hub id).") from None
        if adapter is not None:
            from peft import PeftModel

            if not (adapter / "adapter_config.json").is_file():
                raise UserError(f"{adapter} has no adapter_config.json: run `distillery finetune` again.")
            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()
        self.torch = torch

    def encode(self, text: str) -> list[int]:
        """The harness's tok_encode: the tokenizer's own default special tokens."""
        return self.tokenizer.encode(text)

    def loglikelihoods(self, requests: list[Request], batch_size: int,
                       progress: Callable[[int], None] = lambda n: None) -> list[list[float]]:
        """For each request, the summed log-probability of each continuation given the context."""
        results: list[list[float]] = [[] for _ in requests]
        with self.torch.inference_mode():
            for batch in batches(longest_first(requests), batch_size):
                for index, scores in zip(batch, self._score_batch([requests[i] for i in batch])):
                    results[index] = scores
                progress(len(batch))
        return results

    def _score_batch(self, requests: list[Request]) -> list[list[float]]:
        torch = self.torch
        ctx_ids, ctx_mask, ctx_lens = self._pad([r.context for r in requests])
        # 1) the contexts, once: keep the cache and the logits of each context's last token.
        last = torch.tensor(ctx_lens) - 1
        kept = torch.unique(last)  # only these positions need logits (the lm_head is a large share of the work)
        out = self.model(input_ids=ctx_ids, attention_mask=ctx_mask, use_cache=True,
                         logits_to_keep=kept.to(self.device))
        column = [kept.tolist().index(p) for p in last.tolist()]
        first_logprobs = torch.log_softmax(out.logits.float(), dim=-1)[torch.arange(len(requests)), column].cpu()
        n_choices = len(requests[0].continuations)
        conts = [c for r in requests for c in r.continuations]
        scores = [float(first_logprobs[k // n_choices, c[0]]) for k, c in enumerate(conts)]
        # 2) the rest of every continuation, on the cache repeated once per choice.
        rest = [c[:-1] for c in conts]
        if max(map(len, rest)) == 0:
            return [scores[i:i + n_choices] for i in range(0, len(scores), n_choices)]
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_choices)
        rest_ids, rest_mask, _ = self._pad(rest, min_len=1)
        lens = torch.tensor(ctx_lens, device=self.device).repeat_interleave(n_choices)
        positions = lens[:, None] + torch.arange(rest_ids.shape[1], device=self.device)[None, :]
        mask = torch.cat([ctx_mask.repeat_interleave(n_choices, dim=0), rest_mask], dim=1)
        logits = self.model(input_ids=rest_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for k, c in enumerate(conts):
            if len(c) > 1:
                targets = torch.tensor(c[1:])
                scores[k] += float(logprobs[k, torch.arange(len(c) - 1), targets].sum())
        return [scores[i:i + n_choices] for i in range(0, len(scores), n_choices)]

    def _pad(self, sequences: list[tuple[int, ...]], min_len: int = 0) -> tuple[Any, Any, list[int]]:
        """Right-padded ids, attention mask and lengths (causal attention never looks at the padding)."""
        torch = self.torch
        lens = [len(s) for s in sequences]
        width = max(max(lens), min_len)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        return ids.to(self.device), mask.to(self.device), lens

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int,
                 progress: Callable[[int], None] = lambda n: None) -> list[str]:
        """Greedy completions of chat-formatted prompts (left-padded batches)."""
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        texts: list[str] = []
        with self.torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
                texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                progress(len(chunk))
        return texts
