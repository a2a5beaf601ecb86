"""The CLI: one command per stage in STAGES, exit code 2 with one message for user errors, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from distillery.cli import app
from distillery.runner import STAGES

ROOT = Path(__file__).resolve().parents[2]


def test_cli_has_a_command_per_stage_and_run() -> None:
    names = {command.name for command in app.registered_commands}
    assert set(STAGES) | {"run"} <= names


def test_help_starts_fast_without_heavy_imports() -> None:
    code = ("import sys, distillery.cli; heavy = {'torch', 'transformers', 'unsloth', 'llama_cpp', 'datasets', "
            "'pandas'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_config_exits_2_with_message_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("ingest:\n  sources: []\n  typo_key: 1\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "distillery", "ingest", "-c", str(config)], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "ingest.typo_key: unknown key" in output and "ingest.sources" in output
    assert "Traceback" not in output


def test_missing_config_exits_2() -> None:
    result = CliRunner().invoke(app, ["ingest", "-c", "does/not/exist.yaml"])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def broken_stage_project(tmp_path: Path, monkeypatch) -> Path:
    """A project whose ingest stage has a bug: it divides by zero (as evaluate once did on MathQA item 1041)."""
    import dataclasses

    import distillery.stages.ingest as ingest

    def run(ctx):
        return 1 / 0

    monkeypatch.setattr(ingest, "STAGE", dataclasses.replace(ingest.STAGE, run=run))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text("run: {name: t, root: runs}\ningest:\n  sources:\n    - {name: toy, kind: hf, files: data.jsonl, "
                      "format: messages}\n", encoding="utf-8")
    return config


def test_an_unexpected_error_is_one_line_naming_the_stage_the_error_and_the_log(tmp_path: Path, monkeypatch) -> None:
    import json

    config = broken_stage_project(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["ingest", "-c", str(config)], terminal_width=400)
    assert result.exit_code == 1
    log = tmp_path / "runs" / "t" / "logs" / "ingest.log"
    assert result.output.strip().splitlines()[-1] == (
        "error: ingest failed with an unexpected ZeroDivisionError: division by zero. This is a bug in Distillery, "
        "not a problem with your data or config; please report it with the full traceback, written to "
        f"{Path('runs') / 't' / 'logs' / 'ingest.log'} (-v shows it here).")
    assert "Traceback" not in result.output
    assert "Traceback" in log.read_text() and "ZeroDivisionError: division by zero" in log.read_text()
    entry = json.loads((tmp_path / "runs" / "t" / "manifest.json").read_text())["stages"]["ingest"]
    assert entry["status"] == "failed" and entry["error"] == "ZeroDivisionError: division by zero"
    assert not (tmp_path / "runs" / "t" / "ingest").exists() and not (tmp_path / "runs" / "t" / ".ingest.partial").exists()


def test_verbose_shows_the_traceback_of_an_unexpected_error(tmp_path: Path, monkeypatch) -> None:
    config = broken_stage_project(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["ingest", "-c", str(config), "-v"], terminal_width=400)
    assert result.exit_code == 1
    assert "Traceback" in result.output and "1 / 0" in result.output and "a bug in Distillery" in result.output
