"""finetune.method: full: every weight trained, the whole model written in 16 bits, exported without a merge,
evaluated as the trained model; and the memory estimate that refuses what cannot fit before anything loads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distillery.core.errors import UserError
from distillery.training.preflight import (
    GIB,
    ModelShape,
    check_full_finetune_memory,
    choose_4bit,
    full_finetune_bytes,
    model_shape,
)
from distillery.training.settings import FinetuneConfig
from tests.stages.test_finetune import ROOT, child_env, cli, stage_dir, write_project

SMOLLM2 = ModelShape(parameters=134_515_008, hidden=576, intermediate=1536, layers=30, vocab=49152)


def test_full_fine_tuning_never_loads_4bit_and_refuses_insisting_on_it() -> None:
    assert choose_4bit("auto", cuda=True, method="full") is False
    assert choose_4bit(False, cuda=True, method="full") is False
    with pytest.raises(UserError, match="load_in_4bit: true cannot go with finetune.method: full"):
        choose_4bit(True, cuda=True, method="full")


def test_the_estimate_counts_16_bytes_per_parameter_for_adamw_plus_autocast_copies_and_activations() -> None:
    need = full_finetune_bytes(SMOLLM2, tokens=0, checkpointing=False, optimizer="adamw_torch", mixed=True)
    assert need["states"] == SMOLLM2.parameters * (4 + 4 + 8 + 2) and need["activations"] == 0
    eight_bit = full_finetune_bytes(SMOLLM2, 0, False, "adamw_8bit", mixed=False)
    assert eight_bit["states"] == SMOLLM2.parameters * (4 + 4 + 2)
    sharded = full_finetune_bytes(SMOLLM2, 0, False, "adamw_torch", True, shards=(4, 4, 4))
    assert sharded["states"] == need["states"] // 4
    zero2 = full_finetune_bytes(SMOLLM2, 0, False, "adamw_torch", True, shards=(1, 4, 4))
    assert zero2["states"] == SMOLLM2.parameters * 6 + SMOLLM2.parameters * 12 // 4  # ZeRO-2 keeps whole weights
    long = full_finetune_bytes(SMOLLM2, 4096, False, "adamw_torch", True)
    recomputed = full_finetune_bytes(SMOLLM2, 4096, True, "adamw_torch", True)
    per_layer = 36 * 576 + 8 * 1536
    # checkpointing keeps each layer's fp32 input and recomputes one layer at a time; the logits stay
    assert long["activations"] - recomputed["activations"] == 4096 * (29 * per_layer - 4 * 576 * 30)
    assert recomputed["activations"] > 4096 * 10 * 49152


def test_the_model_shape_is_read_from_its_config_without_weights(demo_model_path: str) -> None:
    assert model_shape(demo_model_path) == SMOLLM2  # the tied embedding counted once


def test_a_configuration_that_cannot_fit_is_refused_with_each_alternative_s_figure(demo_model_path: str) -> None:
    ft = FinetuneConfig(method="full", batch_size=8)
    with pytest.raises(UserError) as refused:
        check_full_finetune_memory(demo_model_path, ft, 2048, cuda=False, mixed=True, available=3 * GIB)
    message = str(refused.value)
    needed = float(re.search(r"needs about ([\d.]+) GiB", message).group(1))
    assert needed > 3 and "3.0 GiB available" in message
    assert re.search(r"weights, gradients and optimizer state 2\.3 GiB, activations [\d.]+ GiB at batch 8 x 2048",
                     message), message
    assert re.search(r"finetune.method: lora: about [\d.]+ GiB \((fits|does not fit either)\)", message)
    assert re.search(r"finetune.batch_size: 1 with gradient_accumulation_steps x8: about [\d.]+ GiB", message)
    assert "adamw_8bit" in message and "fsdp.yaml" in message
    fits = check_full_finetune_memory(demo_model_path, ft, 256, cuda=False, mixed=True, available=64 * GIB)
    assert fits["parameters"] == SMOLLM2.parameters and fits["needed_gib"] < 64


@pytest.mark.integration
def test_a_full_fine_tune_too_big_for_this_machine_is_refused_before_loading(tmp_path: Path) -> None:
    done = cli(write_project(tmp_path, {"method": "full", "batch_size": 100_000}), timeout=300)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    said = " ".join(done.stdout.split())
    assert "Traceback" not in said + done.stderr
    assert re.search(r"finetune.method: full needs about [\d.]+ GiB .* GiB available", said), said[-2000:]
    assert not stage_dir(tmp_path).exists() and "Unsloth" not in said  # refused before any weights loaded


def distillery(config: Path, stage: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillery", stage, "-c", str(config), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=child_env())


@pytest.mark.integration
@pytest.mark.slow
def test_full_fine_tune_trains_every_weight_exports_a_verified_gguf_and_is_evaluated(tmp_path: Path) -> None:
    from safetensors import safe_open

    # No checkpoint (save_steps past max_steps): one of this model holds 1.6 GB of weights and AdamW state; full
    # fine-tuning's checkpoints and their resume are tested under DDP on the tiny model.
    config = write_project(tmp_path, {"backend": "unsloth", "method": "full", "learning_rate": 5e-5,
                                      "sample_prompts": 0, "save_steps": 100})
    done = cli(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = stage_dir(tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "full" and summary["lora"] == {} and summary["memory_estimate"]["needed_gib"] > 0
    assert summary["tensors_changed"] == summary["tensors_compared"] == 272  # every weight, in fp32
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    assert not (out / "adapter").exists()
    with safe_open(str(out / "model" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert {str(f.get_slice(n).get_dtype()) for n in names} == {"BF16"}
    assert len(names) == 272 and not [n for n in names if "lora" in n]
    from transformers import AutoTokenizer

    fmt = out.parent / "format"
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.chat_template == (fmt / "chat_template.jinja").read_text(encoding="utf-8")
    assert tokenizer.eos_token == json.loads((fmt / "template.json").read_text())["eos_token"]

    exported = distillery(config, "export", "--set", "export.outtype=q8_0", "--set", "export.quantizations=[q8_0]")
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    verify = json.loads((tmp_path / "runs" / "t" / "export" / "verify.json").read_text())
    assert verify["passed"] and verify["method"] == "full"
    assert verify["merge"]["tensors"]["identical_to_trained"] == "272/272"
    assert verify["merge"]["tensors"]["changed_from_base"] > 200  # bf16 rounding hides the smallest updates
    assert "no merge (full fine-tune)" in " ".join(exported.stdout.split())

    evaluated = distillery(config, "evaluate", "--set", "export.outtype=q8_0", "--set", "export.quantizations=[q8_0]",
                           "--set", "evaluate.data=null", "--set", "evaluate.heldout.generate=0")
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    scores = json.loads((tmp_path / "runs" / "t" / "evaluate" / "heldout.json").read_text())
    assert list(scores) == ["base", "trained", "SmolLM2-135M-Instruct-Q8_0"]  # merged = trained: scored once
    assert scores["trained"]["overall"]["loss"] < 0.8 * scores["base"]["overall"]["loss"], scores


@pytest.mark.parametrize("name, layout", [
    ("ddp_cpu.yaml", (2, (1, 1, 1))), ("fsdp_cpu.yaml", (2, (2, 2, 2))), ("deepspeed_zero2.yaml", None)])
def test_what_each_accelerate_config_shards(name: str, layout: tuple | None) -> None:
    from distillery.core.userinput import read_yaml_file
    from distillery.training.preflight import accelerate_layout

    path = ROOT / "configs" / "accelerate" / name
    if layout is None:  # ZeRO-2: gradients and optimizer state over the processes, the weights whole on each
        n = int(read_yaml_file(path)["num_processes"])
        layout = (n, (1, n, n))
    assert accelerate_layout(str(path)) == layout
    assert accelerate_layout(None) == (1, (1, 1, 1))


def test_full_fine_tuning_of_a_base_published_quantized_is_refused(tmp_path: Path, demo_model_path: str) -> None:
    from distillery.training.preflight import refuse_quantized_base
    from tests.export.test_merge import prequantized_base

    base = prequantized_base(tmp_path / "bnb-4bit", demo_model_path)
    with pytest.raises(UserError, match=r"method: full .* stored quantized \(bitsandbytes\).*method: lora"):
        refuse_quantized_base(str(base))
    refuse_quantized_base(demo_model_path)  # a 16-bit base passes
