"""The one record shape every data source yields and every later stage reads (docs/ingest.md shows it).

    {"id", "source", "task", "messages": [{"role", "content"}], "choices"?, "label"?, "meta"}
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from distillery.core.errors import UserError
from distillery.core.userinput import not_utf8, read_utf8

ROLES = ("system", "user", "assistant")
JSON_LINES = object()  # read_json_value's answer for a .json file that holds JSON Lines


def content_digest(messages: list[dict[str, str]], choices: list[str] | None = None, label: int | None = None) -> bytes:
    """sha256 of what a record says, independent of where it came from: the deduplication key. Its parts are
    strings and an int (make_record checks the messages), so orjson's handling of NaN cannot merge two keys."""
    return hashlib.sha256(orjson.dumps([messages, choices, label], option=orjson.OPT_SORT_KEYS)).digest()


def content_key(messages: list[dict[str, str]], choices: list[str] | None = None, label: int | None = None) -> str:
    """content_digest as hex text."""
    return content_digest(messages, choices, label).hex()


def make_record(
    source: str,
    task: str,
    messages: list[dict[str, str]],
    meta: dict[str, Any],
    choices: list[str] | None = None,
    label: int | None = None,
) -> dict[str, Any]:
    """Build a normalized record; its id is a stable hash of the source name and the content. Texts are in NFC,
    so that decomposed Hangul (as macOS saves it) trains and dedupes as the syllables it spells."""
    for message in messages:
        if not is_message(message):
            raise ValueError(f"bad message {message!r}: role must be one of {ROLES} and content a string")
    messages = [{**message, "content": unicodedata.normalize("NFC", message["content"])} for message in messages]
    if choices is not None:
        choices = [unicodedata.normalize("NFC", choice) for choice in choices]
    record: dict[str, Any] = {
        "id": hashlib.sha256((source + "\0" + content_key(messages, choices, label)).encode()).hexdigest()[:16],
        "source": source,
        "task": task,
        "messages": messages,
    }
    if choices is not None:
        record["choices"] = choices
        record["label"] = label
    record["meta"] = meta
    return record


def is_message(message: Any) -> bool:
    """A chat message as records hold them: {role: one of ROLES, content: text}."""
    return isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)


def record_problem(record: dict[str, Any]) -> str | None:
    """What keeps a row from being a record as ingest and distill write them (make_record, empty turns dropped), or
    None: a stage reading one from disk refuses a file edited or damaged since."""
    messages = record.get("messages")
    if not isinstance(record.get("id"), str) or not isinstance(record.get("task"), str):
        return "no `id` or `task` text"
    if not isinstance(messages, list) or not messages:
        return "no `messages` list"
    for message in messages:
        if not is_message(message):
            return f"a message that is not {{role: {' | '.join(ROLES)}, content: text}}: {str(message)[:100]!r}"
        if not message["content"].strip():
            return f"an empty {message['role']} turn"
    choices = record.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        return "`choices` that are not a list of texts"
    if not isinstance(record.get("meta", {}), dict):
        return "a `meta` that is not an object"
    return None


def json_line(row: dict[str, Any]) -> bytes:
    """One UTF-8 JSON line. orjson is about ten times faster than json.dumps (100k-row ingest, bench/ingest.py),
    but it writes NaN and Infinity as null and refuses integers beyond 64 bits; CodeI/O test cases hold such
    values and the verifiers compare against them, so those rows go through json.dumps, which keeps them."""
    try:
        line = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        if b"null" not in line or not has_non_finite_float(row):
            return line
    except orjson.JSONEncodeError:
        pass
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def has_non_finite_float(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite_float(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_non_finite_float(v) for v in value)
    return False


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float (a broken model's loss or perplexity) as None: the reports evaluate writes
    are strict JSON, which jq, JavaScript and pandas read (NaN and Infinity are Python's extensions)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def report_json(data: Any) -> str:
    """Indented strict JSON (`finite_or_null`) of a report, ending with a newline."""
    return json.dumps(finite_or_null(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as UTF-8 JSON lines; returns how many were written."""
    count = 0
    with open(path, "wb") as handle:
        for row in rows:
            handle.write(json_line(row))
            count += 1
    return count


def load_json_line(line: str | bytes) -> Any:
    """A JSON line (text or UTF-8 bytes): orjson for speed; json for what orjson refuses (NaN and Infinity, as Python
    writes them) or reads otherwise: an integer beyond 64 bits, which orjson reads as a float that loses its digits
    (a CodeI/O answer such as 27! would train as 1.0888869450418352e+28)."""
    if not search(LONG_DIGITS, line):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
    return without_lone_surrogates(json.loads(line), line)


LONG_DIGITS = re.compile(r"\d{19}")  # may be an integer past 64 bits: json reads it (and a float or a string) exactly
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def search(pattern: re.Pattern[str], text: str | bytes) -> bool:
    """pattern.search on text, or on bytes with the same pattern as bytes."""
    return (as_bytes(pattern) if isinstance(text, bytes) else pattern).search(text) is not None


@functools.cache
def as_bytes(pattern: re.Pattern[str]) -> re.Pattern[bytes]:
    return re.compile(pattern.pattern.encode("ascii"))


def without_lone_surrogates(value: Any, text: str | bytes) -> Any:
    """`value`, which json.loads read from `text`, refusing a lone UTF-16 surrogate escape ("\\ud800"): json accepts
    one (orjson does not), and the text it makes cannot be written as UTF-8, so it failed far from the line that
    held it. Only text that holds such an escape is looked at again."""
    if not search(SURROGATE_ESCAPE, text):
        return value
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the escape \\u{ord(err.object[err.start]):04x} is half of a UTF-16 surrogate pair, not a "
                         "character") from None
    return value


# A record's JSON line: 128k tokens of English are about 0.5 MB. Format's tokenizer takes some 275 times a text's size.
MAX_RECORD_BYTES = 2 << 20
# A record's task: it names a row of evaluate's tables and a key of its JSON (`overall` is taken by all of them).
TASK_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_CONTAINERS = 200_000  # `[` and `{` in one line: 20 million empty arrays in a 60 MB line took 3 GB to read
MAX_FILE_CONTAINERS = 10_000_000  # the same in a .json file read whole (14 million `{}` in 40 MB took 3 GB)
MAX_JSON_FILE_BYTES = 512 << 20  # a .json file read whole takes twice its size, as bytes and as text
MAX_NESTING = 100  # arrays and objects in a user's row: no record holds more; Python's own limit is near 1000


def nested_too_deep(value: Any, text: str) -> bool:
    """Whether `value` (read from `text`) nests arrays and objects more than MAX_NESTING deep: such a row passes the
    JSON reader and then ends whatever walks it recursively (repr, json.dumps) in a RecursionError. Only text with
    that many brackets is walked."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_NESTING:
                    return True
                stack.append((child, depth + 1))
    return False


def json_reason(err: Exception) -> str:
    """Why a JSON text could not be read: the decoder's message, or what Python's json module cannot hold (arrays
    or objects nested thousands deep, an integer of more than 4300 digits), which it raises as other errors."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} column {err.colno}" if err.msg.endswith(" at") else err.msg  # 'Invalid control character at'
    if isinstance(err, RecursionError):
        return "arrays or objects nested too deep to read"
    return str(err).split(";")[0]  # ValueError: Exceeds the limit (4300 digits) for integer string conversion...


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file (read_jsonl_numbered without the line numbers)."""
    for _, row in read_jsonl_numbered(path):
        yield row


MAX_LINE_BYTES = 64 << 20  # a JSONL line: a long reasoning trace is a few MB


def read_jsonl_numbered(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file. A line that is not a JSON object, or not
    UTF-8, is a UserError naming it; a UTF-8 byte order mark is fine."""
    with open(path, "rb") as handle:
        offset = 0
        for line_no, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:  # read no further: one line of gigabytes would take several times that
                raise UserError(f"{path}: line {line_no} is longer than {MAX_LINE_BYTES >> 20} MB, more than one "
                                "record holds. Check that the file is JSON Lines (one object a line), or take that "
                                "line out.")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8(path, f"line {line_no}, byte {offset + err.start}", raw if line_no == 1 else b"") from None
            if line_no == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark
            offset += len(raw)
            if not line.strip():
                continue
            if line.count("[") + line.count("{") > MAX_CONTAINERS:  # before parsing: each is a Python object
                raise UserError(f"{path}: line {line_no} holds more than {MAX_CONTAINERS:,} arrays or objects (or "
                                "brackets in its text), far more than one record holds; reading it would take GBs of "
                                "memory. Fix or remove that line.")
            try:
                row = load_json_line(line)
            except (ValueError, RecursionError) as err:  # JSONDecodeError, and what json.loads cannot hold
                if "integer string conversion" in str(err):  # valid JSON, past what Python reads as an int
                    raise UserError(f"{path}: line {line_no} holds an integer of more than 4,300 digits, more than "
                                    "Python converts from text. Write it as a string, or remove that line.") from None
                raise UserError(f"{path}: line {line_no} is not valid JSON ({json_reason(err)}). Fix or remove that "
                                "line.") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {line_no} is a JSON {type(row).__name__}, expected an object.")
            if nested_too_deep(row, line):
                raise UserError(f"{path}: line {line_no} nests arrays or objects more than {MAX_NESTING} deep, "
                                "deeper than any record. Fix or remove that line.")
            yield line_no, row


def read_json_objects(path: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, where) of each row of a user's .jsonl or .json file, `where` naming the file and the line (JSON
    Lines) or the index (a JSON list of objects, or one under "data" or "train")."""
    data = read_json_value(path) if path.suffix.lower() == ".json" else JSON_LINES
    if data is JSON_LINES:
        for line_no, row in read_jsonl_numbered(path):
            yield row, {"file": str(path), "line": line_no}
        return
    rows = data.get("data", data.get("train")) if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}, or JSON Lines: one object "
                        "a line).")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: item {index} is a JSON {type(row).__name__}, expected an object.")
        yield row, {"file": str(path), "index": index}


def first_line_is_a_whole_object(path: Path) -> bool:
    """Whether the file's first line (up to MAX_LINE_BYTES) is one whole JSON object and something follows it."""
    with open(path, "rb") as handle:
        first = handle.readline(MAX_LINE_BYTES + 1)
        more = handle.read(4096).strip()
    try:
        return bool(more) and isinstance(orjson.loads(first.removeprefix(b"\xef\xbb\xbf")), dict)
    except orjson.JSONDecodeError:
        return False


def read_json_value(path: Path) -> Any:
    """The value of a .json file, or JSON_LINES when its first line is one whole value and more follow (JSON Lines
    under a .json name, as datasets' Dataset.to_json writes them: told from its first line, so that such a file
    streams as a .jsonl does instead of being read whole). Not UTF-8 or not JSON is a UserError."""
    if first_line_is_a_whole_object(path):
        return JSON_LINES
    size = path.stat().st_size
    if size > MAX_JSON_FILE_BYTES:
        raise UserError(f"{path} is {size / (1 << 20):,.0f} MB; a .json file is read whole, up to "
                        f"{MAX_JSON_FILE_BYTES >> 20} MB. Convert it to JSON Lines (one record a line, read as it "
                        "streams) and name it .jsonl.")
    text = read_utf8(path)
    if text.count("[") + text.count("{") > MAX_FILE_CONTAINERS:  # before parsing: each is a Python object
        raise UserError(f"{path} holds more than {MAX_FILE_CONTAINERS:,} arrays or objects: read whole, they would "
                        "take GBs of memory. Convert it to JSON Lines (one record a line, read as it streams) and "
                        "name it .jsonl.")
    try:
        value = without_lone_surrogates(json.loads(text), text)
        if nested_too_deep(value, text):  # a list of rows, or one under "data": one level more than a row
            raise UserError(f"{path}: nests arrays or objects more than {MAX_NESTING} deep, deeper than any record. "
                            "Fix the rows that do.")
        return value
    except (ValueError, RecursionError) as err:
        if not isinstance(err, json.JSONDecodeError):
            raise UserError(f"{path}: not valid JSON ({json_reason(err)}).") from None
        if err.msg == "Extra data" and "\n" not in text[: err.pos].strip():
            return JSON_LINES
        extra = " A .json file holds one JSON value; for one object a line, name it .jsonl." if err.msg == "Extra data" else ""
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}).{extra}") from None
