"""Ingest speed on a 100,000-row AI-Hub 대화체 workbook, or on the whole AI-Hub corpus, against the seeds' own code.

    python bench/ingest.py [--rows 100000] [--repeat 1]
    python bench/ingest.py --full [--cache ~/.cache/distillery/bench/aihub-full]

1. builds bench/out/dialogue_<rows>.xlsx once (cached; openpyxl write-only);
2. baseline, in a fresh process: `pd.read_excel` + pick 원문/번역문 + `to_csv` (the seeds' script);
3. ours, in a fresh process: `python -m distillery ingest` on a config with that one source, into a fresh run dir
   (reading, records, dedup, split, report, manifest with sha256 of every output);
4. the same command again with nothing changed: must say "up to date".
Prints the wall times, the ratio (target >= 5x) and the rerun time (target < 2 s). Not a test: numbers vary by
machine, so nothing here asserts a time.

--full does the same on the ko-en corpus at its real size (dataSetSn=126: 10 workbooks, 1,602,418 rows, in the
six layouts, built once into --cache, outside the repository), against the seeds' code reading the workbooks
one after another with pd.read_excel. It also samples the memory of the whole process tree (ingest and its
reading processes together; target < 2 GB) and checks the row counts in ingest's report. Targets: < 60 s on
2 cores, >= 5x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor
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


# The corpus as AI-Hub ships it: 구어체 and 뉴스 come in several workbooks. Row counts per layout are the real
# ones; how 뉴스's 801,387 rows divide among its four files is ours.
FULL_CORPUS = (
    ("1_구어체(1).xlsx", "구어체", 200_000), ("1_구어체(2).xlsx", "구어체", 200_000),
    ("2_대화체.xlsx", "대화체", 100_000),
    ("3_문어체_뉴스(1).xlsx", "뉴스", 200_000), ("3_문어체_뉴스(2).xlsx", "뉴스", 200_000),
    ("3_문어체_뉴스(3).xlsx", "뉴스", 200_000), ("3_문어체_뉴스(4).xlsx", "뉴스", 201_387),
    ("4_문어체_한국문화.xlsx", "한국문화", 100_646), ("5_문어체_조례.xlsx", "조례", 100_298),
    ("6_문어체_지자체웹사이트.xlsx", "지자체웹사이트", 100_087),
)
FULL_ROWS = sum(rows for *_, rows in FULL_CORPUS)

FULL_BASELINE = textwrap.dedent("""
    import sys
    import pandas as pd
    frames = []
    for path in sys.argv[2:]:
        frame = pd.read_excel(path)
        frames.append(frame[["원문", "번역문"]])
    pd.concat(frames).to_csv(sys.argv[1], index=False)
""")


def sentence_pairs() -> list[tuple[str, str]]:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.ko_en_pairs import DIALOGUES, NEWS, SPOKEN

    return SPOKEN + [pair for *_, turns in DIALOGUES for pair in turns] + [(n[5], n[6]) for n in NEWS]


def build_layout_workbook(path: Path, layout: str, rows: int, first: int) -> Path:
    """A workbook in an AI-Hub layout with `rows` distinct pairs (numbered from `first`), written atomically."""
    if path.is_file():
        return path
    sys.path.insert(0, str(ROOT))
    import openpyxl

    from tests.fixtures.aihub import LAYOUT_COLUMNS, other_cells

    pairs, columns = sentence_pairs(), LAYOUT_COLUMNS[layout]
    workbook = openpyxl.Workbook(write_only=True)
    sheet = workbook.create_sheet("Sheet1")
    sheet.append(list(columns))
    for i in range(first, first + rows):
        korean, english = pairs[i % len(pairs)]
        cells = {**other_cells(layout, i), "원문": f"{korean} ({i})", "번역문": f"{english} ({i})"}
        sheet.append([cells[column] for column in columns])
    tmp = path.with_suffix(".tmp.xlsx")
    workbook.save(tmp)
    os.replace(tmp, path)
    return path


def build_full_corpus(cache: Path) -> list[Path]:
    """The ten workbooks, built in parallel the first time and cached."""
    cache.mkdir(parents=True, exist_ok=True)
    starts = [sum(rows for *_, rows in FULL_CORPUS[:i]) for i in range(len(FULL_CORPUS))]
    with ProcessPoolExecutor() as pool:
        jobs = [pool.submit(build_layout_workbook, cache / name, layout, rows, first)
                for (name, layout, rows), first in zip(FULL_CORPUS, starts)]
        return [job.result() for job in jobs]


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree.update(children)
        frontier = children
    total = 0
    for member in tree:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


def timed_with_memory(command: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, the peak resident memory of the whole process tree (sampled every 0.1 s), and the output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    seconds = time.perf_counter() - started
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}\n{output}")
    return seconds, peak[0], output


def write_full_config(workbooks: list[Path]) -> Path:
    """One source per layout, as a user would configure the corpus."""
    by_layout: dict[str, list[str]] = {}
    for path, (_, layout, _) in zip(workbooks, FULL_CORPUS):
        by_layout.setdefault(layout, []).append(str(path))
    sources = "".join(f"\n    - name: aihub-{layout}\n      kind: aihub_excel\n      path: {json.dumps(paths, ensure_ascii=False)}"
                      for layout, paths in by_layout.items())
    config = OUT / "bench_ingest_full.yaml"
    OUT.mkdir(parents=True, exist_ok=True)
    config.write_text(f"run: {{name: bench-ingest-full, root: {OUT / 'runs'}}}\ningest:\n  sources:{sources}\n",
                      encoding="utf-8")
    return config


def full(cache: Path) -> None:
    started = time.perf_counter()
    workbooks = build_full_corpus(cache)
    size = sum(path.stat().st_size for path in workbooks)
    print(f"corpus: {len(workbooks)} workbooks, {FULL_ROWS:,} rows, {size / 1e6:.0f} MB in {cache} "
          f"(ready in {time.perf_counter() - started:.0f} s)", flush=True)
    config = write_full_config(workbooks)
    baseline_script = OUT / "baseline_read_excel_all.py"
    baseline_script.write_text(FULL_BASELINE, encoding="utf-8")

    shutil.rmtree(OUT / "runs" / "bench-ingest-full", ignore_errors=True)
    ours, ours_peak, output = timed_with_memory([sys.executable, "-m", "distillery", "ingest", "-c", str(config)], ROOT)
    print(output[-3000:])
    report = json.loads((OUT / "runs" / "bench-ingest-full" / "ingest" / "report.json").read_text(encoding="utf-8"))
    read = sum(source["read"] for source in report["sources"])
    written = report["train"] + report["eval"]
    rerun, _, rerun_output = timed_with_memory([sys.executable, "-m", "distillery", "ingest", "-c", str(config)], ROOT)
    up_to_date = "up to date" in rerun_output
    print("baseline (the seeds' code: pd.read_excel one workbook after another) ...", flush=True)
    base, base_peak, _ = timed_with_memory([sys.executable, str(baseline_script), str(OUT / "baseline_all.csv"),
                                           *map(str, workbooks)], OUT)

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"ours      python -m distillery ingest: {ours:6.1f} s, peak {ours_peak / 1e9:.2f} GB (all processes); "
          f"read {read:,} rows, wrote {written:,} records (train {report['train']:,}, eval {report['eval']:,})")
    print(f"baseline  pd.read_excel x {len(workbooks)}:        {base:6.1f} s, peak {base_peak / 1e9:.2f} GB")
    print(f"rerun     unchanged input: {rerun:.2f} s, {'says up to date' if up_to_date else 'DID NOT say up to date'}")
    rows_ok = "" if read == FULL_ROWS == written else f", ROWS WRONG: read {read:,}, wrote {written:,}"
    figure(f"ingest, full AI-Hub ko-en corpus ({len(workbooks)} workbooks, {FULL_ROWS:,} rows)",
           f"{base / ours:.1f}x ({ours:.0f} s vs {base:.0f} s){rows_ok}",
           "pd.read_excel one workbook after another (the seeds' code)", ">= 5x, < 60 s on 2 cores")
    figure("ingest, full corpus, peak memory of all processes", f"{ours_peak / 1e9:.2f} GB",
           f"the seeds' code: {base_peak / 1e9:.2f} GB", "< 2 GB")
    figure("ingest, full corpus, rerun with input unchanged", f"{rerun:.2f} s, "
           f"{'up to date' if up_to_date else 'NOT up to date'}", "-", "< 2 s")


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


def write_config(workbook: Path, decontaminate: bool = False) -> Path:
    """The workbook as one source; without decontamination for the reading figure (the baseline checks nothing),
    with it for the check's own cost."""
    config = OUT / f"bench_ingest{'_decontaminate' if decontaminate else ''}.yaml"
    config.write_text(textwrap.dedent(f"""
        run: {{name: bench-ingest, root: {OUT / 'runs'}}}
        ingest:
          decontaminate: {{enabled: {str(decontaminate).lower()}}}
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
    parser.add_argument("--full", action="store_true", help="the whole corpus: 10 workbooks, 1,602,418 rows")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "distillery" / "bench" / "aihub-full",
                        help="where --full keeps its workbooks (built once)")
    args = parser.parse_args()
    if args.full:
        full(args.cache)
        return

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
    checked = []
    for _ in range(args.repeat):
        shutil.rmtree(OUT / "runs" / "bench-ingest", ignore_errors=True)
        checked.append(timed([sys.executable, "-m", "distillery", "ingest", "-c", str(write_config(workbook, True))],
                             ROOT)[:2])
    check_wall, check_cpu = min(checked)

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
    print(f"decontaminated: {check_wall:6.2f} s wall, {check_cpu:6.2f} s CPU (against the held-out split)")
    figure(f"ingest decontamination of {args.rows:,} rows (against the held-out split)",
           f"+{check_cpu - ours_cpu:.1f} s CPU ({(check_cpu - ours_cpu) / args.rows * 1e6:.0f} µs a record; "
           f"{check_wall:.1f} s in all)", "the same ingest without it", "-")


if __name__ == "__main__":
    main()
