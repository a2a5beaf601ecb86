"""distill.logprobs: the teacher's top-k log-probs on every token of a kept trace, for finetune `objective: kd`.

The teacher reads each kept trace teacher-forced: the question through the shared tokenizer's chat template with
its generation prompt, then the trace exactly as training will see it (reasoning, final answer, EOS). The token
ids are the shared tokenizer's (the student's: `model.path`), so they are the ids format trains on; format then
finds them inside each training example (stages/format.py) and finetune reads them there.

- hf:     one forward pass of the teacher over the ids (top-k of its log-softmax at each scored position);
- gguf:   llama.cpp in the teacher's child process, logits only on the scored rows (evals/gguf_backend.decode);
- openai: the server's legacy completions endpoint with the ids as the prompt, `echo` and `logprobs: k` (vLLM's
          `return_tokens_as_token_ids` asked for); the tokens it echoes must map back to the ids sent (the round
          trip), else the trace keeps no log-probs and says why.
A teacher whose tokenizer is not the student's is refused before any work (core/vocab.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from distillery.core.errors import UserError
from distillery.core.topk import TopK, top_k_of
from distillery.core.vocab import ACROSS_TOKENIZERS, vocabulary_mismatch
from distillery.training.tokens import split_tokens

THINK_OPEN = "<think>"


@dataclass(frozen=True)
class Unscored:
    """A trace the teacher gave no usable log-probs for: it trains on cross-entropy only."""

    reason: str


def scored_sequence(tokenizer: Any, messages: list[dict[str, str]], content: str) -> tuple[list[int], int]:
    """(token ids of the question's prompt + the trace + EOS, index of the first trace token).

    A generation prompt that already opens the reasoning block (newer R1 templates end in `<think>\\n`) is not
    repeated: the trace's own `<think>` is then part of the prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("distill.logprobs: the student's tokenizer (model.path) has no chat template to put the "
                        "question in; use a chat model, or switch distill.logprobs off.")
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if prompt.rstrip().endswith(THINK_OPEN) and content.startswith(THINK_OPEN):
        content = content[len(THINK_OPEN):].lstrip("\n") if prompt.endswith("\n") else content[len(THINK_OPEN):]
    ids, start = split_tokens(tokenizer, prompt, content + (tokenizer.eos_token or ""))
    return ids, max(start, 1)


def top_k_rows(log_probs: np.ndarray, tokens: list[int], k: int) -> TopK:
    ids, values = top_k_of(log_probs, k)
    return TopK.of(tokens, ids, values)


def check_teacher_vocabulary(student_tokenizer: Any, teacher_encode: Any, teacher_name: str) -> None:
    why = vocabulary_mismatch(student_tokenizer, teacher_encode)
    if why:
        raise UserError(f"the teacher {teacher_name} does not share the student's tokenizer ({why}), so its "
                        f"log-probs cannot be compared token by token (distill.logprobs, finetune.objective kd or "
                        f"on_policy). {ACROSS_TOKENIZERS}")


class Scorer:
    """Scores kept traces with the teacher; one per distill run."""

    def __init__(self, teacher: Any, tokenizer: Any, k: int):
        self.teacher, self.tokenizer, self.k = teacher, tokenizer, k
        encode = teacher.encoder(tokenizer)
        if encode is None:  # a server: every scored trace's echoed ids are checked against the ids sent
            teacher.token_id = token_id_mapper(tokenizer)
        else:
            check_teacher_vocabulary(tokenizer, encode, teacher.name)

    def score(self, messages: list[dict[str, str]], content: str) -> TopK | Unscored:
        ids, start = scored_sequence(self.tokenizer, messages, content)
        if start >= len(ids):
            return Unscored("no trace tokens to score")
        return self.teacher.top_logprobs(ids, start, self.k)


def openai_top_k(logprobs: Any, ids: list[int], start: int, k: int, token_id: Any) -> TopK | Unscored:
    """The echoed prompt log-probs of a completions reply as a TopK over ids[start:], after the round trip: each
    echoed token must be the id that was sent. `token_id(text)` maps a returned token to an id (or None). A reply
    of another shape, or log-probs that are not finite numbers <= 0, scores nothing: the server is untrusted."""
    try:
        return _openai_top_k(logprobs, ids, start, k, token_id)
    except (AttributeError, TypeError, ValueError, OverflowError) as err:  # OverflowError: a 400-digit log-prob
        return Unscored(f"malformed echoed log-probs ({type(err).__name__})")


# A server's rounding may lift the top-k probabilities a little past 1; more is no distribution.
MAX_TOP_K_MASS = 1.01


def _openai_top_k(logprobs: dict, ids: list[int], start: int, k: int, token_id: Any) -> TopK | Unscored:
    tokens, tops = logprobs.get("tokens") or [], logprobs.get("top_logprobs") or []
    if len(tokens) < len(ids) or len(tops) < len(ids):
        return Unscored(f"the server echoed {len(tokens)} tokens for a prompt of {len(ids)}")
    echoed = [token_id(t) for t in tokens[:len(ids)]]
    if echoed != ids:
        first = next(i for i, (a, b) in enumerate(zip(echoed, ids)) if a != b)
        return Unscored(f"round trip: echoed token {first} is {tokens[first]!r} -> {echoed[first]}, sent {ids[first]}")
    rows_ids, rows_values = [], []
    for position in range(start, len(ids)):
        pairs = [(token_id(t), v) for t, v in (tops[position] or {}).items()]
        pairs = sorted(((i, v) for i, v in pairs if i is not None), key=lambda p: -p[1])[:k]
        if len(pairs) < k:
            return Unscored(f"the server gave {len(pairs)} of {k} top log-probs at token {position}")
        if len({i for i, _ in pairs}) < k:  # "token_id:7" and "token_id:07", or two pieces of one token
            return Unscored(f"the server gave one token twice among the top log-probs at token {position}")
        rows_ids.append([i for i, _ in pairs])
        rows_values.append([float(v) for _, v in pairs])
    values = np.array(rows_values, dtype=np.float64)
    if not (np.isfinite(values).all() and (values <= 1e-3).all()):
        return Unscored("log-probs that are not finite numbers <= 0")
    mass = np.exp(values).sum(axis=1)
    if (mass > MAX_TOP_K_MASS).any():  # a distribution that is none: the KL against it can go below zero
        return Unscored(f"top log-probs whose probabilities add up to {mass.max():.3g} at token "
                        f"{start + int(mass.argmax())} (more than 1)")
    return TopK.of(ids[start:], np.array(rows_ids), values)


def token_id_mapper(tokenizer: Any) -> Any:
    """Returned token -> id: vLLM's `token_id:<n>`, else the tokenizer's own piece, else a unique decoded text."""
    import threading

    vocab = tokenizer.get_vocab()
    decoded: dict[str, int | None] = {}
    building = threading.Lock()  # distill's worker threads score traces at once: none may read a half-built table

    def by_text(text: str) -> int | None:
        with building:
            if not decoded:
                table: dict[str, int | None] = {}
                for token_id in range(len(tokenizer)):
                    piece = tokenizer.decode([token_id])
                    table[piece] = None if piece in table else token_id  # ambiguous texts map to nothing
                decoded.update(table)
        return decoded.get(text)

    def token_id(text: str) -> int | None:
        if text.startswith("token_id:") and text[9:].isdigit():
            number = int(text[9:])
            return number if number < len(tokenizer) else None  # an id the student has no row for
        return vocab[text] if text in vocab else by_text(text)

    return token_id
