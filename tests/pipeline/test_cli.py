"""The CLI: one command per stage in STAGES, exit code 2 with one message for user errors, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runner import STAGES

ROOT = Path(__file__).resolve().parents[2]


def test_cli_has_a_command_per_stage_and_run() -> None:
    names = {command.name for command in app.registered_commands}
    assert set(STAGES) | {"run"} <= names


def test_help_starts_fast_without_heavy_imports() -> None:
    code = ("import sys, pipeline.cli; heavy = {'torch', 'transformers', 'unsloth', 'llama_cpp', 'datasets', "
            "'pandas'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_config_exits_2_with_message_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("ingest:\n  sources: []\n  typo_key: 1\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "-c", str(config)], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "ingest.typo_key: unknown key" in output and "ingest.sources" in output
    assert "Traceback" not in output


def test_missing_config_exits_2() -> None:
    result = CliRunner().invoke(app, ["ingest", "-c", "does/not/exist.yaml"])
    assert result.exit_code == 2
    assert "does not exist" in result.output
