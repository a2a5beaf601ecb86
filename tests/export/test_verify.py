"""export/verify.py: the merged model run layer by layer gives the log-probs of the whole model."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.export import verify


@pytest.mark.integration
@pytest.mark.parametrize("model", ["demo", "tiny_r1"])
def test_layer_by_layer_equals_the_whole_model(model: str, request: pytest.FixtureRequest,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 (Llama, tied embeddings) and the tiny Qwen2 (q/k/v biases): the same fp32 log-probs, and the
    layered path ran (no fallback to the whole model)."""
    import numpy as np
    from transformers import AutoTokenizer

    path = Path(request.getfixturevalue("demo_model_path" if model == "demo" else "tiny_r1_path"))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    _, token_lists = verify.rendered_prompts(tokenizer, ["What is 12 * 7?", "서울은 어디에 있나요?"])
    whole_model_logprobs = verify.whole_model_logprobs
    with monkeypatch.context() as patch:
        patch.setattr(verify, "whole_model_logprobs", lambda *args: pytest.fail("fell back to the whole model"))
        layered = verify.reference_logprobs(path, token_lists)
    whole = whole_model_logprobs(path, token_lists)
    assert [a.shape for a in layered] == [(len(t), a.shape[1]) for t, a in zip(token_lists, layered)]
    for a, b in zip(layered, whole):
        assert np.abs(a - b).max() < 2e-3 and (a.argmax(-1) == b.argmax(-1)).all()
