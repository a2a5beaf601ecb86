"""Generative MathQA: the option letter after the reasoning (distill's reading of an option), or no answer."""

from __future__ import annotations

import pytest

from distillery.evals.generative import extract_letter, user_prompt
from distillery.evals.mathqa import Item

CHOICES = ("1", "2", "3", "4", "5")


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
    ("<think>so 2</think>\nThe answer is a whole number: (b)", "b"),  # 'a' the article, not option a
    ("The answer is (c)? No, 1 + 1 = 2, so the answer is (b).", "b"),  # the option stated last
    ("</think>\nThe sum is 2", "b"),  # the one choice on the last line
])
def test_extracts_the_last_explicit_letter_after_the_reasoning(reply: str, letter: str) -> None:
    assert extract_letter(reply, CHOICES) == letter


@pytest.mark.parametrize("reply", [
    "<think>\nthe answer is (b) but let me check",  # reasoning never closed: ran out of tokens
    "<think>x</think>\n\n",
    "I am not sure about this one.",
    "the area is 25 square meters",
    "",
    "</think>\nc) 7",  # no option's text, no option stated
])
def test_no_extractable_answer(reply: str) -> None:
    assert extract_letter(reply, CHOICES) is None


def test_evaluate_and_distill_read_an_option_alike() -> None:
    """The held-out math_mc metric and distill's math_mc verifier are one reading of the answer."""
    from distillery.reasoning.verifiers import extract_option

    for reply in ("The answer is (d) 4.", "c", "(c) 3 is it. The answer is a 30% gain", "</think>\nb) 2", "hmm"):
        index = extract_option(reply, list(CHOICES))
        assert extract_letter(reply, CHOICES) == (None if index is None else "abcde"[index])


def test_user_prompt_lists_the_options_like_the_training_records() -> None:
    item = Item("t:1", "what is 1 + 1 ?", ("1", "2", "3", "4", "5"), 1)
    assert user_prompt(item) == "what is 1 + 1 ?\n\nOptions:\na) 1\nb) 2\nc) 3\nd) 4\ne) 5"
