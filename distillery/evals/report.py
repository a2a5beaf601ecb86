"""The comparison of artifacts: a markdown table, JSON rows and a bar chart with standard-error bars."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distillery.core.console import markdown_table
from distillery.core.plots import figure

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
    lines += not_scored(results)
    if results.get("skipped_items"):
        lines += ["", f"Items skipped (options not parseable etc.): {len(results['skipped_items'])}, e.g. "
                  + ", ".join(s["id"] for s in results["skipped_items"][:5])]
    lines += ["", "± is the standard error of the mean (as lm-evaluation-harness reports it). Chart: comparison.png"]
    return "\n".join(lines) + "\n"


def not_scored(results: dict[str, Any]) -> list[str]:
    """Markdown lines naming each artifact that could not be scored and why (none when all were)."""
    if not results.get("errors"):
        return []
    return ["", "Not scored:"] + [f"- {name}: {msg}" for name, msg in results["errors"].items()]


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


# ---- held-out data --------------------------------------------------------------------------------------------


def score_text(value: float | None, spec: str) -> str:
    """A score as `spec` formats it; "n/a" for None (a loss past what a float holds, as heldout.json stores it) and
    NaN, "inf" for infinity."""
    return "n/a" if value is None or value != value else format(value, spec)


def heldout_cell(scores: dict[str, Any] | None) -> str:
    """'loss 1.234 · chrF 35.1' (the task's main metric when it was generated), '✗' when past the quant bound."""
    if not scores:
        return "-"
    parts = [f"loss {score_text(scores['loss'], '.3f')}"]
    metric = scores.get("metric")
    if metric:
        value = scores[metric]
        parts.append(f"chrF {score_text(value, '.1f')}" if metric == "chrf" else f"{metric} {score_text(value, '.2f')}")
    check = scores.get("vs_reference")
    if check and not check["passed"]:
        parts.append("✗ past the quant bound")
    return " · ".join(parts)


def heldout_rows(heldout: dict[str, dict[str, Any]]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(headers, rows): one row per task (and overall), one column per artifact in scoring order."""
    artifacts = list(heldout)
    tasks = sorted({t for scored in heldout.values() for t in scored if t != "overall"}) + ["overall"]
    rows = [(f"{task} ({max(heldout[a].get(task, {}).get('items', 0) for a in artifacts)})",
             *(heldout_cell(heldout[a].get(task)) for a in artifacts)) for task in tasks]
    return ("task (items)", *artifacts), rows


def render_heldout_markdown(heldout: dict[str, dict[str, Any]], reference: str | None, bounds: dict[str, float],
                            heading: str = "##", chart: str = " Chart: heldout.png") -> list[str]:
    """The held-out table in Markdown under a `heading` of that level, what it shows, and each GGUF's check."""
    headers, rows = heldout_rows(heldout)
    lines = [f"{heading} Held-out data (format's eval split, the training template)", "", *markdown_table(headers, rows),
             "", "loss: mean negative log-likelihood per completion token (perplexity = e^loss in heldout.json); the "
             "metric is the task's own (chrF++ for translation, accuracy by math-verify, option letter or CodeI/O "
             f"verifier; exact match and chrF++ elsewhere).{chart}"]
    if reference:
        failed = [f"{name} on {task}" for name, scored in heldout.items() for task, s in scored.items()
                  if s.get("vs_reference", {}).get("passed") is False]
        lines += ["", f"Each GGUF against {reference}: at most {bounds['loss']:.0%} more loss and {bounds['drop']:.2f} "
                  f"less of the main metric per task: " + ("every GGUF scored is within the bounds." if not failed else
                                                           "PAST THE BOUND: " + ", ".join(failed) + ".")]
    return lines


def save_heldout_chart(heldout: dict[str, dict[str, Any]], path: Path) -> None:
    """Per task: the loss of each artifact (base -> adapter -> merged -> each quant) and its main metric."""
    from distillery.evals.tasks import main_metric

    artifacts = list(heldout)
    tasks = sorted({t for scored in heldout.values() for t in scored if t != "overall"})
    width = 0.8 / max(1, len(artifacts))
    losses = {name: [heldout[name].get(t, {}).get("loss", 0.0) for t in tasks] for name in artifacts}
    ceiling = 1.15 * max((v for row in losses.values() for v in row if v is not None and math.isfinite(v)), default=1.0)
    with figure(path, (max(7.0, 1.3 * len(tasks) + 3), 7.0), nrows=2) as (fig, (top, bottom)):
        for k, name in enumerate(artifacts):
            xs = [i + (k - (len(artifacts) - 1) / 2) * width for i in range(len(tasks))]
            bars = top.bar(xs, [v if v is not None and math.isfinite(v) else ceiling for v in losses[name]], width,
                           label=name)
            mark_broken_losses(top, bars, losses[name])
            bottom.bar(xs, [main_metric(heldout[name].get(t, {})) or 0.0 for t in tasks], width, label=name)
        for ax, title in ((top, "held-out loss per completion token (lower is better)"),
                          (bottom, "main metric: chrF/100, accuracy (higher is better)")):
            ax.set_xticks(range(len(tasks)), tasks, rotation=15, ha="right")
            ax.set_title(title)
        bottom.set_ylim(0, 1)
        top.legend(fontsize=8)


def mark_broken_losses(ax: Any, bars: Any, losses: list[float | None]) -> None:
    """A loss past what a float holds (inf, or None as heldout.json stores it) or NaN: its bar drawn to the top of
    the axis, hatched and labelled, so that a broken GGUF does not look like one with no loss."""
    for bar, loss in zip(bars, losses):
        if loss is None or not math.isfinite(loss):
            bar.set_hatch("//")
            bar.set_alpha(0.5)
            ax.annotate(score_text(loss, ".3f"), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
