"""The R1-Distill-Qwen path at toy size (configs/tiny-r1.yaml): DeepSeek-R1-Distill-Qwen's real tokenizer and chat
template on a tiny random Qwen2, through every stage offline. The weights are random: the assertions are about
the machinery (templates, tokens, masks, files), never about scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillery.core.records import read_jsonl
from distillery.evals.generative import extract_letter
from distillery.evals.mathqa import LoadReport, load_items

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "distill", "format", "finetune", "export", "evaluate")
BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
# The preset's machinery at a lighter size (random weights score nothing either way); a later evaluate with other
# evaluate settings keeps UPSTREAM, so that the stages before it stay up to date.
UPSTREAM = ("export.quantizations=[f16,q8_0,q4_k_m]", "distill.max_prompts=2", "finetune.max_steps=6")
SETS = (*UPSTREAM, "evaluate.artifacts=[base,merged,gguf]", "evaluate.limit=6", "evaluate.heldout.limit=3",
        "evaluate.heldout.generate=1", "evaluate.heldout.max_new_tokens=24")


def gguf_metadata(path: Path) -> dict:
    """A GGUF's key/values, read with struct (gguf.GGUFReader takes 12 s a file over R1's 151,665 tokens)."""
    from distillery.core.tiny_qwen2 import HeaderReader

    return HeaderReader(path.read_bytes()).read()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("runs")
    sets = [arg for item in (f"run.root={root}", *SETS) for arg in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "distillery", "run", "-c", "configs/tiny-r1.yaml", *sets], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}, capture_output=True,
                            text=True, timeout=1200)
    return root / "tiny-r1", result


@pytest.mark.integration
@pytest.mark.slow
def test_every_stage_runs_on_the_tiny_r1_model(tiny_run) -> None:
    run, result = tiny_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(manifest[stage]["status"] == "complete" for stage in STAGES), manifest.keys()
    assert "held-out question" in result.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_format_keeps_the_reasoning_the_models_own_template_would_strip(tiny_run, tiny_r1_path: str) -> None:
    from transformers import AutoTokenizer

    run, _ = tiny_run
    rows = list(read_jsonl(run / "format" / "train.jsonl"))
    traces = [r for r in rows if "distill" in r["meta"]]  # teacher traces (meta.distill: teacher, verdict)
    assert traces and all(r["completion"].startswith("<think>") and "</think>" in r["completion"] for r in traces)
    assert all(r["prompt"].endswith(ASSISTANT) and r["completion"].endswith(EOS) for r in rows)
    own = AutoTokenizer.from_pretrained(tiny_r1_path)
    trace = traces[0]
    answer = trace["completion"].removesuffix(EOS)
    rendered = own.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                                       tokenize=False)
    assert "<think>" not in rendered and rendered.endswith(answer.split("</think>")[-1] + EOS)


@pytest.mark.integration
@pytest.mark.slow
def test_the_loss_mask_starts_right_after_the_assistant_tag(tiny_run, tiny_r1_path: str) -> None:
    """Format's rows as finetune hands them to TRL (training/tokens.py's ids and completion mask): one BOS, first
    (the r1 template writes it for a tokenizer that adds one); the loss covers <think>, the answer and the
    end-of-sentence token, and begins at the first token after <｜Assistant｜>."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from distillery.training.tokens import training_example

    run, _ = tiny_run
    row = next(r for r in read_jsonl(run / "format" / "train.jsonl") if "distill" in r["meta"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    example = training_example(tokenizer, row["prompt"], row["completion"], 4096)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_r1_path), processing_class=tokenizer,
                         train_dataset=Dataset.from_list([example]),
                         args=SFTConfig(output_dir=str(run.parent / "mask"), report_to=[], use_cpu=True,
                                        completion_only_loss=True, max_length=4096))
    example = trainer.train_dataset[0]
    ids, mask = example["input_ids"], [label != -100 for label in example["labels"]]  # -100: no loss
    start = mask.index(True)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_ids_to_tokens(ids[start - 1]) == ASSISTANT
    assert all(mask[start:]) and not any(mask[:start])
    assert tokenizer.decode(ids[start:]) == row["completion"] and ids[-1] == tokenizer.eos_token_id


@pytest.mark.integration
@pytest.mark.slow
def test_the_ggufs_carry_what_training_used(tiny_run) -> None:
    run, _ = tiny_run
    template = (run / "format" / "chat_template.jinja").read_text()
    verify = json.loads((run / "export" / "verify.json").read_text())
    assert verify["passed"] and {"f16", "q8_0", "q4_k_m"} <= set(verify["gguf"])
    assert all(all(r["checks"].values()) for r in verify["gguf"].values())  # template, eos, tokenizer, kl
    for path in sorted((run / "export" / "gguf").glob("*.gguf")):
        fields = gguf_metadata(path)
        assert fields["tokenizer.ggml.pre"] == "deepseek-r1-qwen"  # the converter knew the tokenizer
        assert fields["general.architecture"] == "qwen2"
        assert fields["tokenizer.chat_template"] == template
        assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (151646, 151643)


@pytest.mark.integration
@pytest.mark.slow
def test_the_f16_gguf_predicts_what_the_merged_model_predicts(tiny_run) -> None:
    run, _ = tiny_run
    rows = list(read_jsonl(run / "evaluate" / "per_item.jsonl"))
    by_artifact: dict[str, dict] = {}
    for row in rows:
        by_artifact.setdefault(row["artifact"], {})[row["id"]] = (row["pred"], row["pred_norm"])
    f16 = next(name for name in by_artifact if name.endswith("-F16"))
    assert by_artifact["merged"] and by_artifact[f16] == by_artifact["merged"]


def _chat_setup(state: dict, emit, messages: list[dict]) -> tuple:
    """In the llama.cpp child: the chat format llama-cpp-python chose for this GGUF and, built the way its
    Llama() builds it from the GGUF's metadata, the prompt and stops of its chat handler."""
    from llama_cpp import llama_chat_format

    llm = state["llm"]
    token = lambda i: llm.detokenize([i], special=True).decode("utf-8")  # noqa: E731
    formatter = llama_chat_format.Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                                      eos_token=token(llm.token_eos()),
                                                      bos_token=token(llm.token_bos()),
                                                      stop_token_ids=[llm.token_eos()])
    rendered = formatter(messages=messages)
    return llm.chat_format, rendered.prompt, rendered.stop, llm.token_eos()


@pytest.mark.integration
@pytest.mark.slow
def test_chat_renders_the_r1_template_from_the_gguf_and_stops_at_end_of_sentence(tiny_run, tiny_r1_path) -> None:
    from transformers import AutoTokenizer

    from distillery.export.llama_child import LlamaChild

    run, _ = tiny_run
    gguf = run / "export" / "gguf" / "tiny-qwen2-r1-Q4_K_M.gguf"
    template = (run / "format" / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "그리고 3 + 3?"}]
    with LlamaChild(gguf, "chatting with", n_ctx=256) as llama:
        chat_format, prompt, stop, eos_id = llama.call(_chat_setup, messages)
    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    assert chat_format == "chat_template.default"  # the GGUF's own template, not a built-in guess
    assert prompt == tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                   add_generation_prompt=True)
    assert stop == [EOS] and eos_id == tokenizer.eos_token_id
    result = subprocess.run([sys.executable, "-m", "distillery", "chat", "-c", "configs/tiny-r1.yaml", "--set",
                             f"run.root={run.parent}", "--prompt", "2 + 2?", "--max-tokens", "8"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0 and "chat template from the GGUF" in result.stdout, result.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.slow
def test_a_tampered_gguf_template_is_refused(tiny_run, tmp_path: Path) -> None:
    """Export's verification reads the template back from the file: one changed character fails the check."""
    from distillery.export.verify import probe_tokens, reference_logprobs, verify_gguf

    run, _ = tiny_run
    good = run / "export" / "gguf" / "tiny-qwen2-r1-Q8_0.gguf"
    template = (run / "format" / "chat_template.jinja").read_text()
    data = bytearray(good.read_bytes())
    at = data.index(template.encode()) + template.encode().index(b"User")
    data[at:at + 1] = b"u"  # <｜User｜> -> <｜user｜> in the stored template only: one byte, the same length
    tampered = tmp_path / good.name
    tampered.write_bytes(bytes(data))
    probe = probe_tokens(run / "export" / "merged", ["2 + 2?"], 0, good)
    probe["reference"] = reference_logprobs(run / "export" / "merged", probe["token_lists"])
    assert verify_gguf(good, template, "<｜end▁of▁sentence｜>", 151643, probe, max_kl=1.0, min_top1=None,
                       threads=1)["passed"]
    checked = verify_gguf(tampered, template, "<｜end▁of▁sentence｜>", 151643, probe, max_kl=1.0, min_top1=None,
                          threads=1)
    assert checked["checks"]["chat_template"] is False and checked["passed"] is False


@pytest.mark.integration
@pytest.mark.slow
def test_the_r1_generative_evaluation_reports_its_no_answer_rate(tiny_run) -> None:
    """<think> then a letter, through the R1 template, on the base model and a GGUF (last: it replaces evaluate)."""
    run, _ = tiny_run
    sets = [f"run.root={run.parent}", "evaluate.mode=generative", "evaluate.max_new_tokens=24", "evaluate.limit=4",
            "evaluate.artifacts=[base,gguf]", *UPSTREAM]
    result = subprocess.run([sys.executable, "-m", "distillery", "evaluate", "-c", "configs/tiny-r1.yaml",
                             *[arg for item in sets for arg in ("--set", item)]], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((run / "evaluate" / "results.json").read_text())
    assert results["mode"] == "generative" and {"base", "tiny-qwen2-r1-Q4_K_M"} <= set(results["artifacts"])
    per_item = list(read_jsonl(run / "evaluate" / "per_item.jsonl"))
    assert len(per_item) == 4 * len(results["artifacts"])
    choices = {item.id: item.choices for item in load_items(str(ROOT / "configs/samples/mathqa/test.jsonl"), "test", 4,
                                                                 LoadReport())}
    for name, scored in results["artifacts"].items():
        # The reported rate is the share of this artifact's replies in which no option letter can be found.
        rows = [r for r in per_item if r["artifact"] == name]
        replies = [r["reply"] for r in rows]
        unanswered = sum(extract_letter(r["reply"], choices[r["id"]]) is None for r in rows)
        assert scored["n"] == len(replies) == 4 and scored["no_answer"] == unanswered / 4, (name, replies)


@pytest.mark.integration
@pytest.mark.slow
def test_a_gguf_answers_a_prompt_that_writes_its_bos_after_one_bos(tiny_run) -> None:
    """R1-Distill-Qwen's template writes the BOS into the prompt's text and its GGUF asks for a BOS as well: the GGUF
    side of generative evaluation must not add a second one (the HF side tokenizes without special tokens)."""
    from distillery.evals.gguf_backend import GGUFModel
    from tests.evals.test_gguf_backend import bos_of, prompt_tokens_of_an_answer

    run, _ = tiny_run
    model = GGUFModel(run / "export" / "gguf" / "tiny-qwen2-r1-Q8_0.gguf", threads=2, answers_at_once=1)
    try:
        bos, text = model.llama.call(bos_of)
        assert text == BOS and model.llama.metadata["n_vocab"] > bos
        seen = model.llama.call(prompt_tokens_of_an_answer, f"{BOS}{USER}2 + 2?{ASSISTANT}")
        assert seen[0] == bos and seen[1] != bos, seen[:4]
    finally:
        model.close()
