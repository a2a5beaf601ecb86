"""The packed scoring (context once, every continuation beside it under a 4D mask) equals a plain full forward
pass over context + continuation, for every request in a batch of different lengths."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.evals.hf_backend import HFModel
from distillery.evals.scoring import Request, build_request, longest_first, packed_length
from distillery.core.errors import UserError
from tests.fixtures.tiny_lm import build_tiny_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny"))


def full_forward(model, context: tuple[int, ...], continuation: tuple[int, ...]) -> float:
    """What the harness computes: one pass over context + continuation, log-probs of the continuation tokens."""
    import torch

    ids = torch.tensor([list(context) + list(continuation)])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    start = len(context) - 1
    return float(sum(logprobs[start + i, t] for i, t in enumerate(continuation)))


REQUESTS = [
    Request((3, 4, 5, 6, 7, 8, 9), ((10,), (11, 12, 13), (14, 15), (16,), (17, 18, 19, 20))),
    Request((30, 31), ((32, 33), (34,), (35, 36, 37), (38,), (39,))),
    Request((40,), ((41,), (42,), (43,), (44,), (45,))),  # every continuation one token
    Request((60, 61, 62), ((63, 64), (65,), (63, 64), (66, 67, 68), (65,))),  # repeated choices, as MathQA has
    Request(tuple(range(50, 90)), ((90, 91), (92, 93), (94,), (95, 96, 97, 98, 99, 100), (101,))),
]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_packed_scores_equal_the_full_forward(tiny_dir: Path, batch_size: int) -> None:
    scorer = HFModel(str(tiny_dir))
    got = scorer.loglikelihoods(REQUESTS, batch_size)
    for request, scores in zip(REQUESTS, got):
        expected = [full_forward(scorer.model, request.context, c) for c in request.continuations]
        assert scores == pytest.approx(expected, abs=1e-5)
    repeated = got[3]
    assert repeated[0] == repeated[2] and repeated[1] == repeated[4]  # bit for bit: a tie stays a tie


def test_a_row_holds_the_context_and_each_distinct_choice_but_its_last_token() -> None:
    assert [packed_length(r) for r in REQUESTS] == [7 + 6, 2 + 3, 1, 3 + 3, 40 + 7]
    assert longest_first(REQUESTS) == [4, 0, 3, 1, 2]


def test_text_requests_and_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    """Real text through the tokenizer; a PEFT adapter with non-zero B changes the scores, still exactly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    base = HFModel(str(tiny_dir))
    adapted = HFModel(str(tiny_dir), adapter=tmp_path / "adapter")
    request = build_request(base.encode, "Question: what is 1 + 1 ?\nAnswer:", [" 1", " 2", " 33", " 4", " none"])
    assert request.continuations[2] == tuple(base.encode(" 33"))
    base_scores = base.loglikelihoods([request], 2)[0]
    adapted_scores = adapted.loglikelihoods([request], 2)[0]
    assert adapted_scores != pytest.approx(base_scores, abs=1e-3)
    expected = [full_forward(adapted.model, request.context, c) for c in request.continuations]
    assert adapted_scores == pytest.approx(expected, abs=1e-5)


def test_batched_generation_equals_one_at_a_time(tiny_dir: Path) -> None:
    scorer = HFModel(str(tiny_dir))
    prompts = ["<|user|>short\n<|assistant|>", "<|user|>a much longer question here\n<|assistant|>"]
    together = scorer.generate(prompts, max_new_tokens=6, batch_size=2)
    alone = [scorer.generate([p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone and all(isinstance(t, str) for t in together)


def test_unknown_model_path_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load the model"):
        HFModel(str(tmp_path))
