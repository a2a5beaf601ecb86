"""Identity with lm-evaluation-harness 0.4.13 on the demo model: same log-likelihoods (1e-4, or 1e-5 relative for a
long continuation's sum: our float32 linears run through oneDNN, the harness's through MKL, and the summation order
moved one -39.51 by 1.03e-4 on an Intel Xeon), same predictions, on the first 10 test items and on items chosen
for what they hold (test item 1041: an empty fifth choice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.evals import mathqa
from distillery.evals.hf_backend import HFModel
from distillery.evals.scoring import build_request

ITEMS = 10


def assert_scored_like_the_harness(model_path: str, data: Path, limit: int) -> list[mathqa.Item]:
    """Score `limit` items of `data` with the harness and with Distillery; every score and prediction agrees."""
    pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency: pip install -e '.[dev]'")
    from tests.evals.harness import run_harness

    reference = run_harness(model_path, data, limit=limit, batch_size=8, dtype="float32")
    items = mathqa.load_items(str(data), "test", limit, mathqa.LoadReport())
    scorer = HFModel(model_path, "float32")
    requests = [build_request(scorer.encode, ctx, mathqa.continuations(item))
                for item, ctx in zip(items, mathqa.build_contexts(items, 0, [], False))]
    ours = scorer.loglikelihoods(requests, batch_size=8)

    assert len(reference) == len(ours) == limit
    for item, ref, lls in zip(items, reference, ours):
        assert lls == pytest.approx(ref["loglikelihoods"], abs=1e-4, rel=1e-5), item.id
        pred, pred_norm = mathqa.predictions(item, lls)
        assert (pred, pred_norm) == mathqa.predictions(item, ref["loglikelihoods"]), item.id
        assert (float(pred == item.label), float(pred_norm == item.label)) == (ref["acc"], ref["acc_norm"]), item.id
    return items


@pytest.mark.integration
@pytest.mark.slow
def test_scores_equal_the_harness_on_the_first_10_items_and_on_an_empty_choice(demo_model_path: str, shared_file,
                                                                              tmp_path: Path) -> None:
    """Test items 0-9 and 1036-1045 (0-based), in one harness run: 1041's options end in `e ) `, an empty choice
    whose continuation is " "."""
    lines = shared_file("data/mathqa/test.jsonl").read_text(encoding="utf-8").splitlines()
    chosen = lines[:ITEMS] + lines[1036:1046]
    subset = tmp_path / "test-0-9-1036-1045.jsonl"
    subset.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    items = assert_scored_like_the_harness(demo_model_path, subset, len(chosen))
    assert [item.choices[4] for item in items[ITEMS:]].count("") == 1 and items[ITEMS + 5].choices[4] == ""
