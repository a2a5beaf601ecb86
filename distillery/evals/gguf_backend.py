"""Log-likelihoods and generation with a GGUF through llama-cpp-python (log-probabilities from llama.cpp).

The model lives in a child process (export/llama_child.py): a native crash of llama.cpp is a NativeCrash
naming the file, not the death of the evaluation. The context is decoded once per item; each choice then
rewinds the KV cache to the end of the context and decodes only its own tokens, with logits kept for every
position (logits_all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distillery.evals.scoring import Request
from distillery.export.verify import log_softmax
from distillery.export.llama_child import GGUFLoadError, LlamaChild

__all__ = ["GGUFLoadError", "GGUFModel", "log_softmax_at"]


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
        self.llama = LlamaChild(path, "scoring", n_ctx=n_ctx, logits_all=True, threads=threads)

    def encode(self, text: str) -> list[int]:
        """The model's own tokenization, with the special tokens its GGUF metadata asks for (like HF's default)."""
        return self.llama.tokenize([text], add_bos=True, special=False)[0]

    def loglikelihoods(self, requests: list[Request], batch_size: int,
                       progress: Callable[[int], None] = lambda n: None) -> list[list[float]]:
        return self.llama.call(_score_requests, requests, on_event=progress)

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int,
                 progress: Callable[[int], None] = lambda n: None) -> list[str]:
        return self.llama.call(_generate, prompts, max_new_tokens, on_event=progress)

    def completion_logprobs(self, token_lists: list[list[int]], starts: list[int], batch_size: int,
                            progress: Callable[[int], None] = lambda n: None) -> list[float]:
        """For each token list, the summed log-probability of its tokens from `start` on (one pass each)."""
        return self.llama.call(_completion_logprobs, token_lists, starts, on_event=progress)

    def generate_ids(self, id_lists: list[list[int]], max_new_tokens: int, batch_size: int, eos_id: int,
                     samples: int = 1, temperature: float = 0.0,
                     progress: Callable[[int], None] = lambda n: None) -> list[list[str]]:
        """`samples` completions of each token list (greedy when temperature is 0), stopping at `eos_id`."""
        return self.llama.call(_generate_ids, id_lists, max_new_tokens, eos_id, samples, temperature, on_event=progress)

    def close(self) -> None:
        self.llama.close()


def _score_requests(state: dict[str, Any], emit: Callable[[int], None], requests: list[Request]) -> list[list[float]]:
    """In the child: each request's continuation log-likelihoods; emits 1 per request done."""
    results = []
    for request in requests:
        results.append(_score(state["llm"], request))
        emit(1)
    return results


def _score(llm: Any, request: Request) -> list[float]:
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


def _generate(state: dict[str, Any], emit: Callable[[int], None], prompts: list[str], max_new_tokens: int) -> list[str]:
    """In the child: a greedy completion of each prompt; emits 1 per prompt done."""
    llm, texts = state["llm"], []
    for prompt in prompts:
        llm.reset()
        out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0)
        texts.append(out["choices"][0]["text"])
        emit(1)
    return texts


def _generate_ids(state: dict[str, Any], emit: Callable[[int], None], id_lists: list[list[int]], max_new_tokens: int,
                  eos_id: int, samples: int, temperature: float) -> list[list[str]]:
    """In the child: each token list continued `samples` times (seeded), up to the EOS; emits 1 per list done."""
    llm, texts = state["llm"], []
    for ids in id_lists:
        replies = []
        for sample in range(samples):
            llm.reset()
            llm.set_seed(1234 + sample)
            llm.eval(list(ids))
            out: list[int] = []
            for _ in range(max_new_tokens):
                token = int(llm.sample(temp=temperature))  # 0: greedy
                if token == eos_id:
                    break
                out.append(token)
                llm.eval([token])
            replies.append(llm.detokenize(out).decode("utf-8", errors="replace"))
        texts.append(replies)
        emit(1)
    return texts


def _completion_logprobs(state: dict[str, Any], emit: Callable[[int], None], token_lists: list[list[int]],
                         starts: list[int]) -> list[float]:
    """In the child: each list evaluated once; the log-softmax taken only on the rows that predict a scored token."""
    import numpy as np

    llm, results = state["llm"], []
    for tokens, start in zip(token_lists, starts):
        llm.reset()
        llm.eval(list(tokens))
        rows = np.asarray(llm.scores[start - 1:len(tokens) - 1], dtype=np.float64)
        logprobs = log_softmax(rows)[np.arange(len(tokens) - start), np.asarray(tokens[start:])]
        results.append(float(logprobs.sum()))
        emit(1)
    return results

