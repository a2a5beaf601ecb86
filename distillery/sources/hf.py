"""Hugging Face datasets: a Hub id or local json/jsonl/csv/parquet files, mapped into messages.

Layouts (`format`):
- columns:       a column per role (grade-school-math-instructions: INSTRUCTION -> user, RESPONSE -> assistant)
- mathqa:        Problem/options/correct/Rationale -> a `math_mc` record with `choices` and `label`, the
                 options split with lm-evaluation-harness's regular expression
- decomposition: {question, sub_questions[]} -> the question and its numbered sub-questions
- messages:      a `messages` list of {role, content}
- sharegpt:      a `conversations` list of {from: human|gpt|system, value}
- alpaca:        instruction, input, output
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pydantic import Field, field_validator

from distillery.sources.files import resolve_paths
from distillery.sources.registry import Source, SourceParams, SourceReport
from distillery.sources.text import clean_values, controls_removed, listed, name_key, shown, stripped
from distillery.core.errors import UserError
from distillery.core.records import MAX_LINE_BYTES, TASK_PATTERN, make_record, read_json_objects
from distillery.core.userinput import read_utf8

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
TABLES = (".csv", ".parquet")  # files whose every row has every column
# lm-evaluation-harness, lm_eval/tasks/mathqa/utils.py: how an `options` string becomes five choices.
MATHQA_OPTIONS = re.compile(r"[abcd] \) .*?, |e \) .*?$")
LETTERS = "abcde"
JSON_TYPES = {list: "list", dict: "object", bool: "boolean"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class HFDatasetParams(SourceParams):
    """A Hugging Face dataset from the Hub or local json/jsonl/csv/parquet files, mapped into messages."""

    kind: Literal["hf"]
    dataset: str | None = Field(None, description="Hub dataset id, e.g. qwedsacf/grade-school-math-instructions.")
    config_name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read.")
    files: str | list[str] | None = Field(None, description="Local json/jsonl/csv/parquet file(s), a directory or a glob.")
    format: Literal["columns", "mathqa", "decomposition", "messages", "sharegpt", "alpaca"] = Field(
        "columns", description="How rows become messages: a column mapping, or one of the known layouts."
    )
    columns: dict[Literal["system", "user", "assistant"], str] = Field(
        default_factory=lambda: {"user": "INSTRUCTION", "assistant": "RESPONSE"},
        description="For format=columns: which column becomes which role.",
    )
    task: str = Field("qa", pattern=TASK_PATTERN,
                      description="The record task for format=columns/messages/sharegpt/alpaca: letters, digits, "
                      "`_`, `.` and `-` (it names a row of evaluate's tables); not `overall`.")
    timeout_s: float = Field(10.0, gt=0, description="How long to wait for the Hub before failing (no long hangs offline).")

    @field_validator("columns")
    @classmethod
    def _a_user_and_an_assistant_column(cls, columns: dict[str, str]) -> dict[str, str]:
        """Checked whatever the format (only `columns` reads them): a mapping that makes no conversation, or one
        where two roles read one column (the model would learn to echo), is a config error."""
        columns = {role: name_key(column) for role, column in columns.items()}  # as a file's header is read
        missing = [role for role in ("user", "assistant") if role not in columns]
        if missing:
            raise ValueError(f"needs a column for {' and '.join(missing)} (e.g. {{user: INSTRUCTION, assistant: "
                             "RESPONSE}): a record is a user turn answered by an assistant turn")
        shared = sorted({c for c in columns.values() if list(columns.values()).count(c) > 1})
        if shared:
            raise ValueError(f"{shared[0]!r} is the column of two roles: each role reads a column of its own")
        return columns

    @field_validator("task")
    @classmethod
    def _not_overall(cls, task: str) -> str:
        if task == "overall":
            raise ValueError("`overall` is the name of evaluate's row for all tasks together: choose another task name")
        return task


MAX_OPTIONS_CHARS = 1000  # MathQA's longest is 137 characters; the harness's expression takes time quadratic in it


def split_mathqa_options(options: str) -> list[str]:
    """`"a ) 38 , b ) 27.675 , ..."` -> `["38", "27.675", ...]`, exactly as the harness's mathqa task does. Longer
    than MAX_OPTIONS_CHARS is a RowError ("a ) " repeated over 256 KB took 146 s of one core)."""
    if len(options) > MAX_OPTIONS_CHARS:
        raise RowError(f"options longer than {MAX_OPTIONS_CHARS:,} characters")
    return [c[4:].rstrip(" ,") for c in MATHQA_OPTIONS.findall(options)]


class RowError(ValueError):
    """A row that cannot become a record: dropped with this reason (a fixed text: each distinct reason is a row of
    the report) and `detail`, the value at fault, in dropped.jsonl only."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.detail = detail


def text_value(value: Any, column: str) -> str:
    """A value as stripped text: a number as its text, None or NaN as "". A list, an object or a boolean is no
    text to train on (its Python repr would be): RowError."""
    if value is None or (isinstance(value, float) and value != value):
        return ""  # a CSV's or a table's missing cell
    if isinstance(value, float) and math.isinf(value):  # Infinity, or 1e400, in JSON: no text to train on
        raise RowError(f"{column} is not a finite number ({value})")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"non-text {column} ({JSON_TYPES.get(type(value), type(value).__name__)})")
    return stripped(str(value))  # whitespace, and the zero-width characters a blank-looking cell holds


def _text(row: dict[str, Any], column: str) -> str:
    text = text_value(row.get(column), column)
    if not text:
        raise RowError(f"empty {column}")
    return text


def mathqa_record(row: dict[str, Any]) -> tuple[list[dict], list[str], int]:
    """Messages, choices and label of a MathQA row."""
    choices = split_mathqa_options(_text(row, "options"))
    if len(choices) != 5:
        raise RowError("options not parseable")
    correct = _text(row, "correct").lower()
    if correct not in tuple(LETTERS):  # one letter: "ab" is a substring of "abcde", not an answer
        raise RowError("correct is not a-e")
    label = LETTERS.index(correct)
    listed = "\n".join(f"{LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    rationale = text_value(row.get("Rationale"), "Rationale").strip('"').strip()
    answer = f"The answer is ({correct}) {choices[label]}."
    messages = [{"role": "user", "content": f"{_text(row, 'Problem')}\n\nOptions:\n{listed}"},
                {"role": "assistant", "content": f"{rationale}\n{answer}" if rationale else answer}]
    return messages, choices, label


def decomposition_messages(row: dict[str, Any]) -> list[dict]:
    subs = row.get("sub_questions")
    questions = [q for q in (text_value(s, "sub_questions") for s in subs) if q] if isinstance(subs, list) else []
    if not questions:
        raise RowError("empty sub_questions")
    numbered = "\n".join(f"{i}. {question}" for i, question in enumerate(questions, 1))
    return [{"role": "user", "content": f"Break this question into simpler sub-questions.\n\n{_text(row, 'question')}"},
            {"role": "assistant", "content": numbered}]


def chat_messages(turns: Any, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RowError("empty conversation")
    messages = []
    for turn in turns:
        role = roles.get(str(turn.get(role_key, "")).lower()) if isinstance(turn, dict) else None
        if role is None:
            if not isinstance(turn, dict):
                raise RowError("turn is not an object")
            raise RowError(f"unknown role in {role_key}", f"{str(turn.get(role_key))[:40]!r}")
        content = turn_text(turn.get(content_key), content_key)
        if not content:
            raise RowError("empty turn")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise RowError("conversation does not end with an assistant turn")
    check_turn_order([m["role"] for m in messages])
    return messages


def turn_text(content: Any, key: str) -> str:
    """A turn's text: a string, a number as its text, or OpenAI's list of text parts ([{"type": "text", "text":
    ...}], joined as OpenAI joins them); any other part (an image) or value is no text to train on: RowError."""
    if isinstance(content, list) and content and all(isinstance(part, dict) for part in content):
        kinds = sorted({str(part.get("type")) for part in content} - {"text"})
        if kinds or not all(isinstance(part.get("text"), str) for part in content):  # the part's type: the detail
            raise RowError(f"non-text {key} part", shown(kinds[0][:40]) if kinds else "text without a string")
        return stripped("".join(part["text"] for part in content))
    return text_value(content, key)


def check_turn_order(roles: list[str]) -> None:
    """An optional system turn first, then user and assistant by turns, as chat templates render them (several
    raise on anything else); LLaMA-Factory drops such conversations too."""
    dialogue = roles[1:] if roles[0] == "system" else roles
    if dialogue != ["user", "assistant"] * (len(dialogue) // 2) or not dialogue:
        raise RowError("turns out of order (after an optional system turn: user, assistant, user, ...)")


def to_record(row: dict[str, Any], params: HFDatasetParams, where: dict[str, Any]) -> dict[str, Any]:
    """One row -> one record; raises RowError with the reason when it cannot."""
    absent = [column for column in required_columns(params) if column not in row]
    if absent:
        raise RowError(f"missing {', '.join(absent)}")
    fmt, choices, label, task = params.format, None, None, params.task
    if fmt == "mathqa":
        (messages, choices, label), task = mathqa_record(row), "math_mc"
    elif fmt == "decomposition":
        messages, task = decomposition_messages(row), "decompose"
    elif fmt == "messages":
        messages = chat_messages(row.get("messages"), "role", "content", {r: r for r in ("system", "user", "assistant")})
    elif fmt == "sharegpt":
        messages = chat_messages(row.get("conversations"), "from", "value", SHAREGPT_ROLES)
    elif fmt == "alpaca":
        extra = text_value(row.get("input"), "input")
        user = _text(row, "instruction") + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    else:
        messages = [{"role": role, "content": _text(row, column)}
                    for role in ("system", "user", "assistant") if (column := params.columns.get(role))]
    meta = {**where, **({"problem_id": row["id"]} if "id" in row and fmt == "mathqa" else {})}
    return make_record(params.name, task, messages, meta, choices, label)


REQUIRED = {"mathqa": ("Problem", "options", "correct"), "decomposition": ("question", "sub_questions"),
            "messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output")}
OPTIONAL = {"mathqa": ("id", "Rationale"), "alpaca": ("input",)}  # read when a row has them


def required_columns(params: HFDatasetParams) -> tuple[str, ...]:
    if params.format == "columns":
        return tuple(params.columns.values())
    return REQUIRED[params.format]


@functools.lru_cache(maxsize=4096)
def column_key(name: Any) -> Any:
    return name_key(name) if isinstance(name, str) else name


def first_repeated(keys: Iterable[Any]) -> Any:
    """The first key that comes again, else None (linear: a CSV header may have thousands of columns)."""
    seen: set[Any] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


def with_column_keys(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its column names as the config's are compared (NFC, without invisible characters: macOS writes
    a Korean header decomposed, a spreadsheet leaves `RESPONSE ` with its space); the row itself when they are."""
    if all(column_key(key) == key for key in row):
        return row
    twice = first_repeated(map(column_key, row))
    if twice is not None:  # two of its names are one as compared: which value is meant cannot be told
        raise RowError("a column named twice", f"{str(twice)[:40]!r}")
    return {column_key(key): value for key, value in row.items()}


def check_columns(columns: list[str], params: HFDatasetParams, origin: str) -> None:
    """A missing column is a config problem, not a row problem: stop and list what the data has."""
    missing = [c for c in required_columns(params) if c not in columns]
    if missing:
        raise UserError(f"{origin}: no column {', '.join(missing)} (format: {params.format}). It has: "
                        f"{listed(columns)}. Set `columns:` (format: columns) or pick the right format.")


Wanted = tuple[tuple[str, ...], tuple[str, ...]]  # (required, optional) columns


def read_local_file(path: Path, wanted: Wanted = ((), ())) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, where) pairs of a local file; JSONL errors name the line. Of a table, only the `wanted` columns are
    read (required, optional) when it has the required ones (a CSV exported with 200,000 empty columns took 42 s and
    1.4 GB for two)."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        yield from read_json_objects(path)
        return
    if suffix == ".csv":
        for line, row in read_csv(path, wanted):
            yield row, {"file": str(path), "row": line}
        return
    for i, row in enumerate(read_parquet(path, wanted)):
        yield row, {"file": str(path), "row": i}


def read_csv(path: Path, wanted: Wanted = ((), ())) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line where the row starts, row) of a CSV file. Every cell as its text: `8` stays `8`, `090210` keeps its
    zero, and `None` or `NA` are text; only an empty cell (or one a short line lacks) is empty. Row by row with the
    csv module, only the wanted columns kept: pandas took 30 s for 1,000 lines of 20,000 empty fields, and its usecols
    passed a line of more fields than the header (cut), which is refused here. A field is at most a JSONL line's
    size. Strict quoting: a quoted field left open took every later line into it, without a word."""
    import csv

    csv.field_size_limit(MAX_LINE_BYTES)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        start = 1  # the line the record being read starts on
        try:
            header = next(reader, [])
            if not header:
                raise UserError(f"{path}: empty, or its first line (the header) is blank. Put the column names first.")
            check_unique_columns(path, header)
            positions = columns_to_read(header, wanted) or range(len(header))
            names = [header[i] for i in positions]
            start = reader.line_num + 1
            for fields in reader:
                if len(fields) > len(header):
                    raise UserError(f"{path}: line {reader.line_num} has {len(fields)} fields where the header has "
                                    f"{len(header)}: a field holding a comma or a line break needs double quotes "
                                    "around it. Fix or remove that line.")
                if fields:  # a blank line is no row
                    fields += [""] * (len(header) - len(fields))
                    yield start, {name: fields[i] for name, i in zip(names, positions)}
                start = reader.line_num + 1
        except UnicodeDecodeError:
            read_utf8(path)  # raises the error that says where and what to do
            raise
        except csv.Error as err:
            if "unexpected end of data" in str(err):
                raise UserError(f"{path}: line {start} opens a quoted field (\") that never closes: it runs to the end "
                                f"of the file (line {reader.line_num}). Close the quote, or double a quote meant as "
                                "text (\"\").") from None
            raise UserError(f"{path}: line {reader.line_num} cannot be read as CSV ({err}). Fix or remove that "
                            "line.") from None


def check_unique_columns(path: Path, names: list[Any]) -> None:
    """Two columns of one name (as names are compared): which one a row's value came from would be a reader's
    choice (pandas takes the first, pyarrow the last), so the file is refused."""
    keys = [column_key(name) for name in names]
    repeated = first_repeated(keys)
    if repeated is not None:
        where = [i + 1 for i, key in enumerate(keys) if key == repeated]
        raise UserError(f"{path}: the column {shown(str(names[where[0] - 1]))} appears {len(where)} times (columns "
                        f"{', '.join(map(str, where))}). Rename or remove the extra ones.")


class MissingColumns(Exception):
    """A table whose header lacks a column the format needs: refused at its header (check_columns), rows or not."""

    def __init__(self, header: list[Any]):
        super().__init__("missing columns")
        self.columns = [column_key(name) for name in header]


def columns_to_read(header: list[Any], wanted: Wanted) -> list[int] | None:
    """The positions in the header of the (required, optional) columns, as names are compared; None (every column)
    when nothing is required; MissingColumns when a required one is not there."""
    required, optional = wanted
    if not required:
        return None
    positions = [i for i, name in enumerate(header) if column_key(name) in (*required, *optional)]
    found = {column_key(header[i]) for i in positions}
    if not all(column in found for column in required):
        raise MissingColumns(header)
    return positions


def read_parquet(path: Path, wanted: Wanted = ((), ())) -> Iterator[dict[str, Any]]:
    """Rows as plain Python values: a list column is a list (pandas would give numpy arrays)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        check_unique_columns(path, parquet.schema_arrow.names)
        names = parquet.schema_arrow.names
        positions = columns_to_read(names, wanted)
        for batch in parquet.iter_batches(batch_size=parquet_batch_rows(path, parquet.metadata),
                                          columns=None if positions is None else [names[i] for i in positions]):
            yield from batch.to_pylist()
    except (UserError, MissingColumns):
        raise
    except Exception as err:  # pyarrow raises many types for a bad file
        raise UserError(f"{path}: cannot read as parquet: {str(err) or type(err).__name__}") from None


PARQUET_BATCH_BYTES = 256 << 20  # rows decompressed at a time


def parquet_batch_rows(path: Path, metadata: Any) -> int:
    """Rows to read at a time (about PARQUET_BATCH_BYTES of them); a row group whose rows average more than a JSONL
    line may hold (an 11 KB file of 100 MB rows of one repeated letter) is refused before it is decompressed."""
    largest = 1
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        per_row = group.total_byte_size / max(group.num_rows, 1)
        if per_row > MAX_LINE_BYTES:
            raise UserError(f"{path}: row group {i} holds rows of {per_row / (1 << 20):,.0f} MB on average once "
                            f"decompressed ({group.total_byte_size / (1 << 20):,.0f} MB in all), more than one "
                            f"record holds (at most {MAX_LINE_BYTES >> 20} MB). Check the file, or take those rows out.")
        largest = max(largest, math.ceil(per_row))
    return max(1, min(65_536, PARQUET_BATCH_BYTES // largest))


def hub_offline() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_problem(dataset: str, timeout_s: float) -> str | None:
    """Why the Hub cannot serve `dataset` now (offline mode, no connection within the timeout, no such dataset),
    or None: a short check first, so that an offline machine never hangs in a download."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set, so the Hub is not used"
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(dataset, timeout=timeout_s)
    except Exception as err:  # connection, timeout, 404 and auth errors all end the same way
        name = type(err).__name__
        reason = name if "Connect" in name or "Timeout" in name else (str(err).splitlines() or [name])[0]
        return f"the Hugging Face Hub cannot be reached or has no such dataset ({reason})"
    return None


def load_hub_dataset(dataset: str, config_name: str | None, split: str, timeout_s: float, named: str,
                     hint: str) -> Any:
    """A Hub dataset's split through `datasets`; where the Hub cannot serve it (offline, unreachable), the copy an
    earlier run left in the local cache, read without any network call. Neither: one message naming the dataset
    and why, with `hint`. A split the dataset does not have is datasets' ValueError, for the caller to name."""
    import datasets

    check_hub_id(dataset, named)
    problem = hub_problem(dataset, timeout_s)
    if problem is None:
        return datasets.load_dataset(dataset, config_name, split=split)
    try:
        with datasets_cache_only():
            return datasets.load_dataset(dataset, config_name, split=split)
    except ValueError:
        raise
    except Exception:  # datasets' ConnectionError or FileNotFoundError: not in the cache
        raise UserError(f"{named} {dataset}: {problem}, and it is not in the local Hugging Face cache. {hint}") from None


def check_hub_id(dataset: str, named: str) -> None:
    """A Hub id, and nothing `datasets` would read from this machine instead: it loads a local folder of the same
    name (`..`, or `owner/name` under the working directory) before it asks the Hub or its cache."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(dataset)
    except HFValidationError as err:
        raise UserError(f"{named} {dataset!r} is not a Hugging Face Hub dataset id ({err}). A Hub id is `name` or "
                        "`owner/name`; local files go under `files:`.") from None
    if os.path.lexists(dataset):
        raise UserError(f"{named} {dataset}: a local file or folder of that name is in the working directory, which "
                        "`datasets` would read instead of the Hub dataset. Run from another directory, or set "
                        "`files:` to the local files.")


@contextlib.contextmanager
def datasets_cache_only() -> Iterator[None]:
    """datasets' own offline switch for one call: it resolves a Hub id from its cache and makes no request. The
    switch is a module setting read when datasets is imported (from HF_HUB_OFFLINE), so it is set here for the
    call and put back."""
    from datasets import config

    was = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = was


def read_hub(params: HFDatasetParams) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    hint = (f"Download it where you have network (e.g. `hf download {params.dataset} --repo-type dataset`) and set "
            "`files:` to the local json/jsonl/csv/parquet files instead of `dataset:`, or load it once with network.")
    data = load_hub_dataset(params.dataset, params.config_name, params.split, params.timeout_s, "dataset", hint)
    for i, row in enumerate(data):
        yield row, {"dataset": params.dataset, "split": params.split, "index": i}


def read(params: HFDatasetParams, report: SourceReport) -> Iterator[dict[str, Any]]:
    if bool(params.dataset) == bool(params.files):
        raise UserError(f"source {params.name}: set exactly one of `dataset:` (a Hub id) or `files:` (local files).")
    if params.dataset:
        yield from records_of(read_hub(params), f"dataset {params.dataset}", True, params, report)
        return
    wanted = (required_columns(params), OPTIONAL.get(params.format, ()))
    for path in resolve_paths(params.files, SUFFIXES, f"source {params.name}: files"):
        try:
            yield from records_of(read_local_file(path, wanted), str(path), path.suffix.lower() in TABLES, params,
                                  report)
        except MissingColumns as err:  # at the header: a header-only table was taken without a word
            check_columns(err.columns, params, str(path))


def records_of(rows: Iterator[tuple[dict[str, Any], dict[str, Any]]], origin: str, table: bool,
               params: HFDatasetParams, report: SourceReport) -> Iterator[dict[str, Any]]:
    """The records of one file's (or the Hub dataset's) rows. A row without a column the format needs is dropped
    (`missing RESPONSE`); a file where no row has it is refused, at its first row when it is a table (every row
    has every column), else (JSON objects, each with its own keys) once all its rows are read."""
    missing = list(required_columns(params))
    columns: dict[Any, None] = {}  # the columns of the rows read while one is missing, in order
    cleaned, controls = 0, set()
    for row, where in rows:
        row, removed = clean_values(row)  # as a workbook's cells: no control characters, nothing invisible at the ends
        if removed:
            cleaned, controls = cleaned + 1, controls | set(removed)
        report.read += 1
        try:
            row = with_column_keys(row)
        except RowError as err:
            report.drop(str(err), where, err.detail)
            continue
        if missing:
            columns.update(dict.fromkeys(row))
            missing = [column for column in missing if column not in row]
            if missing and table:
                check_columns(list(columns), params, origin)
        try:
            yield to_record(row, params, where)
        except RowError as err:
            report.drop(str(err), where, err.detail)
    if missing and columns:
        check_columns(list(columns), params, origin)
    if cleaned:
        report.note(controls_removed(origin, controls, cleaned, "row(s)"))


SOURCE = Source(kind="hf", params=HFDatasetParams, read=read, files_field="files", suffixes=SUFFIXES)
