"""`just bench`: run every benchmark in bench/ and write bench/RESULTS.md.

Each benchmark is a standalone script that prints its figures as ratios against a named baseline. This runner
adds what a reader needs to trust them: the machine, the package versions, and the command that reproduces
each block.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PACKAGES = ("torch", "transformers", "trl", "peft", "unsloth", "llama-cpp-python", "lm-eval", "python-calamine", "pandas")


def machine() -> str:
    gpu = "none"
    try:
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, GPU: {gpu}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def run_one(script: Path) -> tuple[str, float, int]:
    """Run a benchmark, echoing its output live; returns (output, seconds, exit code)."""
    started = time.time()
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return "".join(lines), time.time() - started, process.wait()


def main() -> int:
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name != Path(__file__).name)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["# Benchmark results", "", f"- when: {stamp}", f"- machine: {machine()}", f"- versions: {versions()}", ""]
    failed = 0
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        output, seconds, code = run_one(script)
        failed += code != 0
        status = "" if code == 0 else f" — FAILED (exit {code})"
        parts += [f"## {script.stem}{status}", "", f"Reproduce: `.venv/bin/python bench/{script.name}` ({seconds:.0f} s)",
                  "", "```", output.rstrip()[-6000:], "```", ""]
    (BENCH / "RESULTS.md").write_text("\n".join(parts), encoding="utf-8")
    print(f"\nwrote {BENCH / 'RESULTS.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
