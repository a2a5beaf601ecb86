"""reasoning/answers.py: free-form math answers checked with math-verify, in a bounded child process."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from distillery.reasoning.answers import MAX_CHARS, MathCheck, answer_region, candidates, check_math
from tests.fixtures.gsm_problems import gsm_rows

GSM = gsm_rows()


def test_gsm_samples_the_reference_answer_and_a_reply_ending_in_it_are_right_and_a_wrong_one_is_not() -> None:
    for row in GSM:
        reference, answer = row["RESPONSE"], int(row["RESPONSE"].rsplit("#### ", 1)[1])
        reply = f"<think>\nLet me see. {row['INSTRUCTION']}\n</think>\n\nStep by step.\nThe answer is {answer}."
        assert check_math(reply, reference) == MathCheck(True, str(answer), str(answer), "the answer is")
        assert check_math(reference, reference) == MathCheck(True, str(answer), str(answer), "####")
        wrong = check_math(f"The answer is {answer + 1}.", reference)
        assert not wrong.correct and wrong.predicted == str(answer + 1) and wrong.error is None


@pytest.mark.parametrize("prediction, reference, how, predicted", [
    # fractions
    ("The answer is \\frac{3}{4}.", "0.75", "the answer is", "\\frac{3}{4}"),
    ("so \\boxed{0.75}", "\\frac{3}{4}", "boxed", "0.75"),
    ("She eats 3/4 of the pie", "#### 0.75", "last number", "3/4"),
    # LaTeX
    ("Hence $\\dfrac{1}{2}$ of them", "\\boxed{\\frac{1}{2}}", "latex", "\\dfrac{1}{2}"),
    ("\\[ x = \\sqrt{2} \\]", "$\\sqrt{2}$", "latex", "x = \\sqrt{2}"),
    ("The answer is $2^{10}$.", "1024", "the answer is", "$2^{10}$"),
    ("\\boxed{1{,}234}", "#### 1,234", "boxed", "1{,}234"),
    # units and currency
    ("She earns 42 dollars.", "#### 42", "last number", "42"),
    ("The answer is $42.", "42", "the answer is", "$42"),
    ("**Answer:** \\boxed{42 \\text{ dollars}}", "\\$42", "boxed", "42 \\text{ dollars}"),
    ("The answer is 12 apples, and 3 are left over.", "12", "the answer is", "12 apples"),
    ("The area is 48 cm^2.", "#### 48", "last number", "48"),  # not the power's 2, not LaTeX's 48*c*m^2
    ("The answer is 9.8 m/s^2", "9.8", "the answer is", "9.8 m/s^2"),
    # thousands separators
    ("#### 1,234", "1234", "####", "1,234"),
    ("In all 1,234,567 people came.", "1234567", "last number", "1,234,567"),
    ("The answer is 1200.0", "10 + 2 = 12\n#### 1,200", "the answer is", "1200.0"),
    # percentages
    ("The answer is 25%.", "25", "the answer is", "25%"),
    ("The discount is 25\\%", "#### 25", "last number", "25"),
    # negative numbers
    ("The temperature is -7 degrees.", "-7", "last number", "-7"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", "boxed", "-\\frac{1}{2}"),
    # tuples, intervals and ratios (MATH's plain `(1,-2)` was read as 2), powers
    ("\\boxed{(1, -2)}", "(1,-2)", "boxed", "(1, -2)"),
    ("The answer is $[1, 3)$.", "[1,3)", "the answer is", "$[1, 3)$"),
    ("(-1, 2)", "\\boxed{(-1,2)}", "whole", "(-1, 2)"),
    ("The ratio is 6:2", "3:1", "last number", "6:2"),
    ("It is 10^3", "1000", "last number", "10^3"),
    # what comes first: the reasoning is dropped, a markdown heading is not GSM's ####
    ("<think>it is 41</think>\nThe answer is 42.", "#### 42", "the answer is", "42"),
    ("#### Step 1\nAdd them up.\n#### Final answer\nThe answer is **5**.", "5", "the answer is", "5"),
    ("The answer is 1\u200b000.", "#### 1000", "the answer is", "1000"),  # a zero-width space shows nothing
    ("#### 12\u00ad345", "12,345", "####", "12345"),  # nor does a soft hyphen
    ("The answer is ４２.", "#### 42", "the answer is", "42"),  # fullwidth digits, as a CJK keyboard writes them
    ("The answer is 42.", "#### \u0664\u0662", "the answer is", "42"),  # Arabic-Indic digits in the reference
])
def test_answers_written_in_other_forms_are_equal(prediction: str, reference: str, how: str, predicted: str) -> None:
    check = check_math(prediction, reference)
    assert check.correct and check.error is None, check
    assert (check.how, check.predicted) == (how, predicted)


@pytest.mark.parametrize("prediction, reference, how, predicted", [
    ("The answer is 41.", "#### 42", "the answer is", "41"),
    ("The answer is 7", "-7", "the answer is", "7"),
    ("\\boxed{\\frac{1}{3}}", "0.33", "boxed", "\\frac{1}{3}"),
    ("I am not sure.", "#### 42", "none", None),
    ("<think>It is 42, but let me check once more", "#### 42", "none", None),  # the reasoning never ended
    ("The answer is \u22123.", "#### 3", "the answer is", "-3"),  # a typographic minus keeps its sign
    ("The answer is 3:45.", "#### 3", "the answer is", "3:45"),  # a time, not its hours
    ("It ends at 3:45", "3", "last number", "3:45"),
    ("\\boxed{(1, 2)}", "(1,-2)", "boxed", "(1, 2)"),
    ("\\boxed{1}", "(1,-2)", "boxed", "1"),
])
def test_wrong_and_missing_answers(prediction: str, reference: str, how: str, predicted: str | None) -> None:
    check = check_math(prediction, reference)
    assert not check.correct and check.error is None
    assert (check.how, check.predicted) == (how, predicted)


@pytest.mark.parametrize("prediction, reference, predicted", [
    ("The answer is either 3 or 8.", "#### 8", "either 3 or 8"),
    ("The answer is 8 or 3.", "#### 8", "8 or 3"),
    ("The answer is x = 3 or x = 8", "#### 8", "x = 3 or x = 8"),
    ("So \\boxed{3, 8}", "#### 8", "3, 8"),
    ("The answer is $3$ or $8$.", "#### 8", "$3$ or $8$"),
    ("It is either 3 or 8", "#### 8", "8"),  # a bare last number, offered as an alternative
    ("Maybe 3, or perhaps 8.", "#### 8", "8"),
    ("The answer is 18 (or 8).", "#### 8", "18 (or 8)"),  # '(or' between two values that are not one
    ("\\boxed{3, or 8}", "#### 8", "3, or 8"),
    ("The total is 12, or 8 if we count the rotten ones.", "#### 8", "8"),
    ("The answer is 3 and 8.", "#### 8", "3 and 8"),  # math-verify reads 8
])
def test_an_answer_hedging_between_numbers_is_wrong_though_math_verify_reads_its_last(prediction: str, reference: str,
                                                                                      predicted: str) -> None:
    check = check_math(prediction, reference)
    assert check == MathCheck(False, predicted, "8", check.how, "it names 2 different numbers, not one final answer")


@pytest.mark.parametrize("prediction, reference", [
    ("The answer is 3 + 5 = 8.", "#### 8"),  # the arithmetic before its last '=' is no hedge
    ("The answer is 8 or 8.0", "#### 8"),  # one number, twice
    ("The answer is 1,200 (1200 in all).", "#### 1,200"),
    ("The answer is 25 (25%).", "#### 25"),
    ("The answer is 3, 8", "The answer is 3, 8"),  # the reference names two numbers itself
    ("The answer is 2 and 3", "2 and 3"),
    ("The answer is \\boxed{3 \\text{ or } 8}", "#### 8"),  # LaTeX: math-verify's set {3, 8}, not 8
    ("Either way, it takes 3 trucks.\nThe total is 18.", "#### 18"),  # 'or' is not between two numbers
    ("2 or 3 apples were eaten, so 18 remain", "#### 18"),
])
def test_one_committed_number_is_no_hedge_and_latex_is_math_verifys(prediction: str, reference: str) -> None:
    check = check_math(prediction, reference)
    assert check.error is None and check.correct == ("text" not in prediction), check


@pytest.mark.parametrize("prediction", ["So the answer is 18 after 3 days.", "Final answer: 42 apples in 6 boxes",
                                        "Answer: 1,200 (from 3 crates)", "The probability is 1/4, or 25%.",
                                        "The answer is 40 minutes (or 2/3 of an hour).", "It costs $5, or 500 cents."])
def test_words_around_a_stated_answer_are_no_hedge(prediction: str) -> None:
    assert check_math(prediction, "#### 18").error is None


@pytest.mark.parametrize("prediction, qualifier", [
    ("The answer is 12 (not 7).", "not"), ("The answer is 12 not 7", "not"),
    ("The answer is 12 instead of 7", "instead of"), ("The answer is 12 rather than 7", "rather than"),
    ("The answer is 7 or more", "or more"), ("The answer is at least 7", "at least")])
def test_a_stated_answer_made_a_bound_or_set_against_the_reference_is_wrong(prediction: str, qualifier: str) -> None:
    """math-verify read the span's last number: each was a verified trace for the reference 7."""
    check = check_math(prediction, "#### 7")
    assert not check.correct and check.error == f"it qualifies its answer ({qualifier}), not one final answer"


def test_a_box_that_assigns_several_values_names_them_all() -> None:
    check = check_math("So \\boxed{x=12, y=7}", "#### 7")
    assert not check.correct and check.error == "it names 2 different numbers, not one final answer"
    assert check_math("So \\boxed{3 + 4 = 7}", "#### 7").correct


def test_a_reference_without_an_answer_is_reported_not_raised() -> None:
    check = check_math("The answer is 8.", "no number here")
    assert check == MathCheck(False, "8", None, "the answer is", "the reference has no answer")
    assert check_math(None, "42").error.startswith("TypeError")  # type: ignore[arg-type]


def test_an_enormous_power_tower_times_out_within_the_bound_and_the_next_check_works() -> None:
    assert check_math("1", "1").correct  # the child is up: what follows times the check alone
    started = time.monotonic()
    check = check_math("The answer is \\boxed{10^{10^{10^{10}}}}", "5", timeout_s=1.0)
    assert time.monotonic() - started < 3
    assert check == MathCheck(False, "10^{10^{10^{10}}}", "5", "boxed", "timed out after 1 s")
    assert check_math("The answer is 5.", "5").correct  # a fresh child took over


def test_checks_from_worker_threads() -> None:
    """distill verifies from a thread pool: math-verify's signal-based timeouts would refuse to run there."""
    pairs = [(f"The answer is {row['RESPONSE'].rsplit('#### ', 1)[1]}.", row["RESPONSE"]) for row in GSM[:12]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        checks = list(pool.map(lambda pair: check_math(*pair), pairs))
    assert all(check.correct and check.error is None for check in checks), checks


def test_only_the_end_of_a_long_reply_is_read() -> None:
    reply = "7 " * 500_000 + "so the answer is 42."
    assert len(answer_region(reply)) == MAX_CHARS
    assert check_math("1", "1").correct  # the child is up: what follows times the check alone
    started = time.monotonic()
    assert check_math(reply, "#### 42").correct
    assert time.monotonic() - started < 2


def test_candidates_in_order_of_explicitness() -> None:
    text = "We get $\\frac{1}{2}$, i.e. 3 parts.\nThe answer is 4.\n#### 5\n\\boxed{6}"
    assert candidates(text) == [("boxed", "6"), ("####", "5"), ("the answer is", "4"), ("latex", "\\frac{1}{2}"),
                                ("last number", "6")]
    assert candidates("It costs $12 and $5.") == [("last number", "5")]  # dollars are not LaTeX
    assert candidates("nothing") == []
