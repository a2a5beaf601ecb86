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
    kept = cap(rows, everything(rows), 4, seed=1, report=report)
    assert len(kept) == 4 and report.dropped["over max_records"] == 6
    assert kept == cap(rows, everything(rows), 4, 1, SourceReport("s"))
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


def write_source_config(sources: list[dict]) -> Path:
    Path("c.yaml").write_text(yaml.safe_dump({"ingest": {"eval_fraction": 0.0, "sources": sources}},
                                             allow_unicode=True), encoding="utf-8")
    return Path("c.yaml")


@pytest.mark.parametrize("spec", [".", "**/*.jsonl", "runs/demo/ingest/train.jsonl"])
def test_a_source_never_reads_this_runs_own_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       spec: str) -> None:
    """`files: .` in a project holding runs/ read back the shards ingest was writing there, without end (180 MB in
    20 s): the run's own directory is left out of a folder or a glob, and a file in it named outright is refused
    (it would be replaced as it is read). Other runs are left out of a folder or a glob too: a second run
    (`--set run.name=try1`) read the first run's report.json as data and stopped on it."""
    monkeypatch.chdir(tmp_path)
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    Path("d.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    one = write_source_config([{"name": "one", "kind": "hf", "files": "d.jsonl", "format": "messages"}])
    run_stage("ingest", load_config(one))
    run_stage("ingest", load_config(one, ["run.name=old"]))
    config = load_config(write_source_config([{"name": "all", "kind": "hf", "files": spec, "format": "messages"}]))
    if spec.startswith("runs/"):
        with pytest.raises(UserError, match=r"ingest.sources.0.files \(all\): runs/demo/ingest/train.jsonl is in "
                                            r"this run's own directory .*runs/demo, which ingest writes into"):
            run_stage("ingest", config)
        return
    status, result, _ = run_stage("ingest", config)
    assert status == "done" and result.metrics["train"] == 1
    assert [r["meta"]["file"] for r in read_jsonl(Path("runs/demo/ingest/train.jsonl"))] == ["d.jsonl"]
    report = json.loads(Path("runs/demo/ingest/report.json").read_text(encoding="utf-8"))
    assert [source["read"] for source in report["sources"]] == [1]  # not the other run's train.jsonl, deduped


def test_a_record_longer_than_any_context_is_dropped_with_its_size(tmp_path: Path, monkeypatch) -> None:
    """One 30 MB record took 4 GB to decontaminate and 8 GB to tokenize in format, and ended each as a crash
    (MemoryError, or the tokenizer's abort). Past 2 MB a record is dropped before either, with its size."""
    monkeypatch.chdir(tmp_path)
    rows = [{"q": f"question {i}?", "a": f"answer {i}."} for i in range(6)]
    rows.insert(3, {"q": "a " * 1_100_000, "a": "ok"})  # 2.2 MB
    Path("d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    status, result, _ = run_stage("ingest", load_config(write_source_config([
        {"name": "one", "kind": "hf", "files": "d.jsonl", "format": "columns", "columns": {"user": "q", "assistant": "a"}}])))
    assert status == "done" and result.metrics["train"] == 6
    dropped = list(read_jsonl(Path("runs/demo/ingest/dropped.jsonl")))
    assert len(dropped) == 1 and dropped[0]["line"] == 4
    assert dropped[0]["reason"].startswith("record over 2 MB, 2,200,")
    assert dropped[0]["reason"].endswith(" bytes, more than any model's context holds: split it into shorter records")


def test_names_that_look_like_markup_are_printed_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source named '[/c]' (the progress bar) and an unread second sheet named '[/x]' (the report's notes) ended
    ingest with rich's MarkupError, exit 1, after every record was read."""
    from tests.fixtures import aihub

    monkeypatch.chdir(tmp_path)
    path = aihub.write_rows(tmp_path / "w.xlsx", [list(aihub.LAYOUT_COLUMNS["구어체"]),
                                                 *aihub.layout_rows("구어체", aihub.PAIRS)], extra_sheets=["x"])
    # Excel and openpyxl refuse '[' in a sheet name; a file written by other means can hold one
    aihub.rewrite_parts(path, {"xl/workbook.xml": lambda xml: xml.replace(b'name="x"', b'name="[/x]"')})
    status, result, _ = run_stage("ingest", load_config(write_source_config([
        {"name": "[/c]", "kind": "aihub_excel", "path": path.name}])))
    assert status == "done" and result.metrics["train"] == len(aihub.PAIRS)
    assert "'[/x]'" in Path("runs/demo/ingest/report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("setting, message", [
    ({"weight": 1e300}, r"weight: Input should be less than or equal to 100"),
    ({"source_column": "원문", "target_column": "원문"}, r"target_column: Value error, is the same column as source_column"),
])
def test_source_settings_that_cannot_make_sense_are_refused_in_the_config(tmp_path: Path, setting: dict,
                                                                          message: str) -> None:
    """weight 1e300 ended in an OverflowError and 1e8 built a list of billions; one column for both sides made
    every record a sentence 'translated' into itself."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"ingest": {"sources": [{"name": "w", "kind": "aihub_excel", "path": "w.xlsx",
                                                              **setting}]}}, allow_unicode=True), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_config(str(config))


def weighted_project(tmp_path: Path, weight: int = 100) -> Path:
    rows = [{"INSTRUCTION": f"question {i} " + "x" * 400, "RESPONSE": f"answer {i}"} for i in range(100)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "w", "root": str(tmp_path / "runs")}, "ingest": {
        "decontaminate": {"enabled": False},
        "sources": [{"name": "s", "kind": "hf", "files": str(tmp_path / "d.jsonl"), "weight": weight}]}}),
        encoding="utf-8")
    return config


def assert_failed_cleanly(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "w"
    assert not (run / "ingest").exists() and not (run / ".ingest.partial").exists()
    assert json.loads((run / "manifest.json").read_text())["stages"]["ingest"]["status"] == "failed"


def test_a_weight_that_would_fill_the_disk_is_refused_before_train_jsonl_is_written(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """The free-space check ran only while sources were read: `weight: 100` copied 12 MB of records into 1.2 GB of
    train.jsonl, past the reserve, and a full disk ended ingest as a bug in Distillery."""
    import shutil

    from distillery.sources.shards import DISK_RESERVE

    config = weighted_project(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=DISK_RESERVE + (2 << 20)))
    with pytest.raises(UserError, match=r"ingest: train.jsonl and eval.jsonl would take 6\.\d MB, more than the disk "
                                        r"holding .*runs/w can take while 1\.1 GB stays free \(1\.1 GB free now\)\. "
                                        r"Free some space, or lower the sources' `weight`"):
        run_stage("ingest", load_config(config))
    assert_failed_cleanly(tmp_path)


def test_a_disk_that_fills_up_while_a_stage_writes_is_the_users_to_fix(tmp_path: Path, monkeypatch) -> None:
    import errno

    from distillery.stages import ingest

    def full(out: Path, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.jsonl"))

    monkeypatch.setattr(ingest, "write_outputs", full)
    with pytest.raises(UserError, match=r"the disk is full \(No space left on device while writing .*train\.jsonl\)\. "
                                        r"Free some space and run the same command again"):
        run_stage("ingest", load_config(weighted_project(tmp_path, weight=1)))
    assert_failed_cleanly(tmp_path)
