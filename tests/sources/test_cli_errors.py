"""Bad input through the real CLI: exit code 2, one message naming file/sheet/row/column, no traceback,
nothing left in runs/<name>/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.fixtures import aihub

ROOT = Path(__file__).resolve().parents[2]


def run_ingest(workdir: Path, source: dict) -> subprocess.CompletedProcess:
    (workdir / "c.yaml").write_text(yaml.safe_dump({"ingest": {"sources": [source]}}, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}  # this checkout's code, one-line messages
    return subprocess.run([sys.executable, "-m", "distillery", "ingest", "-c", "c.yaml"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)


def excel_source(path: str) -> dict:
    return {"name": "ko-en", "kind": "aihub_excel", "path": path}


def write_bad_jsonl(workdir: Path) -> str:
    line = json.dumps({"problem_description": "p", "io_requirements": "r", "refcode": "c", "funcname": "f",
                       "ios": [{"input": {}, "output": 1}]})
    (workdir / "raw.jsonl").write_text(f"{line}\n{line}\n{{not json\n", encoding="utf-8")
    return "raw.jsonl"


def write_symlink_loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


CASES: dict[str, tuple[Callable[[Path], dict], list[str]]] = {
    "missing file": (lambda d: excel_source("data/missing.xlsx"),
                     ["ingest.sources.0.path (ko-en): data/missing.xlsx does not exist"]),
    "missing columns": (lambda d: excel_source(aihub.write_rows(d / "cols.xlsx", [["ID", "ko", "en"], [1, "네", "Yes"]]).name),
                        ["cols.xlsx (sheet 'Sheet1')", "'원문'", "'번역문'", "(row 1 has ID, ko, en)"]),
    "fake xlsx": (lambda d: excel_source(aihub.write_not_excel(d / "fake.xlsx").name),
                  ["fake.xlsx: the file is not an Excel workbook"]),
    "encrypted": (lambda d: excel_source(aihub.write_encrypted(d / "locked.xlsx").name),
                  ["locked.xlsx: the workbook is encrypted"]),
    "unknown sheet": (lambda d: {**excel_source(aihub.write_layout(d / "s.xlsx", "구어체").name), "sheet": "Data"},
                      ["s.xlsx: no sheet 'Data'. Its sheets are: Sheet1"]),
    "unknown source kind": (lambda d: {"name": "x", "kind": "excel", "path": "a.xlsx"},
                            ["ingest.sources.0", "'excel'", "'aihub_excel', 'hf', 'codeio'"]),
    "typo in a source key": (lambda d: {**excel_source("a.xlsx"), "diretion": "both"},
                             ["ingest.sources.0.aihub_excel.diretion: unknown key"]),
    "codeio line not json": (lambda d: {"name": "cio", "kind": "codeio", "path": write_bad_jsonl(d)},
                             ["raw.jsonl: line 3 is not valid JSON"]),
    "stray far cell": (lambda d: excel_source(aihub.write_stray_cell(d / "stray.xlsx").name),
                       ["stray.xlsx (sheet 'Sheet1'): cell XFD1048576 holds a value far outside"]),
    "swapped languages": (lambda d: excel_source(aihub.write_swapped(d / "sw.xlsx", swapped=20, rows=20).name),
                          ["sw.xlsx (sheet 'Sheet1'): 20 of 20 rows have English in 원문 and Korean in 번역문"]),
    "symlink loop": (lambda d: excel_source(write_symlink_loop(d / "loop.xlsx").name),
                     ["ingest.sources.0.path (ko-en): loop.xlsx is a loop of symbolic links"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_clear_message_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    make_source, expected = CASES[case]
    result = run_ingest(tmp_path, make_source(tmp_path))
    output = " ".join((result.stdout + result.stderr).split())  # rich may wrap long lines
    assert result.returncode == 2, output
    assert output.count("error:") == 1, output
    message = output.split("error:", 1)[1]
    assert all(" ".join(text.split()) in message for text in expected), output
    assert "Traceback" not in output
    run_dir = tmp_path / "runs" / "demo"
    assert not (run_dir / "ingest").exists() and not (run_dir / ".ingest.partial").exists()
    if (run_dir / "manifest.json").exists():
        assert json.loads((run_dir / "manifest.json").read_text())["stages"]["ingest"]["status"] == "failed"
