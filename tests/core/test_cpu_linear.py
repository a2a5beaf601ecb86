"""oneDNN-packed float32 linears compute what nn.Linear does, for a whole model, untied and tied, and leave alone
what they cannot replace."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.core.cpu_linear import pack_linears, packed_linear_available, packed_linear_class
from tests.fixtures.tiny_lm import build_tiny_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny"))


def load(path: Path, dtype: str = "float32", tie: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if tie:  # the output layer reads the embedding matrix, as SmolLM2's and small Qwen2.5's do
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return model.eval()


def linears(model) -> int:
    import torch

    return sum(type(m) is torch.nn.Linear for m in model.modules())


def test_this_torch_has_the_op_and_the_probe_leaves_the_random_state_alone() -> None:
    import torch

    packed_linear_available.cache_clear()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert packed_linear_available()  # the pinned torch: every evaluate test runs the packed path
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("tie", [False, True])
def test_a_packed_model_computes_the_same_logits_and_answers(tiny_dir: Path, tie: bool) -> None:
    import torch

    plain, packed = load(tiny_dir, tie=tie), load(tiny_dir, tie=tie)
    count = linears(packed)
    assert pack_linears(packed) == count == 2 * 7 + 1  # q k v o gate up down per layer, and the output layer
    assert linears(packed) == 0 and isinstance(packed.lm_head, packed_linear_class())
    tied = plain.lm_head.weight.data_ptr() == plain.get_input_embeddings().weight.data_ptr()
    assert tied == tie and torch.equal(packed.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    ids = torch.randint(0, 257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(packed(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=256)
        assert torch.equal(packed.generate(ids[:, :7], **kwargs), plain.generate(ids[:, :7], **kwargs))


def test_one_linear_with_and_without_bias_in_any_leading_shape() -> None:
    import torch

    torch.manual_seed(0)
    for bias in (True, False):
        linear = torch.nn.Linear(48, 20, bias=bias).requires_grad_(False)
        x = torch.randn(2, 3, 5, 48)
        assert torch.allclose(packed_linear_class()(linear)(x), linear(x), atol=1e-5, rtol=1e-5)
        assert torch.allclose(packed_linear_class()(linear)(x[:, 0, :, :].transpose(0, 1)),  # not contiguous
                              linear(x[:, 0, :, :].transpose(0, 1)), atol=1e-5, rtol=1e-5)


def test_other_dtypes_and_linear_subclasses_are_left_alone(tiny_dir: Path) -> None:
    import torch

    assert pack_linears(load(tiny_dir, dtype="bfloat16")) == 0

    class Special(torch.nn.Linear):  # as PEFT's and bitsandbytes' layers are: they read their own .weight
        pass

    model = torch.nn.Sequential(Special(4, 4), torch.nn.Linear(4, 4))
    assert pack_linears(model) == 1 and type(model[0]) is Special and type(model[1]) is packed_linear_class()


def test_the_layers_of_a_peft_adapter_are_left_alone_and_the_rest_computes_the_same(tiny_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: it counts
    torch.manual_seed(0)
    plain = get_peft_model(load(tiny_dir), config).eval()
    torch.manual_seed(0)
    packed = get_peft_model(load(tiny_dir), config).eval()
    # 15 linears; in 2 layers q and v are adapter layers, each a base layer and lora_A, lora_B inside
    assert pack_linears(packed) == 15 - 2 * 2
    ids = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(packed(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_each_original_weight_is_freed_once_it_is_packed(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory peaks at the model plus one layer's packed copy, not at two models."""
    import weakref

    import torch

    from distillery.core import cpu_linear

    model = load(tiny_dir, tie=False)
    originals = [weakref.ref(m.weight) for m in model.modules() if type(m) is torch.nn.Linear]
    alive_when_packing: list[int] = []
    real = cpu_linear.packed_linear_class()

    class Watching(real):  # counts the original weights still alive as each layer is packed
        def __init__(self, linear: torch.nn.Linear):
            super().__init__(linear)
            alive_when_packing.append(sum(ref() is not None for ref in originals))

    monkeypatch.setattr(cpu_linear, "packed_linear_class", lambda: Watching)
    assert pack_linears(model) == len(originals)
    assert alive_when_packing == list(range(len(originals), 0, -1))  # the one being packed and those not yet


def lora_model(tiny_dir: Path, **settings):
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **settings)  # B != 0
    torch.manual_seed(0)
    return get_peft_model(load(tiny_dir), config)


def swapped(model) -> int:
    return sum("forward" in vars(m) for m in model.modules())


def test_while_generating_a_lora_model_in_training_runs_packed_merged_layers_and_is_restored_after(
        tiny_dir: Path) -> None:
    import torch

    from distillery.core.cpu_linear import packed_while_generating

    model = lora_model(tiny_dir)
    ids = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=256)
    with torch.no_grad():
        logits, answers = model(input_ids=ids).logits, model.generate(input_ids=ids[:, :7], **kwargs)
        with packed_while_generating(model) as count:
            # 2 layers x (q, v) LoRA layers from their merged weights; k o gate up down and the output layer
            assert count == swapped(model) == 2 * 2 + 2 * 5 + 1
            assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(model.generate(input_ids=ids[:, :7], **kwargs), answers)
        assert swapped(model) == 0 and torch.equal(model(input_ids=ids).logits, logits)
        with pytest.raises(RuntimeError), packed_while_generating(model):
            raise RuntimeError("generation failed")
        assert swapped(model) == 0


def test_while_generating_trained_weights_dora_and_an_unaffordable_copy_are_left_alone(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from distillery.core import machine
    from distillery.core.cpu_linear import packed_while_generating

    full = load(tiny_dir)
    full.lm_head.weight.requires_grad_(False)  # every other weight trains: a full fine-tune's are never packed
    with torch.no_grad(), packed_while_generating(full) as count:
        assert count == 1 and "forward" in vars(full.lm_head)
    dora = lora_model(tiny_dir, use_dora=True)
    with torch.no_grad(), packed_while_generating(dora) as count:
        assert count == 2 * 5 + 1  # DoRA's layers run as PEFT computes them
    monkeypatch.setattr(machine, "available_memory", lambda: 10_000)  # less than twice the frozen weights
    with torch.no_grad(), packed_while_generating(lora_model(tiny_dir)) as count:
        assert count == 0


def test_a_packing_that_fails_leaves_generation_as_it_was(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples are generated after minutes of training: a failure to pack is no reason to lose the run."""
    import torch

    from distillery.core import cpu_linear

    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn: unsupported shape")

    monkeypatch.setattr(cpu_linear, "packed_linear_class", lambda: refuse)
    model = lora_model(tiny_dir)
    with torch.no_grad(), cpu_linear.packed_while_generating(model) as count:
        assert count == 0 == swapped(model)
