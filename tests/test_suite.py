"""The test suite's own guarantee: a test that crashes natively (a segfault in C code) fails on its own, named
in the report, and every other test still runs (pyproject's pytest options: one xdist worker, restarted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRASHY = '''
import ctypes


def test_before():
    assert True


def test_segfaults():
    ctypes.string_at(0)


def test_after():
    assert True
'''


def test_a_native_crash_fails_only_its_test_and_is_named(tmp_path: Path) -> None:
    (tmp_path / "test_crashy.py").write_text(CRASHY, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                           str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_crashy.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # the project's plugin, tests/xdist_crash.py
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "1 failed, 2 passed" in output, output
    assert "FAILED test_crashy.py::test_segfaults" in output and "crashed while running" in output, output


def test_setup_leaves_out_the_scikit_learn_that_transformers_would_import_in_every_model_process() -> None:
    """lm-eval declares scikit-learn and never imports it for MathQA; installed, transformers imports it whenever
    a process loads a model (1.3 s each on a 2-core CPU, in every stage's child processes). `just setup` installs
    lm-eval with --no-deps; this fails where a change brings scikit-learn back."""
    import importlib.util

    assert importlib.util.find_spec("sklearn") is None, (
        "scikit-learn is installed in this venv (set up before December 2026?): remove it with `.venv/bin/python -m "
        "pip uninstall scikit-learn scipy`")
    assert importlib.util.find_spec("lm_eval") is not None
