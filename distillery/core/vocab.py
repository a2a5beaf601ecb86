"""Do two models share a vocabulary? Token-level distillation (finetune objective kd or on_policy) compares the
teacher's and the student's distributions token id by token id, so their tokenizers must agree.

Compared: the ids of a probe text (Latin, Hangul, digits, code, the reasoning tags) and the id of each of the
student's special tokens in the teacher's vocabulary. Never the embedding sizes: Qwen2.5 / R1-Distill-Qwen models
of different sizes pad their embeddings to 151,936 or 152,064 rows with one tokenizer, and that is a match.
"""

from __future__ import annotations

from typing import Any, Callable

PROBE = ("Distillation keeps the teacher's distribution. 증류는 교사 모델의 분포를 배웁니다. "
         "12 + 7 = 19; def f(x):\n    return x ** 2\n<think>\nstep\n</think>\n\n\\boxed{42}")
ACROSS_TOKENIZERS = ("Teachers and students with different tokenizers can still distill through text: the teacher's "
                     "traces (distill with finetune.objective: sft), which needs no shared vocabulary.")


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """The student's special tokens (EOS, BOS, PAD and added ones) and their ids."""
    names = {getattr(tokenizer, attr, None) for attr in ("eos_token", "bos_token", "pad_token")}
    names |= set(getattr(tokenizer, "additional_special_tokens", None) or [])
    return {name: tokenizer.convert_tokens_to_ids(name) for name in sorted(n for n in names if n)}


def vocabulary_mismatch(student: Any, teacher_encode: Callable[[str], list[int]]) -> str | None:
    """Why the teacher's tokenizer is not the student's, or None. `teacher_encode(text)` tokenizes with the
    teacher's tokenizer, special tokens parsed, nothing added (no BOS)."""
    mine = student(PROBE, add_special_tokens=False)["input_ids"]
    theirs = teacher_encode(PROBE)
    if mine != theirs:
        first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        return (f"a probe text is {len(mine)} tokens for the student and {len(theirs)} for the teacher, different "
                f"from token {first} on (student {mine[first:first + 3]}, teacher {theirs[first:first + 3]})")
    for name, token_id in special_tokens(student).items():
        if teacher_encode(name) != [token_id]:
            return f"the student's special token {name!r} (id {token_id}) is {teacher_encode(name)} for the teacher"
    return None


def hf_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts every text with its BOS by itself (SmolLM2's has a BOS token it never adds)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
