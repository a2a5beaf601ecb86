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


def rec(source: str, i: int, answer: str | None = None) -> dict:
    messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer or f"a{i}"}]
    return make_record(source, "qa", messages, {"row": i})


def test_cap_keeps_a_seeded_sample_and_reports_the_rest() -> None:
    records = [rec("s", i) for i in range(10)]
    report = SourceReport("s")
    kept = cap(records, 4, seed=1, report=report)
    assert len(kept) == 4 and report.dropped["over max_records"] == 6
    assert [r["id"] for r in kept] == [r["id"] for r in cap(records, 4, 1, SourceReport("s"))]
    assert [r["id"] for r in kept] == [r["id"] for r in records if r in kept]  # original order kept


def test_dedupe_across_sources_keeps_first_and_says_of_what() -> None:
    a, b = [rec("a", 1), rec("a", 2)], [rec("b", 2), rec("b", 3)]
    reports = [SourceReport("a"), SourceReport("b")]
    kept = dedupe([a, b], reports)
    assert [len(k) for k in kept] == [2, 1]
    assert reports[1].dropped["duplicate"] == 1
    assert reports[1].dropped_rows[0]["duplicate_of"] == a[1]["id"]


def test_split_is_seeded_stable_and_never_empty() -> None:
    records = [rec("s", i) for i in range(200)]
    train, evaluation = split(records, 0.1, seed=7)
    assert len(train) + len(evaluation) == 200 and 8 <= len(evaluation) <= 35
    # stable when more records arrive: the old eval records stay in eval
    _, evaluation_more = split(records + [rec("s", i) for i in range(200, 260)], 0.1, seed=7)
    assert {r["id"] for r in evaluation} <= {r["id"] for r in evaluation_more}
    assert len(split(records[:3], 0.01, seed=7)[1]) == 1
    assert split(records[:1], 0.5, seed=7) == (records[:1], [])


def test_weight_repeats_or_subsamples() -> None:
    records = [rec("s", i) for i in range(10)]
    assert len(apply_weight(records, 2.0, 0)) == 20
    assert len(apply_weight(records, 0.5, 0)) == 5
    assert len(apply_weight(records, 1.5, 0)) == 15


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
