"""`just bench`: run every benchmark in bench/ and write bench/RESULTS.md.

Each benchmark is a standalone script that prints its headline figures (bench/figures.py) as ratios against a
named baseline. This runner gathers them into one table and adds what a reader needs to trust them: the
machine, the package versions, the command that reproduces each figure, and each script's full output.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from figures import parse

BENCH = Path(__file__).resolve().parent
# In pipeline order; each with the arguments of the figures the issues name (most run with their defaults).
BENCHMARKS = (("ingest.py",), ("finetune.py",), ("evaluate.py",), ("evaluate.py", "--items", "all", "--no-harness"),
              ("export.py",), ("distill.py",), ("distill.py", "--teacher"), ("demo.py",), ("demo.py", "--config", "configs/tiny-r1.yaml"))
PACKAGES = ("torch", "transformers", "trl", "peft", "unsloth", "llama-cpp-python", "lm-eval", "python-calamine", "pandas")


def machine() -> str:
    sys.path.insert(0, str(BENCH.parent))
    from distillery.export.llama_build import describe_cpu

    gpu = "none"
    try:
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return (f"{platform.platform()}, {os.cpu_count()} cores ({describe_cpu()}), Python {platform.python_version()}, "
            f"GPU: {gpu}")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def run_one(script: Path, args: tuple[str, ...]) -> tuple[str, float, int]:
    """Run a benchmark, echoing its output live; returns (output, seconds, exit code)."""
    started = time.time()
    process = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return "".join(lines), time.time() - started, process.wait()


def figures_table(figures: list[tuple[str, dict[str, str]]]) -> list[str]:
    lines = ["| figure | result | baseline | target | command |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {f['figure']} | {f['result']} | {f['baseline']} | {f['target']} | `{command}` |" for command, f in figures]
    return lines


def show_in_readme(table: list[str]) -> None:
    """The README shows RESULTS.md's table between its bench markers (tests/test_readme.py keeps them equal)."""
    readme = BENCH.parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + "\n".join(table) + "\n" + text[end:], encoding="utf-8")


README_START, README_END = "<!-- bench/RESULTS.md table: begin -->", "<!-- bench/RESULTS.md table: end -->"


def main() -> int:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures: list[tuple[str, dict[str, str]]] = []
    blocks: list[str] = []
    failed = 0
    for name, *args in BENCHMARKS:
        command = " ".join([f".venv/bin/python bench/{name}", *args])
        print(f"\n=== {command} ===", flush=True)
        output, seconds, code = run_one(BENCH / name, tuple(args))
        failed += code != 0
        status = "" if code == 0 else f" — FAILED (exit {code})"
        figures += [(command, f) for f in parse(output)]
        blocks += [f"## {' '.join([Path(name).stem, *args])}{status}", "", f"`{command}` ({seconds:.0f} s)", "", "```",
                   output.rstrip()[-6000:], "```", ""]
    parts = ["# Benchmark results", "", f"- when: {stamp}", f"- machine: {machine()}", f"- versions: {versions()}",
             f"- load average at the end: {os.getloadavg()[0]:.1f} (the figures are only as steady as the machine)",
             "", *figures_table(figures), "", "Each script's full output follows.", "", *blocks]
    (BENCH / "RESULTS.md").write_text("\n".join(parts), encoding="utf-8")
    show_in_readme(figures_table(figures))
    print(f"\nwrote {BENCH / 'RESULTS.md'} and its table into README.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
