"""Generative MathQA (R1 style): the model reasons inside <think>...</think>, then names an option letter.

The prompt is the one the training data uses (sources.hf.mathqa_record: the problem, then the options
as "a) ..." lines), rendered through the run's chat template; the answer is the option the reply states after
its reasoning, by the rule distill's math_mc verifier reads a teacher's answer with. A reply whose reasoning never
closes, or that names no option, counts as "no answer".
"""

from __future__ import annotations

from distillery.reasoning.verifiers import extract_option
from distillery.sources.hf import LETTERS
from distillery.evals.mathqa import Item


def user_prompt(item: Item) -> str:
    """The problem and its lettered options, worded like the training records."""
    listed = "\n".join(f"{LETTERS[i]}) {choice}" for i, choice in enumerate(item.choices))
    return f"{item.problem}\n\nOptions:\n{listed}"


def extract_letter(text: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The option letter the reply settles on after its reasoning, read as distill's math_mc verifier reads a
    teacher's answer (verifiers.extract_option: the option stated last), or None (also for reasoning that never
    closes)."""
    index = extract_option(text, list(choices))
    return LETTERS[index] if index is not None else None
