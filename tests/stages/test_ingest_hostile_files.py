"""Data files as hostile input, through the real ingest stage (from an adversarial review): values JSON holds that
orjson reads otherwise, rows that cost GBs to parse, drops that fill the disk, text with control characters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.core.records import read_jsonl
from distillery.runner import run_stage
from distillery.sources import registry

RAW = {"problem_description": "Multiply the numbers up to n.", "io_requirements": "Input: n (int). Output: int.",
       "refcode": "import math\ndef main_solution(n):\n    return math.factorial(n)", "funcname": "main_solution"}


def ingest(tmp_path: Path, source: dict) -> Path:
    config = {"run": {"name": "h", "root": str(tmp_path / "runs")}, "ingest": {"eval_fraction": 0.1, "sources": [
        {"name": "s", **source}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run_stage("ingest", load_config(tmp_path / "c.yaml"))
    return tmp_path / "runs" / "h" / "ingest"


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_integers_past_64_bits_and_non_finite_values_keep_their_exact_value(tmp_path: Path) -> None:
    """Infinity in a test case ended ingest as 'a bug' (a str pattern on the bytes read back); 27! trained as
    1.0888869450418352e+28 (orjson reads integers past 64 bits as floats)."""
    records = [{**RAW, "problem_description": f"Multiply the numbers up to n ({n}).",
                "ios": [{"input": {"n": n}, "output": math.factorial(n)}]} for n in range(20, 30)]
    records.append({**RAW, "problem_description": "Overflow.", "ios": [{"input": {"x": math.inf}, "output": -math.inf}]})
    out = ingest(tmp_path, {"kind": "codeio", "path": write_lines(tmp_path / "raw.jsonl", map(json.dumps, records)),
                            "tasks": ["output"]})
    rows = list(read_jsonl(out / "train.jsonl")) + list(read_jsonl(out / "eval.jsonl"))
    answers = {row["meta"]["io_input"].get("n"): row for row in rows}
    assert answers[27]["messages"][1]["content"] == '{"output": 10888869450418352160768000000}'
    assert answers[27]["meta"]["io_output"] == math.factorial(27)
    assert answers[None]["meta"]["io_output"] == -math.inf and len(rows) == 11


def test_an_infinite_number_where_text_is_expected_is_dropped_naming_it(tmp_path: Path) -> None:
    lines = [json.dumps({"INSTRUCTION": f"q{i}", "RESPONSE": f"a{i}"}) for i in range(10)]
    lines += ['{"INSTRUCTION": "q", "RESPONSE": Infinity}', '{"INSTRUCTION": "q", "RESPONSE": 1e400}']
    out = ingest(tmp_path, {"kind": "hf", "files": write_lines(tmp_path / "d.jsonl", lines), "format": "columns",
                            "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}})
    assert [row["reason"] for row in read_jsonl(out / "dropped.jsonl")] == ["RESPONSE is not a finite number (inf)"] * 2


def test_dropped_jsonl_lists_a_bounded_number_of_drops_and_the_report_counts_all(tmp_path: Path, monkeypatch) -> None:
    """Two million `{}` lines (6 MB) kept 700 MB of drops in memory; under a long folder name one 600 KB file wrote a
    725 MB dropped.jsonl."""
    monkeypatch.setattr(registry, "MAX_LISTED", 5)
    lines = [json.dumps({"INSTRUCTION": f"q{i}", "RESPONSE": f"a{i}"}) for i in range(10)] + ["{}"] * 40
    out = ingest(tmp_path, {"kind": "hf", "files": write_lines(tmp_path / "d.jsonl", lines), "format": "columns",
                            "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}})
    assert len(list(read_jsonl(out / "dropped.jsonl"))) == 5
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == 40 and report["sources"][0]["dropped"] == {"missing RESPONSE, INSTRUCTION": 40}
    assert "dropped.jsonl lists the first 5 of its 40 dropped items; all are counted by reason" in report["sources"][0]["notes"]


def test_a_line_of_millions_of_arrays_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """20 million empty arrays in one 60 MB line took 3 GB and ended as a MemoryError, 'a bug'."""
    path = write_lines(tmp_path / "d.jsonl", ['{"INSTRUCTION": "q", "RESPONSE": "a"}',
                                              '{"INSTRUCTION": "q", "RESPONSE": [' + "[]," * 300_000 + "[]]}"])
    with pytest.raises(UserError, match=r"d.jsonl: line 2 holds more than 200,000 arrays or objects .* Fix or remove "
                                        "that line"):
        ingest(tmp_path, {"kind": "hf", "files": path, "format": "columns",
                          "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}})


def test_a_json_file_read_whole_is_bounded_in_size_and_objects(tmp_path: Path, monkeypatch) -> None:
    from distillery.core import records

    source = {"kind": "hf", "format": "columns", "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"INSTRUCTION": f"q{i}", "RESPONSE": f"a{i}"} for i in range(200)]))
    monkeypatch.setattr(records, "MAX_FILE_CONTAINERS", 100)
    with pytest.raises(UserError, match=r"d.json holds more than 100 arrays or objects.*Convert it to JSON Lines"):
        ingest(tmp_path, {**source, "files": str(path)})
    monkeypatch.setattr(records, "MAX_JSON_FILE_BYTES", 1000)
    with pytest.raises(UserError, match=r"d.json is 0 MB; a .json file is read whole, up to 0 MB\. Convert it to JSON "
                                        "Lines"):
        ingest(tmp_path, {**source, "files": str(path)})


def test_control_characters_leave_codeio_text_as_they_leave_other_sources(tmp_path: Path) -> None:
    records = [{**RAW, "problem_description": f"Problem {n} \x1b[2J\x1b]0;pwned\x07 with NUL\x00.",
                "ios": [{"input": {"n": n}, "output": math.factorial(n)}]} for n in range(10)]
    out = ingest(tmp_path, {"kind": "codeio", "path": write_lines(tmp_path / "raw.jsonl", map(json.dumps, records)),
                            "tasks": ["output"]})
    prompts = [row["messages"][0]["content"] for row in read_jsonl(out / "train.jsonl")]
    assert prompts and all("Problem" in p and "[2J]0;pwned with NUL." in p and "\x1b" not in p and "\x00" not in p
                           for p in prompts)
    notes = json.loads((out / "report.json").read_text())["sources"][0]["notes"]
    assert any("control characters" in note and "removed from 10 record(s)" in note for note in notes), notes


def test_a_parquet_file_whose_rows_decompress_past_a_record_is_refused_before_reading(tmp_path: Path) -> None:
    """Three 100 MB rows of one letter in an 11 KB zstd file took 1.1 GB and ended 'cannot read as parquet: '."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    with pq.ParquetWriter(path, pa.schema([("INSTRUCTION", pa.string()), ("RESPONSE", pa.string())]),
                          compression="zstd") as writer:
        writer.write_table(pa.table({"INSTRUCTION": ["q"], "RESPONSE": ["x" * (70 << 20)]}))
    assert path.stat().st_size < 100_000
    with pytest.raises(UserError, match=r"d.parquet: row group 0 holds rows of 70 MB on average once decompressed"):
        ingest(tmp_path, {"kind": "hf", "files": str(path), "format": "columns",
                          "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}})


def test_of_a_wide_table_only_the_columns_the_format_needs_are_read(tmp_path: Path) -> None:
    """A CSV exported with 200,000 empty columns took 42 s and 1.4 GB to give two; a file without a needed column
    is still refused listing what it has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillery.sources.hf import MissingColumns, read_csv, read_parquet

    wanted = (("INSTRUCTION", "RESPONSE"), ("extra",))
    header = "\ufeffRESPONSE,INSTRUCTION," + ",".join(f"c{i}" for i in range(5000))
    write_lines(tmp_path / "d.csv", [header] + [f"a{i},q{i}" + "," * 5000 for i in range(20)])
    rows = [row for _, row in read_csv(tmp_path / "d.csv", wanted)]
    assert len(rows) == 20 and rows[3] == {"RESPONSE": "a3", "INSTRUCTION": "q3"}
    with pytest.raises(MissingColumns) as caught:  # refused at the header, which lists every column
        next(read_csv(tmp_path / "d.csv", (("INSTRUCTION", "nosuch"), ())))
    assert len(caught.value.columns) == 5002
    pq.write_table(pa.table({"c0": ["x"], "INSTRUCTION": ["q"], "extra": ["e"], "RESPONSE": ["a"]}), tmp_path / "d.parquet")
    assert list(read_parquet(tmp_path / "d.parquet", wanted)) == [{"INSTRUCTION": "q", "extra": "e", "RESPONSE": "a"}]
    out = ingest(tmp_path, {"kind": "hf", "files": str(tmp_path / "d.csv"), "format": "columns",
                            "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}})
    assert len(list(read_jsonl(out / "train.jsonl"))) + len(list(read_jsonl(out / "eval.jsonl"))) == 20


def test_a_csv_line_with_more_fields_than_its_header_is_named_with_the_fix(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.csv", ["INSTRUCTION,RESPONSE", *(f"q{i},a{i}" for i in range(10)), "q,1,000,a"])
    with pytest.raises(UserError, match=r"d.csv: line 12 has 4 fields where the header has 2: a field holding a comma "
                                        "or a line break needs double quotes around it. Fix or remove that line."):
        ingest(tmp_path, {"kind": "hf", "files": path, "format": "columns",
                          "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}})


def test_header_names_of_only_invisible_characters_are_shown_by_their_code_points(tmp_path: Path) -> None:
    """Two names that compare as empty were named as `the column  appears 2 times`: nothing to look for."""
    path = tmp_path / "d.csv"
    path.write_text("\u200b\u200b,\u2060\nq,a\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d.csv: the column '\\u200b\\u200b' \[U\+200B U\+200B\] appears 2 times"):
        ingest(tmp_path, {"kind": "hf", "files": str(path), "format": "columns",
                          "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}})
