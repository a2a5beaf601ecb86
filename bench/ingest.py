"""Ingest speed on a 100,000-row AI-Hub 대화체 workbook, against the seeds' own code.

    python bench/ingest.py [--rows 100000] [--repeat 1]

1. builds bench/out/dialogue_<rows>.xlsx once (cached; openpyxl write-only);
2. baseline, in a fresh process: `pd.read_excel` + pick 원문/번역문 + `to_csv` (the seeds' script);
3. ours, in a fresh process: `python -m distillery ingest` on a config with that one source, into a fresh run dir
   (reading, records, dedup, split, report, manifest with sha256 of every output);
4. the same command again with nothing changed: must say "up to date".
Prints the wall times, the ratio (target >= 5x) and the rerun time (target < 2 s). Not a test: numbers vary by
machine, so nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from figures import figure

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
HEADER = ("대분류", "소분류", "상황", "Set Nr.", "발화자", "원문", "번역문")

BASELINE = textwrap.dedent("""
    import sys
    import pandas as pd
    frame = pd.read_excel(sys.argv[1])
    frame[["원문", "번역문"]].to_csv(sys.argv[2], index=False)
""")


def build_workbook(rows: int) -> Path:
    """A 대화체 workbook of `rows` distinct sentence pairs (cached under bench/out/)."""
    path = OUT / f"dialogue_{rows}.xlsx"
    if path.is_file():
        return path
    sys.path.insert(0, str(ROOT))
    import openpyxl

    from tests.fixtures.ko_en_pairs import DIALOGUES, NEWS, SPOKEN

    pairs = SPOKEN + [pair for *_, turns in DIALOGUES for pair in turns] + [(n[5], n[6]) for n in NEWS]
    OUT.mkdir(parents=True, exist_ok=True)
    workbook = openpyxl.Workbook(write_only=True)
    sheet = workbook.create_sheet("Sheet1")
    sheet.append(HEADER)
    for i in range(rows):
        korean, english = pairs[i % len(pairs)]
        set_nr = i // 6 + 1
        # the row number makes every pair distinct, as in the real corpus (dedup keeps them all)
        sheet.append(["일상", "여행", "길 찾기", set_nr, "AB"[i % 2], f"{korean} ({i})", f"{english} ({i})"])
    tmp = path.with_suffix(".tmp.xlsx")
    workbook.save(tmp)
    os.replace(tmp, path)
    return path


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of a fresh process (CPU time is the steadier number on a shared, loaded machine)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    cpu, started = child_cpu_seconds(), time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - started, child_cpu_seconds() - cpu
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    return seconds, cpu, result.stdout + result.stderr


def write_config(workbook: Path) -> Path:
    config = OUT / "bench_ingest.yaml"
    config.write_text(textwrap.dedent(f"""
        run: {{name: bench-ingest, root: {OUT / 'runs'}}}
        ingest:
          sources:
            - name: aihub-dialogue
              kind: aihub_excel
              path: {workbook}
    """), encoding="utf-8")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side; the best time counts")
    args = parser.parse_args()

    started = time.perf_counter()
    workbook = build_workbook(args.rows)
    print(f"workbook: {workbook} ({workbook.stat().st_size / 1e6:.1f} MB, ready in {time.perf_counter() - started:.1f} s)")
    config = write_config(workbook)
    baseline_script = OUT / "baseline_read_excel.py"
    baseline_script.write_text(BASELINE, encoding="utf-8")

    baseline, ours = [], []
    for _ in range(args.repeat):
        baseline.append(timed([sys.executable, str(baseline_script), str(workbook), str(OUT / "baseline.csv")], OUT)[:2])
        shutil.rmtree(OUT / "runs" / "bench-ingest", ignore_errors=True)  # a fresh run every time
        ours.append(timed([sys.executable, "-m", "distillery", "ingest", "-c", str(config)], ROOT)[:2])
    rerun, rerun_cpu, output = timed([sys.executable, "-m", "distillery", "ingest", "-c", str(config)], ROOT)
    up_to_date = "up to date" in output

    (base_wall, base_cpu), (ours_wall, ours_cpu) = min(baseline), min(ours)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"baseline  pd.read_excel + to_csv (subprocess):     {base_wall:6.2f} s wall, {base_cpu:6.2f} s CPU")
    print(f"ours      python -m distillery ingest (subprocess):   {ours_wall:6.2f} s wall, {ours_cpu:6.2f} s CPU")
    print(f"ratio     {base_wall / ours_wall:.1f}x faster by wall time, {base_cpu / ours_cpu:.1f}x by CPU time "
          "(target >= 5x)")
    print(f"rerun     unchanged input: {rerun:.2f} s wall, {rerun_cpu:.2f} s CPU, "
          f"{'says up to date' if up_to_date else 'DID NOT say up to date'} (target < 2 s)")
    figure(f"ingest, {args.rows:,}-row 대화체 workbook", f"{base_wall / ours_wall:.1f}x ({ours_wall:.1f} s vs "
           f"{base_wall:.1f} s)", "pd.read_excel + column pick + to_csv", ">= 5x")
    figure("ingest rerun, input unchanged", f"{rerun:.2f} s, {'up to date' if up_to_date else 'NOT up to date'}",
           "-", "< 2 s")


if __name__ == "__main__":
    main()
