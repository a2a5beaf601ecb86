"""Checking a teacher's answer against what a record knows to be right.

- math_mc:       the chosen option letter (a-e; the one the reply states last) against the record's label;
- numeric:       free-form math (GSM-style numbers, fractions, LaTeX, units): the answer's final answer against
                 the reference's, by math-verify (reasoning/answers.py); which extraction found it goes in details;
- codeio_output: the last JSON object of the answer ({"output": ...}) against the expected output, with CodeI/O's
                 rules (identical JSON, or equal up to a relative float tolerance of 1e-3 with the same integer
                 part, same keys for objects, same length for lists, NaN/inf never close);
- codeio_input:  the last JSON object ({"input": {...}}) is fed to the reference code in the sandbox and the
                 result compared with the expected output by the same rules.
Each returns a Verdict with the feedback the teacher gets for a second turn (CodeI/O++) and the canonical
final-answer line that ends the training trace. Each never raises on what a teacher wrote or the code returned:
a value that cannot be read or compared (an integer of thousands of digits, a structure nested thousands deep)
is a failed verdict that says why (`never_raises`).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from distillery.reasoning.answers import MathCheck, after_reasoning, answer_region, candidates, check_math
from distillery.reasoning.sandbox import Limits, clean_text, preview, run_function

LETTERS = "abcde"
FLOAT_TOLERANCE = 1e-3  # CodeI/O's relative tolerance


@dataclass
class Verdict:
    ok: bool
    answer: Any = None  # what was extracted from the text (None: nothing found)
    expected: Any = None
    feedback: str = ""  # shown to the teacher on a second turn and kept in the trace
    canonical: str = ""  # the final answer the training trace ends with (set when ok)
    details: dict = field(default_factory=dict)


# What reading or comparing a hostile value raises: JSON's integer-digit limit (ValueError), nesting past the
# recursion limit, an integer too large for float arithmetic, a value too large to hold.
UNREADABLE = (ValueError, RecursionError, OverflowError, MemoryError)


def unreadable_reason(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "a value in it is nested too deeply"
    if isinstance(err, OverflowError):
        return "a value in it holds a number too large to compare"
    if isinstance(err, MemoryError):
        return "a value in it is too large"
    return clean_text(str(err).split(";")[0], 150)  # e.g. "Exceeds the limit (4300 digits) for integer ..."


def never_raises(verify: Callable[[dict, str, Limits], Verdict]) -> Callable[[dict, str, Limits], Verdict]:
    """The verifier, with a value it cannot read or compare turned into a failed verdict that says why."""

    @functools.wraps(verify)
    def checked(record: dict, text: str, limits: Limits) -> Verdict:
        try:
            return verify(record, text, limits)
        except UNREADABLE as err:
            return Verdict(False, feedback=f"The answer could not be checked: {unreadable_reason(err)}.",
                           details={"unreadable": type(err).__name__})

    return checked


# ---- math_mc ---------------------------------------------------------------------------------------------------

# An option stated as the answer; of several, the one stated last counts, whichever pattern states it. The runs of
# white space are possessive (\s*+): with plain \s* "answer" and a few thousand spaces (a degenerate reply) took
# the regex engine minutes, trying every way to share the spaces among the first pattern's three runs.
MC_STATED = re.compile("|".join((
    r"answer\s*+(?:is|:)?\s*+(?:option\s*+)?[\(\[]?\s*+([a-e])\s*+[\)\]]",  # "The answer is (c)", "answer: c)"
    r"\\boxed\{\s*\(?([a-e])\)?\s*\}",
    # "answer is c", "Answer: A because", "answer is option a which"; not the article ("the answer is a whole
    # number", "a 30% gain": a lowercase a before a word or number) nor "e.g."
    r"answer\s*(?:is|:)\s*(?:option\s*([a-e])|(?-i:(a))(?!\s+[a-z0-9])|(?-i:([A-E]))|(?-i:([b-e])))(?!\w|\.\w)",
)), flags=re.IGNORECASE)
# a lone "(c)", when no option is stated as the answer; not one the text rules out ("the answer is not (c)")
MC_LONE = re.compile(r"(?<!not )(?<!n't )(?<!no )\(([a-e])\)", flags=re.IGNORECASE)
MC_ALONE = re.compile(r"\s*\(?([a-e])\)?[.:]?\s*", flags=re.IGNORECASE)  # a last line that is only a letter: "c", "(C)."


def extract_option(text: str, choices: list[str]) -> int | None:
    """Index of the option the text chose: the last one it states as the answer, else the last lone "(c)", else a
    last line that is only a letter, else the one choice that ends its last line (option_ending). Distill's math_mc
    verifier and evaluate's option letters (held-out math_mc, generative MathQA) read answers by this one rule."""
    tail = after_reasoning(text)
    for pattern in (MC_STATED, MC_LONE):
        found = [next(letter for letter in match.groups() if letter) for match in pattern.finditer(tail)]
        if found:
            return LETTERS.index(found[-1].lower())
    lines = [line for line in tail.strip().splitlines() if line.strip()]
    if not lines:
        return None
    alone = MC_ALONE.fullmatch(lines[-1])
    if alone:
        return LETTERS.index(alone[1].lower())
    return option_ending(lines[-1], choices)


TRAILING = " \t.!*_`'\"$"  # what may follow an answer on its line: punctuation, markdown, LaTeX's $
NEGATION = re.compile(r"\b(?:not|never|no)\b|n't", re.IGNORECASE)


def option_ending(line: str, choices: list[str]) -> int | None:
    """The one option whose text ends the line ("so the result is 18."), as a whole number or word (not the 2 of
    "12" or "1.2"), on a line that negates nothing: "I gave up after 22 minutes" and "it is not 22" choose none
    (a choice anywhere in the line used to count)."""
    if NEGATION.search(line):
        return None
    end = line.rstrip(TRAILING)
    found = []
    for i, choice in enumerate(choices):
        text = (choice or "").strip().rstrip(TRAILING)
        before = end[:len(end) - len(text)][-1:]
        if text and end.endswith(text) and not (before.isalnum() or before in ".,"):
            found.append(i)
    return found[0] if len(found) == 1 else None


@never_raises
def verify_math_mc(record: dict, text: str, limits: Limits) -> Verdict:
    choices, label = record["choices"], record["label"]
    chosen = extract_option(text, choices)
    expected = LETTERS[label]
    if chosen is None:
        return Verdict(False, None, expected, "No option was chosen: finish with 'The answer is (x)' where x is a-e.")
    letter = LETTERS[chosen]
    if chosen != label:
        return Verdict(False, letter, expected, f"The chosen option ({letter}) {choices[chosen]} is not correct.")
    return Verdict(True, letter, expected, "Correct.", f"The answer is ({letter}) {choices[label]}.")


# ---- numeric ---------------------------------------------------------------------------------------------------

def reference_answer(record: dict) -> str:
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant")


@never_raises
def verify_numeric(record: dict, text: str, limits: Limits) -> Verdict:
    check = check_math(text, reference_answer(record))
    details = {"math": {"how": check.how, "predicted": check.predicted, "expected": check.expected,
                        "error": check.error}}
    if check.correct:
        return Verdict(True, check.predicted, check.expected, "Correct.", f"The answer is {check.expected}.",
                       details=details)
    return Verdict(False, check.predicted, check.expected, numeric_feedback(check), details=details)


def numeric_feedback(check: MathCheck) -> str:
    """Why a free-form answer failed, for the teacher's second turn (never naming the reference's answer)."""
    shown = clean_text(check.predicted or "", 100)  # the teacher's own text, echoed back to it
    if check.expected is None:
        return "The reference answer has no final answer that can be read; this record cannot be checked."
    if check.predicted is None:
        return "No final answer was found: finish with 'The answer is N'."
    if check.how == "none":
        return f"The final answer {shown} cannot be read as a number: finish with 'The answer is N'."
    if check.error:
        return f"The final answer {shown} could not be checked ({check.error}): finish with 'The answer is N'."
    return f"The final answer {shown} is not correct."


# ---- CodeI/O ---------------------------------------------------------------------------------------------------

def last_braced_span(text: str) -> str | None:
    """The last complete top-level {...} in the text."""
    depth, start, last = 0, None, None
    for i, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                last = text[start:i + 1]
    return last


def parse_json_like(candidate: str) -> Any:
    """JSON, then JSON with Python's True/False/None, then a Python literal; None when none of them parses."""
    attempts = (candidate, candidate.replace("True", "true").replace("False", "false").replace("None", "null"))
    for attempt in attempts:
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            continue
    try:
        value = ast.literal_eval(candidate)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):  # TypeError: `{[1, 2]: 3}`
        return None
    return json.loads(json.dumps(value)) if _jsonable(value) else None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def extract_last_json(text: str) -> Any:
    """The answer's last JSON object: the last ```json block if any, else the last {...}; tuples read as lists."""
    tail = after_reasoning(text)
    if "```json" in tail:
        block = tail[tail.rfind("```json") + len("```json"):]
        candidate = block.split("```", 1)[0].strip()
    else:
        candidate = last_braced_span(tail)
    if candidate:
        value = parse_json_like(candidate)
        if value is None:
            value = parse_json_like(candidate.replace("(", "[").replace(")", "]"))
        if value is not None:
            return value
    boxed = tail.rfind("\\boxed{")
    if boxed != -1:
        inner = tail[boxed + len("\\boxed{"):].replace("\\{", "{").replace("\\}", "}")
        span = last_braced_span(inner)
        return parse_json_like(span) if span else None
    return None


def is_close(pred: Any, target: Any, tol: float = FLOAT_TOLERANCE) -> bool:
    """CodeI/O's comparison: recursive, floats within a relative tolerance and with the same integer part."""
    if isinstance(pred, dict) and isinstance(target, dict):
        return pred.keys() == target.keys() and all(is_close(pred[k], target[k], tol) for k in pred)
    if isinstance(pred, list) and isinstance(target, list):
        return len(pred) == len(target) and all(is_close(p, t, tol) for p, t in zip(pred, target))
    if isinstance(pred, bool) or isinstance(target, bool):  # Python's True == 1: `true` is not the output 1
        return type(pred) is type(target) and pred == target
    numbers = (int, float)
    if isinstance(pred, numbers) and isinstance(target, numbers):
        if isinstance(pred, float) or isinstance(target, float):
            try:
                if not (math.isfinite(pred) and math.isfinite(target)):
                    return False
                return abs(pred - target) <= tol * abs(target) and int(pred) == int(target)
            except OverflowError:  # an integer beyond any float is not close to a float
                return False
        return pred == target
    return pred == target


def outputs_match(pred: Any, target: Any) -> bool:
    return json.dumps(pred) == json.dumps(target) or is_close(pred, target)


MISSING = object()


def extracted_field(text: str, key: str) -> Any:
    """The value under `key` of the answer's last JSON object (a bare non-object value is taken as is);
    MISSING when there is none (a JSON null is a value: some functions return None)."""
    value = extract_last_json(text)
    if isinstance(value, dict):
        return value.get(key, MISSING)
    return MISSING if value is None else value


@never_raises
def verify_codeio_output(record: dict, text: str, limits: Limits) -> Verdict:
    meta = record["meta"]
    expected, given = meta["io_output"], preview(meta["io_input"])
    pred = extracted_field(text, "output")
    if pred is MISSING:
        return Verdict(False, None, expected, 'No final answer was found: give it as JSON, {"output": <your output>}.')
    if not outputs_match(pred, expected):
        return Verdict(False, pred, expected,
                       f"Mismatch: for the input {given}, the predicted output {preview(pred)} is not correct.")
    return Verdict(True, pred, expected, "Correct: the predicted output matches.", json.dumps({"output": pred}))


@never_raises
def verify_codeio_input(record: dict, text: str, limits: Limits) -> Verdict:
    meta = record["meta"]
    expected = meta["io_output"]
    pred = extracted_field(text, "input")
    if not isinstance(pred, dict):
        return Verdict(False, None if pred is MISSING else pred, expected,
                       'No input was found: give it as JSON, {"input": {<name>: <value>, ...}}, with every variable.')
    run = run_function(meta["refcode"], meta["funcname"], pred, limits)
    details = {"sandbox": {"status": run.status, "message": run.message, "seconds": run.seconds,
                           "network": run.network, "files": run.files, "unix_sockets": run.unix_sockets,
                           "keyring": run.keyring, "processes": run.processes, "memory": run.memory}}
    # What the code printed or returned is untrusted: only a cleaned, bounded preview reaches the feedback (and
    # from there a remote teacher and, after a revision, the training text).
    if not run.ok:
        return Verdict(False, pred, expected,
                       f"Running the code on the predicted input {preview(pred)} failed: {run.message}", details=details)
    if not outputs_match(run.value, expected):
        return Verdict(False, pred, expected,
                       f"Mismatch: the predicted input {preview(pred)} gives {preview(run.value)}, not the required "
                       f"output {preview(expected)}.", details=details)
    return Verdict(True, pred, expected, "Correct: the predicted input gives the required output.",
                   json.dumps({"input": pred}), details=details)


VERIFIERS: dict[str, Callable[[dict, str, Limits], Verdict]] = {
    "math_mc": verify_math_mc,
    "numeric": verify_numeric,
    "codeio_output": verify_codeio_output,
    "codeio_input": verify_codeio_input,
}


def why_uncheckable(verifier: str, record: dict) -> str | None:
    """Why a record cannot be checked by `verifier` (None when it can): what it is missing."""
    if verifier == "math_mc":
        choices, label = record.get("choices"), record.get("label")
        if not choices or not isinstance(label, int) or not 0 <= label < len(choices) or len(choices) > len(LETTERS):
            return "no choices/label"
    elif verifier == "numeric":
        if not any(m["role"] == "assistant" for m in record["messages"]) \
                or not candidates(answer_region(reference_answer(record))):
            return "no reference answer"
        if check_math("", reference_answer(record)).expected is None:  # found, but math-verify cannot read it
            return "reference answer math-verify cannot read"
    else:
        needed = ("io_input", "io_output") if verifier == "codeio_output" else ("refcode", "funcname", "io_input", "io_output")
        missing = [k for k in needed if k not in record.get("meta", {})]
        if missing:
            return f"meta lacks {', '.join(missing)}"
    return None
