"""Qwen2.5's family on the same tiny architecture: Qwen2's own vocabulary and ChatML template (llama.cpp's
ggml-vocab-qwen2.gguf, in the llama-cpp-python sdist) on a random Qwen2, through format -> finetune -> export ->
chat with `template: chat`. The weights are random; the assertions are about templates, tokens and files."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from distillery.core import tiny_qwen2
from distillery.core.records import read_jsonl
from distillery.export.llama_build import fetch_sdist
from tests.e2e.test_tiny_r1 import gguf_metadata

ROOT = Path(__file__).resolve().parents[2]
IM_END = "<|im_end|>"


def qwen2_vocab_header() -> dict:
    with tarfile.open(fetch_sdist()) as sdist:
        member = next(m for m in sdist.getmembers() if m.name.endswith("models/ggml-vocab-qwen2.gguf"))
        return tiny_qwen2.HeaderReader(sdist.extractfile(member).read()).read()


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("chatml")
    tiny_qwen2.save(qwen2_vocab_header(), work / "tiny-qwen2-chatml", eos=IM_END)
    config = {
        "run": {"name": "chatml", "root": str(work / "runs")},
        "model": {"path": str(work / "tiny-qwen2-chatml")},
        "ingest": {"sources": [
            {"name": "ko-en", "kind": "aihub_excel", "path": str(ROOT / "configs/samples/aihub"), "max_records": 24},
            {"name": "gsm", "kind": "hf", "files": str(ROOT / "configs/samples/hf/gsm_instructions.jsonl"),
             "format": "columns", "columns": {"user": "INSTRUCTION", "assistant": "RESPONSE"}, "max_records": 24}]},
        "format": {"template": "chat", "max_length": 512},
        "finetune": {"backend": "unsloth", "max_steps": 4, "save_steps": 2, "batch_size": 4, "sample_prompts": 0,
                     "lora": {"r": 8, "alpha": 16}, "gradient_checkpointing": False},
        "export": {"quantizations": ["q8_0"], "outtype": "q8_0"},
        "evaluate": {"enabled": False},
    }
    path = work / "chatml.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    export = subprocess.run([sys.executable, "-m", "distillery", "export", "-c", str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    chat = subprocess.run([sys.executable, "-m", "distillery", "chat", "-c", str(path), "--prompt", "2 + 2?",
                           "--max-tokens", "8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return work / "runs" / "chatml", work / "tiny-qwen2-chatml", chat


@pytest.mark.integration
@pytest.mark.slow
def test_chatml_rows_end_their_turn_with_im_end(chatml_run) -> None:
    run, _, _ = chatml_run
    rows = list(read_jsonl(run / "format" / "train.jsonl"))
    assert rows and all(r["prompt"].startswith("<|im_start|>system\n") for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["completion"].endswith(IM_END) for r in rows)


@pytest.mark.integration
@pytest.mark.slow
def test_the_chatml_gguf_carries_qwen2s_tokenizer_template_and_end_token(chatml_run) -> None:
    from transformers import AutoTokenizer

    run, model, chat = chatml_run
    tokenizer = AutoTokenizer.from_pretrained(model)
    [gguf] = sorted((run / "export" / "gguf").glob("*.gguf"))
    fields = gguf_metadata(gguf)
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids(IM_END)
    modelfile = gguf.with_suffix(".Modelfile").read_text()
    assert f'PARAMETER stop "{IM_END}"' in modelfile and "<|im_start|>assistant\n" in modelfile
    assert chat.returncode == 0 and "chat template from the GGUF" in chat.stdout, chat.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.slow
def test_push_takes_only_the_export_this_config_makes(chatml_run) -> None:
    """push uploaded an export trained with other settings, under a card of the changed config's."""
    from distillery.commands.push import push
    from distillery.config import load_config
    from distillery.core.console import console
    from distillery.core.errors import UserError

    run, _, _ = chatml_run
    config = run.parents[1] / "chatml.yaml"
    assert push(load_config(config), console, dry_run=True)["uploaded"] is False
    with pytest.raises(UserError, match=r"the export in .* is not the one this config makes: `distillery export` "
                                        r"would run finetune again"):
        push(load_config(config, ["finetune.learning_rate=0.001"]), console, dry_run=True)
