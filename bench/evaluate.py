"""MathQA scoring speed: Distillery's evaluate scorer against lm-evaluation-harness 0.4.13 on the same items.

Baseline (named in issue 4): the harness, HF backend, SmolLM2-135M fp32, batch 8, 300 MathQA test items —
3 min 9 s on the project's 2-core CPU machine. Both runs here score the same 300 items of
../shared/data/mathqa/test.jsonl on the same machine and in the same process; the script prints both times,
the ratio (target >= 3x) and whether every prediction (acc and acc_norm) is identical.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from figures import figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH = 8


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=300, help="MathQA test items (the baseline is for 300)")
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

    from evals import mathqa
    from evals.harness import run_harness
    from evals.hf_backend import HFModel
    from evals.scoring import build_request
    from pipeline.models import resolve_model_path

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
        print(f"distillery evaluate: {ours_s:.1f} s for {n_items} items; now the harness ...", flush=True)
        harness_s, harness_cpu, reference = run_reference()
        harness_times.append((harness_s, harness_cpu))
        print(f"harness: {harness_s:.1f} s (run {attempt + 1} of {args.repeat})", flush=True)
    (ours_s, ours_cpu), (harness_s, harness_cpu) = min(ours_times), min(harness_times)

    same, max_diff = 0, 0.0
    for item, ref, lls in zip(items, reference, ours):
        same += mathqa.predictions(item, lls) == mathqa.predictions(item, ref["loglikelihoods"])
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(lls, ref["loglikelihoods"])))
    acc = sum(r["acc"] for r in reference) / len(reference)
    best = f", best of {args.repeat} alternating runs each" if args.repeat > 1 else ""
    print(f"MathQA, {n_items} test items, SmolLM2-135M fp32, batch {BATCH} (model load included in both{best})")
    print(f"  lm-eval 0.4.13 harness : {harness_s:7.1f} s wall, {harness_cpu:7.1f} s CPU   (named baseline: 189 s wall for 300 items)")
    print(f"  distillery evaluate    : {ours_s:7.1f} s wall, {ours_cpu:7.1f} s CPU")
    print(f"  speed-up               : {harness_s / ours_s:5.2f}x wall, {harness_cpu / ours_cpu:5.2f}x CPU   (target >= 3x)")
    print(f"  identical predictions  : {same}/{len(items)} items; max |delta log-likelihood| {max_diff:.2e}; acc {acc:.3f}")
    figure(f"evaluate, {n_items} MathQA items (SmolLM2-135M fp32, batch {BATCH})",
           f"{harness_s / ours_s:.2f}x ({ours_s:.0f} s vs {harness_s:.0f} s), {same}/{len(items)} identical",
           "lm-eval 0.4.13 harness, same model and dtype", ">= 3x, identical predictions")
    return 0 if same == len(items) else 1


if __name__ == "__main__":
    sys.exit(main())
