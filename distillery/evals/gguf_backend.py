"""Log-likelihoods and generation with a GGUF through llama-cpp-python (log-probabilities from llama.cpp).

The model lives in a child process (export/llama_child.py): a native crash of llama.cpp is a NativeCrash
naming the file, not the death of the evaluation. `decode` asks llama.cpp for logits only on the rows that predict
a scored token (the output layer over the whole vocabulary is a fifth of a small model's work per row) and keeps
the KV cache of the tokens a sequence shares with the one before it: a MathQA context is decoded once for all its
choices, and held-out sequences, taken in sorted order, share their template's system prompt and instruction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distillery.evals.scoring import Request
from distillery.export.verify import log_softmax
from distillery.export.llama_child import GGUFLoadError, LlamaChild

__all__ = ["GGUFLoadError", "GGUFModel", "decode", "log_softmax_rows"]


def has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


class GGUFModel:
    def __init__(self, path: Path, n_ctx: int = 2048, threads: int | None = None):
        if not has_gguf_magic(path):
            raise GGUFLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                                "re-run `distillery export --force` or remove it")
        self.llama = LlamaChild(path, "scoring", n_ctx=n_ctx, threads=threads)

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
        return self.score_and_generate(token_lists, starts, [], 0, batch_size, -1, progress=progress)[0]

    def score_and_generate(self, token_lists: list[list[int]], starts: list[int], answer: list[int],
                           max_new_tokens: int, batch_size: int, eos_id: int, samples: int = 1,
                           temperature: float = 0.0, progress: Callable[[int], None] = lambda n: None,
                           ) -> tuple[list[float], dict[int, list[str]]]:
        """completion_logprobs, and for the lists in `answer` (indices) `samples` continuations of their prompt
        (the tokens before `start`), each generated right after its list is scored, from the prompt already in
        llama.cpp's KV cache."""
        return self.llama.call(_score_and_generate, token_lists, starts, set(answer), max_new_tokens, eos_id,
                               samples, temperature, on_event=progress)

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
    """The context decoded once (its last row kept, as log-probabilities); each continuation decoded after it."""
    context, first = list(request.context), []
    decode(llm, context, 0, len(context) - 1, lambda position, rows: first.append(log_softmax(rows[-1].astype("float64"))))
    end, scores = len(context), []
    for cont in request.continuations:
        picked = [float(first[0][cont[0]])]
        decode(llm, list(cont[:-1]), end, end,
               lambda position, rows, cont=cont: picked.extend(log_softmax_rows(rows, cont[position - end + 1:][:len(rows)])))
        scores.append(sum(picked))
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
        decode(llm, list(ids[:-1]), 0, len(ids), lambda position, rows: None)  # no logits: continue_prompt reads them
        texts.append([continue_prompt(llm, list(ids), max_new_tokens, eos_id, temperature, 1234 + sample)
                      for sample in range(samples)])
        emit(1)
    return texts


def _score_and_generate(state: dict[str, Any], emit: Callable[[int], None], token_lists: list[list[int]],
                        starts: list[int], answer: set[int], max_new_tokens: int, eos_id: int, samples: int,
                        temperature: float) -> tuple[list[float], dict[int, list[str]]]:
    """In the child: each list's tokens from `start` on scored given all before them; lists taken in sorted order
    so that each decodes only what it does not share with the one before. A list in `answer` then has its prompt
    continued `samples` times (seeded) up to the EOS. Emits 1 per list scored and 1 per list answered."""
    import numpy as np

    from distillery.training.tokens import common_prefix

    llm, results, replies, cached = state["llm"], [0.0] * len(token_lists), {}, []
    for index in sorted(range(len(token_lists)), key=lambda i: token_lists[i]):
        tokens, start = token_lists[index], max(1, starts[index])
        keep = min(common_prefix(cached, tokens), start - 1)  # the row before `start` is always decoded
        picked: list[float] = []
        decode(llm, tokens[keep:-1], keep, start - 1,
               lambda position, rows: picked.extend(log_softmax_rows(rows, tokens[position + 1:position + 1 + len(rows)])))
        results[index] = float(np.sum(picked, dtype=np.float64))
        cached = tokens[:-1]
        emit(1)
        if index in answer:
            replies[index] = [continue_prompt(llm, tokens[:start], max_new_tokens, eos_id, temperature, 1234 + sample)
                              for sample in range(samples)]
            cached = llm.input_ids[:llm.n_tokens].tolist()
            emit(1)
    return results, replies


def continue_prompt(llm: Any, prompt: list[int], max_new_tokens: int, eos_id: int, temperature: float,
                    seed: int) -> str:
    """Up to `max_new_tokens` tokens after `prompt`, whose first len - 1 tokens are in the KV cache: its last token
    is decoded again for the first token's logits. Greedy when temperature is 0; stops at `eos_id`."""
    llm.set_seed(seed)
    decode(llm, prompt[-1:], len(prompt) - 1, len(prompt) - 1, lambda position, rows: None)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(llm.sample(temp=temperature))  # 0: greedy
        if token == eos_id:
            break
        out.append(token)
        decode(llm, [token], llm.n_tokens, llm.n_tokens, lambda position, rows: None)
    return llm.detokenize(out).decode("utf-8", errors="replace")


def decode(llm: Any, tokens: list[int], keep: int, logits_from: int, on_rows: Callable[[int, Any], None]) -> None:
    """Decode `tokens` after the first `keep` cached positions (the cache past them is dropped), asking llama.cpp
    for logits only at positions >= logits_from; on_rows(first position, rows) gets them chunk by chunk (the
    array is llama.cpp's own buffer: read it before the next decode). Uses llama-cpp-python's batch directly, as
    its `eval` does (pinned version), because `eval` can ask only for every row or for the last."""
    import numpy as np

    llm._ctx.kv_cache_seq_rm(-1, keep, -1)
    at, batch = keep, llm._batch
    for offset in range(0, len(tokens), llm.n_batch):
        chunk = tokens[offset:offset + llm.n_batch]
        fields = batch.batch
        fields.n_tokens = len(chunk)
        for j, token in enumerate(chunk):
            fields.token[j], fields.pos[j], fields.n_seq_id[j] = token, at + j, 1
            fields.seq_id[j][0] = 0
            fields.logits[j] = at + j >= logits_from
        llm._ctx.decode(batch)
        llm.input_ids[at:at + len(chunk)] = chunk
        outputs = at + len(chunk) - max(at, logits_from)
        if outputs > 0:
            on_rows(max(at, logits_from), np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(outputs, llm.n_vocab())))
        at += len(chunk)
    llm.n_tokens = at


def log_softmax_rows(rows: Any, targets: list[int], block: int = 64) -> list[float]:
    """log p(target) of each row of raw logits, in float64 a block of rows at a time (export's verify uses the
    same log-softmax; a block bounds the float64 copy at a 150k vocabulary)."""
    import numpy as np

    out: list[float] = []
    for at in range(0, len(targets), block):
        logprobs = log_softmax(np.asarray(rows[at:at + block], dtype=np.float64))
        out += logprobs[np.arange(len(logprobs)), targets[at:at + block]].tolist()
    return out
