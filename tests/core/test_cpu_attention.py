"""Grouped-query attention under a mask on a CPU: the same numbers as transformers' sdpa, without its copies of
the keys and values per query head."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.core.cpu_attention import NAME, native_gqa_available, use_native_gqa
from tests.fixtures.tiny_lm import build_tiny_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny"))  # 4 query heads over 2 key/value heads


def load(path: Path, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def padded_batch():
    import torch

    ids = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :11], mask[2, :4] = 0, 0  # left padding: a mask goes to every attention layer
    return ids, mask


def test_the_probe_passes_and_leaves_the_random_state_alone() -> None:
    import torch

    native_gqa_available.cache_clear()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert native_gqa_available()  # the pinned torch: every evaluate test on a GQA model runs this path
    assert torch.equal(torch.rand(3), expected)


def test_a_padded_batch_gives_the_same_logits_and_answers_without_repeating_heads(tiny_dir: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import transformers.integrations.sdpa_attention as sdpa

    plain, grouped = load(tiny_dir), load(tiny_dir)
    assert use_native_gqa(grouped) and grouped.config._attn_implementation == NAME
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=256)
    with torch.inference_mode():
        expected_logits = plain(input_ids=ids, attention_mask=mask).logits
        expected_answers = plain.generate(ids, **kwargs)

        def no_copies(*args, **kw):
            raise AssertionError("keys and values were repeated per query head")

        monkeypatch.setattr(sdpa, "repeat_kv", no_copies)
        logits = grouped(input_ids=ids, attention_mask=mask).logits
        answers = grouped.generate(ids, **kwargs)
    real = mask.bool()
    assert torch.allclose(logits[real], expected_logits[real], atol=1e-6, rtol=1e-6)
    assert torch.equal(answers, expected_answers)


def test_other_implementations_and_models_without_grouped_heads_are_left_alone(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    assert not use_native_gqa(load(tiny_dir, attn="eager"))
    config = LlamaConfig.from_pretrained(tiny_dir)
    config.num_key_value_heads = config.num_attention_heads
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    assert not use_native_gqa(model) and model.config._attn_implementation == "sdpa"
