"""The one line format every benchmark prints its headline figures in, so that `just bench` (bench/report.py)
can gather them into bench/RESULTS.md's table. Not a benchmark itself."""

from __future__ import annotations

PREFIX = "FIGURE"
FIELDS = ("figure", "result", "baseline", "target")


def figure(name: str, result: str, baseline: str, target: str = "-") -> None:
    """Print one headline figure: what was measured, the result (a ratio where there is a baseline), the named
    baseline it is compared with, and the target it must reach."""
    print(" | ".join((PREFIX, name, result, baseline, target)), flush=True)


def parse(output: str) -> list[dict[str, str]]:
    """The figures a benchmark printed, in order."""
    rows = []
    for line in output.splitlines():
        parts = [part.strip() for part in line.split(" | ")]
        if parts[0] == PREFIX and len(parts) == len(FIELDS) + 1:
            rows.append(dict(zip(FIELDS, parts[1:])))
    return rows
