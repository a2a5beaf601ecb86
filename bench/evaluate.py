"""MathQA scoring speed: Distillery's evaluate scorer against lm-evaluation-harness 0.4.13 on the same items.

Baseline (named in issue 4): the harness, HF backend, SmolLM2-135M fp32, batch 8, 300 MathQA test items —
3 min 9 s on the project's 2-core CPU machine. Both runs here score the same items of
../shared/data/mathqa/test.jsonl on the same machine and in the same process; the script prints both times,
the ratio (target >= 3x), whether every prediction (acc and acc_norm) is identical, and the scores in
lm-eval's table shape (acc, acc_norm, standard errors).

    .venv/bin/python bench/evaluate.py                       # 300 items, both sides
    .venv/bin/python bench/evaluate.py --items all           # the whole test split, 2,985 items, both sides
    .venv/bin/python bench/evaluate.py --items all --no-harness   # the whole split, Distillery only
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from figures import figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH = 8


def items_arg(value: str) -> int | None:
    """A number of items, or None for `all`."""
    return None if value == "all" else int(value)


def lm_eval_table(scores: dict) -> str:
    """acc and acc_norm in the shape of lm-eval's results table (lm_eval.utils.make_table)."""
    rows = [("mathqa", "1", "none", "0", "acc", "↑", f"{scores['acc']:.4f}", "±", f"{scores['acc_stderr']:.4f}"),
            ("", "", "none", "0", "acc_norm", "↑", f"{scores['acc_norm']:.4f}", "±", f"{scores['acc_norm_stderr']:.4f}")]
    header = ("Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    right = {1, 3, 6, 8}

    def line(cells: tuple[str, ...]) -> str:
        return "|" + "|".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + "|"

    rule = "|" + "|".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=items_arg, default=300,
                        help="MathQA test items, or `all` (the baseline is for 300)")
    parser.add_argument("--no-harness", action="store_true",
                        help="score with Distillery only (the harness takes ~36 min for the whole split)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both (1 makes CPU seconds comparable on a busy machine)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each side, alternating; the best time of each counts (steadier on a noisy machine)")
    args = parser.parse_args()
    n_items = args.items
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # Both sides' libraries are imported before either clock starts: whichever ran first would otherwise pay
    # for importing transformers (seconds) on behalf of both. Model loading stays inside both timings.
    import lm_eval.models.huggingface  # noqa: F401
    import transformers  # noqa: F401

    from distillery.evals import mathqa
    from tests.evals.harness import run_harness
    from distillery.evals.hf_backend import HFModel
    from distillery.evals.scoring import build_request
    from distillery.core.models import resolve_model_path

    data = ROOT.parent / "shared" / "data" / "mathqa" / "test.jsonl"
    if not data.is_file():
        print(f"skipped: {data} is absent (../shared exists only beside the project's own checkouts)")
        return 0
    model_path = resolve_model_path("bundled:SmolLM2-135M-Instruct")

    def run_ours() -> tuple[float, float, list, list[list[float]]]:
        started, cpu = time.perf_counter(), time.process_time()
        items = mathqa.load_items(str(data), "test", n_items, mathqa.LoadReport())
        scorer = HFModel(model_path, "float32")
        requests = [build_request(scorer.encode, ctx, mathqa.continuations(item))
                    for item, ctx in zip(items, mathqa.build_contexts(items, 0, [], False))]
        scores = scorer.loglikelihoods(requests, batch_size=BATCH)
        return time.perf_counter() - started, time.process_time() - cpu, items, scores

    def run_reference() -> tuple[float, float, list[dict]]:
        started, cpu = time.perf_counter(), time.process_time()
        reference = run_harness(model_path, data, limit=n_items, batch_size=BATCH, dtype="float32")
        return time.perf_counter() - started, time.process_time() - cpu, reference

    ours_times, harness_times = [], []
    for attempt in range(args.repeat):
        ours_s, ours_cpu, items, ours = run_ours()
        ours_times.append((ours_s, ours_cpu))
        print(f"distillery evaluate: {ours_s:.1f} s for {len(items)} items", flush=True)
        if args.no_harness:
            continue
        harness_s, harness_cpu, reference = run_reference()
        harness_times.append((harness_s, harness_cpu))
        print(f"harness: {harness_s:.1f} s (run {attempt + 1} of {args.repeat})", flush=True)
    (ours_s, ours_cpu) = min(ours_times)
    label = f"{len(items)} MathQA test items" if n_items else f"all {len(items)} MathQA test items"
    rows = [{"acc": float(p == i.label), "acc_norm": float(n == i.label)}
            for i, (p, n) in ((i, mathqa.predictions(i, lls)) for i, lls in zip(items, ours))]
    print(f"\nDistillery, {label}, SmolLM2-135M fp32, 0-shot:")
    print(lm_eval_table(mathqa.aggregate(rows)))
    if args.no_harness:
        scores = mathqa.aggregate(rows)
        figure(f"evaluate, {label} (SmolLM2-135M fp32)",
               f"acc {scores['acc']:.4f} ± {scores['acc_stderr']:.4f}, acc_norm {scores['acc_norm']:.4f} ± "
               f"{scores['acc_norm_stderr']:.4f} in {ours_s:.0f} s", "- (the harness not run: --no-harness)")
        return 0
    (harness_s, harness_cpu) = min(harness_times)
    print(f"\nlm-eval 0.4.13 harness, the same items:")
    print(lm_eval_table(mathqa.aggregate([{"acc": r["acc"], "acc_norm": r["acc_norm"]} for r in reference])))

    same, max_diff = 0, 0.0
    for item, ref, lls in zip(items, reference, ours):
        same += mathqa.predictions(item, lls) == mathqa.predictions(item, ref["loglikelihoods"])
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(lls, ref["loglikelihoods"])))
    acc = sum(r["acc"] for r in reference) / len(reference)
    best = f", best of {args.repeat} alternating runs each" if args.repeat > 1 else ""
    print(f"\nMathQA, {label}, SmolLM2-135M fp32, batch {BATCH} (model load included in both{best})")
    print(f"  lm-eval 0.4.13 harness : {harness_s:7.1f} s wall, {harness_cpu:7.1f} s CPU   (named baseline: 189 s wall for 300 items)")
    print(f"  distillery evaluate    : {ours_s:7.1f} s wall, {ours_cpu:7.1f} s CPU")
    print(f"  speed-up               : {harness_s / ours_s:5.2f}x wall, {harness_cpu / ours_cpu:5.2f}x CPU   (target >= 3x)")
    print(f"  identical predictions  : {same}/{len(items)} items; max |delta log-likelihood| {max_diff:.2e}; acc {acc:.3f}")
    figure(f"evaluate, {label} (SmolLM2-135M fp32, batch {BATCH})",
           f"{harness_s / ours_s:.2f}x ({ours_s:.0f} s vs {harness_s:.0f} s), {same}/{len(items)} identical",
           "lm-eval 0.4.13 harness, same model and dtype", ">= 3x, identical predictions")
    return 0 if same == len(items) else 1


if __name__ == "__main__":
    sys.exit(main())
