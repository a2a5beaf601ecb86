"""`just bench`: run every benchmark in bench/ and write bench/RESULTS.md.

    python bench/report.py                          # every benchmark (about an hour on 2 cores)
    python bench/report.py --only ingest.py --full  # one of them; its rows and section in RESULTS.md are replaced
    python bench/report.py --from-log gpu.log --only gpu.py  # a benchmark that ran elsewhere (the GPU machine)

Each benchmark is a standalone script that prints its headline figures (bench/figures.py) as ratios against a
named baseline. This runner gathers them into one table and adds what a reader needs to trust them: the
machine, the package versions, the command that reproduces each figure, and each script's full output.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from figures import PREFIX, parse

BENCH = Path(__file__).resolve().parent
# In pipeline order; each with the arguments of the figures the issues name (most run with their defaults).
BENCHMARKS = (("ingest.py",), ("ingest.py", "--full"), ("finetune.py",), ("finetune.py", "--methods"), ("evaluate.py",), ("evaluate.py", "--items", "all", "--no-harness"),
              ("export.py",), ("export.py", "--scale"), ("export.py", "--builds-at", "1.5b"), ("distill.py",), ("distill.py", "--teacher"), ("distill.py", "--objectives"), ("demo.py",), ("demo.py", "--config", "configs/tiny-r1.yaml"),
              ("gpu.py",))
# Measured only on a CUDA machine: elsewhere their rows and sections in RESULTS.md are kept as they are.
NEEDS_GPU = {("gpu.py",)}
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


def cpu_in_short() -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores': what a section measured on when it ran alone (--only)."""
    sys.path.insert(0, str(BENCH.parent))
    from distillery.export.llama_build import describe_cpu

    return f"{describe_cpu().split(':')[0]}, {os.cpu_count()} cores"


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


def readme_table(table: list[str]) -> list[str]:
    """RESULTS.md's figures that have a target, without the baseline column (RESULTS.md keeps every figure and
    column; the README stays short); each benchmark's command heads its figures in a row of its own."""
    rows, command = [], None
    for line in table:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if cells[0] != "figure" and (cells[3] == "-" or cells[3].startswith("- ")):
            continue  # an informational figure: RESULTS.md only
        if cells[4].startswith("`") and cells[4] != command:
            command = cells[4]
            rows.append(f"| {command.replace('.venv/bin/python ', '')} | | |")
        rows.append("| " + " | ".join([cells[0], cells[1], cells[3]]) + " |")
    return rows


def show_in_readme(table: list[str]) -> None:
    """The README shows RESULTS.md's table between its bench markers (tests/test_readme.py keeps them equal)."""
    readme = BENCH.parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + "\n".join(readme_table(table)) + "\n" + text[end:], encoding="utf-8")


README_START, README_END = "<!-- bench/RESULTS.md table: begin -->", "<!-- bench/RESULTS.md table: end -->"


def command_of(benchmark: tuple[str, ...]) -> str:
    return " ".join([f".venv/bin/python bench/{benchmark[0]}", *benchmark[1:]])


def heading_of(benchmark: tuple[str, ...]) -> str:
    return " ".join([Path(benchmark[0]).stem, *benchmark[1:]])


def run_benchmark(benchmark: tuple[str, ...], stamp: str, log: Path | None = None) -> tuple[list[dict[str, str]], str, bool]:
    """(its figures, its section for RESULTS.md, whether it succeeded); from `log` when it ran elsewhere."""
    command = command_of(benchmark)
    if log:
        output, where, code = log.read_text(encoding="utf-8", errors="replace"), f"its log {log.name}, {stamp}", 0
    else:
        print(f"\n=== {command} ===", flush=True)
        output, seconds, code = run_one(BENCH / benchmark[0], benchmark[1:])
        where = f"{seconds:.0f} s, {stamp}, on {cpu_in_short()}"
    status = "" if code == 0 else f" — FAILED (exit {code})"
    section = "\n".join([f"## {heading_of(benchmark)}{status}", "", f"`{command}` ({where})", "",
                         "```", figure_lines_and_tail(output), "```", ""])
    return parse(output), section, code == 0


def figure_lines_and_tail(output: str, tail: int = 6000) -> str:
    """The output's last `tail` characters, after every FIGURE line that falls before them (a long log's figures
    are printed as they are measured, not only at its end)."""
    text = output.rstrip()
    if len(text) <= tail:
        return text
    early = [line for line in text[:-tail].splitlines() if line.startswith(PREFIX)]
    return "\n".join([*early, "[...]", text[-tail:]])


def has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def previous_machine_line() -> str:
    path = BENCH / "RESULTS.md"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return next((line for line in lines if line.startswith("- machine: ")), "")


def previous_results() -> tuple[dict[str, list[dict[str, str]]], dict[str, str]]:
    """RESULTS.md's figures by command and sections by heading, to keep those of benchmarks not run now."""
    path = BENCH / "RESULTS.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    figures: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 5 and cells[4].startswith("`"):
            figures.setdefault(cells[4].strip("`"), []).append(dict(zip(("figure", "result", "baseline", "target"), cells)))
    sections = {}
    for section in re.split(r"^(?=## )", text, flags=re.M)[1:]:
        heading = section.splitlines()[0][3:].split(" — FAILED")[0].strip()
        sections[heading] = section.rstrip() + "\n"
    return figures, sections


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-log", type=Path, help="with --only: take its output from this log instead of running it")
    parser.add_argument("--only", nargs=argparse.REMAINDER, help="one benchmark: its script and arguments")
    parsed = parser.parse_args()
    only = tuple(parsed.only or ())
    if only and only not in BENCHMARKS:
        parser.error(f"--only {' '.join(only)}: not one of {', '.join(' '.join(b) for b in BENCHMARKS)}")
    if parsed.from_log and not only:
        parser.error("--from-log needs --only with the benchmark that wrote the log")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures, sections = previous_results()
    if not only:  # a full run replaces everything it measures
        figures = {command_of(b): figures[command_of(b)] for b in NEEDS_GPU if command_of(b) in figures}
        sections = {heading_of(b): sections[heading_of(b)] for b in NEEDS_GPU if heading_of(b) in sections}
    failed = 0
    gpu = has_gpu()
    for benchmark in ([only] if only else BENCHMARKS):
        if benchmark in NEEDS_GPU and not gpu and not parsed.from_log:
            print(f"\n=== {command_of(benchmark)}: no GPU here, its figures in RESULTS.md are kept ===", flush=True)
            continue
        figures[command_of(benchmark)], sections[heading_of(benchmark)], ok = run_benchmark(benchmark, stamp,
                                                                                            parsed.from_log)
        failed += not ok
    table = figures_table([(command_of(b), f) for b in BENCHMARKS for f in figures.get(command_of(b), [])])
    when = f"{stamp} ({' '.join(only)} only; each section below says when it ran)" if only else stamp
    # one benchmark run alone names its CPU in its section: the machine line stays the full run's
    machine_line = previous_machine_line() if only else ""
    parts = ["# Benchmark results", "", f"- when: {when}", machine_line or f"- machine: {machine()}",
             f"- versions: {versions()}",
             f"- load average at the end: {os.getloadavg()[0]:.1f} (the figures are only as steady as the machine)",
             "", *table, "", "Each script's full output follows.", "",
             *[sections[heading_of(b)] for b in BENCHMARKS if heading_of(b) in sections]]
    (BENCH / "RESULTS.md").write_text("\n".join(parts), encoding="utf-8")
    show_in_readme(table)
    print(f"\nwrote {BENCH / 'RESULTS.md'} and its table into README.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
