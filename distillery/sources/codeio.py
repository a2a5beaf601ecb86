"""hkust-nlp/CodeIO records in their two public formats.

raw (`problem_description, io_requirements, refcode, funcname, ios[{input, output}]`): every used io pair
becomes an output-prediction prompt (task code_io_output: given the input, predict the output) and/or an
input-prediction prompt (code_io_input: given the output, predict a feasible input), worded with the CodeI/O
paper's templates and followed by its reference-code tip. The given value is inserted with Python `repr`, as
the original pipeline does.

Raw records carry no reasoning, so the assistant turn is the known answer in the paper's answer format:
`{"output": <the io output>}` / `{"input": <the io input>}` as JSON. That trains directly (format/finetune) and
is checkable; distill replaces it with a verified teacher reasoning that ends in the same JSON object. `meta`
keeps funcname, refcode, io_input and io_output so a verifier can run the reference code.

sft (the released CodeI/O++ records `prompt, turn_1, feedback_1, turn_2, feedback_2`): one response made of the
first answer, the execution feedback on it and, when there was a second turn, the revised answer and its
feedback, in that order (the paper's CodeI/O++ concatenation); task code_io.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field

from distillery.sources.files import resolve_paths
from distillery.sources.registry import Source, SourceParams, SourceReport
from distillery.sources.text import controls_removed, without_controls
from distillery.core.errors import UserError
from distillery.core.records import make_record, read_json_objects

SUFFIXES = (".jsonl", ".json")

OUTPUT_PREDICTION = """You are given a question that requires some input and output variables as follows:

{query}

The input and output requirements are as follows:

{io_req}

Given the following input:

{given}

Can you predict the output without writing any code? Please reason and put your final answer in the following json format: {{"output": <your output>}}, where <your output> should strictly match the output requirement as specified."""

INPUT_PREDICTION = """You are given a question that requires some input and output variables as follows:

{query}

The input and output requirements are as follows:

{io_req}

Given the following output:

{given}

Can you predict a feasible input without writing any code? Please reason and put your final answer in the following json format: {{"input": <your input>}}, where <your input> should be a dictionary, even if the there is only one input variable, with keys strictly match the input variables' names as specified."""

REFCODE_TIP = """Tip: Here is a reference code snippet for this question. You can refer to this code to guide your reasoning but not copy spans of code directly.

{refcode}"""

TASKS = {"output": ("code_io_output", OUTPUT_PREDICTION), "input": ("code_io_input", INPUT_PREDICTION)}
SFT_PARTS = ("turn_1", "feedback_1", "turn_2", "feedback_2")


class CodeIOParams(SourceParams):
    """hkust-nlp/CodeIO records: raw (problem, refcode, ios) or the released SFT records (CodeI/O++)."""

    kind: Literal["codeio"]
    path: str | list[str] = Field(description="JSONL file(s), a directory or a glob.")
    format: Literal["raw", "sft"] = Field("raw", description="raw: problem_description/refcode/ios; sft: prompt/turn_1/feedback_1/turn_2/feedback_2.")
    tasks: list[Literal["output", "input"]] = Field(
        default_factory=lambda: ["output", "input"], min_length=1,
        description="For raw records: which prediction prompts to make (output, input or both)."
    )
    ios_per_record: int = Field(1, ge=1, description="For raw records: how many of the `ios` pairs become prompts.")


class RecordError(ValueError):
    """A record that cannot become training prompts: dropped with this reason."""


def prediction_prompt(task: str, raw: dict[str, Any], io: dict[str, Any]) -> str:
    """The paper's prompt for one io pair, the reference-code tip appended."""
    _, template = TASKS[task]
    given = io["input"] if task == "output" else io["output"]
    body = template.format(query=raw["problem_description"].strip(), io_req=raw["io_requirements"].strip(),
                           given=repr(given))
    return body + "\n\n" + REFCODE_TIP.format(refcode=raw["refcode"])


def known_answer(task: str, io: dict[str, Any]) -> str:
    """The assistant turn of a raw record: the known answer as the JSON object the prompt asks for."""
    return json.dumps({task: io[task]}, ensure_ascii=False)


def check_raw(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The usable io pairs of a raw record; raises RecordError saying what is missing."""
    for field in ("refcode", "problem_description", "io_requirements", "funcname"):
        if not isinstance(raw.get(field), str) or not raw[field].strip():
            raise RecordError(f"no {field}")
    ios = raw.get("ios")
    if not isinstance(ios, list) or not ios:
        raise RecordError("no ios")
    usable = [io for io in ios if isinstance(io, dict) and "input" in io and "output" in io]
    if not usable:
        raise RecordError("no io pair with input and output")
    return usable


def raw_records(raw: dict[str, Any], params: CodeIOParams, where: dict[str, Any]) -> list[dict[str, Any]]:
    records = []
    for io_index, io in enumerate(check_raw(raw)[: params.ios_per_record]):
        meta = {**where, "funcname": raw["funcname"], "refcode": raw["refcode"], "io_input": io["input"],
                "io_output": io["output"], "io_index": io_index}
        for task in params.tasks:
            messages = [{"role": "user", "content": prediction_prompt(task, raw, io)},
                        {"role": "assistant", "content": known_answer(task, io)}]
            records.append(make_record(params.name, TASKS[task][0], messages, dict(meta)))  # own meta each
    return records


def flatten_sft(row: dict[str, Any]) -> str:
    """CodeI/O++: first answer, its feedback, then the revision and its feedback when there was one."""
    values = {key: row.get(key) for key in SFT_PARTS}
    wrong = next((key for key, value in values.items() if value is not None and not isinstance(value, str)), None)
    if wrong:  # its Python repr ("{'answer': 42}", "True") is no text to train on
        raise RecordError(f"non-text {wrong} ({type(values[wrong]).__name__})")
    parts = [(values[key] or "").strip() for key in SFT_PARTS]
    if not parts[0]:
        raise RecordError("no turn_1")
    return "\n\n".join(part for part in parts if part)


def sft_records(row: dict[str, Any], params: CodeIOParams, where: dict[str, Any]) -> list[dict[str, Any]]:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError("no prompt")
    messages = [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": flatten_sft(row)}]
    return [make_record(params.name, "code_io", messages, where)]


# The text fields whose control characters go (as hf and aihub sources remove them). Not refcode: it is the code
# the verifier runs and the io values came from; nor the io values, which prompts quote with repr, answers as JSON.
TEXT_FIELDS = ("problem_description", "io_requirements", "funcname", "prompt", *SFT_PARTS)


def without_control_text(row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The row with the control characters of its TEXT_FIELDS removed, and those removed."""
    removed = ""
    for field in TEXT_FIELDS:
        if isinstance(row.get(field), str):
            text, controls = without_controls(row[field])
            if controls:
                row, removed = {**row, field: text}, removed + controls
    return row, removed


def read(params: CodeIOParams, report: SourceReport) -> Iterator[dict[str, Any]]:
    make = raw_records if params.format == "raw" else sft_records
    cleaned, controls = 0, set()
    for path in resolve_paths(params.path, SUFFIXES, f"source {params.name}: path"):
        for row, where in read_json_objects(path):
            report.read += 1
            row, removed = without_control_text(row)
            if removed:
                cleaned, controls = cleaned + 1, controls | set(removed)
            try:
                yield from make(row, params, where)
            except RecordError as err:
                report.drop(str(err), where)
    if cleaned:
        report.note(controls_removed(f"source {params.name}", controls, cleaned, "record(s)"))


SOURCE = Source(kind="codeio", params=CodeIOParams, read=read, files_field="path", suffixes=SUFFIXES)
