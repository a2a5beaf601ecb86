"""Log-likelihoods and generation with a GGUF through llama-cpp-python (log-probabilities from llama.cpp).

The context is decoded once per item; each choice then rewinds the KV cache to the end of the context and
decodes only its own tokens, with logits kept for every position (logits_all).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from evals.scoring import Request
from exports.gguf import log_softmax


class GGUFLoadError(Exception):
    """The file is not a GGUF llama.cpp can load (reported and skipped by the stage)."""


def log_softmax_at(logits, token: int) -> float:
    """log p(token) from one row of raw logits, in float64 (export's verify uses the same log-softmax)."""
    import numpy as np

    return float(log_softmax(np.asarray(logits, dtype=np.float64))[token])


def has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


class GGUFModel:
    def __init__(self, path: Path, n_ctx: int = 2048, threads: int | None = None):
        if not has_gguf_magic(path):
            raise GGUFLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                                "re-run `distillery export --force` or remove it")
        from llama_cpp import Llama

        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_gpu_layers=-1,
                             n_threads=threads or max(1, (os.cpu_count() or 2)))
        except (ValueError, RuntimeError, OSError) as err:
            raise GGUFLoadError(f"llama.cpp cannot load {path}: {str(err).splitlines()[0]}") from None

    def encode(self, text: str) -> list[int]:
        """The model's own tokenization, with the special tokens its GGUF metadata asks for (like HF's default)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def loglikelihoods(self, requests: list[Request], batch_size: int,
                       progress: Callable[[int], None] = lambda n: None) -> list[list[float]]:
        results = []
        for request in requests:
            results.append(self._score(request))
            progress(1)
        return results

    def _score(self, request: Request) -> list[float]:
        llm = self.llm
        llm.reset()
        llm.eval(list(request.context))
        end = llm.n_tokens
        scores = []
        for cont in request.continuations:
            total = log_softmax_at(llm.scores[end - 1], cont[0])
            if len(cont) > 1:
                llm.n_tokens = end  # rewind: eval() drops the cache past n_tokens
                llm.eval(list(cont[:-1]))
                total += sum(log_softmax_at(llm.scores[end + i], cont[i + 1]) for i in range(len(cont) - 1))
            scores.append(total)
        return scores

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int,
                 progress: Callable[[int], None] = lambda n: None) -> list[str]:
        texts = []
        for prompt in prompts:
            self.llm.reset()
            out = self.llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0)
            texts.append(out["choices"][0]["text"])
            progress(1)
        return texts
