"""codeio: raw records -> the paper's output/input-prediction prompts; SFT records -> one CodeI/O++ response."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distillery.sources import SourceReport, codeio
from distillery.sources.codeio import CodeIOParams
from distillery.core.errors import UserError

REFCODE = "def main_solution(word, times):\n    return word * times"
RAW = {
    "problem_description": "A word is repeated a number of times. What is the resulting string?",
    "io_requirements": "Input:\n  `word` (str): the word.\n  `times` (int): how often.\nOutput:\n  `return` (str): the result.",
    "refcode": REFCODE,
    "funcname": "main_solution",
    "ios": [{"input": {"word": "ab", "times": 2}, "output": "abab"},
            {"input": {"word": "x", "times": 3}, "output": "xxx"}],
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path: Path, **overrides: Any) -> tuple[list[dict], SourceReport]:
    report = SourceReport("codeio")
    params = CodeIOParams(name="codeio", kind="codeio", path=str(path), **overrides)
    return list(codeio.read(params, report)), report


def test_raw_record_gives_output_and_input_prediction_with_the_paper_wording(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "raw.jsonl", [RAW])
    records, report = read(path)
    assert report.read == 1 and [r["task"] for r in records] == ["code_io_output", "code_io_input"]
    output_prompt = records[0]["messages"][0]["content"]
    assert output_prompt == (
        "You are given a question that requires some input and output variables as follows:\n\n"
        f"{RAW['problem_description']}\n\nThe input and output requirements are as follows:\n\n{RAW['io_requirements']}\n\n"
        "Given the following input:\n\n{'word': 'ab', 'times': 2}\n\n"
        "Can you predict the output without writing any code? Please reason and put your final answer in the "
        'following json format: {"output": <your output>}, where <your output> should strictly match the output '
        "requirement as specified.\n\n"
        "Tip: Here is a reference code snippet for this question. You can refer to this code to guide your reasoning "
        f"but not copy spans of code directly.\n\n{REFCODE}")
    input_prompt = records[1]["messages"][0]["content"]
    assert "Given the following output:\n\n'abab'\n\nCan you predict a feasible input without writing any code?" in input_prompt
    assert input_prompt.endswith(REFCODE)
    assert records[0]["messages"][1] == {"role": "assistant", "content": '{"output": "abab"}'}
    assert records[1]["messages"][1] == {"role": "assistant", "content": '{"input": {"word": "ab", "times": 2}}'}
    assert records[0]["meta"] == {"file": str(path), "line": 1, "funcname": "main_solution", "refcode": REFCODE,
                                  "io_input": {"word": "ab", "times": 2}, "io_output": "abab", "io_index": 0}


def test_the_known_answer_is_what_the_reference_code_computes(tmp_path: Path) -> None:
    records, _ = read(write_jsonl(tmp_path / "raw.jsonl", [RAW]), ios_per_record=2)
    namespace: dict[str, Any] = {}
    exec(REFCODE, namespace)  # the test's own reference code
    for record in records:
        meta = record["meta"]
        assert namespace[meta["funcname"]](**meta["io_input"]) == meta["io_output"]
        answer = json.loads(record["messages"][1]["content"])
        assert answer == ({"output": meta["io_output"]} if record["task"] == "code_io_output" else {"input": meta["io_input"]})


def test_tasks_and_ios_per_record_choose_the_prompts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "raw.jsonl", [RAW])
    records, _ = read(path, tasks=["output"], ios_per_record=5)
    assert [(r["task"], r["meta"]["io_index"]) for r in records] == [("code_io_output", 0), ("code_io_output", 1)]
    assert "{'word': 'x', 'times': 3}" in records[1]["messages"][0]["content"]


def test_records_without_refcode_or_ios_are_dropped_with_reason_and_line(tmp_path: Path) -> None:
    rows = [RAW, {**RAW, "refcode": ""}, {k: v for k, v in RAW.items() if k != "ios"}, {**RAW, "ios": []},
            {**RAW, "ios": [{"input": {"word": "a"}}]}, "", {**RAW, "funcname": None}]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    records, report = read(path)
    assert len(records) == 2 and report.read == 6
    assert dict(report.dropped) == {"no refcode": 1, "no ios": 2, "no io pair with input and output": 1, "no funcname": 1}
    assert [(d["reason"], d["line"]) for d in report.dropped_rows] == [
        ("no refcode", 2), ("no ios", 3), ("no ios", 4), ("no io pair with input and output", 5), ("no funcname", 7)]


def test_a_line_that_is_not_json_is_an_error_with_its_number(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "raw.jsonl", [RAW, '{"problem_description": "cut off', RAW])
    with pytest.raises(UserError, match=r"raw.jsonl: line 2 is not valid JSON"):
        read(path)


def test_a_json_list_file_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    path.write_text(json.dumps([RAW, RAW]), encoding="utf-8")
    records, _ = read(path, tasks=["input"])
    assert [r["meta"]["index"] for r in records] == [0, 1]


def test_a_file_with_a_byte_order_mark_is_read_and_one_not_in_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps(RAW) + "\n", encoding="utf-8-sig")
    assert len(read(path, tasks=["input"])[0]) == 1
    path.write_text(json.dumps({**RAW, "funcname": "함수"}, ensure_ascii=False) + "\n", encoding="cp949")
    with pytest.raises(UserError, match=r"raw.jsonl is not UTF-8 text \(line 1, byte \d+ cannot be decoded\)"):
        read(path)


def test_sft_records_are_flattened_into_one_codeio_plus_plus_response(tmp_path: Path) -> None:
    revised = {"prompt": "Predict the output.", "turn_1": "It is 3.\n```json\n{\"output\": 3}\n```",
               "feedback_1": "[Mismatch] Your output is not correct! Given the input, the output should be 4.",
               "turn_2": "I see, it is 4.\n```json\n{\"output\": 4}\n```", "feedback_2": "Correct!"}
    right_first = {"prompt": "Predict the input.", "turn_1": "{\"input\": {\"n\": 1}}", "feedback_1": "Feasible input!",
                   "turn_2": None, "feedback_2": None}
    typed = {"prompt": "px", "turn_1": {"answer": 42}, "feedback_1": True, "turn_2": [1, 2]}  # was "{'answer': 42}..."
    path = write_jsonl(tmp_path / "sft.jsonl", [revised, right_first, {"prompt": "x", "turn_1": ""}, typed])
    records, report = read(path, format="sft")
    assert [r["task"] for r in records] == ["code_io", "code_io"]
    assert records[0]["messages"] == [
        {"role": "user", "content": "Predict the output."},
        {"role": "assistant", "content": "\n\n".join(revised[k] for k in ("turn_1", "feedback_1", "turn_2", "feedback_2"))}]
    assert records[1]["messages"][1]["content"] == "{\"input\": {\"n\": 1}}\n\nFeasible input!"
    assert dict(report.dropped) == {"no turn_1": 1, "non-text turn_1 (dict)": 1} and report.dropped_rows[0]["line"] == 3


def test_an_empty_task_list_is_a_config_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="tasks"):
        CodeIOParams(name="c", kind="codeio", path="x.jsonl", tasks=[])


@pytest.mark.integration
def test_the_real_raw_records_all_become_prompts(shared_file) -> None:
    path = shared_file("data/codeio/rawcode_1k_parsed.jsonl")
    records, report = read(path)
    assert report.read == 464 and len(records) + 2 * sum(report.dropped.values()) == 2 * 464
    assert len(records) >= 900
    for record in records:
        meta = record["meta"]
        assert meta["refcode"] in record["messages"][0]["content"]
        given = meta["io_input"] if record["task"] == "code_io_output" else meta["io_output"]
        assert f"\n\n{given!r}\n\n" in record["messages"][0]["content"]
        assert json.loads(record["messages"][1]["content"]) in ({"output": meta["io_output"]}, {"input": meta["io_input"]})
