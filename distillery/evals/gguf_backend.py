"""Log-likelihoods and generation with a GGUF through llama-cpp-python (log-probabilities from llama.cpp).

The model lives in a child process (export/llama_child.py): a native crash of llama.cpp is a NativeCrash
naming the file, not the death of the evaluation. `decode` asks llama.cpp for logits only on the rows that predict
a scored token (the output layer over the whole vocabulary is a fifth of a small model's work per row) and keeps
the KV cache of the tokens a sequence shares with the one before it: a MathQA context is decoded once for all its
choices, and held-out sequences, taken in sorted order, share their template's system prompt and instruction.
Answers to held-out prompts are generated side by side (gguf_answers.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distillery.evals.gguf_answers import Answers, submit
from distillery.evals.scoring import Request
from distillery.export.verify import log_softmax
from distillery.export.llama_child import (GGUFContextError, GGUFDecodeError, GGUFLoadError, LlamaChild, decode_failure,
                                           has_gguf_magic)
from distillery.training.tokens import common_prefix

__all__ = ["GGUFContextError", "GGUFDecodeError", "GGUFLoadError", "GGUFModel", "decode", "log_softmax_rows"]


ANSWERS_AT_ONCE = 8  # sequences generated side by side (Answers); more samples of an item take turns


class GGUFModel:
    """`n_ctx` cells: half for the list being scored, half for the answers generated side by side."""

    def __init__(self, path: Path, n_ctx: int = 2048, threads: int | None = None, answers_at_once: int = ANSWERS_AT_ONCE):
        if not has_gguf_magic(path):
            raise GGUFLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                                "re-run `distillery export --force` or remove it")
        self.llama = LlamaChild(path, "scoring", n_ctx=n_ctx, threads=threads, sequences=1 + answers_at_once)

    def check_vocabulary(self, highest_id: int) -> None:
        """GGUFDecodeError when token ids up to `highest_id` (the training tokenizer's) are outside this GGUF's
        vocabulary: it was not exported from the model the run trained."""
        n_vocab = self.llama.metadata["n_vocab"]
        if highest_id >= n_vocab:
            raise GGUFDecodeError(f"{self.llama.path.name} has a vocabulary of {n_vocab} tokens, but the training "
                                  f"tokenizer's ids reach {highest_id}: it is not a GGUF of this run's model "
                                  "(re-run `distillery export --force`)")

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
                           temperature: float = 0.0, top_p: float = 1.0,
                           progress: Callable[[int], None] = lambda n: None) -> tuple[list[float], dict[int, list[str]]]:
        """completion_logprobs, and for the lists in `answer` (indices) `samples` continuations of their prompt
        (the tokens before `start`), from the prompt the scoring left in llama.cpp's KV cache."""
        return self.llama.call(_score_and_generate, token_lists, starts, set(answer), max_new_tokens, eos_id,
                               samples, temperature, top_p, on_event=progress)

    def generate_ids(self, id_lists: list[list[int]], max_new_tokens: int, batch_size: int, eos_id: int,
                     samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                     progress: Callable[[int], None] = lambda n: None) -> list[list[str]]:
        """`samples` completions of each token list (greedy when temperature is 0, else `pick`), stopping at
        `eos_id`."""
        return self.llama.call(_generate_ids, id_lists, max_new_tokens, eos_id, samples, temperature, top_p,
                               on_event=progress)

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
        # the prompt as the template wrote it (any BOS is in its text), as the HF side tokenizes it: no second BOS
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0)
        texts.append(out["choices"][0]["text"])
        emit(1)
    return texts


def _generate_ids(state: dict[str, Any], emit: Callable[[int], None], id_lists: list[list[int]], max_new_tokens: int,
                  eos_id: int, samples: int, temperature: float, top_p: float) -> list[list[str]]:
    """In the child: each token list continued `samples` times (seeded) up to the EOS, side by side (`Answers`);
    the lists are decoded in sorted order, each reading the prefix it shares with the one before. Emits 1 per list
    answered."""
    llm, cached = state["llm"], []
    answers = Answers(llm, max_new_tokens, eos_id, temperature, top_p, emit)
    for index in sorted(range(len(id_lists)), key=lambda i: id_lists[i]):
        ids, last = id_lists[index], []
        keep = min(common_prefix(cached, ids), len(ids) - 1)  # the last token is decoded again for its logits
        decode(llm, ids[keep:], keep, len(ids) - 1, lambda position, rows: last.append(rows[-1].copy()))
        cached = [] if answers.add(index, len(ids), last[-1], samples) else list(ids)
    replies = answers.finish()
    return [[text(llm, tokens) for tokens in replies[i]] for i in range(len(id_lists))]


def _score_and_generate(state: dict[str, Any], emit: Callable[[int], None], token_lists: list[list[int]],
                        starts: list[int], answer: set[int], max_new_tokens: int, eos_id: int, samples: int,
                        temperature: float, top_p: float) -> tuple[list[float], dict[int, list[str]]]:
    """In the child: each list's tokens from `start` on scored given all before them; lists taken in sorted order
    so that each decodes only what it does not share with the one before. A list in `answer` has its prompt (the
    tokens before `start`) continued `samples` times (seeded) up to the EOS, side by side with the others'
    (`Answers`). Emits 1 per list scored and 1 per list answered."""
    import numpy as np

    llm, results, cached = state["llm"], [0.0] * len(token_lists), []
    answers = Answers(llm, max_new_tokens, eos_id, temperature, top_p, emit)
    for index in sorted(range(len(token_lists)), key=lambda i: token_lists[i]):
        tokens, start = token_lists[index], max(1, starts[index])
        keep = min(common_prefix(cached, tokens), start - 1)  # the row before `start` is always decoded
        picked: list[float] = []
        first: list[Any] = []  # the logits after the prompt: an answer's first token

        def read(position: int, rows: Any) -> None:
            if position == start - 1:
                first.append(rows[0].copy())
            picked.extend(log_softmax_rows(rows, tokens[position + 1:position + 1 + len(rows)]))

        decode(llm, tokens[keep:-1], keep, start - 1, read)
        results[index] = float(np.sum(picked, dtype=np.float64))
        cached = tokens[:-1]
        emit(1)
        if index in answer:
            llm._ctx.kv_cache_seq_rm(0, start, -1)  # the prompt's cells only
            cached = [] if answers.add(index, start, first[0], samples) else tokens[:start]
    return results, {key: [text(llm, tokens) for tokens in replies] for key, replies in answers.finish().items()}


def text(llm: Any, tokens: list[int]) -> str:
    return llm.detokenize(tokens).decode("utf-8", errors="replace")


def decode(llm: Any, tokens: list[int], keep: int, logits_from: int, on_rows: Callable[[int, Any], None]) -> None:
    """Decode `tokens` as sequence 0 after its first `keep` cached positions (its cache past them is dropped),
    asking llama.cpp for logits only at positions >= logits_from; on_rows(first position, rows) gets them chunk by
    chunk (the array is llama.cpp's own buffer: read it before the next decode)."""
    import numpy as np

    if keep + len(tokens) > len(llm.input_ids):  # past the context asked for (llama.cpp's own is rounded up)
        raise decode_failure(1, llm, len(tokens), keep)
    llm._ctx.kv_cache_seq_rm(0, keep, -1)
    at = keep
    for offset in range(0, len(tokens), llm.n_batch):
        chunk = tokens[offset:offset + llm.n_batch]
        submit(llm, [(token, at + j, 0, at + j >= logits_from) for j, token in enumerate(chunk)])
        llm.input_ids[at:at + len(chunk)] = chunk
        outputs = at + len(chunk) - max(at, logits_from)
        if outputs > 0:
            on_rows(max(at, logits_from), np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(outputs, llm.n_vocab())))
        at += len(chunk)
    llm.n_tokens = at


def log_softmax_rows(rows: Any, targets: list[int], block: int = 64) -> list[float]:
    """log p(target) of each row of raw logits: the target's logit less the row's log-sum-exp, both from the row's
    maximum, the exponentials in float32 (llama.cpp's logits are float32) summed in float64: within 1e-7 of a
    float64 log-softmax and 3x faster (that took a tenth of the demo's held-out scoring of a GGUF). A block of rows
    at a time bounds the temporary."""
    import numpy as np

    out: list[float] = []
    for at in range(0, len(targets), block):
        logits = np.asarray(rows[at:at + block], dtype=np.float32)
        picked = targets[at:at + block]
        top = logits.max(axis=-1, keepdims=True)
        total = np.exp(logits - top).sum(axis=-1, dtype=np.float64)
        target = logits[np.arange(len(picked)), picked].astype(np.float64) - top[:, 0].astype(np.float64)
        out += (target - np.log(total)).tolist()
    return out
