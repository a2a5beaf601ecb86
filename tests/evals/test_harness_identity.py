"""Identity with lm-evaluation-harness 0.4.13 on the demo model: same log-likelihoods (1e-4), same predictions."""

from __future__ import annotations

import pytest

from evals import mathqa
from evals.hf_backend import HFModel
from evals.scoring import build_request

ITEMS = 50


@pytest.mark.integration
@pytest.mark.slow
def test_scores_equal_the_harness_on_50_items(demo_model_path: str, shared_file) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency: pip install -e '.[dev]'")
    from evals.harness import run_harness

    data = shared_file("data/mathqa/test.jsonl")
    reference = run_harness(demo_model_path, data, limit=ITEMS, batch_size=8, dtype="float32")

    items = mathqa.load_items(str(data), "test", ITEMS, mathqa.LoadReport())
    scorer = HFModel(demo_model_path, "float32")
    requests = [build_request(scorer.encode, ctx, mathqa.continuations(item))
                for item, ctx in zip(items, mathqa.build_contexts(items, 0, [], False))]
    ours = scorer.loglikelihoods(requests, batch_size=8)

    assert len(reference) == len(ours) == ITEMS
    for item, ref, lls in zip(items, reference, ours):
        assert lls == pytest.approx(ref["loglikelihoods"], abs=1e-4), item.id
        pred, pred_norm = mathqa.predictions(item, lls)
        assert (pred, pred_norm) == mathqa.predictions(item, ref["loglikelihoods"]), item.id
        assert (float(pred == item.label), float(pred_norm == item.label)) == (ref["acc"], ref["acc_norm"]), item.id
