"""Generative MathQA (R1 style): the model reasons inside <think>...</think>, then names an option letter.

The prompt is the one the training data uses (sources.hf.mathqa_record: the problem, then the options
as "a) ..." lines), rendered through the run's chat template; the answer is the letter found after the
reasoning. A reply whose reasoning never closes, or that names no letter, counts as "no answer".
"""

from __future__ import annotations

import re

from distillery.sources.hf import LETTERS
from distillery.evals.mathqa import Item

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Most explicit first: "answer is (c)", "Answer: c", "\boxed{c}", then a lone "(c)" / "c)", then a bare letter.
ANSWER_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)\s*(?:option\s*)?\(?\s*([a-e])\s*\)?(?![a-z0-9])", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*\(?([a-e])\)?\s*\}", re.IGNORECASE),
    re.compile(r"(?<![a-z0-9])\(([a-e])\)", re.IGNORECASE),
    re.compile(r"(?<![a-z0-9(])([a-e])\)", re.IGNORECASE),
    re.compile(r"^\s*\(?([a-e])\)?[\s.:]*$", re.IGNORECASE),
)


def user_prompt(item: Item) -> str:
    """The problem and its lettered options, worded like the training records."""
    listed = "\n".join(f"{LETTERS[i]}) {choice}" for i, choice in enumerate(item.choices))
    return f"{item.problem}\n\nOptions:\n{listed}"


def answer_region(text: str) -> str | None:
    """What follows the reasoning; None when a reasoning block was opened and never closed."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return None
    return text


def extract_letter(text: str) -> str | None:
    """The option letter the reply settles on (the last explicit one), or None."""
    region = answer_region(text)
    if region is None or not region.strip():
        return None
    for pattern in ANSWER_PATTERNS:
        matches = pattern.findall(region)
        if matches:
            return matches[-1].lower()
    return None
