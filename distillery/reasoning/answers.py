"""Checking a free-form math answer against a reference answer, with math-verify.

    check = check_math("<think>...</think> 3/4 of it, so the answer is $0.75$.", "\\frac{3}{4}")
    check.correct, check.predicted, check.expected, check.how, check.error
    # True, '$0.75$', '\\frac{3}{4}', 'the answer is', None

The answer in each text is the first of these that math-verify can parse (LaTeX, fractions, percentages,
units, thousands separators); `how` names the one that found the prediction's:

- boxed:          the last \\boxed{...} (or \\fbox{...});
- ####:           GSM8K's final line, `#### 42`;
- the answer is:  the rest of the sentence after the last "answer is" / "answer:";
- latex:          the last LaTeX math span with a command in it ($\\frac{3}{4}$, \\(...\\), \\[...\\], $$...$$), or a
                  whole one-line text written in LaTeX (a reference such as `\\frac{3}{4}`);
- whole:          a whole one-line text that is a tuple, an interval or a ratio with no words (MATH's `(1,-2)`,
                  `[1,3)`, `3:45`): read as LaTeX, as math-verify reads them only there;
- last number:    the last number in the text (`1,234`, `-7`, `3/4`, `25%`, `10^3`, a ratio `3:1`);
- none:           nothing found, or nothing found that parses.

The answer found must commit to one number. It hedges, and is wrong however it parses (math-verify would read
only its last number), when `or` joins different numbers in it (`either 3 or 8`, `x = 3 or x = 8`; a bare last
number offered as an alternative: `it is 3 or 8`), when a box or a `####` line lists several after its last `=`
(`\\boxed{3, 8}`; `3 + 5 = 8` commits to 8), or when `and` joins two numbers (`2 and 3`, where math-verify reads 3;
not the mixed number `2 and 1/2`). `, or` and `(or` restate one value when the numbers agree up to a unit factor
(`1/4, or 25%`, `$5, or 500 cents`, `40 minutes (or 2/3 of an hour)`) and no word of doubt offers them as
alternatives (`18 (or 20)`, `3, or perhaps 8` hedge). Words around a stated answer are no hedge (`the answer is 18
after 3 days`: math-verify then reads the span as it reads any), except those that make it a bound or set it
against another number (`12 (not 7)`, `12 instead of 7`, `at least 7`, `7 or more`), and a box that assigns
several values (`\\boxed{x=12, y=7}`) names them all. math-verify reads a LaTeX answer (`3 \\text{ or }
8`) as a set, never equal to one number. A tuple, an interval or a ratio is one answer (`\\boxed{(1, -2)}`; `3:45`
is not 3), and a number with a unit and a power is the number (`48 cm^2`). A reference that itself names several
numbers (a pair) lets the prediction do so too.

A prediction's reasoning (<think>...</think>) is dropped first; one that never closes leaves no answer. Only the
last MAX_CHARS characters of each text are read.

Model output is untrusted, and sympy can run for ever on it (an enormous power tower) or fill the memory. So
parsing and comparing run in one child process, kept across calls for speed and killed and replaced when a
call overruns its wall-clock limit; each call may also grow it by MEMORY_BYTES at most. math-verify's own
timeouts (signal.alarm: they fail off the main thread, and distill checks from worker threads) are off.
`check_math` never raises: a timeout or a failure is `error`, with `correct` False.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

from distillery.core.isolation import Child, ChildTimeout, limit_growth, plain
from distillery.core.unseen import unseen_pattern

MAX_CHARS = 4000  # of a reply, from its end: the final answer is there, and sympy's work grows with the text
MAX_SPAN = 200  # characters of one extracted answer
MEMORY_BYTES = 1 << 30  # that one check may add to the child
STARTUP_TIMEOUT_S = 120.0  # starting the child and importing sympy, before the first check's own clock starts

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
GSM_FINAL = re.compile(r"####[ \t]*([^\sA-Za-z#][^\n]*)")  # not a markdown heading (`#### Step 2`)
INVISIBLE = unseen_pattern(keep="\t\n\r")  # control and zero-width characters; line breaks stay
ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)[\s*:]*([^\n]*)", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.;!?](?!\d)|,\s+(?=[A-Za-z])")
LATEX_SPAN = re.compile(r"\\\[(.+?)\\\]|\\\((.+?)\\\)|\$\$(.+?)\$\$|\$([^$]*\\[A-Za-z][^$]*)\$", re.DOTALL)
LATEX_COMMAND = re.compile(r"\\[A-Za-z]")
LATEX_MARKUP = re.compile(r"\\[A-Za-z]|[{}^_]")
OR_WORD = re.compile(r"\bor\b", re.IGNORECASE)
# words that make a stated answer a bound or one number set against another ('12 (not 7)', '12 instead of 7', 'at
# least 7'): math-verify would read its last number
QUALIFIED = re.compile(r"\b(?:not|instead of|rather than|at (?:least|most)|or (?:more|less|fewer)|(?:more|less|fewer) "
                       r"than)\b", re.IGNORECASE)
# ', or' and '(or' restate one value in other units ('1/4, or 25%', '40 minutes (or 2/3 of an hour)', '$5, or 500
# cents') when the numbers agree up to one of these factors; a word of doubt makes them alternatives anyway
RESTATED = re.compile(r",\s*or\b|\(\s*or\b", re.IGNORECASE)
UNIT_FACTORS = (1, 10, 12, 24, 60, 100, 1000, 3600)
DOUBT = re.compile(r"\b(?:either|maybe|perhaps|possibly|probably|might|could)\b", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.,^])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?(?:\^\d+)?%?")  # not cm^2's 2
# read only as LaTeX by math-verify (as plain text, `(1,-2)` is -2 and `3:45` is 3): a bracketed tuple or interval
# with no words, a ratio or a time
TUPLE_OR_RATIO = re.compile(r"[\[(][^A-Za-z\n]*,[^A-Za-z\n]*[\])]|-?\d+(?:\.\d+)?(?:\s*:\s*\d+(?:\.\d+)?)+")
NUMBER_OR_RATIO = re.compile(f"(?:{NUMBER.pattern})" + r"(?:\s*:\s*\d+(?:\.\d+)?)*")  # a last number: 3:1 whole
JOINED_BY_AND = re.compile(f"(?:{NUMBER.pattern})" + r"(?:\s*+,)?\s++and\s++" + f"(?:{NUMBER.pattern})")
# a number and a plain-text unit with a power (`48 cm^2`, `9.8 m/s^2`): the number, not LaTeX's 48*c*m^2
NUMBER_IN_UNITS = re.compile(f"({NUMBER.pattern})" + r"\s*[A-Za-z]+(?:\^\d+)?(?:\s*/\s*[A-Za-z]+(?:\^\d+)?)?")


@dataclass(frozen=True)
class MathCheck:
    correct: bool
    predicted: str | None  # the answer found in the prediction, as written there
    expected: str | None  # the answer found in the reference; None when it has none that parses
    how: str  # which extraction found the prediction's answer (see the module docstring); after a timeout or a
    #           failure, the first that found something
    error: str | None = None  # a timeout, a crash, an answer that cannot be parsed or that names several numbers


def check_math(prediction: str, reference: str, timeout_s: float = 5.0) -> MathCheck:
    """Whether the prediction's final answer equals the reference's, by math-verify; see the module docstring."""
    try:
        return _CHECKER.check(answer_region(prediction), answer_region(reference), timeout_s)
    except Exception as err:  # noqa: BLE001 - a caller scoring thousands of replies gets a failed check, never a raise
        return MathCheck(False, None, None, "none", f"{type(err).__name__}: {err}")


def after_reasoning(text: str) -> str:
    """The text after the last </think>; all of it when there is no reasoning block; nothing when one was opened
    and never closed (a reply cut off mid-thought: what it said while thinking is no answer)."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    return "" if THINK_OPEN in text else text


def answer_region(text: str) -> str:
    """What follows the reasoning (after_reasoning), at most its last MAX_CHARS characters, as a reader sees it:
    a typographic minus (U+2212, as LaTeX-to-Unicode and some teachers write it) is "-" (its number would otherwise
    lose the sign), characters that show nothing (a zero-width space or a soft hyphen inside "1\u200b000") are
    dropped, so the number is not read as two, and digits of other scripts (fullwidth ４２, Arabic-Indic ٤٢) are
    ASCII digits, which math-verify reads."""
    region = INVISIBLE.sub("", after_reasoning(text)[-MAX_CHARS:]).replace("\u2212", "-")
    return region if region.isascii() else OTHER_DIGIT.sub(lambda digit: str(unicodedata.decimal(digit[0])), region)


OTHER_DIGIT = re.compile(r"(?![0-9])\d")  # a decimal digit (Unicode Nd) of any script but ASCII


# ---- finding the answer (plain regular expressions: cheap, safe in this process) ---------------------------------

def candidates(text: str) -> list[tuple[str, str]]:
    """(how, answer text) for each extraction that finds something, the most explicit first."""
    found = [("boxed", last_boxed(text)), ("####", last_match(GSM_FINAL, text)),
             ("the answer is", after_answer_is(text)), ("latex", last_latex(text)),
             ("whole", whole_tuple_or_ratio(text)), ("last number", last_match(NUMBER_OR_RATIO, text, group=0))]
    return [(how, span[:MAX_SPAN]) for how, span in found if span]


def last_match(pattern: re.Pattern, text: str, group: int = 1) -> str | None:
    matches = list(pattern.finditer(text))
    return matches[-1].group(group).strip() if matches else None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...}, braces balanced; None when there is none or it is cut."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    opening = text.index("{", start)
    depth = 0
    for i in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[opening + 1:i].strip() or None
    return None


def after_answer_is(text: str) -> str | None:
    """The rest of the sentence after the last 'answer is' / 'answer:', markdown bold dropped."""
    rest = last_match(ANSWER_IS, text)
    if not rest:
        return None
    return SENTENCE_END.split(rest, maxsplit=1)[0].strip(" *") or None


def last_latex(text: str) -> str | None:
    """The last LaTeX math span with a command in it; else the whole text when it is one line of LaTeX."""
    spans = [next(group for group in match.groups() if group is not None) for match in LATEX_SPAN.finditer(text)]
    spans = [span.strip() for span in spans if LATEX_COMMAND.search(span)]
    if spans:
        return spans[-1]
    whole = text.strip()
    if "\n" not in whole and len(whole) <= MAX_SPAN and LATEX_COMMAND.search(whole):
        return whole
    return None


def whole_tuple_or_ratio(text: str) -> str | None:
    """The whole text when it is one tuple, interval or ratio (TUPLE_OR_RATIO) and nothing else."""
    whole = text.strip().strip("$").strip()
    return whole if len(whole) <= MAX_SPAN and TUPLE_OR_RATIO.fullmatch(whole) else None


# ---- parsing and comparing (sympy: only ever in the child) -----------------------------------------------------

def parse_answer(span: str) -> list:
    """math-verify's parse of one extracted answer (empty when it cannot be read): as LaTeX when it has LaTeX
    markup in it (`\\frac`, `1{,}234`, `2^{10}`), else as plain text (where `$` is a currency sign and words are
    units). Never the raw text as a fallback: an answer that does not parse lets the next extraction try."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    inner = span.strip().strip("$").strip()
    in_units = NUMBER_IN_UNITS.fullmatch(inner)
    if in_units and "^" in inner:
        inner = in_units.group(1)
    if LATEX_MARKUP.search(inner) or TUPLE_OR_RATIO.fullmatch(inner):
        return parse(f"${inner}$", [LatexExtractionConfig()], fallback_mode="no_fallback", parsing_timeout=None)
    inner = inner.replace("\\$", "").replace("\\%", "%")
    return parse(inner, [LatexExtractionConfig(), ExprExtractionConfig()], fallback_mode="no_fallback",
                 parsing_timeout=None)


def first_parsed(text: str) -> tuple[str, str, list] | None:
    """(how, answer text, parsed) of the first extraction whose answer parses."""
    for how, span in candidates(text):
        parsed = parse_answer(span)
        if parsed:
            return how, span, parsed
    return None


def compare(prediction: str, reference: str) -> MathCheck:
    """The check itself, in this process: extraction, parsing, math-verify's comparison."""
    from math_verify import verify

    expected = first_parsed(reference)
    if expected is None:
        shown, _ = first_found(reference)
        error = f"the reference answer {shown!r} cannot be parsed" if shown else "the reference has no answer"
        predicted, how = first_found(prediction)
        return MathCheck(False, predicted, None, how, error)
    got = first_parsed(prediction)
    if got is None:
        shown, _ = first_found(prediction)
        return MathCheck(False, shown, expected[1], "none", f"the answer {shown!r} cannot be parsed" if shown else None)
    how, span, parsed = got
    hedge = hedged(how, span if how != "last number" else alternatives_ending(prediction), expected[1], reference)
    qualified = QUALIFIED.search(span) if how == "the answer is" else None
    if qualified and not hedge:
        hedge = f"it qualifies its answer ({qualified.group(0).lower()}), not one final answer"
    if hedge:
        return MathCheck(False, span, expected[1], how, hedge)
    return MathCheck(bool(verify(expected[2], parsed, timeout_seconds=None)), span, expected[1], how)


def hedged(how: str, span: str, reference_span: str, reference: str) -> str | None:
    """Why a predicted answer commits to no one number (see the module docstring), or None."""
    named = committed_numbers(how, span)
    if len(named) < 2 or len(committed_numbers("boxed", reference_span)) > 1 or JOINED_BY_AND.search(reference):
        return None
    return f"it names {len(named)} different numbers, not one final answer"


def committed_numbers(how: str, span: str) -> set:
    """The different numbers an answer commits to: all of them when 'or' is in it; in a box or a `####` line,
    those after its last '=' ('3 + 5 = 8': 8); both of two joined by 'and' ('2 and 3'; not '2 and 1/2', a mixed
    number); none for LaTeX, a tuple, an interval or a ratio (math-verify reads them whole) or for the words
    around a stated answer."""
    inner = span.strip().strip("$").strip()
    if LATEX_MARKUP.search(inner) or TUPLE_OR_RATIO.fullmatch(inner):
        return set()
    joined = JOINED_BY_AND.search(span)
    if joined and "/" not in joined.group(0).split("and")[-1]:
        return number_values(joined.group(0))
    if OR_WORD.search(span):
        values = number_values(span)
        return set() if RESTATED.search(span) and not DOUBT.search(span) and one_value_in_units(values) else values
    if how in ("boxed", "####"):  # each part's value after its last '=': `x=12, y=7` names two
        return set().union(*(number_values(part.rsplit("=", 1)[-1]) for part in span.split(",") if "=" in part)) \
            if span.count("=") > 1 else number_values(span.rsplit("=", 1)[-1])
    return set()


OFFERED_BEFORE = re.compile(f"(?:{NUMBER.pattern})" + r"\s*,?\s+or\s+(?:else\s+|maybe\s+|perhaps\s+)?$", re.IGNORECASE)


def alternatives_ending(text: str) -> str:
    """'3 or 8' when the text's last number is offered as an alternative to the number before it; else ''."""
    last = list(NUMBER.finditer(text))
    offered = OFFERED_BEFORE.search(text[:last[-1].start()]) if last else None
    return offered.group(0) + last[-1].group(0) if offered else ""


def one_value_in_units(values: set) -> bool:
    """Whether every number is the first one in other units (a ratio in UNIT_FACTORS either way; a percentage
    also as its fraction: 1/4 and 25)."""
    numbers = [v for v in values if isinstance(v, Fraction) and v != 0]
    if len(numbers) != len(values):
        return False
    first = numbers[0]
    return all(any(v * f == first or first * f == v or v * f == first * 100 or first * f == v * 100
                   for f in UNIT_FACTORS) for v in numbers[1:])


def number_values(text: str) -> set:
    """The numbers in the text by value: '1,200' and '1200.0' are one, and so are '25%' and '25' (as math-verify
    reads them)."""
    values: set = set()
    for match in NUMBER.finditer(text):
        number = match.group(0)
        try:
            values.add(Fraction(number.rstrip("%").replace(",", "")))
        except (ValueError, ZeroDivisionError):  # '1/0'
            values.add(number)
    return values


def first_found(text: str) -> tuple[str | None, str]:
    """(answer text, how) of the first extraction that finds something, parsed or not: what a failed check shows."""
    found = candidates(text)
    return (found[0][1], found[0][0]) if found else (None, "none")


def load_math_verify() -> None:
    """In the child, once: import sympy and math-verify and silence math-verify's warning that its timeouts are off
    (they are, on purpose: the parent's clock bounds each call)."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    compare("$\\frac{1}{2}$", "0.5")  # loads the LaTeX grammar


def compare_in_child(prediction: str, reference: str, cpu_seconds: float) -> MathCheck:
    limit_growth(MEMORY_BYTES, cpu_seconds)
    return compare(prediction, reference)


class Checker:
    """One math-verify child for the whole process, answering one call at a time; replaced when a call overruns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: Child | None = None

    def check(self, prediction: str, reference: str, timeout_s: float) -> MathCheck:
        with self._lock:
            try:
                child = self._running()
                return child.call(plain, compare_in_child, prediction, reference, timeout_s + 1, timeout_s=timeout_s)
            except ChildTimeout:
                self.close()
                return self._failed(prediction, reference, f"timed out after {timeout_s:g} s")
            except Exception as err:  # noqa: BLE001 - a crash, a memory limit met natively, a child that will not start
                self.close()
                return self._failed(prediction, reference, f"the math checker failed: {err}")
            except BaseException:  # Ctrl-C mid-call killed the child: the next call starts another
                self.close()
                raise

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None

    def _running(self) -> Child:
        if self._child is None:
            child = Child("math-verify", "checking a math answer")
            try:
                child.call(plain, load_math_verify, timeout_s=STARTUP_TIMEOUT_S)
            except BaseException:
                child.close()
                raise
            self._child = child
        return self._child

    @staticmethod
    def _failed(prediction: str, reference: str, error: str) -> MathCheck:
        predicted, how = first_found(prediction)
        return MathCheck(False, predicted, first_found(reference)[0], how, error)


_CHECKER = Checker()
atexit.register(_CHECKER.close)
