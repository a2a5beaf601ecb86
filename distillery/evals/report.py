"""The comparison of artifacts: a markdown table, JSON rows and a bar chart with standard-error bars."""

from __future__ import annotations

from distillery.core.plots import figure

from pathlib import Path
from typing import Any

from distillery.core.console import markdown_table

METRICS = {"loglikelihood": ("acc", "acc_norm"), "generative": ("acc", "no_answer")}


def fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per scored artifact, with its change against the base model where there is one."""
    metrics = METRICS[results["mode"]]
    base = results["artifacts"].get("base")
    rows = []
    for name, scored in results["artifacts"].items():
        row = {"artifact": name, "kind": scored["kind"], "n": scored["n"]}
        for metric in metrics:
            row[metric] = scored.get(metric)
            row[f"{metric}_stderr"] = scored.get(f"{metric}_stderr")
            if base is not None and name != "base" and scored.get(metric) is not None:
                row[f"{metric}_vs_base"] = scored[metric] - base[metric]
        rows.append(row)
    return rows


def render_markdown(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    metrics = METRICS[results["mode"]]
    lines = [f"# MathQA ({results['mode']}, {results['num_fewshot']}-shot, {results['n']} items of {results['data']})",
             ""]
    headers = ("artifact", "kind", *(h for m in metrics for h in (m, "Δ vs base")))
    cells = []
    for row in rows:
        cells.append((row["artifact"], row["kind"], *(cell for m in metrics for cell in (
            fmt(row[m], row[f"{m}_stderr"]), "" if row.get(f"{m}_vs_base") is None else f"{row[f'{m}_vs_base']:+.4f}"))))
    lines += markdown_table(headers, cells)
    if results.get("errors"):
        lines += ["", "Not scored:"] + [f"- {name}: {msg}" for name, msg in results["errors"].items()]
    if results.get("skipped_items"):
        lines += ["", f"Items skipped (options not parseable etc.): {len(results['skipped_items'])}, e.g. "
                  + ", ".join(s["id"] for s in results["skipped_items"][:5])]
    lines += ["", "± is the standard error of the mean (as lm-evaluation-harness reports it). Chart: comparison.png"]
    return "\n".join(lines) + "\n"


def save_chart(results: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars, one group per artifact, one bar per metric, error bars = standard error."""
    metrics = METRICS[results["mode"]]
    width = 0.8 / len(metrics)
    with figure(path, (max(5.0, 1.4 * len(rows) + 2), 3.8)) as (fig, ax):
        for k, metric in enumerate(metrics):
            xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
            values = [row[metric] or 0.0 for row in rows]
            errors = [row[f"{metric}_stderr"] or 0.0 for row in rows]
            ax.bar(xs, values, width, yerr=errors, capsize=3, label=metric)
        if results["mode"] == "loglikelihood":
            ax.axhline(0.2, color="grey", linestyle=":", linewidth=1, label="chance (0.2)")
        ax.set_xticks(range(len(rows)), [row["artifact"] for row in rows], rotation=15, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.set_title(f"MathQA {results['mode']}, {results['n']} items")
        ax.legend(fontsize=8)
