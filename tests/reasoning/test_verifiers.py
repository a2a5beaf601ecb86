"""Verifiers: answer extraction, CodeI/O's tolerance rules, and input prediction checked by running the code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distillery.core.records import make_record
from distillery.reasoning.sandbox import Limits
from distillery.reasoning.verifiers import (extract_last_json, extract_option, is_close, outputs_match,
                                            verify_codeio_input, verify_codeio_output, verify_math_mc, verify_numeric,
                                            why_uncheckable)

LIMITS = Limits(timeout_s=2.0, memory_mb=512, max_processes=8)
CHOICES = ["12", "15", "18", "21", "24"]


def mc_record(label: int = 2) -> dict:
    messages = [{"role": "user", "content": "What is 6 * 3?\n\nOptions:\na) 12\nb) 15\nc) 18\nd) 21\ne) 24"},
                {"role": "assistant", "content": "6 * 3 = 18\nThe answer is (c) 18."}]
    return make_record("mathqa", "math_mc", messages, {"line": 1}, CHOICES, label)


def codeio_record(task: str = "code_io_output", io_input=None, io_output=None, refcode: str | None = None) -> dict:
    refcode = refcode or "def main_solution(a, b):\n    return {'total': a + b, 'ratio': a / b}\n"
    io_input = io_input if io_input is not None else {"a": 3, "b": 4}
    io_output = io_output if io_output is not None else {"total": 7, "ratio": 0.75}
    messages = [{"role": "user", "content": "Predict it."}, {"role": "assistant", "content": "{}"}]
    meta = {"line": 1, "funcname": "main_solution", "refcode": refcode, "io_input": io_input, "io_output": io_output}
    return make_record("codeio", task, messages, meta)


@pytest.mark.parametrize("text, index", [
    ("so it is 18. The answer is (c) 18.", 2),
    ("Answer: b", 1),
    ("<think>maybe (a)? no</think>\nThe answer is (E)", 4),
    ("The final choice is \\boxed{d}", 3),
    ("I pick (a) over (b), final: (b)", 1),
    ("Therefore the result is 18", 2),
    ("I do not know", None),
    ("<think>6 * 3 = 18, so the answer is (c)... let me check that again", None),  # cut off mid-thought
])
def test_extract_option(text: str, index: int | None) -> None:
    assert extract_option(text, CHOICES) == index


@pytest.mark.parametrize("text, index", [
    ("The answer is (b) at first sight, but 6 * 3 = 18, so \\boxed{c}", 2),
    ("\\boxed{a} looks tempting; checking again, the answer is (c).", 2),
    ("The answer is (a)? No: 6 * 3 = 18. Answer: c", 2),
    ("Answer: b. Options (a) and (d) are too small.", 1),  # a lone (x) after the stated answer does not count
    ("The correct option is \\boxed{c}. Note that the answer is a whole number.", 2),  # 'a': the article
    ("Answer: (c)\nThe answer is e.g. 45", 2),  # 'e.g.' is no option
    ("The answer is b because 6 * 3 = 18.", 1),
    ("The answer is A because 6 * 3 = 18.", 0),
    ("Answer: A is correct.", 0),
    ("The answer is option a which is 12", 0),
    ("(c) fits. The answer is a 30% gain", 2),  # the article again: the lone (c) decides
    ("6 * 3 = 18\n\nc", 2),  # a last line that is only an option
    ("6 * 3 = 18\n(C).", 2),
    ("6 * 3 = 18\nc) 18", 2),  # the option's text, quoted alone
])
def test_extract_option_takes_the_option_stated_last(text: str, index: int) -> None:
    assert extract_option(text, CHOICES) == index


def test_extract_option_reads_a_degenerate_reply_in_linear_time() -> None:
    """A reply with "answer" and a long run of white space (a model that degenerates into spaces, a hostile
    teacher) was minutes of regex backtracking that held the distill or evaluate worker: 2,000 spaces took ~20 s."""
    import time

    started = time.monotonic()
    for text in ("The answer" + " " * 2000 + "x", "answer:" + "\n" * 2000 + "option" + " " * 2000 + "x"):
        assert extract_option(text, CHOICES) is None
    assert extract_option("The answer is" + " " * 2000 + "(c)", CHOICES) == 2
    assert time.monotonic() - started < 1.0


def test_math_mc_verdicts() -> None:
    good = verify_math_mc(mc_record(), "3 sixes... The answer is (c)", LIMITS)
    assert good.ok and good.canonical == "The answer is (c) 18."
    bad = verify_math_mc(mc_record(), "The answer is (a)", LIMITS)
    assert not bad.ok and bad.answer == "a" and "(a) 12 is not correct" in bad.feedback
    assert not verify_math_mc(mc_record(), "no idea", LIMITS).ok


def gsm_record(answer: str = "10 + 2 = 12\n#### 1,200") -> dict:
    messages = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": answer}]
    return make_record("gsm", "qa", messages, {})


def test_numeric_compares_final_answers_and_keeps_which_extraction_found_them() -> None:
    """The matching itself is reasoning/answers.py's (tests/reasoning/test_answers.py); here, the verdicts."""
    good = verify_numeric(gsm_record(), "<think>12 * 100</think>\nso the answer is 1200.", LIMITS)
    assert good.ok and (good.answer, good.expected, good.canonical) == ("1200", "1,200", "The answer is 1,200.")
    assert good.details == {"math": {"how": "the answer is", "predicted": "1200", "expected": "1,200", "error": None}}
    assert verify_numeric(gsm_record("#### 0.75"), "\\boxed{\\frac{3}{4}}", LIMITS).details["math"]["how"] == "boxed"
    bad = verify_numeric(gsm_record(), "The answer is 1201", LIMITS)
    assert not bad.ok and bad.feedback == "The final answer 1201 is not correct." and "1,200" not in bad.feedback
    assert verify_numeric(gsm_record(), "no idea", LIMITS).feedback.startswith("No final answer was found")
    unread = verify_numeric(gsm_record(), "\\boxed{\\frac{}{}}", LIMITS)
    assert not unread.ok and "cannot be read" in unread.feedback and unread.details["math"]["error"]
    hedged = verify_numeric(gsm_record(), "It is 1,000 or 1,200. So the answer is either 1,000 or 1,200.", LIMITS)
    assert not hedged.ok and hedged.feedback == ("The final answer either 1,000 or 1,200 could not be checked (it "
                                                 "names 2 different numbers, not one final answer): finish with "
                                                 "'The answer is N'.")
    nothing = verify_numeric(gsm_record("see the book"), "The answer is 3.", LIMITS)
    assert not nothing.ok and "this record cannot be checked" in nothing.feedback


@pytest.mark.parametrize("text, value", [
    ('reasoning {"a": 1} more reasoning {"output": [1, 2]}', {"output": [1, 2]}),
    ('```json\n{"output": {"x": 1.5}}\n```\nthen some {"noise": 0}', {"output": {"x": 1.5}}),
    ("{'output': True, 'other': None}", {"output": True, "other": None}),
    ('{"output": (1, 2)}', {"output": [1, 2]}),
    ('The result is \\boxed{\\{"output": 3\\}}', {"output": 3}),
    ("no json here", None),
])
def test_extract_last_json(text: str, value) -> None:
    assert extract_last_json(text) == value


def test_is_close_follows_codeio_rules() -> None:
    assert is_close(3.14159, 3.1416)  # within 1e-3 relative, same integer part
    assert not is_close(2.9999, 3.0)  # close, but the integer parts differ
    assert not is_close(1.1, 1.0)
    assert not is_close(math.nan, math.nan) and not is_close(math.inf, math.inf)
    assert is_close({"a": [1, 2.0001]}, {"a": [1, 2.0]})
    assert not is_close({"a": 1}, {"a": 1, "b": 2}) and not is_close([1, 2], [1, 2, 3])
    assert is_close(5, 5) and not is_close(5, 6)
    assert outputs_match("abc", "abc") and not outputs_match("abc", "abd")
    # Python's True == 1, but the output `true` is not the output 1
    assert not outputs_match(True, 1) and not outputs_match({"a": [True]}, {"a": [1]}) and not is_close(0, False)
    assert outputs_match(True, True) and outputs_match(1, 1.0)


def test_codeio_output_prediction() -> None:
    record = codeio_record()
    good = verify_codeio_output(record, 'Adding gives 7, and 3/4.\n{"output": {"total": 7, "ratio": 0.7500001}}', LIMITS)
    assert good.ok and good.canonical == '{"output": {"total": 7, "ratio": 0.7500001}}'
    bad = verify_codeio_output(record, '{"output": {"total": 8, "ratio": 0.75}}', LIMITS)
    assert not bad.ok and "Mismatch" in bad.feedback and '{"a": 3, "b": 4}' in bad.feedback
    assert "No final answer" in verify_codeio_output(record, "it is seven", LIMITS).feedback
    assert "No final answer" in verify_codeio_output(record, '{"result": 7}', LIMITS).feedback
    # a reply cut off while thinking: the JSON it wrote there is no final answer
    assert "No final answer" in verify_codeio_output(record, '<think>maybe {"output": {"total": 7, "ratio": 0.75}}',
                                                     LIMITS).feedback
    returns_none = codeio_record()
    returns_none["meta"]["io_output"] = None
    assert verify_codeio_output(returns_none, '{"output": null}', LIMITS).ok


def test_codeio_input_prediction_runs_the_reference_code() -> None:
    record = codeio_record("code_io_input")
    good = verify_codeio_input(record, 'Try a=3, b=4: {"input": {"a": 3, "b": 4}}', LIMITS)
    assert good.ok and good.details["sandbox"]["status"] == "ok"
    other = verify_codeio_input(record, '{"input": {"a": 6, "b": 8}}', LIMITS)  # 14 and 0.75: total differs
    assert not other.ok and '"total": 14' in other.feedback
    broken = verify_codeio_input(record, '{"input": {"a": 1, "b": 0}}', LIMITS)
    assert not broken.ok and "ZeroDivisionError" in broken.feedback
    assert not verify_codeio_input(record, '{"input": 5}', LIMITS).ok


def test_why_uncheckable() -> None:
    assert why_uncheckable("math_mc", mc_record()) is None
    no_label = make_record("x", "math_mc", [{"role": "user", "content": "q"}], {})
    assert why_uncheckable("math_mc", no_label) == "no choices/label"
    assert why_uncheckable("numeric", gsm_record()) is None
    assert why_uncheckable("numeric", gsm_record("<think>7</think> see the book")) == "no reference answer"
    # an answer is found but math-verify cannot read it: the teacher is not asked (twice, with revision) in vain
    assert why_uncheckable("numeric", gsm_record("The answer is yes.")) == "reference answer math-verify cannot read"
    assert why_uncheckable("codeio_input", codeio_record()) is None
    missing = make_record("x", "code_io_input", [{"role": "user", "content": "q"}], {"io_input": {}})
    assert why_uncheckable("codeio_input", missing) == "meta lacks refcode, funcname, io_output"


def test_real_codeio_reference_code_verifies_its_own_io(shared_file) -> None:
    """464 real CodeI/O records: given the recorded input as the 'prediction', the sandboxed reference code must
    give the recorded output back for (nearly) all of the first 16 (a few use unseeded randomness)."""
    path = shared_file("data/codeio/rawcode_1k_parsed.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:16]]
    verified = 0
    for row in rows:
        io = row["ios"][0]
        record = codeio_record("code_io_input", io["input"], io["output"], row["refcode"])
        record["meta"]["funcname"] = row["funcname"]
        verified += verify_codeio_input(record, json.dumps({"input": io["input"]}), Limits()).ok
    assert verified >= 14, verified


HOSTILE = {
    "infinite loop": ("def main_solution(a, b):\n    while True:\n        pass\n", "did not finish"),
    "fork bomb": ("import os\ndef main_solution(a, b):\n    while True:\n        try:\n            os.fork()\n"
                  "        except OSError:\n            pass\n", "did not finish"),
    "memory bomb": ("def main_solution(a, b):\n    return len(bytearray(8 * 1024 ** 3))\n", "MemoryError"),
    "write outside": ("def main_solution(a, b):\n    open('/var/tmp/distill-escape-test.txt', 'w').write('x')\n    return 7\n",
                      "PermissionError"),
    "read secrets": ("import os\ndef main_solution(a, b):\n    return os.environ['HF_TOKEN']\n", "KeyError"),
    "socket": ("import socket\ndef main_solution(a, b):\n    socket.socket().connect(('127.0.0.1', 22))\n    return 7\n",
               "network access is not allowed"),
    "print gigabytes": ("def main_solution(a, b):\n    while True:\n        print('x' * 65536)\n", "printed more than"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_code_is_a_failed_check_with_its_reason(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_should_never_be_seen")
    refcode, reason = HOSTILE[kind]
    record = codeio_record("code_io_input", io_output=7, refcode=refcode)
    verdict = verify_codeio_input(record, '{"input": {"a": 3, "b": 4}}', LIMITS)
    assert not verdict.ok and reason in verdict.feedback
    assert "hf_should_never_be_seen" not in verdict.feedback
    assert not Path("/var/tmp/distill-escape-test.txt").exists()


def test_what_the_code_returns_reaches_the_feedback_cleaned_and_bounded() -> None:
    """A 200 KB return value with terminal escapes: the teacher's feedback (and a revised trace) gets a preview."""
    refcode = "def main_solution(a, b):\n    return '\\x1b]0;owned\\x07' + 'x' * 200000\n"
    verdict = verify_codeio_input(codeio_record("code_io_input", io_output=7, refcode=refcode),
                                  '{"input": {"a": 3, "b": 4}}', Limits(timeout_s=2.0, memory_mb=512))
    assert not verdict.ok and "gives" in verdict.feedback
    assert len(verdict.feedback) < 1000 and "\x1b" not in verdict.feedback and "characters cut" in verdict.feedback


DEEP = "[" * 5000 + "]" * 5000
# Teacher answers and returned values that parse but cannot be compared, or cannot be parsed at all.
HOSTILE_ANSWERS = {
    "5000-digit integer": '{"output": ' + "9" * 5000 + "}",
    "400-digit integer against a float": '{"output": 1' + "0" * 400 + "}",
    "5000 nested lists": '{"output": ' + DEEP + "}",
    "5000 nested lists, Python style": "{'output': " + DEEP + ", 'x': None}",
    "a tuple key": '{"output": {(1, 2): 3}}',  # read again with [ ] for ( ): an unhashable key
    "NaN": '{"output": NaN}',
    "infinity": '{"output": Infinity}',
    "huge float": '{"output": 1e999}',
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_ANSWERS))
def test_every_verifier_fails_an_answer_it_cannot_read_or_compare(kind: str) -> None:
    """A failed verdict with a short reason, never an exception (distill would end as a bug)."""
    text = HOSTILE_ANSWERS[kind]
    verdicts = [verify_codeio_output(codeio_record(io_output=2.5), text, LIMITS),
                verify_codeio_input(codeio_record("code_io_input", io_output=2.5), text.replace("output", "input"),
                                    LIMITS),
                verify_numeric(gsm_record(), text, LIMITS), verify_math_mc(mc_record(), text, LIMITS)]
    for verdict in verdicts:
        assert not verdict.ok and 0 < len(verdict.feedback) < 1000, verdict.feedback


RETURNS = {
    "400-digit integer against a float": "return 10 ** 400",
    "600 nested lists": "x = 2.0\n    for _ in range(600):\n        x = [x]\n    return x",  # read, too deep to compare
    "NaN": "return float('nan')",
    "infinity": "return float('inf')",
}


@pytest.mark.parametrize("kind", sorted(RETURNS))
def test_a_returned_value_that_cannot_be_compared_is_a_failed_verdict(kind: str) -> None:
    refcode = f"def main_solution(a, b):\n    {RETURNS[kind]}\n"
    expected = 2.5
    for _ in range(600 if "nested" in kind else 0):
        expected = [expected]
    verdict = verify_codeio_input(codeio_record("code_io_input", io_output=expected, refcode=refcode),
                                  '{"input": {"a": 3, "b": 4}}', LIMITS)
    assert not verdict.ok and 0 < len(verdict.feedback) < 1000, verdict.feedback


@pytest.mark.parametrize("text", ["I could not solve it, sorry; I gave up after 18 minutes.",
                                  "Whatever it is, it is certainly not 18.", "It is 118", "It is 1.18",
                                  "18 or 21, I cannot tell", "The answer is not (c)", "It isn't (C) either"])
def test_an_option_named_in_a_last_line_that_does_not_end_on_it_or_negates_it_is_no_choice(text: str) -> None:
    """Any choice appearing in the last line counted: a reply that gave up after '22 minutes' was a verified trace
    (and evaluate counted it right)."""
    assert extract_option(text, CHOICES) is None
