"""JSONL written and read by distillery.core.records: fast, and exact for the values CodeI/O test cases hold."""

from __future__ import annotations

import json
import math
import unicodedata

import pytest

from distillery.core.errors import UserError
from distillery.core.records import content_key, make_record, read_json_objects, read_jsonl, report_json, write_jsonl


def test_rows_round_trip_with_non_finite_floats_big_integers_and_korean(tmp_path):
    rows = [
        {"id": "a", "meta": {"io_input": {"graph": [[0, math.inf, 2], [-math.inf, 0, None]]}, "note": None}},
        {"id": "b", "meta": {"io_output": math.nan, "big": 2**70}},
        {"id": "c", "messages": [{"role": "user", "content": "안녕하세요"}], "meta": {"empty": None}},
    ]
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, rows) == 3
    back = list(read_jsonl(path))
    assert back[0] == rows[0]
    assert math.isnan(back[1]["meta"]["io_output"]) and back[1]["meta"]["big"] == 2**70
    assert back[2] == rows[2]
    assert "안녕하세요" in path.read_text(encoding="utf-8")  # UTF-8, not \\u escapes


def test_lines_python_json_wrote_with_infinity_are_read(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps({"ios": [math.inf, 1]}) + "\n", encoding="utf-8")
    assert list(read_jsonl(path)) == [{"ios": [math.inf, 1]}]


def test_a_broken_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        list(read_jsonl(path))
    path.write_text('{"a": "x\x01y"}\n', encoding="utf-8")  # the message ended 'Invalid control character at'
    with pytest.raises(UserError, match=r"line 1 is not valid JSON \(Invalid control character at column 9\)"):
        list(read_jsonl(path))


def test_json_python_cannot_hold_names_the_file_and_line(tmp_path):
    """Nesting thousands deep (a RecursionError) or an integer of 5000 digits (a ValueError) ended a stage as an
    unexpected error, exit code 1, 'a bug in Distillery'."""
    path = tmp_path / "hostile.jsonl"
    path.write_text('{"a": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"hostile\.jsonl: line 2 is not valid JSON \(arrays or objects nested too deep"):
        list(read_jsonl(path))
    path.write_text('{"a": ' + "1" * 5000 + "}\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1 holds an integer of more than 4,300 digits, more than Python "
                                        r"converts from text. Write it as a string"):  # valid JSON: not called invalid
        list(read_jsonl(path))
    whole = tmp_path / "hostile.json"
    whole.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(UserError, match=r"hostile\.json: not valid JSON \(arrays or objects nested too deep"):
        list(read_json_objects(whole))


@pytest.mark.parametrize("depth", [101, 990])
def test_a_row_nested_deeper_than_any_record_names_the_file_and_line(tmp_path, depth):
    """Nested 990 deep, a row passes the JSON reader (orjson's limit is 1024) and then ended ingest in a
    RecursionError wherever it was walked (codeio's repr of a test input, json.dumps of a MathQA id)."""
    from distillery.core.records import MAX_NESTING

    path = tmp_path / "deep.jsonl"
    nested = "[" * (depth - 1) + "]" * (depth - 1)
    path.write_text('{"a": [[1]]}\n' + '{"ios": ' + nested + "}\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"deep\.jsonl: line 2 nests arrays or objects more than {MAX_NESTING} deep"):
        list(read_jsonl(path))
    path.write_text('{"ios": ' + "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1) + "}\n", encoding="utf-8")
    assert len(list(read_jsonl(path))) == 1  # as deep as a row may be
    whole = tmp_path / "deep.json"
    whole.write_text("[" + '{"ios": ' + "[" * 100 + "]" * 100 + "}]", encoding="utf-8")  # deeper: json.loads's own
    with pytest.raises(UserError, match=rf"deep\.json: nests arrays or objects more than {MAX_NESTING} deep"):
        list(read_json_objects(whole))


def test_a_file_that_is_not_utf8_names_the_file_the_line_and_the_byte(tmp_path):
    """Windows saves Korean text as CP949 or UTF-16 ("Unicode"): one message saying so, not a UnicodeDecodeError."""
    path = tmp_path / "ko.jsonl"
    path.write_bytes(b'{"a": "ok"}\n' + '{"a": "안녕"}\n'.encode("cp949"))
    with pytest.raises(UserError, match=r"ko\.jsonl is not UTF-8 text \(line 2, byte 19 cannot be decoded\)\. "
                                        r"Save it as UTF-8"):
        list(read_jsonl(path))
    path.write_text('{"a": "안녕"}\n', encoding="utf-16")
    with pytest.raises(UserError, match=r"\(line 1, byte 0 cannot be decoded\)\. It looks like UTF-16"):
        list(read_jsonl(path))


def test_a_utf8_byte_order_mark_is_read_past(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8-sig")
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}]


def test_content_key_ignores_key_order_and_tells_contents_apart():
    one = [{"role": "user", "content": "x"}]
    assert content_key(one) == content_key([{"content": "x", "role": "user"}])
    assert content_key(one) != content_key([{"role": "user", "content": "y"}])
    assert content_key(one, ["a", "b"], 0) != content_key(one, ["a", "b"], 1)


def test_decomposed_hangul_is_stored_composed_and_dedupes_with_its_composed_twin():
    """macOS saves Hangul decomposed (NFD): it must train, and dedupe, as the syllables it spells."""
    composed = "안녕하세요"
    decomposed = unicodedata.normalize("NFD", composed)
    record = make_record("s", "qa", [{"role": "user", "content": decomposed}, {"role": "assistant", "content": "Hi"}],
                         {}, [decomposed, "x"], 0)
    twin = make_record("s", "qa", [{"role": "user", "content": composed}, {"role": "assistant", "content": "Hi"}],
                       {}, [composed, "x"], 0)
    assert record == twin and record["messages"][0]["content"] == composed and record["choices"][0] == composed


def test_a_report_is_strict_json_with_a_broken_models_loss_as_null() -> None:
    """heldout.json and results.json are read by jq, JavaScript and pandas: no NaN or Infinity tokens."""
    report = {"Q4_K_M": {"qa": {"loss": math.inf, "ppl": math.nan, "items": 3, "tokens": [1.5, -math.inf]}},
              "name": "한국어"}
    text = report_json(report)
    assert "NaN" not in text and "Infinity" not in text and "한국어" in text and text.endswith("\n")
    assert json.loads(text) == {"Q4_K_M": {"qa": {"loss": None, "ppl": None, "items": 3, "tokens": [1.5, None]}},
                                "name": "한국어"}


def test_a_line_longer_than_any_record_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    """One line of 200 MB took 1 GB to read (2 GB would take 10): the line is refused at the bound, which is
    lowered here to keep the test small."""
    from distillery.core import records

    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"a": "b"}) + "\n" + json.dumps({"a": "b" * 2000}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"x.jsonl: line 2 is longer than 0 MB, more than one record holds"):
        list(read_jsonl(path))
    path.write_text(json.dumps({"a": "b" * 900}) + "\n", encoding="utf-8")  # under the bound, newline included
    assert len(list(read_jsonl(path))) == 1


def test_a_config_far_larger_than_any_config_is_refused_unread(tmp_path, monkeypatch):
    from distillery.core import userinput

    monkeypatch.setattr(userinput, "MAX_YAML_BYTES", 1 << 20)
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: t}\n" + "# padding\n" * 200_000, encoding="utf-8")
    with pytest.raises(UserError, match=r"c.yaml is larger than 1 MB, far more than a config holds"):
        userinput.read_yaml_file(path)
