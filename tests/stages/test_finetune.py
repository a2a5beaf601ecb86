"""Finetune: hardware choices, bad input, checkpoint bookkeeping, the multiple-choice loss (unit); both backends,
the multiple-choice objective, accelerate launch and kill -9 / resume on the real demo model (integration)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distillery.core.errors import UserError
from distillery.stages.finetune import load_format_outputs, render_samples
from distillery.training.preflight import (
    check_completions_fit,
    choose_4bit,
    choose_optimizer,
    choose_precision,
    locate_model,
)
from distillery.training.callbacks import COMPLETE, last_complete_checkpoint, prune_checkpoints, trim_metrics

ROOT = Path(__file__).resolve().parents[2]


# ---- unit ------------------------------------------------------------------------------------------------------


def test_4bit_auto_follows_cuda_and_insisting_without_cuda_fails() -> None:
    assert choose_4bit("auto", cuda=True) is True
    assert choose_4bit("auto", cuda=False) is False
    assert choose_4bit(False, cuda=True) is False
    with pytest.raises(UserError, match="load_in_4bit: true needs a CUDA GPU"):
        choose_4bit(True, cuda=False)


def test_precision_auto_from_hardware() -> None:
    assert choose_precision("auto", cuda=True, bf16_ok=True) == "bf16"
    assert choose_precision("auto", cuda=True, bf16_ok=False) == "fp16"
    assert choose_precision("auto", cuda=False, bf16_ok=False) == "fp32"
    assert choose_precision("auto", cuda=False, bf16_ok=True) == "bf16"
    with pytest.raises(UserError, match="fp16 training needs a CUDA GPU"):
        choose_precision("fp16", cuda=False, bf16_ok=False)
    with pytest.raises(UserError, match="bf16 is not supported by this GPU"):
        choose_precision("bf16", cuda=True, bf16_ok=False)


def test_lora_options_reach_peft() -> None:
    from distillery.config import FinetuneConfig
    from distillery.training.backends import lora_settings

    ft = FinetuneConfig.model_validate({"lora": {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj"],
                                                 "use_rslora": True, "use_dora": True}})
    job = type("Job", (), {"finetune": ft})()
    assert lora_settings(job) == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj"],
                                  "use_rslora": True, "use_dora": True, "bias": "none"}


def test_8bit_optimizers_fall_back_on_cpu_only() -> None:
    assert choose_optimizer("paged_adamw_8bit", cuda=False) == "adamw_torch"
    assert choose_optimizer("paged_adamw_8bit", cuda=True) == "paged_adamw_8bit"
    assert choose_optimizer("adamw_torch", cuda=False) == "adamw_torch"


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per whitespace-separated word (built in code)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> </s> Q: A: what is two plus two four long".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def test_max_length_shorter_than_prompts_counts_the_examples_that_lose_everything(word_tokenizer) -> None:
    rows = [{"id": "short", "prompt": "Q: two plus two A: ", "completion": "four </s>"},
            {"id": "long1", "prompt": "Q: " + "long " * 10 + "A: ", "completion": "four </s>"},
            {"id": "long2", "prompt": "Q: " + "long " * 12 + "A: ", "completion": "four </s>"}]
    check_completions_fit(rows, word_tokenizer, max_length=20)  # every prompt fits: no error
    with pytest.raises(UserError, match=r"2 of 3 training examples would lose their whole completion \(e.g. id long1\)"):
        check_completions_fit(rows, word_tokenizer, max_length=8)


def test_a_prompt_that_leaves_exactly_one_completion_token_is_accepted(word_tokenizer) -> None:
    rows = [{"id": "a", "prompt": "Q: two plus two A:", "completion": " four </s>"}]  # 5 prompt tokens
    check_completions_fit(rows, word_tokenizer, max_length=6)
    with pytest.raises(UserError, match="1 of 1"):
        check_completions_fit(rows, word_tokenizer, max_length=5)


def test_eval_rows_and_sample_prompts_are_those_with_room_for_a_completion(word_tokenizer) -> None:
    """A held-out prompt of 36k tokens at max_length 64 went to sample generation, which asked for 10 GB and ended
    the run after training; eval rows that all lost their completion gave no eval_loss and no word of why."""
    from distillery.training.preflight import check_eval_rows_fit, prompts_that_fit

    long = {"id": "long", "prompt": "Q: " + "long " * 12 + "A: ", "completion": "four </s>"}
    short = [{"id": f"s{i}", "prompt": f"Q: {i} plus {i} A: ", "completion": "more </s>"} for i in range(3)]
    rows = [long, *short]
    assert prompts_that_fit(rows, 2, word_tokenizer, max_length=8) == [short[0]["prompt"], short[1]["prompt"]]
    assert prompts_that_fit(rows, 5, word_tokenizer, max_length=20) == [r["prompt"] for r in rows]
    assert check_eval_rows_fit(rows, word_tokenizer, 20, eval_steps=2) is None
    assert check_eval_rows_fit(rows, word_tokenizer, 8, eval_steps=2) == (
        "finetune: 1 of 4 eval examples lose their whole completion to format.max_length 8 (e.g. id long); eval_loss "
        "leaves them out")
    with pytest.raises(UserError, match=r"finetune.eval_steps is 2, but all 4 of format's eval examples lose their "
                                        r"whole completion to format.max_length 3 \(e.g. id long\), so no eval loss"):
        check_eval_rows_fit(rows, word_tokenizer, 3, eval_steps=2)


def write_format_dir(directory: Path, train: list[dict]) -> Path:
    directory.mkdir(parents=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    (directory / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    (directory / "template.json").write_text(json.dumps({"name": "qa", "eos_token": "</s>"}), encoding="utf-8")
    return directory


def test_empty_training_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no training examples"):
        load_format_outputs(write_format_dir(tmp_path / "format", []))


def test_settings_the_data_or_the_machine_cannot_honour_are_refused_before_the_model_loads() -> None:
    """eval_steps with no held-out example, a tracker that is not installed, and multiple_choice with
    group_by_length each stopped the trainer with a traceback after the model loaded (and a rerun did the same)."""
    import importlib.util

    from pydantic import ValidationError

    from distillery.stages.finetune import check_eval_rows, check_tracker_installed
    from distillery.training.settings import FinetuneConfig

    row = {"prompt": "Q", "completion": "A"}
    check_eval_rows(FinetuneConfig(eval_steps=5), [row])
    check_eval_rows(FinetuneConfig(), [])
    with pytest.raises(UserError, match="eval_steps is 5, but format's eval split has no example"):
        check_eval_rows(FinetuneConfig(eval_steps=5), [])
    with pytest.raises(UserError, match="no multiple-choice example"):
        check_eval_rows(FinetuneConfig(eval_steps=5, objective="multiple_choice"), [row])
    for tracker in ("tensorboard", "wandb"):
        if importlib.util.find_spec(tracker) is None:
            with pytest.raises(UserError, match=f"report_to is {tracker}, which is not installed"):
                check_tracker_installed(tracker)
    check_tracker_installed("none")
    with pytest.raises(ValidationError, match="set group_by_length: false"):
        FinetuneConfig(objective="multiple_choice", group_by_length=True)


def test_settings_an_objective_never_reads_are_refused() -> None:
    """packing with multiple_choice or on_policy, and eval_steps with on_policy, were accepted and ignored: their
    trainers neither pack nor (on_policy) evaluate."""
    from pydantic import ValidationError

    from distillery.training.settings import FinetuneConfig

    for objective in ("multiple_choice", "on_policy"):
        with pytest.raises(ValidationError, match=f"the {objective} objective .* never packs: set packing: false"):
            FinetuneConfig(objective=objective, packing=True, backend="hf")
    with pytest.raises(ValidationError, match="eval_steps: the on_policy objective.*unset eval_steps"):
        FinetuneConfig(objective="on_policy", eval_steps=5, backend="hf")
    assert FinetuneConfig(objective="kd", packing=True, eval_steps=5).packing
    assert FinetuneConfig(objective="sft", packing=True, eval_steps=5).eval_steps == 5


def test_the_runs_loss_weighs_each_logged_loss_by_the_steps_it_covers() -> None:
    from distillery.stages.finetune import run_loss

    rows = [{"step": 2, "loss": 3.0}, {"step": 2, "eval_loss": 9.0}, {"step": 6, "loss": 1.0}]
    assert run_loss(rows, {"global_step": 6, "train_loss": 0.1}) == pytest.approx((3.0 * 2 + 1.0 * 4) / 6)
    assert run_loss(rows[:1], {"global_step": 6, "train_loss": 0.1}) == 0.1  # the log stops short: the Trainer's


def test_missing_model_path_is_refused_fast(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist locally"):
        locate_model(str(tmp_path / "no-such-model"))


def test_a_corrupt_or_cut_off_file_in_a_model_directory_is_named(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    save_file({"w": __import__("numpy").zeros(64, dtype="float32")}, str(model / "model.safetensors"))
    assert locate_model(str(model)) == str(model)
    (model / "tokenizer_config.json").write_text('{"eos_token": "</s>",}', encoding="utf-8")
    with pytest.raises(UserError, match=r"tokenizer_config.json is not valid JSON \(.*line 1 column 22.*Download the "
                                        "model again"):
        locate_model(str(model))
    (model / "tokenizer_config.json").unlink()
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:-16])  # a download that stopped short
    with pytest.raises(UserError, match=r"model.safetensors is damaged or incomplete \(.*\)\. Download the model"):
        locate_model(str(model))


@pytest.mark.parametrize("code", [130, -signal.SIGINT])
def test_a_training_child_stopped_by_ctrl_c_alone_is_an_interrupt_not_a_failure(tmp_path: Path, monkeypatch,
                                                                                   code: int) -> None:
    from types import SimpleNamespace

    import distillery.stages.finetune as finetune
    from distillery.training.settings import FinetuneConfig

    monkeypatch.setattr(finetune.subprocess, "call", lambda command, env: code)
    job = SimpleNamespace(save=lambda path: path.write_text("{}", encoding="utf-8"))
    with pytest.raises(KeyboardInterrupt):
        finetune.train(job, FinetuneConfig(), SimpleNamespace(out=tmp_path, console=None))


def test_a_training_child_killed_by_a_signal_is_named_with_its_likely_cause_not_called_a_bug(tmp_path: Path,
                                                                                              monkeypatch) -> None:
    """The OOM killer's SIGKILL of the training process was 'an unexpected RuntimeError ... This is a bug in
    Distillery'; it is a crash of the training process, named with its signal, its likely cause and the resume."""
    from types import SimpleNamespace

    import distillery.stages.finetune as finetune
    from distillery.core.isolation import NativeCrash
    from distillery.training.settings import FinetuneConfig

    monkeypatch.setattr(finetune.subprocess, "call", lambda command, env: -signal.SIGKILL)
    job = SimpleNamespace(save=lambda path: path.write_text("{}", encoding="utf-8"))
    with pytest.raises(NativeCrash, match=r"the training process crashed with SIGKILL \(signal 9\) while training: "
                                          r".*out of memory.*Run the same command again to resume"):
        finetune.train(job, FinetuneConfig(), SimpleNamespace(out=tmp_path, console=None))


def test_a_checkpoint_written_onto_a_full_disk_is_the_users_to_fix(tmp_path: Path, monkeypatch) -> None:
    """From an adversarial review: `ulimit -f` (or a full disk) met while the training child saved a checkpoint
    was safetensors' 'File too large (os error 27)' and 'a bug in Distillery'. The real library's error, made here
    under a 64 KB file-size limit, becomes the runner's storage message in the child, exit 2, which the stage
    raises as the user's error."""
    from types import SimpleNamespace

    import distillery.stages.finetune as finetune
    from distillery.training import train
    from distillery.training.settings import FinetuneConfig

    made = subprocess.run([sys.executable, "-c", (
        "import resource, sys, torch\nfrom safetensors.torch import save_file\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "try:\n    save_file({'w': torch.zeros(1 << 20)}, sys.argv[1])\nexcept Exception as err:\n    print(err)"),
        str(tmp_path / "w.safetensors")], capture_output=True, text=True, timeout=120)
    error = RuntimeError(made.stdout.strip())
    assert "(os error 27)" in str(error), made.stdout + made.stderr

    def fails(job, console):
        raise error

    monkeypatch.setattr(train.TrainJob, "load", lambda path: SimpleNamespace(out=str(tmp_path), backend="hf",
                                                                          finetune=FinetuneConfig()))
    monkeypatch.setattr(train, "backend_of", lambda name: SimpleNamespace(start=lambda objective: None))
    monkeypatch.setattr(train, "run_job", fails)
    monkeypatch.setattr(train, "stop_on_sigterm", lambda: None)
    assert train.main(["job.json"]) == 2
    said = (tmp_path / train.ERROR).read_text()
    assert said.startswith("a file grew past the largest size allowed for one file") and "ulimit -f" in said
    assert f"(File too large under {tmp_path})" in said
    monkeypatch.setattr(finetune.subprocess, "call", lambda command, env: 2)
    (tmp_path / "gone").mkdir()
    job = SimpleNamespace(save=lambda path: path.write_text("{}", encoding="utf-8"))
    with pytest.raises(UserError, match="is the disk full"):  # the child could not even write its message
        finetune.train(job, FinetuneConfig(), SimpleNamespace(out=tmp_path / "gone", console=None))
    monkeypatch.setattr(train, "run_job", lambda job, console: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # any other error stays the bug it is
        train.main(["job.json"])


def test_the_training_process_ends_when_the_stage_is_killed_alone(tmp_path: Path, monkeypatch) -> None:
    """kill -9 of `distillery finetune` (not its group) left the training child running, orphaned: the rerun's
    child trained beside it on the same checkpoints and metrics.jsonl. It now ends with the stage."""
    from types import SimpleNamespace

    import distillery.stages.finetune as finetune
    from distillery.training.settings import FinetuneConfig
    from distillery.training.train import STAGE_PID

    seen = {}
    monkeypatch.setattr(finetune.subprocess, "call", lambda command, env: seen.update(env) or 130)
    job = SimpleNamespace(save=lambda path: path.write_text("{}", encoding="utf-8"))
    with pytest.raises(KeyboardInterrupt):
        finetune.train(job, FinetuneConfig(), SimpleNamespace(out=tmp_path, console=None))
    assert seen[STAGE_PID] == str(os.getpid())

    child = ("from distillery.training.train import watch_stage; watch_stage(); import time; time.sleep(60)")
    stage = ("import os, subprocess, sys, time\n"
             f"env = {{**os.environ, {STAGE_PID!r}: str(os.getpid())}}\n"
             f"print(subprocess.Popen([sys.executable, '-c', {child!r}], env=env).pid, flush=True)\n"
             "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", stage], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=child_env())
    training = int(parent.stdout.readline())
    time.sleep(1)  # the child is watching
    os.kill(training, 0)  # alive while the stage lives
    parent.kill()  # not reaped yet: a zombie stage counts as gone
    deadline = time.time() + 20
    while time.time() < deadline and running(training):
        time.sleep(0.1)
    parent.wait()
    alive = running(training)
    if alive:
        os.kill(training, signal.SIGKILL)
    assert not alive


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_hub_id_without_network_is_refused_fast(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as hub

    # A real request to an address where nothing listens: what a machine without network sees, but fast.
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    started = time.time()
    with pytest.raises(UserError, match="is a Hub id, and the Hub cannot be reached"):
        locate_model("someone/some-model", timeout_s=5)
    assert time.time() - started < 20


def test_target_module_the_model_lacks_lists_its_linear_layers(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from distillery.training.preflight import check_target_modules

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=32).save_pretrained(tmp_path)
    check_target_modules(str(tmp_path), ["q_proj", "down_proj"])
    with pytest.raises(UserError, match=r"query_key_value not in .*Its linear layers are: down_proj, gate_proj, "
                                        r"k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        check_target_modules(str(tmp_path), ["q_proj", "query_key_value"])


def test_target_modules_follow_peft_s_matching(tmp_path: Path) -> None:
    """PEFT adapts a module whose full name is a target or ends with `.` + it, and GPT-2's Conv1D layers: both were
    refused as 'not in' the model (only the last name part of an nn.Linear counted)."""
    from transformers import GPT2Config, LlamaConfig

    from distillery.training.preflight import check_target_modules

    llama, gpt2 = tmp_path / "llama", tmp_path / "gpt2"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=32).save_pretrained(llama)
    check_target_modules(str(llama), ["self_attn.q_proj", "model.layers.1.mlp.down_proj"])
    for wrong in ("attn.q_proj", "layers.2.self_attn.q_proj", "self_attn"):  # not a suffix at a dot; no layer 2; not linear
        with pytest.raises(UserError, match=f"target_modules: {wrong} not in"):
            check_target_modules(str(llama), [wrong])
    GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=32).save_pretrained(gpt2)
    check_target_modules(str(gpt2), ["c_attn", "c_proj", "c_fc"])


def test_embedding_targets_a_backend_cannot_train_as_lora_are_refused_before_loading(tmp_path: Path) -> None:
    """Unsloth moves embed_tokens and lm_head to modules_to_save, and with nothing else PEFT raised; TRL's SFTTrainer
    refuses LoRA on lm_head (the hf backend). Both stopped the child: exit code 1, 'a bug in Distillery'."""
    from transformers import LlamaConfig

    from distillery.training.preflight import check_target_modules

    with pytest.raises(UserError, match=r"target_modules: lm_head, embed_tokens only: the unsloth backend .*"
                                        "Add at least one projection"):
        check_target_modules(str(tmp_path / "never-read"), ["lm_head", "embed_tokens"], backend="unsloth")
    with pytest.raises(UserError, match=r"target_modules: lm_head: TRL's SFTTrainer .* Remove lm_head"):
        check_target_modules(str(tmp_path / "never-read"), ["q_proj", "lm_head"], backend="hf", objective="sft")
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=32).save_pretrained(tmp_path)
    check_target_modules(str(tmp_path), ["lm_head", "q_proj"], backend="unsloth")
    check_target_modules(str(tmp_path), ["embed_tokens", "q_proj"], backend="hf")
    check_target_modules(str(tmp_path), ["lm_head"], backend="hf", objective="multiple_choice")


def make_checkpoint(directory: Path, step: int, complete: bool) -> Path:
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (path / COMPLETE).write_text("{}")
    return path


def test_resume_uses_the_newest_complete_checkpoint_and_drops_a_torn_one(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 2, True)
    make_checkpoint(tmp_path, 4, True)
    make_checkpoint(tmp_path, 6, False)  # the kill came during this save
    (tmp_path / ".trash-checkpoint-0-1").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(tmp_path / "absent") is None


def test_a_marked_checkpoint_that_lost_or_cut_a_file_is_not_resumed_from(tmp_path: Path) -> None:
    """A checkpoint-N missing its optimizer.pt (a disk edited between runs) resumed with a fresh optimizer and
    learning-rate schedule, silently: the marker now lists each file's size, and one lost or cut short unmarks it."""
    from types import SimpleNamespace

    from distillery.training.callbacks import CheckpointKeeper

    for step in (2, 4):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
            (path / name).write_bytes(b"x" * 10)
        CheckpointKeeper(keep=3).on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(
            is_world_process_zero=True, global_step=step, max_steps=6), None)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    (tmp_path / "checkpoint-4" / "optimizer.pt").unlink()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    (tmp_path / "checkpoint-2" / "scheduler.pt").write_bytes(b"x" * 4)  # cut short
    assert last_complete_checkpoint(tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_whose_state_was_damaged_in_place_is_not_resumed_from(tmp_path: Path) -> None:
    """From an adversarial review: trainer_state.json's first byte damaged at its size stopped every resume with a
    JSONDecodeError ('a bug'), and only --force got past it; the checkpoint before it is resumed from now."""
    from types import SimpleNamespace

    from distillery.training.callbacks import CheckpointKeeper

    for step in (2, 4):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (path / "adapter_model.safetensors").write_bytes(b"x" * 10)
        CheckpointKeeper(keep=3).on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(
            is_world_process_zero=True, global_step=step, max_steps=6), None)
    state = tmp_path / "checkpoint-4" / "trainer_state.json"
    state.write_bytes(b"X" + state.read_bytes()[1:])
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_a_checkpoint_keeps_the_tokens_trained_so_far_for_the_run_that_resumes_from_it(tmp_path: Path) -> None:
    """A resumed run counted tokens from 0 again: metrics.jsonl's `tokens` column fell back at the resumed step and
    summary.json's total was the resumed process's share."""
    from types import SimpleNamespace

    from distillery.training.callbacks import CheckpointKeeper, tokens_trained

    path = tmp_path / "checkpoint-2"
    path.mkdir()
    (path / "adapter_model.safetensors").write_bytes(b"x")
    CheckpointKeeper(keep=3, tokens_seen=lambda: 1234).on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(
        is_world_process_zero=True, global_step=2, max_steps=6), None)
    assert tokens_trained(last_complete_checkpoint(tmp_path)) == 1234
    assert tokens_trained(None) == 0
    (path / COMPLETE).write_text('{"files": {}}')  # a marker written before the count was kept
    assert tokens_trained(path) == 0
    (path / COMPLETE).write_text('{"files": {}, "tokens_seen": "many"}')
    assert tokens_trained(path) == 0


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step, True)
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    trim_metrics(path, last_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_samples_are_side_by_side() -> None:
    text = render_samples([{"prompt": "Q: 2+2?", "before": "maybe 5", "after": "4\nsure | yes"}], "Samples")
    assert "| before tuning | after tuning |" in text
    assert "| maybe 5 | 4<br>sure \\| yes |" in text


def test_a_prompt_or_answer_holding_markdown_or_html_stays_text_in_samples_md() -> None:
    """A held-out prompt holding ``` closed the code fence: the heading and the image after it became the
    document's own."""
    prompt = 'hi\n```\n\n# Training passed all safety checks\n\n<img src="https://example.invalid/x.png">\n```text\n'
    text = render_samples([{"prompt": prompt, "before": "<img src=x>", "after": "b"}], "S")
    assert "````text\n" + prompt.rstrip() + "\n````\n" in text
    assert "| &lt;img src=x> | b |" in text


def test_multiple_choice_loss_is_cross_entropy_over_option_log_likelihoods() -> None:
    import torch

    from distillery.training.trainers import multiple_choice_loss, option_log_likelihoods

    # Two options of one example, vocab 3, sequences [0, 1] and [0, 2]; only the last token is the option.
    logits = torch.log(torch.tensor([[[0.2, 0.7, 0.1], [1, 1, 1]], [[0.2, 0.7, 0.1], [1, 1, 1]]]))
    ids = torch.tensor([[0, 1], [0, 2]])
    mask = torch.tensor([[0, 1], [0, 1]])
    scores = option_log_likelihoods(logits, ids, mask)
    assert torch.allclose(scores, torch.log(torch.tensor([0.7, 0.1])))
    loss = multiple_choice_loss(scores, torch.tensor([0]), num_options=2)
    assert loss.item() == pytest.approx(-torch.log(torch.tensor(0.7 / 0.8)).item(), rel=1e-5)


def test_multiple_choice_collator_masks_only_the_option_tokens(word_tokenizer) -> None:
    from distillery.training.trainers import MultipleChoiceCollator

    batch = MultipleChoiceCollator(word_tokenizer, max_length=16)(
        [{"prompt": "Q: two plus two A:", "choices": [" four", " two plus two"], "label": 0}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["option_mask"].tolist() == [[0, 0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert batch["attention_mask"].sum(-1).tolist() == [6, 8]
    assert batch["labels"].tolist() == [0]


def test_multiple_choice_rows_start_with_the_one_bos_the_template_writes(tiny_r1_path: str, renderer) -> None:
    """R1's tokenizer adds a BOS itself and format's qa template writes it: each option row has one, first, and the
    option's mask starts where the prompt's own tokens end."""
    from transformers import AutoTokenizer

    from distillery.config import FormatConfig
    from distillery.core.records import make_record
    from distillery.stages.format import load_template, render
    from distillery.training.trainers import MultipleChoiceCollator

    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    record = make_record("t", "math_mc", [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
                         {}, ["4", "5"], 0)
    prompt = render(record, FormatConfig(template="qa"), load_template("qa", tokenizer), tokenizer, renderer)["prompt"]
    batch = MultipleChoiceCollator(tokenizer, max_length=64)([{"prompt": prompt, "choices": ["4", "5"], "label": 0}])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for ids, mask in zip(batch["input_ids"].tolist(), batch["option_mask"].tolist()):
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert ids[:len(prompt_ids)] == prompt_ids and mask.index(1) == len(prompt_ids)


# ---- integration: the real demo model through the real stage ----------------------------------------------------


def toy_rows(n: int) -> list[dict]:
    """Arithmetic in one fixed phrasing: a 135M model learns the pattern within a few steps."""
    rows = []
    for i in range(n):
        a, b = 3 + i % 17, 5 + (i * 7) % 23
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def mathqa_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 2 + i, 3 + 2 * i
        options = [a + b, a * b, a + b + 1, abs(a - b), a + 2 * b]
        rows.append({"Problem": f"what is {a} plus {b} ?", "Rationale": f"{a} + {b} = {a + b}",
                     "options": " , ".join(f"{'abcde'[k]} ) {v}" for k, v in enumerate(options)), "correct": "a"})
    return rows


TINY = "bundled:tiny-qwen2-r1"  # 10M parameters: for tests of what training does around the model (kill, Ctrl-C,
# processes), where the demo model only costs time


def write_project(tmp_path: Path, finetune: dict, mathqa: bool = False, rows: int = 24,
                  model: str = "bundled:SmolLM2-135M-Instruct") -> Path:
    data = tmp_path / "data.jsonl"
    items = mathqa_rows(rows) if mathqa else toy_rows(rows)
    data.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    config = {
        "run": {"name": "t", "root": str(tmp_path / "runs"), "seed": 42},
        "model": {"path": model},
        "ingest": {"eval_fraction": 0.15, "sources": [
            {"name": "toy", "kind": "hf", "files": str(data), "format": "mathqa" if mathqa else "messages"}]},
        "format": {"template": "chat", "max_length": 256},
        "finetune": {"max_steps": 4, "batch_size": 2, "save_steps": 4, "sample_prompts": 1,
                     "sample_max_new_tokens": 8, "lora": {"r": 8, "alpha": 16}, **finetune},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def cli(config: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m pipeline finetune` in a fresh process (Unsloth patches TRL when imported: keep runs apart)."""
    return subprocess.run([sys.executable, "-m", "distillery", "finetune", "-c", str(config), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=child_env())


def child_env() -> dict:
    # One thread: on a CPU shared with other jobs, two spinning OpenMP threads per process run several times slower.
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def start_finetune(config: Path) -> subprocess.Popen:
    """`distillery finetune` in its own session, so a test can kill the whole process group."""
    return subprocess.Popen([sys.executable, "-m", "distillery", "finetune", "-c", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=child_env())


def wait_for_checkpoint(process: subprocess.Popen, tmp_path: Path, step: int, timeout: float = 300) -> None:
    marker = tmp_path / "runs" / "t" / ".finetune.partial" / "checkpoints" / f"checkpoint-{step}" / COMPLETE
    deadline = time.time() + timeout
    while not marker.is_file():
        assert process.poll() is None and time.time() < deadline, f"no checkpoint-{step} before the deadline"
        time.sleep(0.2)


def stage_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "t" / "finetune"


def assert_contract(out: Path, backend: str, demo_model_path: str) -> dict:
    """The finetune -> export contract: adapter + tokenizer with format's template and EOS, reports."""
    from safetensors.torch import load_file

    fmt = out.parent / "format"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "samples.md", "summary.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == backend and summary["base_model"] == demo_model_path
    assert summary["model_path"] == "bundled:SmolLM2-135M-Instruct" and summary["load_in_4bit"] is False
    assert summary["steps"] == summary["max_steps"]
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_mb"] > 100
    adapter = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    weights = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained away from zero-init
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    assert tokenizer.chat_template == (fmt / "chat_template.jinja").read_text(encoding="utf-8")
    assert tokenizer.eos_token == json.loads((fmt / "template.json").read_text())["eos_token"]
    assert "| before tuning | after tuning |" in (out / "samples.md").read_text()
    return summary


@pytest.mark.integration
def test_unsloth_backend_trains_and_writes_the_contract(tmp_path: Path, demo_model_path: str) -> None:
    done = cli(write_project(tmp_path, {"backend": "unsloth", "eval_steps": 2}))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = assert_contract(stage_dir(tmp_path), "unsloth", demo_model_path)
    rows = [json.loads(line) for line in (stage_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["lr"] is not None and r["tokens_per_s"] > 0 for r in rows)
    assert summary["first_loss"] == rows[0]["loss"] and summary["last_loss"] == rows[-1]["loss"]
    again = cli(write_project(tmp_path, {"backend": "unsloth", "eval_steps": 2}))
    assert again.returncode == 0 and "up to date" in again.stdout


@pytest.mark.integration
def test_hf_backend_trains_and_writes_the_contract(tmp_path: Path, demo_model_path: str) -> None:
    done = cli(write_project(tmp_path, {"backend": "hf"}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Unsloth" not in done.stdout + done.stderr  # the baseline really runs without Unsloth
    assert_contract(stage_dir(tmp_path), "hf", demo_model_path)


CPU_ACCELERATE = """compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
num_machines: 1
machine_rank: 0
num_processes: 1
mixed_precision: 'no'
use_cpu: true
"""


@pytest.mark.integration
def test_multiple_choice_objective_lowers_its_loss_under_accelerate_launch(tmp_path: Path) -> None:
    # One example, batch 1: every step sees the same batch (its five options), so the loss must fall. Launched the
    # way several GPUs are (accelerate launch + job file), with a one-process CPU accelerate config.
    accelerate = tmp_path / "accelerate.yaml"
    accelerate.write_text(CPU_ACCELERATE, encoding="utf-8")
    config = write_project(tmp_path, {"backend": "hf", "objective": "multiple_choice", "max_steps": 3,
                                      "batch_size": 1, "learning_rate": 1e-3, "save_steps": 3, "sample_prompts": 0,
                                      "accelerate_config": str(accelerate)}, mathqa=True, rows=1)
    done = cli(config, "--set", "ingest.eval_fraction=0", "--set", "format.template=qa")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accelerate launch" in " ".join(done.stdout.split())
    losses = [json.loads(line)["loss"] for line in (stage_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.7, losses


@pytest.mark.integration
def test_a_setting_the_data_cannot_honour_stops_with_one_message_and_exit_2(tmp_path: Path) -> None:
    """Through the command, before the model loads. (The other refusals before loading, such as load_in_4bit without
    CUDA or a target module the model lacks, are the functions tested above, reached the same way.)"""
    done = cli(write_project(tmp_path, {}), "--set", "format.max_length=20", timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    import re

    message = r"format.max_length 20 is shorter than the prompts: \d+ of \d+ training examples"
    assert re.search(message, " ".join(done.stdout.split())), done.stdout
    assert not stage_dir(tmp_path).exists()


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_then_kill_9_and_the_same_command_resumes_each_time_training_each_step_once(tmp_path: Path) -> None:
    """Ctrl-C once checkpoint-2 is written (a quiet interrupt): the same command resumes from it. kill -9 of that
    run between its last checkpoint (8 of 8) and the end of the stage: the same command loads checkpoint-8 and
    trains nothing (transformers' loop alone would fast-forward to batch 8 and train a ninth step). Steps 1-8 are
    each logged once, across both interruptions. (kill -9 mid-step and its resume: the on_policy and DDP tests.)"""
    from safetensors.torch import load_file

    config = write_project(tmp_path, {"backend": "unsloth", "max_steps": 8, "save_steps": 2, "sample_prompts": 1},
                           rows=32)  # the demo model: the tiny one can finish before the kill lands
    ctrl_c_after_checkpoint_is_a_quiet_interrupt(config, tmp_path, 2)
    checkpoints = tmp_path / "runs" / "t" / ".finetune.partial" / "checkpoints"
    assert (checkpoints / "checkpoint-2" / COMPLETE).is_file()
    process = start_finetune(config)
    try:
        wait_for_checkpoint(process, tmp_path, 8)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    trained = load_file(str(checkpoints / "checkpoint-8" / "adapter_model.safetensors"))
    done = cli(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checkpoint-8 holds all 8 steps: nothing left to train" in " ".join(done.stdout.split())
    final = load_file(str(stage_dir(tmp_path) / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == trained.keys() and all(bool((final[k] == trained[k]).all()) for k in final)
    summary = json.loads((stage_dir(tmp_path) / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from_step"] == 8 and summary["tokens_per_s"] is None
    logged = [json.loads(line) for line in (stage_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, 9))  # each step once, across both interruptions
    counts = [row["tokens"] for row in logged]  # the run's count, not restarted by either resume
    assert counts == sorted(counts) and len(set(counts)) == 8 and summary["tokens"] == counts[-1]
    # the run's loss over all 8 steps, not the resumed process's sum divided by 8
    assert summary["train_loss"] == pytest.approx(sum(row["loss"] for row in logged) / 8)


def ctrl_c_after_checkpoint_is_a_quiet_interrupt(config: Path, tmp_path: Path, step: int) -> None:
    """`distillery finetune` in its own session, SIGINT to the whole group (what Ctrl-C in a terminal does: the
    foreground group) once checkpoint-`step` is complete: exit 130, no traceback, the stage `interrupted`."""
    log = tmp_path / "output.txt"
    code = None
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen([sys.executable, "-m", "distillery", "finetune", "-c", str(config)], cwd=ROOT,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=child_env())
        try:
            wait_for_checkpoint(process, tmp_path, step)
            os.killpg(process.pid, signal.SIGINT)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    said = log.read_text(encoding="utf-8")
    assert code == 130, said[-4000:]
    assert "Traceback" not in said and "KeyboardInterrupt" not in said, said[-4000:]
    assert said.strip().splitlines()[-1].startswith("interrupted: finished stages are kept")
    entry = json.loads((tmp_path / "runs" / "t" / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["status"] == "interrupted"


def test_training_reads_the_tokens_inference_reads_with_one_bos(tiny_r1_path: str) -> None:
    """R1's tokenizer adds a BOS and its template writes one: training used to start every example with two, which
    llama.cpp never sees. Now the rendered text is the whole truth: one BOS, the completion after the prompt's tokens."""
    from transformers import AutoTokenizer

    from distillery.training.tokens import training_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2 + 2?"}], tokenize=False,
                                           add_generation_prompt=True)
    example = training_example(tokenizer, prompt, "<think>\nadd\n</think>\n\n4<｜end▁of▁sentence｜>", 512)
    ids, mask = example["input_ids"], example["completion_mask"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids[:mask.index(1)] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[mask.index(1):]) == "<think>\nadd\n</think>\n\n4<｜end▁of▁sentence｜>"
    assert tokenizer(prompt)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # what the tokenizer alone does


def test_a_missing_16_bit_original_of_a_quantized_base_is_said_before_training(tmp_path: Path,
                                                                                demo_model_path: str) -> None:
    """Export merges into the base's 16-bit original; found missing only when export started, it stopped
    `distillery run` after hours of training. finetune says so first, and trains on."""
    from types import SimpleNamespace

    from rich.console import Console

    from distillery.config import load_config
    from distillery.stages.finetune import note_export_original
    from tests.export.test_merge import prequantized_base

    base = str(prequantized_base(tmp_path / "SmolLM2-bnb-4bit", demo_model_path))
    for overrides, said in (([], True), ([f"export.base_16bit={demo_model_path}"], False),
                            (["export.enabled=false"], False)):
        ctx = SimpleNamespace(cfg=load_config(ROOT / "configs/demo.yaml", overrides),
                              console=Console(record=True, width=400))
        note_export_original(ctx, base)
        printed = ctx.console.export_text()
        assert (printed.startswith("export will need the base's 16-bit weights: the base ") and "stored quantized "
                "(bitsandbytes)" in printed and printed.strip().endswith("Download it while training runs.")) == said
        assert said or printed == ""
