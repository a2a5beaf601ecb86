"""The justfile's recipes: the config reaches distillery as one argument, whatever it holds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("ingest", "distill", "format", "finetune", "evaluate", "export-gguf", "push", "chat", "demo")


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_config_is_quoted_for_the_shell(recipe: str) -> None:
    """From an adversarial review: `just config='c.yaml; touch pwned' chat` ran the touch, and a config path with a
    space was two arguments. `just -n` prints each recipe's command without running it."""
    if shutil.which("just") is None:
        pytest.skip("just is not installed (`pip install rust-just==1.59.0`, as the README's commands do)")
    hostile = "my dir/c.yaml'; touch /tmp/pwned; echo '"
    printed = subprocess.run(["just", "-n", f"config={hostile}", recipe], cwd=ROOT, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    quoted = "'my dir/c.yaml'\\''; touch /tmp/pwned; echo '\\'''"
    assert f"-c {quoted}" in printed.stderr, printed.stderr[-2000:]
