"""Training across processes for real: `accelerate launch` with two CPU processes (torch.distributed over gloo),
the code path a multi-GPU DDP run takes, on the tiny Qwen2: DDP LoRA with unsloth against one process, DDP full
fine-tuning (hf) interrupted and resumed, FSDP2 with the hf backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.stages.test_finetune import (ROOT, TINY, cli, ctrl_c_after_checkpoint_is_a_quiet_interrupt, stage_dir,
                                       write_project)

DDP_CPU = ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"  # the shipped two-CPU-process config


def losses(tmp_path: Path) -> list[float]:
    rows = (stage_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in rows if "loss" in json.loads(line)]


def ddp_project(tmp_path: Path, model: str = "bundled:SmolLM2-135M-Instruct", **finetune) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_project(tmp_path, {"backend": "hf", "batch_size": 2, "sample_prompts": 0,
                                    "gradient_checkpointing": False, "accelerate_config": str(DDP_CPU),
                                    **finetune}, rows=32, model=model)


def train(tmp_path: Path, backend: str, steps: int, **finetune) -> list[float]:
    """A fp32 run of `steps` steps on the tiny Qwen2; its losses."""
    config = ddp_project(tmp_path, model=TINY, backend=backend, max_steps=steps, save_steps=steps, precision="fp32",
                         **finetune)
    done = cli(config, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return losses(tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """2 processes x batch 2 (unsloth: it supports one process per device under accelerate/torchrun) against
    1 process x batch 4, same seed and data, fp32: every optimizer step sees the same four examples. Step 1 starts
    from the same weights, so its loss matches to float rounding. Later steps may differ a little: each process
    averages the loss over its own two examples' tokens and DDP averages the two means, where one process averages
    over all four examples' tokens, so the gradients weight tokens slightly differently; and CPU reductions are not
    bit-reproducible (the one-process run alone moved 1.1% at step 4 between two runs). Measured on SmolLM2-135M:
    at most 1.3%; bound 3%. In bf16 rounding adds more, hence fp32. One process of either backend gives the same
    losses here (step 1 identical, the next three within 0.02%); the gradient averaging is accelerate's, the same
    for both backends, so one DDP run checks it (the hf backend trains under DDP and FSDP in the tests below)."""
    single = train(tmp_path / "one", "hf", 4, batch_size=4, accelerate_config=None)
    multi = train(tmp_path / "two", "unsloth", 4)
    summary = json.loads((stage_dir(tmp_path / "two") / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["backend"] == "unsloth"
    assert sorted(p.name for p in (stage_dir(tmp_path / "two") / "adapter").glob("adapter_*")) == [
        "adapter_config.json", "adapter_model.safetensors"]  # written once, by rank 0
    assert len(multi) == len(single) == 4
    assert abs(multi[0] - single[0]) < 1e-3 * single[0], (multi, single)
    assert all(abs(m - s) < 0.03 * s for m, s in zip(multi, single)), (multi, single)


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_of_a_full_fine_tune_is_a_quiet_interrupt_and_the_same_command_resumes(tmp_path: Path) -> None:
    """Full fine-tuning (every weight and its AdamW state in each checkpoint) under DDP, stopped by Ctrl-C: it
    reaches accelerate, torchrun and both ranks at once (the terminal's foreground group); torchrun only logs that
    it passes SIGINT on, and the stage ends as an interrupt (130) without a traceback. The same command resumes and
    rank 0 writes the whole model. (kill -9 and its resume: tests/stages/test_finetune.py, one process.) On the tiny
    Qwen2 (R1's tokenizer and template): the demo model's 1.6 GB checkpoints cost a minute here; its full fine-tune
    is tested end to end elsewhere."""
    config = ddp_project(tmp_path, model=TINY, max_steps=6, save_steps=2, method="full",
                         learning_rate=5e-5)
    ctrl_c_after_checkpoint_is_a_quiet_interrupt(config, tmp_path, 2)
    done = cli(config, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert "resuming from checkpoint-" in out and int(out.split("resuming from checkpoint-")[1].split()[0]) >= 2
    summary = json.loads((stage_dir(tmp_path) / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2 and summary["method"] == "full"
    assert summary["resumed_from_step"] >= 2
    assert summary["tensors_changed"] == summary["tensors_compared"] > 0
    assert (stage_dir(tmp_path) / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "runs" / "t" / ".finetune.partial").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_writes_a_whole_trained_adapter(tmp_path: Path) -> None:
    """FSDP2 shards the model across the processes; the adapter must come back whole (FULL_STATE_DICT), with the
    shapes a one-process adapter has, and trained."""
    from safetensors.torch import load_file

    fsdp = ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml"
    config = ddp_project(tmp_path, model=TINY, max_steps=4, save_steps=4, accelerate_config=str(fsdp))
    done = cli(config, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((stage_dir(tmp_path) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    weights = load_file(str(stage_dir(tmp_path) / "adapter" / "adapter_model.safetensors"))
    shapes = {tuple(v.shape) for k, v in weights.items() if "q_proj.lora_A" in k}
    assert shapes == {(8, 64)}  # r x hidden: the whole matrix, not a shard
    assert sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k) > 0


@pytest.mark.parametrize("name, message", [
    ("deepspeed_zero2.yaml", "uses DeepSpeed ZeRO, which needs CUDA GPUs"),
    ("ddp.yaml", "runs one process per GPU and this machine has no CUDA GPU"),
])
def test_accelerate_configs_this_machine_cannot_launch_are_refused_first(name: str, message: str) -> None:
    from distillery.core.errors import UserError
    from distillery.training.preflight import check_accelerate_config

    with pytest.raises(UserError, match=message):
        check_accelerate_config(str(ROOT / "configs" / "accelerate" / name), cuda=False)
    check_accelerate_config(str(DDP_CPU), cuda=False)
    check_accelerate_config(str(ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml"), cuda=False)


@pytest.mark.parametrize("name", ["fsdp_cpu.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"])
def test_the_unsloth_backend_refuses_sharding_and_names_the_hf_backend(name: str) -> None:
    from distillery.core.errors import UserError
    from distillery.training.preflight import check_accelerate_config

    with pytest.raises(UserError, match="unsloth backend does not support.*Set finetune.backend: hf"):
        check_accelerate_config(str(ROOT / "configs" / "accelerate" / name), cuda=True, backend="unsloth")
    check_accelerate_config(str(DDP_CPU), cuda=False, backend="unsloth")
    check_accelerate_config(str(ROOT / "configs" / "accelerate" / "ddp.yaml"), cuda=True, backend="unsloth")


@pytest.mark.parametrize("text, encoding, message", [
    ("distributed_type: MULTI_GPU\ndistributed_type: 'NO'\n", "utf-8", "found the key 'distributed_type' a second time"),
    ("distributed_type: 'NO'\n", "utf-16", r"acc.yaml is not UTF-8 text .* Save it as UTF-8"),
    ("- distributed_type\n", "utf-8", "is not an accelerate config"),
    ("a: " + "[" * 5000, "utf-8", "nested more than 100 levels deep"),
])
def test_an_accelerate_config_is_read_as_strictly_as_the_config(tmp_path: Path, text: str, encoding: str,
                                                                message: str) -> None:
    from distillery.core.errors import UserError
    from distillery.training.preflight import check_accelerate_config

    (tmp_path / "acc.yaml").write_text(text, encoding=encoding)
    with pytest.raises(UserError, match=message):
        check_accelerate_config(str(tmp_path / "acc.yaml"), cuda=False)
    with pytest.raises(UserError, match="is a directory, not a file. See configs/accelerate/"):
        check_accelerate_config(str(tmp_path), cuda=False)
