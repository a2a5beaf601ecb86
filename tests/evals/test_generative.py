"""Generative MathQA: the option letter after the reasoning, or no answer."""

from __future__ import annotations

import pytest

from distillery.evals.generative import extract_letter, user_prompt
from distillery.evals.mathqa import Item


@pytest.mark.parametrize("reply, letter", [
    ("<think>\nadd them: 2, so b) looks right, not (c)\n</think>\n\nThe answer is (b) 2.", "b"),
    ("The answer is (d) 4.", "d"),
    ("Answer: e", "e"),
    ("answer: (A)", "a"),
    ("</think> so it is \\boxed{c}", "c"),
    ("<think>long thought</think>\n(b)", "b"),
    ("<think>\n</think>\n\nc) 3", "c"),
    ("c", "c"),
    ("  d.  ", "d"),
    ("reasoning that the model started without the opening tag</think>\nAnswer is a", "a"),
])
def test_extracts_the_last_explicit_letter_after_the_reasoning(reply: str, letter: str) -> None:
    assert extract_letter(reply) == letter


@pytest.mark.parametrize("reply", [
    "<think>\nthe answer is (b) but let me check",  # reasoning never closed: ran out of tokens
    "<think>x</think>\n\n",
    "I am not sure about this one.",
    "the area is 25 square meters",
    "",
])
def test_no_extractable_answer(reply: str) -> None:
    assert extract_letter(reply) is None


def test_user_prompt_lists_the_options_like_the_training_records() -> None:
    item = Item("t:1", "what is 1 + 1 ?", ("1", "2", "3", "4", "5"), 1)
    assert user_prompt(item) == "what is 1 + 1 ?\n\nOptions:\na) 1\nb) 2\nc) 3\nd) 4\ne) 5"
