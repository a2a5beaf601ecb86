"""Ingest across processes: workbooks read in parallel give the same bytes as one process; a worker's error or
death is one clear message and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.runner import run_stage
from distillery.sources.shards import plan_units, worker_count
from tests.fixtures import aihub
from tests.fixtures.crash import crash_child_of
from tests.fixtures.ko_en_pairs import NEWS, SPOKEN

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_FILES = ("train.jsonl", "eval.jsonl", "dropped.jsonl", "report.json", "report.md")


def write_corpus(directory: Path) -> Path:
    """Six workbooks, one per AI-Hub layout, some rows repeated across them (dedupe drops those)."""
    pairs = SPOKEN + [(n[5], n[6]) for n in NEWS]
    for number, layout in enumerate(aihub.LAYOUT_COLUMNS):
        rows = [(ko, f"{en} ({number})" if i % 3 else en) for i, (ko, en) in enumerate(pairs)]
        aihub.write_layout(directory / f"{number + 1}_{layout}.xlsx", layout, rows)
    return directory


def config(tmp_path: Path, corpus: Path, name: str, workers: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": name, "root": str(tmp_path / "runs"), "seed": 5}, "ingest": {
        "workers": workers, "eval_fraction": 0.2, "sources": [
            {"name": "ko-en", "kind": "aihub_excel", "path": str(corpus), "direction": "both", "max_records": 150,
             "weight": 1.5},
            {"name": "gsm", "kind": "hf", "files": str(ROOT / "configs/samples/hf/gsm_instructions.jsonl"),
             "format": "columns", "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}},
            {"name": "ko-en-again", "kind": "aihub_excel", "path": str(corpus)},
            {"name": "codeio", "kind": "codeio", "path": str(ROOT / "configs/samples/codeio/raw.jsonl"), "format": "raw"},
        ]}}, allow_unicode=True), encoding="utf-8")
    return path


def test_workbooks_read_in_two_processes_give_the_bytes_of_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    run_stage("ingest", load_config(config(tmp_path, corpus, "serial", workers=1)))
    assert "processes" not in capsys.readouterr().out
    run_stage("ingest", load_config(config(tmp_path, corpus, "parallel", workers=2)))
    assert "reading 14 files/sources in 2 processes" in capsys.readouterr().out
    serial, parallel = tmp_path / "runs/serial/ingest", tmp_path / "runs/parallel/ingest"
    for name in OUTPUT_FILES:
        assert (parallel / name).read_bytes() == (serial / name).read_bytes(), name
    assert sorted(p.name for p in parallel.iterdir()) == sorted(OUTPUT_FILES)  # the shards are gone
    report = json.loads((parallel / "report.json").read_text(encoding="utf-8"))
    dropped = {source["source"]: source["dropped"] for source in report["sources"]}
    assert dropped["ko-en"]["over max_records"] > 0 and dropped["ko-en-again"]["duplicate"] > 0
    assert report["train"] > 0 and report["eval"] > 0


def test_one_process_per_core_only_for_inputs_worth_it(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    units = plan_units(load_config(config(tmp_path, corpus, "c", workers=1)).ingest.sources)
    assert [unit.label for unit in units[:2]] == ["ko-en (1_구어체.xlsx)", "ko-en (2_대화체.xlsx)"]
    assert len(units) == 6 + 1 + 6 + 1
    assert worker_count(None, units, input_bytes=1 << 20) == 1
    assert worker_count(None, units, input_bytes=1 << 30) == min(len(os.sched_getaffinity(0)), len(units))
    assert worker_count(8, units[:3], input_bytes=0) == 3


def test_a_bad_workbook_read_by_a_worker_is_the_usual_message_and_nothing_is_left(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    aihub.write_not_excel(corpus / "4_broken.xlsx")
    with pytest.raises(UserError, match=r"4_broken.xlsx: the file is not an Excel workbook"):
        run_stage("ingest", load_config(config(tmp_path, corpus, "bad", workers=2)))
    assert not (tmp_path / "runs/bad/ingest").exists()
    assert not any((tmp_path / "runs/bad").glob(".ingest*"))


def ingest_two_large_sources(tmp_path: Path) -> subprocess.Popen:
    """`distillery ingest` started on two 150,000-row sources read in two processes (run `k` under tmp_path)."""
    for part in ("a", "b"):
        with open(tmp_path / f"{part}.jsonl", "w", encoding="utf-8") as handle:
            for i in range(150_000):
                handle.write(json.dumps({"q": f"{part} question {i}", "a": f"answer {i}"}) + "\n")
    sources = [{"name": part, "kind": "hf", "files": str(tmp_path / f"{part}.jsonl"), "format": "columns",
                "columns": {"user": "q", "assistant": "a"}} for part in ("a", "b")]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "k", "root": str(tmp_path / "runs")},
                                    "ingest": {"workers": 2, "sources": sources}}), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "distillery", "ingest", "-c", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    return proc


def test_a_worker_killed_mid_read_is_one_line_naming_what_it_read(tmp_path: Path) -> None:
    """A native crash (here SIGSEGV from outside) in a reading process: exit 1, one line, no partial output."""
    proc = ingest_two_large_sources(tmp_path)
    crash_child_of(proc, signal.SIGSEGV, marker=b"spawn_main", timeout=60)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output
    assert "a reading process crashed with SIGSEGV (signal 11) while reading one of: a, b" in output
    assert "Set `ingest.workers: 1`" in output
    assert "Traceback" not in output
    assert not (tmp_path / "runs/k/ingest").exists() and not any((tmp_path / "runs/k").glob(".ingest*"))


def wait_for_children(proc: subprocess.Popen, count: int, timeout: float = 60) -> list[int]:
    """The pids of `proc`'s reading processes, once `count` of them have started."""
    import time

    from tests.fixtures.crash import child_pids

    deadline = time.time() + timeout
    while len(pids := child_pids(proc.pid, b"spawn_main")) < count:
        assert proc.poll() is None and time.time() < deadline, "the reading processes did not start"
        time.sleep(0.05)
    return pids


def alive_pids(pids: list[int], within: float) -> list[int]:
    """Those of `pids` still running (not zombies) after up to `within` seconds."""
    import time

    deadline = time.time() + within
    while True:
        running = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                running.append(pid)
        if not running or time.time() > deadline:
            return running
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_reading_processes_end_with_the_pipeline_and_sigterm_is_an_interrupt(tmp_path: Path, sig: int) -> None:
    """SIGTERM (a scheduler's preemption, `docker stop`) ended ingest at once, silent, recorded as running; after it
    or a kill -9 its reading processes read and wrote on, orphaned, then hung for good. Now SIGTERM ends it as Ctrl-C
    does (exit 143, one line, recorded as interrupted) and the reading processes end with it either way."""
    from tests.fixtures.crash import child_pids

    proc = ingest_two_large_sources(tmp_path)
    workers = wait_for_children(proc, count=2)
    workers += child_pids(proc.pid, b"resource_tracker")  # multiprocessing's helper: it ends with them
    proc.send_signal(sig)
    try:
        output = proc.communicate(timeout=30)[0]  # orphans would hold its output open
        assert alive_pids(workers, within=10) == []
    finally:
        for pid in alive_pids(workers, within=0):
            os.kill(pid, signal.SIGKILL)
    if sig == signal.SIGKILL:
        return
    assert proc.returncode == 143, output
    assert output.strip().splitlines()[-1] == ("terminated (SIGTERM): finished stages are kept; run the same "
                                               "command to continue.")
    assert "Traceback" not in output
    entry = json.loads((tmp_path / "runs/k/manifest.json").read_text())["stages"]["ingest"]
    assert entry["status"] == "interrupted"
    assert not (tmp_path / "runs/k/ingest").exists() and not any((tmp_path / "runs/k").glob(".ingest*"))
