"""Ingest's own steps: cap, cross-source dedup, the seeded split, weights, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distillery.sources import SourceReport
from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.core.records import make_record, read_jsonl
from distillery.runner import run_stage
from distillery.stages.ingest import apply_weight, cap, dedupe, split
from tests.fixtures.shards import everything, source_rows


def rec(source: str, i: int, answer: str | None = None) -> dict:
    messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer or f"a{i}"}]
    return make_record(source, "qa", messages, {"row": i})


def test_cap_keeps_a_seeded_sample_and_reports_the_rest(tmp_path: Path) -> None:
    rows = source_rows([rec("s", i) for i in range(10)], tmp_path)
    report = SourceReport("s")
    kept = cap(rows, 4, seed=1, report=report)
    assert len(kept) == 4 and report.dropped["over max_records"] == 6
    assert kept == cap(rows, 4, 1, SourceReport("s"))
    assert kept == sorted(kept)  # original order kept
    assert {d["row"] for d in report.dropped_rows} == set(range(10)) - set(kept)  # where each dropped one was


def test_dedupe_across_sources_keeps_first_and_says_of_what(tmp_path: Path) -> None:
    a, b = [rec("a", 1), rec("a", 2)], [rec("b", 2), rec("b", 3)]
    rows = [source_rows(a, tmp_path), source_rows(b, tmp_path)]
    reports = [SourceReport("a"), SourceReport("b")]
    kept = dedupe(rows, [everything(r) for r in rows], reports)
    assert kept == [[0, 1], [1]]
    assert reports[1].dropped["duplicate"] == 1
    assert reports[1].dropped_rows[0] == {"source": "b", "reason": "duplicate", "id": b[0]["id"],
                                          "duplicate_of": a[1]["id"], "row": 2}


def test_split_is_seeded_stable_and_never_empty(tmp_path: Path) -> None:
    records = [rec("s", i) for i in range(200)]
    rows = source_rows(records, tmp_path, seed=7)
    train, evaluation = split(rows, everything(rows), 0.1)
    assert len(train) + len(evaluation) == 200 and 8 <= len(evaluation) <= 35
    # stable when more records arrive: the old eval records stay in eval
    more = source_rows(records + [rec("s", i) for i in range(200, 260)], tmp_path, seed=7)
    assert set(evaluation) <= set(split(more, everything(more), 0.1)[1])
    assert len(split(rows, [0, 1, 2], 0.01)[1]) == 1
    assert split(rows, [0], 0.5) == ([0], [])


def test_weight_repeats_or_subsamples(tmp_path: Path) -> None:
    rows = source_rows([rec("s", i) for i in range(10)], tmp_path)
    assert len(apply_weight(rows, everything(rows), 2.0, 0)) == 20
    assert len(apply_weight(rows, everything(rows), 0.5, 0)) == 5
    assert apply_weight(rows, everything(rows), 1.5, 0)[:10] == everything(rows)
    assert len(set(apply_weight(rows, everything(rows), 1.5, 0)[10:])) == 5
    assert len(apply_weight(rows, everything(rows), 0.05, 0)) == 1  # a small source keeps a record


def test_a_weight_below_one_leaves_a_one_record_source_its_record(tmp_path: Path) -> None:
    rows = source_rows([rec("s", 0)], tmp_path)
    assert apply_weight(rows, [0], 0.5, 0) == [0] and apply_weight(rows, [], 0.5, 0) == []


def test_stage_writes_report_and_dropped_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"q{i % 6}"}, {"role": "assistant", "content": "a"}]}
            for i in range(10)]
    Path("d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    Path("c.yaml").write_text(yaml.safe_dump({"ingest": {"eval_fraction": 0.0, "sources": [
        {"name": "one", "kind": "hf", "files": "d.jsonl", "format": "messages"},
        {"name": "two", "kind": "hf", "files": "d.jsonl", "format": "messages", "weight": 2}]}}), encoding="utf-8")
    run_stage("ingest", load_config("c.yaml"))
    report = json.loads(Path("runs/demo/ingest/report.json").read_text())
    one, two = report["sources"]
    assert (one["read"], one["kept"], one["dropped"]) == (10, 6, {"duplicate": 4})
    assert (two["kept"], two["dropped"], two["train"]) == (0, {"duplicate": 10}, 0)
    assert report["train"] == 6
    dropped = list(read_jsonl(Path("runs/demo/ingest/dropped.jsonl")))
    assert len(dropped) == 14 and {d["reason"] for d in dropped} == {"duplicate"}
    assert "| one | hf | 10 | 6 | 4 duplicate | 6 | 0 |" in Path("runs/demo/ingest/report.md").read_text()


def test_missing_source_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(yaml.safe_dump({"ingest": {"sources": [
        {"name": "one", "kind": "hf", "files": "missing.jsonl", "format": "messages"}]}}), encoding="utf-8")
    with pytest.raises(UserError, match=r"ingest.sources.0.files \(one\): missing.jsonl does not exist"):
        run_stage("ingest", load_config("c.yaml"))
    assert not Path("runs/demo/ingest").exists()


def test_an_ingest_with_no_record_left_says_why_in_its_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No report is written when nothing survives: the message itself names each source's drop reasons."""
    monkeypatch.chdir(tmp_path)
    rows = [{"question": ["a", "list"], "answer": "x"}, {"question": "q", "answer": ""}, {"question": "q2", "answer": ""}]
    Path("d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    Path("c.yaml").write_text(yaml.safe_dump({"ingest": {"sources": [
        {"name": "mine", "kind": "hf", "files": "d.jsonl", "format": "columns",
         "columns": {"user": "question", "assistant": "answer"}}]}}), encoding="utf-8")
    with pytest.raises(UserError, match=r"no record survived \(mine: 3 read, dropped empty answer: 2, non-text "
                                        r"question \(list\): 1\)"):
        run_stage("ingest", load_config("c.yaml"))
    assert not Path("runs/demo/ingest").exists()
