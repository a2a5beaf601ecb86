"""The streamed merge (export/merge.py) against PEFT's merge_and_unload, tensor by tensor, on the real demo model:
plain LoRA, rsLoRA, DoRA and an adapted embedding; and the exact check that refuses a merge without the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.export import merge


def make_adapter(base: str, out: Path, **lora) -> Path:
    """A real PEFT adapter on `base` with every LoRA B (and DoRA magnitude) set to visible random values."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.05 * torch.randn_like(param))
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: str, adapter: Path, dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return {k: v for k, v in PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict().items()}


def tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(str(path)))
    return found


def one_step_apart(a, b) -> bool:
    """Equal, or apart by at most one bf16 step at their magnitude (fp32 sums in another order)."""
    diff = (a.float() - b.float()).abs()
    return bool((diff <= b.float().abs() * 2.0**-7 + 1e-30).all())


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "embedding"])
def test_streamed_merge_equals_peft_merge_and_unload(kind: str, tmp_path: Path, demo_model_path: str) -> None:
    import torch

    lora = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
            "embedding": {"target_modules": ["q_proj", "embed_tokens"]}}[kind]
    adapter = make_adapter(demo_model_path, tmp_path / "adapter", **lora)
    deltas, why = merge.read_adapter(adapter)
    assert deltas is not None, why
    out = tmp_path / "merged"
    merge.stream_merge(Path(demo_model_path), deltas, out, "bf16", "100MB")
    ours, theirs = tensors(out), peft_merged(demo_model_path, adapter, torch.bfloat16)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert set(ours) == {k for k in theirs if k != "lm_head.weight"}  # tied: the base stores no lm_head
    exact = sum(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(one_step_apart(ours[k], theirs[k]) for k in ours), kind
    assert exact >= len(ours) - len(deltas)  # every untargeted tensor bit-exact
    (out / "adapter").symlink_to(adapter)
    check = merge.check_merge(demo_model_path, adapter, out)
    assert check["passed"] and check["targeted"] == len(deltas), check


@pytest.mark.integration
def test_a_merge_into_fp16_of_a_bf16_base_passes_the_check_within_one_step(tmp_path: Path, demo_model_path: str) -> None:
    """export.dtype fp16 on the bf16 demo model: weights under fp16's smallest normal value (6.1e-5) round to its
    subnormal spacing, which the check counted as 1024 relative steps and refused. A weight past fp16's range
    (inf) fails it, named."""
    import torch

    adapter = make_adapter(demo_model_path, tmp_path / "adapter")
    deltas, _ = merge.read_adapter(adapter)
    out = tmp_path / "merged"
    merge.stream_merge(Path(demo_model_path), deltas, out, "fp16", "5GB")
    merged = tensors(out)
    assert all(v.dtype == torch.float16 for v in merged.values())
    assert any(bool(((v.abs() < 2.0**-14) & (v != 0)).any()) for v in merged.values())  # subnormals are there
    check = merge.check_merge(demo_model_path, adapter, out)
    assert check["passed"] and check["max_error_in_16bit_steps"] <= 1.0 and check["out_of_range"] == [], check

    from safetensors.torch import save_file

    merged["model.norm.weight"][0] = float("inf")  # what fp16 makes of a weight past 65504
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    check = merge.check_merge(demo_model_path, adapter, out)
    assert not check["passed"] and check["out_of_range"] == ["model.norm.weight"], check


@pytest.mark.integration
def test_the_check_refuses_a_merge_that_lost_the_adapter_or_used_other_weights(tmp_path: Path, demo_model_path: str) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = make_adapter(demo_model_path, tmp_path / "adapter")
    lost = tmp_path / "lost"
    lost.mkdir()
    for path in Path(demo_model_path).glob("*.safetensors"):  # the base unchanged: the adapter was dropped
        shutil.copy(path, lost / path.name)
    check = merge.check_merge(demo_model_path, adapter, lost)
    assert not check["passed"] and check["weights_changed"] == 0, check

    deltas, _ = merge.read_adapter(adapter)
    merge.stream_merge(Path(demo_model_path), deltas, tmp_path / "good", "bf16", "10GB")
    weights = load_file(str(tmp_path / "good" / "model.safetensors"))
    name = next(iter(deltas))
    weights[name] = (weights[name].float() * 1.02).to(weights[name].dtype)  # a merge into other (e.g. 4-bit) weights
    (tmp_path / "other").mkdir()
    save_file(weights, str(tmp_path / "other" / "model.safetensors"))
    check = merge.check_merge(demo_model_path, adapter, tmp_path / "other")
    assert not check["passed"] and check["max_error_in_16bit_steps"] > 1 and check["worst_tensor"] == name, check

    good = load_file(str(tmp_path / "good" / "model.safetensors"))
    del good["model.norm.weight"]  # a merge that wrote only some of the base's (untargeted) tensors
    save_file(good, str(tmp_path / "other" / "model.safetensors"))
    check = merge.check_merge(demo_model_path, adapter, tmp_path / "other")
    assert not check["passed"] and check["absent_from_merged"] == ["model.norm.weight"], check


def test_shards_are_planned_in_order_under_the_size(tmp_path: Path) -> None:
    layout = [(f"t{i}", (10, 10), "bf16") for i in range(7)]  # 200 bytes each
    assert merge.plan_shards(layout, 450) == [[0, 1], [2, 3], [4, 5], [6]]
    assert merge.parse_size("5GB") == 5 * 10**9 and merge.parse_size("2GiB") == 2 * 2**30


def test_the_shard_writer_writes_what_safetensors_reads(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    items = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.float16)}
    writer = merge.ShardWriter(tmp_path / "x.safetensors", [(k, tuple(v.shape), {torch.bfloat16: "bf16", torch.float16: "fp16"}[v.dtype]) for k, v in items.items()])
    for name, value in items.items():
        writer.write(name, [value[:2], value[2:]])  # row blocks
    writer.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in items.items())
