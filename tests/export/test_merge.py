"""export/merge.py: reading finetune's output, and the 16-bit merge on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.export import merge
from distillery.core.errors import UserError
from tests.fixtures.adapter_run import make_adapter_run


def test_missing_adapter_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="missing adapter_model.safetensors.*run `distillery finetune`"):
        merge.read_finetune(tmp_path / "adapter", tmp_path / "summary.json")


def test_summary_without_backend_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    for name in merge.ADAPTER_FILES:
        (tmp_path / "adapter" / name).write_text("{}")
    (tmp_path / "summary.json").write_text(json.dumps({"base_model": "x"}))
    with pytest.raises(UserError, match="summary.json: backend: Field required.*distillery finetune --force"):
        merge.read_finetune(tmp_path / "adapter", tmp_path / "summary.json")


def test_auto_dtype_keeps_the_base_16_bit_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))
    assert merge.merged_dtype_name("auto", str(tmp_path)) == "fp16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert merge.merged_dtype_name("auto", str(tmp_path)) == "bf16"
    assert merge.merged_dtype_name("fp16", str(tmp_path)) == "fp16"


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.integration
@pytest.mark.slow
def test_unsloth_and_peft_merges_agree_and_keep_the_adapter(tmp_path: Path, demo_model_path: str) -> None:
    """Unsloth's save_pretrained_merged and PEFT's merge_and_unload give the same 16-bit weights, and the
    merge check proves the adapter is in them. The adapter trains a copy of the final norm (modules_to_save),
    which the streamed merge refuses, so both whole-model merges run. Unsloth merges in a child process:
    imported here it would patch transformers for the verification that follows (on a GPU machine bench/gpu.py
    saw that verification fail with its rotary embeddings on CUDA and the model on the CPU)."""
    import sys

    import torch

    run = make_adapter_run(tmp_path / "runs", demo_model_path, backend="unsloth", modules_to_save=("norm",))
    finetune = run.stage_dir("finetune")
    summary = merge.read_finetune(finetune / "adapter", finetune / "summary.json")
    adapter = finetune / "adapter"
    unsloth_stats = merge.merge_adapter(summary, adapter, tmp_path / "unsloth", "bf16", "100MB")
    assert "unsloth" not in sys.modules  # the merge ran in its own process; no stage imports Unsloth here
    peft_stats = merge.merge_adapter(summary.model_copy(update={"backend": "hf"}), adapter, tmp_path / "peft", "bf16", "100MB")
    assert unsloth_stats["method"].startswith("unsloth (whole model: the adapter uses modules_to_save")
    assert peft_stats["method"].startswith("peft (whole model: the adapter uses modules_to_save")
    assert unsloth_stats["shards"] > 1 and peft_stats["shards"] > 1  # max_shard_size honoured
    a, b = _tensors(tmp_path / "unsloth"), _tensors(tmp_path / "peft")
    base = _tensors(Path(demo_model_path))
    shared = sorted(set(a) & set(b))
    assert shared and all(a[k].dtype == torch.bfloat16 for k in shared)
    changed = [k for k in shared if k in base and not torch.equal(b[k], base[k])]
    assert any("q_proj" in k for k in changed) and not any("k_proj" in k for k in changed)
    assert "model.norm.weight" in changed  # the trained copy, not the base's norm
    for key in shared:  # the same merge up to one bf16 rounding step
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-2, rtol=1e-2), key
    tokenizer_config = json.loads((tmp_path / "unsloth" / "generation_config.json").read_text())
    assert tokenizer_config["eos_token_id"] == 2

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "unsloth"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    tokens = [tokenizer(text, add_special_tokens=False)["input_ids"]]
    merged_model = merge.load_causal_lm(str(tmp_path / "unsloth"))
    check = merge.verify_merge(demo_model_path, adapter, tokens, merge.next_token_logprobs(merged_model, tokens))
    assert check["passed"], check


def prequantized_base(directory: Path, model: str) -> Path:
    """A base as published pre-quantized in 4 bits (bitsandbytes): only its config matters here."""
    config = json.loads((Path(model) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_prequantized_base_is_merged_into_its_16_bit_original_or_refused(tmp_path: Path, demo_model_path: str,
                                                                           tiny_r1_path: str) -> None:
    base = str(prequantized_base(tmp_path / "bnb-4bit", demo_model_path))
    assert merge.original_16bit(demo_model_path) == Path(demo_model_path)  # a 16-bit base is its own original
    assert merge.original_16bit(base, demo_model_path) == Path(demo_model_path)
    with pytest.raises(UserError, match=r"stored quantized \(bitsandbytes\).*no 16-bit original is known.*"
                                        r"set export.base_16bit"):
        merge.original_16bit(base)
    with pytest.raises(UserError, match="export.base_16bit: .*nowhere is neither a directory nor in the local"):
        merge.original_16bit(base, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="is another model than the base .*hidden_size"):
        merge.original_16bit(base, tiny_r1_path)
    with pytest.raises(UserError, match="is not 16-bit safetensors weights"):
        merge.original_16bit(base, base)


def test_unsloths_4_bit_names_map_to_their_16_bit_originals() -> None:
    if not merge.unsloth_mapper():
        pytest.skip("unsloth is not installed")
    names = merge.unsloth_16bit_names("unsloth/DeepSeek-R1-Distill-Qwen-32B-unsloth-bnb-4bit")
    assert names == ["unsloth/DeepSeek-R1-Distill-Qwen-32B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"]
    assert merge.unsloth_16bit_names("/data/my-model") == []


def test_a_base_stored_as_pytorch_model_bin_is_refused_with_a_conversion_that_works(tmp_path: Path) -> None:
    """The check reads safetensors (on a .bin-only base it compared 0/0 tensors): such a base is refused with a
    command that converts it in place; run as printed, the base then merges and passes the check."""
    import re
    import shlex
    import shutil
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.export.test_streamed_merge import make_adapter
    from tests.fixtures.tiny_lm import build_tiny_lm

    built = build_tiny_lm(tmp_path / "built")
    base = tmp_path / "it's a \"base\" $HOME"  # the command it suggests quotes the path for the shell
    base.mkdir()
    torch.save(load_file(str(built / "model.safetensors")), base / "pytorch_model.bin")
    for path in built.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, base / path.name)
    merge.refuse_pickled_base(built)  # safetensors: nothing to say
    with pytest.raises(UserError, match=r"stores its weights only as pytorch_model\*\.bin .*in place") as refused:
        merge.refuse_pickled_base(base)
    command = re.search(r"python (-c .+) Then run", str(refused.value)).group(1)  # pasted into a shell, as is
    subprocess.run(f"{shlex.quote(sys.executable)} {command}", shell=True, check=True, capture_output=True)
    assert (base / "model.safetensors").is_file() and (base / "pytorch_model.bin").is_file()
    merge.refuse_pickled_base(base)
    adapter = make_adapter(str(base), tmp_path / "adapter")
    deltas, _ = merge.read_adapter(adapter)
    merge.stream_merge(base, deltas, tmp_path / "merged", "bf16", "5GB")
    check = merge.check_merge(str(base), adapter, tmp_path / "merged")
    assert check["passed"] and check["targeted"] == len(deltas) and check["untargeted_identical"] == "15/15", check


def write_adapter(directory: Path, config: dict, tensors: dict) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize("config_change, tensor_change, why", [
    ({"r": 0}, None, "r is 0, not a positive integer"),
    ({"r": 100_000}, None, r"\(4, 8\) and its B \(6, 4\), not of the rank 100000"),
    ({"lora_alpha": "16"}, None, "lora_alpha is '16', not a number"),
    ({"lora_alpha": None}, None, "lora_alpha is None"),
    ({}, "no B", "has no B matrix beside it"),
    ({}, "inf", "holds NaN or inf"),
])
def test_an_adapter_finetune_did_not_write_is_named_before_the_merge(tmp_path: Path, config_change: dict,
                                                                    tensor_change: str | None, why: str) -> None:
    """r 0 was a ZeroDivisionError, a huge r grew export past 4 GB (and merged with a wrong scale), a missing B
    a KeyError, inf deltas were merged: each an unexpected error or worse."""
    import torch

    from distillery.export.merge import read_adapter

    name = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{name}.lora_A.weight": torch.zeros(4, 8), f"{name}.lora_B.weight": torch.zeros(6, 4)}
    if tensor_change == "no B":
        del tensors[f"{name}.lora_B.weight"]
    elif tensor_change == "inf":
        tensors[f"{name}.lora_B.weight"][0, 0] = float("inf")
    config = {"r": 4, "lora_alpha": 8, "peft_type": "LORA", **config_change}
    adapter = write_adapter(tmp_path / "adapter", config, tensors)
    with pytest.raises(UserError, match=why + ".*not the adapter finetune wrote"):
        read_adapter(adapter)
    good = write_adapter(tmp_path / "good", {"r": 4, "lora_alpha": 8, "peft_type": "LORA"},
                         {f"{name}.lora_A.weight": torch.zeros(4, 8), f"{name}.lora_B.weight": torch.zeros(6, 4)})
    deltas, _ = read_adapter(good)
    assert list(deltas) == ["model.layers.0.self_attn.q_proj.weight"] and deltas[list(deltas)[0]].scale == 2.0


@pytest.mark.parametrize(("content", "why"), [
    (b"garbage", r"its first 8 bytes give a header of 0 bytes"),
    ((10**15).to_bytes(8, "little"), r"its first 8 bytes give a header of 1,000,000,000,000,000 bytes"),
    (len(b'{"w": {"dtype": "BF16", "shape": "abc", "data_offsets": [0, 0]}}').to_bytes(8, "little")
     + b'{"w": {"dtype": "BF16", "shape": "abc", "data_offsets": [0, 0]}}',
     r"its header does not list tensors with a dtype, a shape and offsets"),
    ((64).to_bytes(8, "little") + b'{"w": {', r"Expecting"),  # cut short
])
def test_a_safetensors_file_that_claims_what_it_is_not_is_named(tmp_path: Path, content: bytes, why: str) -> None:
    """A file whose first 8 bytes claimed a petabyte header ended in a MemoryError; a header of another shape in a
    TypeError wherever a shape was multiplied (export's and evaluate's memory checks)."""
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(UserError, match=rf"model\.safetensors is not a readable safetensors file \({why}.*\): the "
                                        r"model is damaged or was cut short"):
        merge.base_tensors(tmp_path)


def test_a_full_fine_tune_exported_into_fp16_past_its_range_fails_the_check(tiny_r1_path: str, tmp_path: Path) -> None:
    """From an adversarial review: a trained bf16 weight of 1e5 became inf in the fp16 export, and the copy check
    passed (inf equals inf); llama.cpp's quantizer then stopped on it as 'a bug'. It now fails as the LoRA merge's
    check does, naming the tensor and export.dtype: bf16."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from distillery.export.merge import check_trained_copy, export_trained
    from distillery.stages.export import merge_failure

    trained = tmp_path / "model"
    shutil.copytree(tiny_r1_path, trained)
    weights = load_file(str(trained / "model.safetensors"))
    name = next(n for n in weights if n.endswith("input_layernorm.weight"))
    weights[name] = weights[name].clone()
    weights[name][0] = 1.0e5
    save_file(weights, str(trained / "model.safetensors"), metadata={"format": "pt"})
    export_trained(trained, tmp_path / "fp16", "fp16", "5GB")
    result = check_trained_copy(tiny_r1_path, trained, tmp_path / "fp16")
    assert result["passed"] is False and result["out_of_range"] == [name]
    said = merge_failure({"tensors": result, "distributions": {"passed": None}})
    assert name in said and "set export.dtype: bf16" in said
    export_trained(trained, tmp_path / "bf16", "bf16", "5GB")
    kept = check_trained_copy(tiny_r1_path, trained, tmp_path / "bf16")
    assert kept["passed"] and kept["out_of_range"] == [] and torch.isfinite(load_file(
        str(tmp_path / "bf16" / "model.safetensors"))[name]).all()
