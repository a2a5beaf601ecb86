"""Distillation beyond teacher text: the KD loss by hand, the teacher's top-k log-probs from each kind of teacher
aligned with format's tokens (ChatML and R1's <think> template), vocabularies that do not match refused (unit);
configs/distill-kd.yaml through distill -> format -> finetune (kd) -> evaluate, kd under Unsloth with
packing, and an on-policy run that changes the adapter and resumes after kill -9 (integration)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from distillery.config import FormatConfig
from distillery.core.errors import UserError
from distillery.core.records import make_record
from distillery.core.topk import TopK, load_sequences, save_sequences, sequence
from distillery.core.vocab import hf_encoder
from distillery.reasoning.prompts import question
from distillery.reasoning.teacher_logprobs import (
    Unscored,
    check_teacher_vocabulary,
    openai_top_k,
    scored_sequence,
)
from distillery.stages.format import find_tokens, load_template, render
from distillery.training.callbacks import COMPLETE
from distillery.training.tokens import split_tokens

ROOT = Path(__file__).resolve().parents[2]
TRACE = "<think>\nTwo apples and three apples make five apples.\n</think>\n\nThe answer is 5."


# ---- the KD loss -----------------------------------------------------------------------------------------------


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_equals_the_hand_computed_kl_over_top_k_and_the_tail(temperature: float) -> None:
    import torch

    from distillery.training.kd import kd_token_loss

    student = [[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]  # two tokens, a vocabulary of four
    top_ids = [[0, 1], [2, 3]]  # the teacher's top-2 at each token, most likely first
    top_p = [[0.6, 0.3], [0.5, 0.25]]  # tails: 0.1 and 0.25
    expected = []
    for logits, ids, probs in zip(student, top_ids, top_p):
        teacher = softmax([math.log(p) / temperature for p in probs + [1 - sum(probs)]])
        q = softmax([z / temperature for z in logits])
        buckets = [q[i] for i in ids] + [1 - sum(q[i] for i in ids)]
        expected.append(kl(teacher, buckets) * temperature ** 2)
    got = kd_token_loss(torch.tensor(student), torch.tensor(top_ids), torch.log(torch.tensor(top_p)), temperature)
    assert got.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected[1] == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5), rel=1e-6) or temperature != 1.0


def test_a_student_equal_to_its_teacher_on_the_buckets_has_zero_kd_loss() -> None:
    import torch

    from distillery.training.kd import kd_token_loss

    logits = torch.tensor([[3.0, 1.0, 0.5, -2.0, 0.0]])
    log_q = torch.log_softmax(logits, -1)
    ids = torch.tensor([[0, 1]])
    assert kd_token_loss(logits, ids, log_q.gather(-1, ids), 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_index_follows_the_alignment_and_stays_minus_one_elsewhere() -> None:
    from distillery.training.kd import teacher_index_column

    arrays = {"offsets": np.array([0, 3, 3, 5]), "starts": np.array([2, -1, 4])}
    assert teacher_index_column(arrays, 0, 6) == [-1, -1, 0, 1, 2, -1]
    assert teacher_index_column(arrays, 1, 4) == [-1] * 4
    assert teacher_index_column(arrays, 2, 5) == [-1, -1, -1, -1, 3]  # cut by max_length: the rest is dropped


def test_top_k_sidecar_round_trips_through_a_progress_line_and_a_file(tmp_path: Path) -> None:
    one = TopK.of([5, 6], np.array([[5, 1], [6, 2]]), np.array([[-0.1, -2.5], [-0.2, -1.75]]))
    again = TopK.decode(json.loads(json.dumps(one.encode())))
    assert again.tokens.tolist() == [5, 6] and again.logprobs.dtype == np.float16
    save_sequences(tmp_path / "s.safetensors", [one, None, again], {"k": 2, "teacher": "t"})
    arrays, meta = load_sequences(tmp_path / "s.safetensors")
    assert meta == {"k": 2, "teacher": "t"} and arrays["offsets"].tolist() == [0, 2, 2, 4]
    assert sequence(arrays, 1) is None and sequence(arrays, 2).ids.tolist() == [[5, 1], [6, 2]]


def test_a_cut_short_sidecar_is_one_message_naming_the_file(tmp_path: Path) -> None:
    one = TopK.of([5, 6], np.array([[5, 1], [6, 2]]), np.array([[-0.1, -2.5], [-0.2, -1.75]]))
    path = tmp_path / "s.safetensors"
    save_sequences(path, [one], {"k": 2})
    path.write_bytes(path.read_bytes()[:-10])  # the header promises more bytes than the file holds
    with pytest.raises(UserError, match=r"s.safetensors cannot be read as teacher log-probs .*--force"):
        load_sequences(path)
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"s.safetensors cannot be read"):
        load_sequences(path)


def test_a_sidecar_out_of_step_with_its_records_is_one_message(tmp_path: Path) -> None:
    """One sequence per record of the file beside it, and offsets inside the arrays: anything else paired records
    with other records' log-probs, or stopped format on an IndexError (from an adversarial review)."""
    from safetensors.numpy import save_file

    one = TopK.of([5, 6], np.array([[5, 1], [6, 2]]), np.array([[-0.1, -2.5], [-0.2, -1.75]]))
    path = tmp_path / "s.safetensors"
    save_sequences(path, [one, None], {"k": 2})
    assert load_sequences(path, 2)[0]["offsets"].tolist() == [0, 2, 2]
    with pytest.raises(UserError, match=r"holds 2 sequences of teacher log-probs for 3 records.*--force"):
        load_sequences(path, 3)
    arrays, _ = load_sequences(path)
    save_file({**arrays, "offsets": np.array([0, 9], dtype=np.int64)}, str(path))  # past the 2 rows it holds
    with pytest.raises(UserError, match="offsets that do not fit its arrays"):
        load_sequences(path, 1)


# ---- alignment with format's tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("model, template", [("demo", "chat"), ("tiny_r1", "r1")])
def test_the_teachers_tokens_are_the_completion_tokens_format_trains_on(model: str, template: str, demo_model_path: str,
                                                                       tiny_r1_path: str, renderer) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path if model == "demo" else tiny_r1_path)
    record = make_record("s", "qa", [{"role": "user", "content": "What is 2 + 3 apples?"},
                                     {"role": "assistant", "content": TRACE}], {})
    ids, start = scored_sequence(tokenizer, question(record), TRACE)
    teacher_tokens = ids[start:]
    row = render(record, FormatConfig(template=template), load_template(template, tokenizer), tokenizer, renderer)
    assert "<think>" in row["completion"]
    trained, prompt_len = split_tokens(tokenizer, row["prompt"], row["completion"])
    at = find_tokens(trained, teacher_tokens, prompt_len - 8)
    assert at == prompt_len  # every completion token, from the first to the EOS, has the teacher's distribution
    assert trained[at:] == teacher_tokens and teacher_tokens[-1] == tokenizer.convert_tokens_to_ids(tokenizer.eos_token)


def test_a_generation_prompt_that_opens_the_reasoning_block_is_not_repeated(tiny_r1_path: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    tokenizer.chat_template = tokenizer.chat_template.replace("{{'<｜Assistant｜>'}}{% endif %}",
                                                              "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<think>\n"), prompt
    ids, start = scored_sequence(tokenizer, [{"role": "user", "content": "q"}], TRACE)
    assert tokenizer.decode(ids).count("<think>") == 1


# ---- teachers: the same log-probs from each kind --------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_teacher(demo_model_path: str):
    from distillery.reasoning.teachers import HFTeacher

    teacher = HFTeacher(demo_model_path)
    yield teacher
    teacher.close()


@pytest.fixture(scope="module")
def trace_ids(demo_model_path: str) -> tuple[list[int], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    return scored_sequence(tokenizer, [{"role": "user", "content": "What is 2 + 3 apples?"}], TRACE)


def test_the_gguf_teacher_gives_the_hf_teachers_top_k(hf_teacher, trace_ids) -> None:
    from distillery.core.models import bundled_gguf
    from distillery.reasoning.teachers import GGUFTeacher

    ids, start = trace_ids
    gguf = GGUFTeacher(bundled_gguf("SmolLM2-135M-Instruct"), 1024)
    try:
        from_gguf = gguf.top_logprobs(ids, start, 8)
    finally:
        gguf.close()
    from_hf = hf_teacher.top_logprobs(ids, start, 8)
    assert from_gguf.tokens.tolist() == from_hf.tokens.tolist() == ids[start:]
    # The HF teacher is the bundled GGUF's Q4_1 weights dequantized: the same distribution up to kernel rounding.
    assert np.mean(from_gguf.ids[:, 0] == from_hf.ids[:, 0]) >= 0.9
    assert np.abs(from_gguf.logprobs[:, 0].astype(float) - from_hf.logprobs[:, 0].astype(float)).mean() < 0.15


class EchoServer:
    """An OpenAI-compatible completions endpoint the way vLLM answers `echo` + `logprobs` with
    `return_tokens_as_token_ids`, its numbers computed by the real model (only the HTTP server is a stand-in)."""

    def __init__(self, teacher, corrupt_echo: bool = False):
        self.teacher, self.corrupt_echo = teacher, corrupt_echo
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/completions" and body["echo"] and body["return_tokens_as_token_ids"]
                ids, k = body["prompt"], body["logprobs"]
                top = outer.teacher.top_logprobs(ids, 1, k)
                echoed = list(ids)
                if outer.corrupt_echo:
                    echoed[3] += 1
                tops = [None] + [{f"token_id:{i}": float(v) for i, v in zip(row_ids, row_values)}
                                 for row_ids, row_values in zip(top.ids.tolist(), top.logprobs.tolist())]
                reply = {"choices": [{"text": "", "logprobs": {"tokens": [f"token_id:{i}" for i in echoed],
                                                                "top_logprobs": tops}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def close(self) -> None:
        self.server.shutdown()


def test_the_openai_teacher_reads_the_servers_echoed_log_probs_after_the_round_trip(hf_teacher, trace_ids,
                                                                                   demo_model_path: str) -> None:
    from transformers import AutoTokenizer

    from distillery.reasoning.teacher_logprobs import Scorer
    from distillery.reasoning.teachers import OpenAITeacher

    ids, start = trace_ids
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    for corrupt in (False, True):
        server = EchoServer(hf_teacher, corrupt_echo=corrupt)
        teacher = OpenAITeacher(server.url, "stub", "NO_KEY", 30.0, 0)
        try:
            Scorer(teacher, tokenizer, 8)  # a server's vocabulary is checked by the round trip of every request
            got = teacher.top_logprobs(ids, start, 8)
        finally:
            teacher.close()
            server.close()
        if corrupt:
            assert isinstance(got, Unscored) and got.reason.startswith("round trip: echoed token 3")
        else:
            want = hf_teacher.top_logprobs(ids, start, 8)
            assert got.ids.tolist() == want.ids.tolist() and np.allclose(got.logprobs, want.logprobs, atol=1e-3)


def test_a_trace_the_completions_endpoint_refuses_is_unscored_and_distill_goes_on() -> None:
    """A kept trace read whole (question, first reply, feedback, revision) can be longer than the teacher's context
    though each chat request fitted: the 400 concerns that trace, which trains on cross-entropy only, as documented
    for a failed round trip; it was a UserError that stopped distill, blaming the URL, model and key."""
    from distillery.reasoning.teachers import OpenAITeacher
    from tests.fixtures.http_faults import FaultServer, send

    error = {"error": {"message": "This model's maximum context length is 2048 tokens, you requested 2300"}}
    server = FaultServer(lambda handler, n: send(handler, json.dumps(error).encode(), status=400))
    teacher = OpenAITeacher(server.url, "stub", "NO_KEY", 30.0, 0)
    try:
        got = teacher.top_logprobs([1, 2, 3, 4], 1, 4)
    finally:
        teacher.close()
        server.close()
    assert isinstance(got, Unscored) and got.reason.startswith("refused by the teacher (HTTP 400): ")
    assert "maximum context length is 2048" in got.reason


def test_echoed_text_tokens_map_to_ids_and_missing_top_log_probs_are_unscored(demo_model_path: str) -> None:
    from transformers import AutoTokenizer

    from distillery.reasoning.teacher_logprobs import token_id_mapper

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    token_id = token_id_mapper(tokenizer)
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    reply = {"tokens": pieces, "top_logprobs": [None, {pieces[1]: -0.5, "token_id:7": -1.5}]}
    got = openai_top_k(reply, ids, 1, 2, token_id)
    assert got.ids.tolist() == [[ids[1], 7]]
    assert isinstance(openai_top_k(reply, ids, 1, 3, token_id), Unscored)


def test_a_hostile_servers_echo_scores_nothing_and_never_raises(demo_model_path: str) -> None:
    from transformers import AutoTokenizer

    from distillery.reasoning.teacher_logprobs import token_id_mapper

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    token_id = token_id_mapper(tokenizer)
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    echoed = [f"token_id:{i}" for i in ids]
    replies = {
        "not a dict": ["tokens"],
        "tokens not text": {"tokens": [1, 2], "top_logprobs": [None, {"a": -1.0}]},
        "a top that is a list": {"tokens": echoed, "top_logprobs": [None, [1, 2]]},
        "a value that is text": {"tokens": echoed, "top_logprobs": [None, {"token_id:5": "x", "token_id:6": -1}]},
        "NaN": {"tokens": echoed, "top_logprobs": [None, {"token_id:5": float("nan"), "token_id:6": -1.0}]},
        "positive": {"tokens": echoed, "top_logprobs": [None, {"token_id:5": 50.0, "token_id:6": -1.0}]},
        "an id past the vocabulary": {"tokens": echoed,
                                      "top_logprobs": [None, {"token_id:99999999": -0.1, "token_id:6": -1.0}]},
        "nothing": {},
        # from an adversarial review: one id twice (the KD loss went to -1.3, a KL below zero), and a row of
        # certainties (five log-probs of 0: a mass of 5, quietly renormalised)
        "one id written twice": {"tokens": echoed, "top_logprobs": [None, {"token_id:7": -0.1, "token_id:07": -0.2}]},
        "a mass past 1": {"tokens": echoed, "top_logprobs": [None, {"token_id:5": 0.0, "token_id:6": 0.0}]},
    }
    for name, reply in replies.items():
        assert isinstance(openai_top_k(reply, ids, 1, 2, token_id), Unscored), name
    rounded = {"tokens": echoed, "top_logprobs": [None, {"token_id:5": -0.0001, "token_id:6": -5.0}]}
    assert not isinstance(openai_top_k(rounded, ids, 1, 2, token_id), Unscored)  # rounding past 1 by a hair


# ---- the vocabulary check --------------------------------------------------------------------------------------


def test_a_teacher_of_another_tokenizer_is_refused_and_told_the_text_path(demo_model_path: str,
                                                                         tiny_r1_path: str) -> None:
    from transformers import AutoTokenizer

    smollm2, qwen = AutoTokenizer.from_pretrained(demo_model_path), AutoTokenizer.from_pretrained(tiny_r1_path)
    check_teacher_vocabulary(qwen, hf_encoder(AutoTokenizer.from_pretrained(tiny_r1_path)), "same")  # a match
    with pytest.raises(UserError, match=r"does not share the student's tokenizer .*objective: sft"):
        check_teacher_vocabulary(smollm2, hf_encoder(qwen), "qwen")


def test_a_teacher_with_a_padded_embedding_is_the_same_vocabulary(tmp_path: Path, tiny_r1_path: str) -> None:
    """R1-Distill-Qwen sizes pad their embeddings to 151,936 or 152,064 rows with one tokenizer: a match."""
    from transformers import AutoModelForCausalLM

    from distillery.training.on_policy import load_teacher

    padded = AutoModelForCausalLM.from_pretrained(tiny_r1_path)
    padded.resize_token_embeddings(152064)
    padded.save_pretrained(tmp_path / "teacher")
    student = AutoModelForCausalLM.from_pretrained(tiny_r1_path)
    job = type("Job", (), {"teacher_model": str(tmp_path / "teacher"), "precision": "fp32", "device": "cpu",
                           "trust_remote_code": False})()
    teacher = load_teacher(job, student)
    assert teacher.config.vocab_size == student.config.vocab_size == 151936
    assert teacher.get_input_embeddings().weight.shape[0] == 151936


def test_a_student_with_a_padded_embedding_gets_a_teacher_padded_alike(tmp_path: Path, tiny_r1_path: str) -> None:
    """From an adversarial review: a student padded past the teacher (152,064 against 151,936 rows) stopped in TRL's
    size check as 'a bug'. The teacher is padded to the student's rows and gives the padded ones no probability; its
    logits for real tokens are unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    from distillery.training.on_policy import PADDED_LOGIT, load_teacher

    student = AutoModelForCausalLM.from_pretrained(tiny_r1_path)
    student.resize_token_embeddings(152064)
    job = type("Job", (), {"teacher_model": tiny_r1_path, "precision": "fp32", "device": "cpu",
                           "trust_remote_code": False})()
    teacher = load_teacher(job, student)
    original = AutoModelForCausalLM.from_pretrained(tiny_r1_path, dtype=torch.float32)
    ids = torch.tensor([[5, 77, 1000, 151000]])
    with torch.no_grad():
        logits, reference = teacher(ids).logits, original(ids).logits
    assert teacher.config.vocab_size == 152064 and logits.shape[-1] == 152064
    assert torch.equal(logits[..., :151936], reference) and (logits[..., 151936:] == PADDED_LOGIT).all()
    assert torch.softmax(logits, -1)[..., 151936:].sum() == 0


# ---- the preset, end to end ------------------------------------------------------------------------------------

SMALL = ["--set", "distill.max_prompts=6", "--set", "distill.max_tokens=48", "--set", "finetune.max_steps=6",
         "--set", "finetune.save_steps=3", "--set", "finetune.sample_prompts=0", "--set", "evaluate.heldout.limit=3",
         "--set", "evaluate.heldout.generate=0", "--set", 'export.verify.prompts=["What is 12 + 7?"]',
         "--set", "export.verify.new_tokens=4", "--set", "export.outtype=q8_0"]


def cli(stage: str, tmp_path: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillery", stage, "-c", str(ROOT / "configs/distill-kd.yaml"),
                           "--set", f"run.root={tmp_path / 'runs'}", *SMALL, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def formatted(tmp_path_factory) -> Path:
    """The preset's ingest -> distill (top-20 log-probs from the GGUF teacher) -> format, once for this module."""
    root = tmp_path_factory.mktemp("kd")
    done = cli("format", root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def copy_of(formatted: Path, tmp_path: Path) -> Path:
    shutil.copytree(formatted / "runs", tmp_path / "runs")
    return tmp_path


@pytest.mark.integration
@pytest.mark.slow
def test_the_kd_preset_trains_and_the_student_learns_on_its_held_out_data(formatted: Path, tmp_path: Path) -> None:
    """Through evaluate's base and adapter: an adapter is exported the same way whatever objective trained it (the
    demo's, tests/e2e/test_demo.py), so the preset's export is not run again here."""
    run = copy_of(formatted, tmp_path) / "runs/distill-kd"
    distill = json.loads((run / "distill/report.json").read_text())
    assert distill["logprobs"]["k"] == 20 and distill["logprobs"]["records"] == distill["train_records"] > 0
    assert distill["logprobs"]["bytes_per_token"] == 124
    teacher = json.loads((run / "format/stats.json").read_text())["teacher_logprobs"]
    assert teacher["rows"] == distill["logprobs"]["records"] and teacher["unaligned"] == 0
    done = cli("evaluate", tmp_path, "--set", "evaluate.artifacts=[base,adapter]")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    summary = json.loads((run / "finetune/summary.json").read_text())
    assert summary["objective"] == "kd" and summary["steps"] == 6
    assert summary["last_loss"] < summary["first_loss"]
    heldout = json.loads((run / "evaluate/heldout.json").read_text())
    assert set(heldout) == {"base", "adapter"}
    assert heldout["adapter"]["overall"]["loss"] < heldout["base"]["overall"]["loss"]


@pytest.mark.integration
def test_kd_trains_under_unsloth_with_packing(formatted: Path, tmp_path: Path) -> None:
    copy_of(formatted, tmp_path)
    done = cli("finetune", tmp_path, "--set", "finetune.backend=unsloth", "--set", "finetune.packing=true",
               "--set", "finetune.max_steps=2", "--set", "finetune.batch_size=1", "--set", "finetune.sample_prompts=0")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/distill-kd/finetune/summary.json").read_text())
    assert summary["backend"] == "unsloth" and summary["objective"] == "kd" and summary["steps"] == 2
    assert math.isfinite(summary["last_loss"])


def stage_context(tmp_path: Path, *overrides: str):
    from rich.console import Console

    from distillery.config import load_config
    from distillery.core.rundir import RunDir
    from distillery.stage import StageContext

    cfg = load_config(ROOT / "configs/distill-kd.yaml", [f"run.root={tmp_path / 'runs'}", *overrides])
    return StageContext(cfg=cfg, run=RunDir(cfg.run.root, cfg.run.name), out=tmp_path / "out", console=Console())


def test_on_policy_generation_past_the_models_context_is_said(tmp_path: Path, tiny_r1_path: str) -> None:
    """The tiny Qwen2 has 4,096 positions: prompts of up to 4,000 tokens and 200 new ones run past them."""
    from rich.console import Console

    from distillery.stages.finetune import note_generation_past_context

    ctx = stage_context(tmp_path, "finetune.on_policy.max_new_tokens=200")
    ctx.console = Console(record=True, width=300)
    note_generation_past_context(ctx, tiny_r1_path, 3000)
    assert ctx.console.export_text() == ""
    note_generation_past_context(ctx, tiny_r1_path, 4000)
    said = " ".join(ctx.console.export_text().split())
    assert "on_policy generates up to 200 tokens after prompts of up to 4,000" in said
    assert "past the 4,096 positions" in said and "Lower finetune.on_policy.max_new_tokens to 96" in said


def test_kd_with_no_train_example_carrying_log_probs_is_refused_with_distills_reasons(tmp_path: Path) -> None:
    """From an adversarial review: a teacher of another tokenizer echoes other tokens, so distill scores no trace;
    kd then trained exit 0 as plain cross-entropy under kd's name."""
    from distillery.stages.finetune import check_teacher_rows

    ctx = stage_context(tmp_path)
    (ctx.run.stage_dir("format")).mkdir(parents=True)
    (ctx.run.stage_dir("distill")).mkdir(parents=True)
    stats = ctx.upstream("format", "stats")
    stats.write_text(json.dumps({"teacher_logprobs": {"k": 5, "rows": 0, "unaligned": 0}}))
    reason = "round trip: echoed token 0 is 'token_id:9' -> 9, sent 5"
    ctx.upstream("distill", "report").write_text(json.dumps({"logprobs": {
        "unscored": {"round trip": 4}, "unscored_examples": {"round trip": reason}}}))
    with pytest.raises(UserError, match=r"no train example has them \(distill could not score its traces: 4 x round "
                       r"trip: echoed token 0 .*share the student's tokenizer"):
        check_teacher_rows(ctx)
    stats.write_text(json.dumps({"teacher_logprobs": {"k": 5, "rows": 1, "unaligned": 3}}))
    check_teacher_rows(ctx)  # one row is kd on that row, cross-entropy on the rest: counted in format's report


def test_kd_without_the_teachers_log_probs_is_refused_before_training(tmp_path: Path) -> None:
    from distillery.stages.finetune import teacher_of

    with pytest.raises(UserError, match=r"format has none: set distill.enabled: true and distill.logprobs: 20"):
        teacher_of(stage_context(tmp_path), None)


def test_on_policy_is_refused_on_unsloth_with_the_backend_to_use(tmp_path: Path) -> None:
    """When the config loads, not when finetune starts after distill and format have run."""
    with pytest.raises(UserError, match=r"finetune: Value error, finetune.objective on_policy runs TRL's "
                                        r"DistillationTrainer, .* Set finetune.backend: hf"):
        stage_context(tmp_path, "finetune.objective=on_policy", "finetune.backend=unsloth")


def test_on_policy_with_a_teacher_of_another_tokenizer_is_refused(tmp_path: Path, tiny_r1_path: str) -> None:
    from transformers import AutoTokenizer

    from distillery.core.models import resolve_model_path
    from distillery.stages.finetune import teacher_of

    ctx = stage_context(tmp_path, "finetune.objective=on_policy", "finetune.on_policy.teacher=bundled:tiny-qwen2-r1")
    with pytest.raises(UserError, match=r"does not share the student's tokenizer"):
        teacher_of(ctx, AutoTokenizer.from_pretrained(resolve_model_path(ctx.cfg.model.path)))


@pytest.mark.integration
@pytest.mark.slow
def test_on_policy_changes_the_adapter_and_resumes_after_kill_9(formatted: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    copy_of(formatted, tmp_path)
    extra = ["--set", "finetune.objective=on_policy", "--set", "finetune.max_steps=4", "--set", "finetune.save_steps=2",
             "--set", "finetune.on_policy.max_new_tokens=16", "--set", "finetune.batch_size=2"]
    command = [sys.executable, "-m", "distillery", "finetune", "-c", str(ROOT / "configs/distill-kd.yaml"),
               "--set", f"run.root={tmp_path / 'runs'}", *SMALL, *extra]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    marker = tmp_path / "runs/distill-kd/.finetune.partial/checkpoints/checkpoint-2" / COMPLETE
    try:
        deadline = time.time() + 400
        while not marker.is_file():
            assert process.poll() is None and time.time() < deadline, "no checkpoint-2 before the deadline"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done = cli("finetune", tmp_path, *extra)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "resuming from checkpoint-" in " ".join(done.stdout.split())
    out = tmp_path / "runs/distill-kd/finetune"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "on_policy" and summary["steps"] == 4 and summary["resumed_from_step"] >= 2
    weights = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # moved away from the zero init


@pytest.mark.parametrize("mode, ids", [("add", ["a", "b", "a-trace"]), ("replace", ["b", "a-trace"])])
def test_distilled_records_join_or_replace_the_records_they_came_from(tmp_path: Path, mode: str, ids: list) -> None:
    from distillery.core.records import write_jsonl
    from distillery.stages.format import load_records

    ctx = stage_context(tmp_path, f"format.distilled={mode}")
    said = {"task": "qa", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    for stage, rows in (("ingest", [{"id": "a", **said}, {"id": "b", **said}]),
                        ("distill", [{"id": "a-trace", **said, "meta": {"distill": {"from_id": "a"}}}])):
        ctx.run.stage_dir(stage).mkdir(parents=True)
        write_jsonl(ctx.run.stage_dir(stage) / "train.jsonl", rows)
    assert [r["id"] for r in load_records(ctx, "train")] == ids


def test_on_policy_lmbda_chooses_each_step_from_the_seed_and_references_are_the_training_tokens(
        demo_model_path: str) -> None:
    from transformers import AutoTokenizer

    from distillery.training.on_policy import on_policy_step, reference_completions
    from distillery.training.tokens import training_example

    assert all(on_policy_step(7, step, 1.0) for step in range(50))
    assert not any(on_policy_step(7, step, 0.0) for step in range(50))
    draws = [on_policy_step(7, step, 0.5) for step in range(400)]
    assert 150 < sum(draws) < 250 and draws == [on_policy_step(7, step, 0.5) for step in range(400)]  # a resume agrees
    assert draws != [on_policy_step(8, step, 0.5) for step in range(400)]
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    rows = [{"prompt": prompt, "completion": "5.<|im_end|>"}, {"prompt": prompt, "completion": "Five.<|im_end|>"}]
    references = reference_completions(rows, tokenizer, 512)
    for row, ids in zip(rows, references[prompt]):
        example = training_example(tokenizer, row["prompt"], row["completion"], 512)
        assert ids == [t for t, m in zip(example["input_ids"], example["completion_mask"]) if m] and ids


def test_the_trl_method_lmbda_replaces_is_the_one_trl_generates_with() -> None:
    """on_policy.lmbda swaps the student's generations for format's completions in DistillationTrainer's
    `_generate_single_turn`: if TRL renamed or bypassed it, lmbda < 1 would silently train fully on-policy."""
    import inspect

    from trl import DistillationTrainer

    assert "self._generate_single_turn(prompt_ids" in inspect.getsource(DistillationTrainer._generate)
    assert list(inspect.signature(DistillationTrainer._generate_single_turn).parameters)[:2] == ["self", "prompt_ids"]
