"""A model directory is untrusted input: a config.json, tokenizer, index or file that is not the model's is one
message naming it (exit 2), found before anything heavy loads, at a bounded cost (from an adversarial review)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from distillery.core.errors import UserError
from distillery.core.models import check_model_files, load_tokenizer, meta_model, resolve_model_path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The demo model's small files copied, its weights linked (270 MB)."""
    source, copy = Path(resolve_model_path("bundled:SmolLM2-135M-Instruct")), tmp_path / "model"
    copy.mkdir()
    for path in source.iterdir():
        if path.suffix == ".safetensors":
            (copy / path.name).symlink_to(path)
        elif path.is_file():
            shutil.copy(path, copy / path.name)
    return copy


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes", [{"num_attention_heads": 0}, {"hidden_size": -576}, {"model_type": "nosuch"},
                                     {"dtype": "int3"}])
def test_a_config_transformers_cannot_build_is_named(model: Path, changes: dict) -> None:
    """ZeroDivisionError at format (heads 0), RuntimeError, ValueError in finetune's preflight: each was a bug."""
    edit_json(model / "config.json", **changes)
    with pytest.raises(UserError, match="model.path: transformers cannot load"):
        meta_model(str(model))
    if "num_attention_heads" in changes:  # format reads the config with the tokenizer
        with pytest.raises(UserError, match="model.path: transformers cannot load"):
            load_tokenizer(str(model))


def test_a_config_with_more_layers_than_its_weights_is_refused_before_building_them(model: Path) -> None:
    """num_hidden_layers 1,000,000: preflight built them on the meta device for minutes and gigabytes."""
    edit_json(model / "config.json", num_hidden_layers=1_000_000)
    with pytest.raises(UserError, match="num_hidden_layers 1000000, and its weights hold 30 layers"):
        check_model_files(model)
    with pytest.raises(UserError, match="num_hidden_layers 1000000; a model has 1 to 1000"):
        meta_model(str(model))


def test_only_regular_files_of_a_bounded_size_are_read(model: Path) -> None:
    """extra.json linked to /dev/zero grew past 4 GB; a FIFO named .safetensors blocked format forever."""
    (model / "extra.json").symlink_to("/dev/zero")
    with pytest.raises(UserError, match="extra.json is not a regular file"):
        check_model_files(model)
    (model / "extra.json").unlink()
    os.mkfifo(model / "extra.safetensors")
    with pytest.raises(UserError, match="extra.safetensors is not a regular file"):
        check_model_files(model)
    (model / "extra.safetensors").unlink()
    with open(model / "extra.json", "wb") as handle:
        handle.truncate(300 << 20)  # sparse: no disk
    with pytest.raises(UserError, match="extra.json is 300 MB, far more than a model's JSON files"):
        check_model_files(model)


def test_an_index_naming_a_file_outside_the_model_is_refused(model: Path) -> None:
    """transformers opened ../../etc/passwd as a shard."""
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../../../../etc/passwd"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"names the shard '../../../../etc/passwd', which is not a .safetensors file"):
        check_model_files(model)


def test_a_tokenizer_without_eos_or_with_one_past_the_embeddings_is_refused(model: Path) -> None:
    """No EOS: completions that never end were written (exit 0); an EOS id past the embeddings failed inside
    training (a device-side assert on a GPU)."""
    from distillery.stages.format import check_special_tokens

    settings = json.loads((model / "tokenizer_config.json").read_text())
    for key in ("eos_token", "eos_token_id", "pad_token", "pad_token_id"):
        settings.pop(key, None)
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match="has no EOS token"):
        check_special_tokens(load_tokenizer(str(model)), str(model), False)
    (model / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": "<|nosuch|>"}))
    with pytest.raises(UserError, match=r"EOS token '<\|nosuch\|>' has id 49152, and the model has embeddings for "
                                        r"ids 0 to 49151"):
        check_special_tokens(load_tokenizer(str(model)), str(model), False)


def test_weights_that_trained_into_nan_are_not_saved() -> None:
    """A base with NaN weights trained to 'done' with a loss of 0.000 and an all-NaN adapter."""
    import torch

    from distillery.training.train import check_finite

    model = torch.nn.Linear(4, 2)
    check_finite(model)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="training diverged: 1 trained tensors hold NaN or inf .*weight"):
        check_finite(model)
    model.weight.requires_grad_(False)  # frozen: not what training made
    check_finite(model)


@pytest.mark.parametrize("damage", ["config disagrees with the weights", "no weights", "pickle only"])
def test_a_model_that_does_not_load_for_training_is_the_user_s_to_fix(model: Path, tmp_path: Path, damage: str) -> None:
    """Each ended finetune as 'a bug in Distillery, run the same command again to resume', which cannot help."""
    from distillery.config import FinetuneConfig
    from distillery.training.train import TrainJob, load_model

    if damage == "config disagrees with the weights":
        edit_json(model / "config.json", vocab_size=50_000)
    else:
        (model / "model.safetensors").unlink()
        if damage == "pickle only":
            (model / "pytorch_model.bin").write_bytes(b"\x80\x04not a checkpoint")
    job = TrainJob(out=str(tmp_path), adapter_dir="", model_dir="", metrics_path="", train_path="", eval_path="",
                   model_path=str(model), backend="hf", device="cpu", load_in_4bit=False, precision="fp32",
                   optimizer="adamw_torch", max_length=64, seed=0, template="", eos_token="<|im_end|>",
                   finetune=FinetuneConfig())
    with pytest.raises(UserError, match=f"model.path: {model} cannot be loaded for training"):
        load_model(job)


def test_a_chat_template_that_never_ends_stops_format_within_its_budget(model: Path, monkeypatch) -> None:
    """Three nested range(99999) in the model's chat_template.jinja hung format for good; it is now stopped after
    its CPU budget, naming the records and what to use instead."""
    from distillery.config import FormatConfig
    from distillery.core import chat_render
    from distillery.core.records import make_record
    from distillery.stages.format import load_template, render_rows

    monkeypatch.setattr(chat_render, "CPU_SECONDS", 2.0)
    (model / "chat_template.jinja").write_text("{% for a in range(99999) %}{% for b in range(99999) %}"
                                               "{% for c in range(99999) %}{% endfor %}{% endfor %}{% endfor %}")
    tokenizer = load_tokenizer(str(model))
    records = [make_record("toy", "qa", [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
                           {"row": i}) for i in range(3)]
    with chat_render.ChatRenderer() as renderer, pytest.raises(UserError) as refused:
        render_rows(records, FormatConfig(template="chat"), load_template("chat", tokenizer), tokenizer, renderer)
    assert str(refused.value) == (
        f"format.template chat: the model's chat template (its tokenizer files) took more than 2 s of CPU time "
        f"rendering records {records[0]['id']} to {records[2]['id']}, where a chat template needs milliseconds and a "
        "few MB: it is broken or hostile. Use template qa, ko_qa, alpaca or r1, or a model whose template is sound.")


MATERIALIZE = "from distillery.core.models import resolve_model_path; print(resolve_model_path('bundled:tiny-qwen2-r1'))"


def test_jobs_that_build_one_bundled_model_at_once_share_one_whole_entry(tmp_path: Path) -> None:
    """From an adversarial review (a SLURM array on a fresh cache): the second job to finish its build failed
    renaming onto the first one's entry (Errno 39: a bug), a folder named by PID alone could be wiped by a job of
    another PID namespace, and a killed build's folder stayed forever. Two jobs at once get the same entry; a
    leftover is swept, and an entry cut short since is built again."""
    import subprocess
    import sys

    env = {**os.environ, "DISTILLERY_HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    models = tmp_path / "models"
    models.mkdir()
    (models / ".tiny-qwen2-r1.tmp-4471").mkdir()  # a job killed mid-build
    jobs = [subprocess.Popen([sys.executable, "-c", MATERIALIZE], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], done
    assert {out.strip() for out, _ in done} == {str(models / "tiny-qwen2-r1")}
    assert sorted(p.name for p in models.iterdir()) == [".tiny-qwen2-r1.lock", "tiny-qwen2-r1"]
    check_model_files(models / "tiny-qwen2-r1")
    weights = models / "tiny-qwen2-r1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # damaged since: it was trusted forever
    rebuilt = subprocess.run([sys.executable, "-c", MATERIALIZE], env=env, capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0 and "is damaged: building it again" in rebuilt.stderr, rebuilt.stderr[-2000:]
    check_model_files(models / "tiny-qwen2-r1")


def test_a_model_cache_that_cannot_be_written_is_one_message_naming_it(tmp_path: Path, monkeypatch) -> None:
    """A read-only home or a DISTILLERY_HOME under a file: 'a bug' (PermissionError, NotADirectoryError) or the
    run.root remedy, after building the model for seconds."""
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(UserError, match=r"the model cache .*a-file/cache/models cannot be written \(Not a directory\): "
                                        "set DISTILLERY_HOME to a directory you can write to"):
        resolve_model_path("bundled:tiny-qwen2-r1")


def test_an_empty_distillery_home_is_the_default_cache_not_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """`DISTILLERY_HOME= just demo` (a variable set but left empty) put the model cache, sdists and wheels in
    whatever directory the command ran in."""
    from distillery.core.machine import cache_home

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DISTILLERY_HOME", "")
    assert cache_home() == tmp_path / ".cache" / "distillery"
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "elsewhere"))
    assert cache_home() == tmp_path / "elsewhere"


def test_a_distillery_home_with_a_tilde_or_relative_is_one_absolute_place(tmp_path: Path, monkeypatch) -> None:
    """A `~` quoted in a script or .env is the home directory, not a folder named `~` in the working directory;
    a relative one is made absolute (each command's directory would otherwise be another cache)."""
    from distillery.core.machine import cache_home

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DISTILLERY_HOME", "~/dh")
    monkeypatch.chdir(tmp_path)
    assert cache_home() == tmp_path / "home" / "dh"
    monkeypatch.setenv("DISTILLERY_HOME", "cache")
    assert cache_home() == tmp_path / "cache" and cache_home().is_absolute()
