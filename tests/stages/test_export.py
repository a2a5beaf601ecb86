"""Export stage on the real demo model: verified merge and GGUFs, Modelfiles, chat, push --dry-run, resume
after a kill, and every bad input ending in one clear message (exit 2 through the CLI)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.core.rundir import RunDir
from distillery.runner import run_stage
from tests.fixtures.adapter_run import demo_config, make_adapter_run

ROOT = Path(__file__).resolve().parents[2]
# One short prompt and a few answer tokens keep the verification cheap on CPU; the checks are the same.
FAST_VERIFY = {"verify": {"prompts": ["What is 12 + 7?"], "new_tokens": 4}}
STEM = "SmolLM2-135M-Instruct"


def cli(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; a wide console so that rich does not wrap the messages tested for."""
    env = {**(env if env is not None else os.environ), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "distillery", *args], cwd=cwd, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=600)


KILL_SCRIPT = """
import sys
from distillery.config import load_config
from distillery.runner import run_stage
run_stage("export", load_config(sys.argv[1]))
"""


def kill_while_converting(config: Path, run: RunDir) -> dict[str, bool]:
    """Start the export in its own process group (so that the kill also reaches the converter subprocess it
    starts) and kill -9 it while the converter is writing the first GGUF: its temp file exists, the final name
    does not. What the run directory holds then."""
    partial = run.partial_dir("export")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(config)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and not list((partial / "gguf").glob(".*.gguf.tmp")):
        assert proc.poll() is None, "the export ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"stage dir": run.stage_dir("export").exists(), "final gguf": bool(list(partial.rglob("*.gguf"))),
            "merge kept": (partial / "merged" / "config.json").is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_model_path: str) -> tuple[Path, RunDir, dict[str, bool]]:
    """The demo model's export, killed while converting, run again and stopped (Ctrl-C) while it writes its reports,
    then run again to the end (one export, not three, for the tests of the finished export and of the
    interruptions)."""
    from distillery.stages import export

    tmp = tmp_path_factory.mktemp("export")
    run = make_adapter_run(tmp / "runs", demo_model_path)
    config = demo_config(tmp, **FAST_VERIFY)
    killed = kill_while_converting(config, run)

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(export, "print_summary", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_stage("export", load_config(config))
    killed["ggufs kept"] = sorted(p.name for p in (run.partial_dir("export") / "gguf").glob("*.gguf"))
    status, _, _ = run_stage("export", load_config(config))
    assert status == "done"
    return config, run, killed


@pytest.mark.integration
@pytest.mark.slow
def test_export_writes_verified_merged_model_and_ggufs(exported, demo_model_path: str) -> None:
    _, run, _ = exported
    out = run.stage_dir("export")
    assert sorted(p.name for p in (out / "gguf").iterdir()) == [
        f"{STEM}-Q4_K_M.Modelfile", f"{STEM}-Q4_K_M.gguf", f"{STEM}-Q8_0.Modelfile", f"{STEM}-Q8_0.gguf"]
    merged = out / "merged"
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in merged.iterdir()}
    assert list(merged.glob("*.safetensors"))
    training_template = (run.stage_dir("format") / "chat_template.jinja").read_text()
    assert (merged / "chat_template.jinja").read_text() == training_template
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and verify["merge"]["passed"]
    assert verify["ollama"] == {"template": True, "warning": None}  # ChatML: every Modelfile has its TEMPLATE
    tensors, merge = verify["merge"]["tensors"], verify["merge"]["distributions"]
    assert tensors["passed"] and tensors["targeted"] == tensors["adapted_weights"] > 0 and tensors["weights_changed"] > 0
    assert merge["merged_vs_base_plus_adapter"]["mean_kl"] < 0.5 * merge["base_vs_base_plus_adapter"]["mean_kl"]
    assert set(verify["gguf"]) == {"f16", "q8_0", "q4_k_m"}
    f16 = verify["gguf"]["f16"]
    assert f16["mean_kl"] <= 0.02 and f16["top1_agreement"] >= 0.9 and all(f16["checks"].values())
    for name in ("q8_0", "q4_k_m"):
        assert verify["gguf"][name]["checks"] == {"loads": True, "chat_template": True, "eos": True,
                                                  "tokenizer": True, "kl": True}
    assert (out / "verify.png").stat().st_size > 1000 and "q4_k_m" in (out / "report.md").read_text()
    assert not (out / "gguf" / f"{STEM}-F16.gguf").exists()  # the intermediate is dropped unless asked for
    assert not run.partial_dir("export").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_gguf_carries_the_training_template_and_eos(exported) -> None:
    from distillery.export.llama_child import LlamaChild

    _, run, _ = exported
    with LlamaChild(run.stage_dir("export") / "gguf" / f"{STEM}-Q4_K_M.gguf", "reading", n_ctx=128) as llama:
        meta = llama.metadata
    assert meta["chat_template"] == (run.stage_dir("format") / "chat_template.jinja").read_text()
    assert meta["eos_token"] == "<|im_end|>"


@pytest.mark.integration
@pytest.mark.slow
def test_rerun_is_up_to_date(exported) -> None:
    config, _, _ = exported
    status, _, _ = run_stage("export", load_config(config))
    assert status == "up to date"


@pytest.mark.integration
@pytest.mark.slow
def test_chat_answers_one_prompt_with_the_exported_gguf(exported) -> None:
    config, _, _ = exported
    result = cli("chat", "-c", str(config), "-p", "What is 12 + 7?", "--max-tokens", "12")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{STEM}-Q4_K_M.gguf" in result.stdout
    answer = result.stdout.strip().splitlines()[-1]
    assert answer.strip() and "<|im_end|>" not in answer


@pytest.mark.integration
@pytest.mark.slow
def test_interactive_chat_streams_answers_and_keeps_the_conversation(exported) -> None:
    config, _, _ = exported
    result = subprocess.run([sys.executable, "-m", "distillery", "chat", "-c", str(config), "--gguf", "q8_0",
                             "--max-tokens", "8"], cwd=ROOT, input="Hello!\nAnd again?\n/exit\n",
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{STEM}-Q8_0.gguf" in result.stdout and result.stdout.count("model> ") == 2


@pytest.mark.integration
@pytest.mark.slow
def test_chat_with_an_unknown_gguf_lists_the_available_ones(exported) -> None:
    config, _, _ = exported
    result = cli("chat", "-c", str(config), "-p", "hi", "--gguf", "q5_k_m")
    assert result.returncode == 2 and f"{STEM}-Q8_0.gguf" in result.stdout and "Traceback" not in result.stdout


@pytest.mark.parametrize("max_tokens, temperature, context, says", [
    (0, 0.0, 4096, "--max-tokens 0: an answer is at least 1 token"), (-3, 0.0, 4096, "--max-tokens -3"),
    (256, -1.0, 4096, "--temperature -1.0: a temperature is a finite number, 0 or more"),
    (256, float("nan"), 4096, "--temperature nan"), (256, float("inf"), 4096, "--temperature inf"),
    (256, 0.0, 0, "--context 0: llama.cpp's context holds the conversation and the answer; pass from 64 to"),
    (256, 0.0, 1 << 32, "--context 4294967296: llama.cpp's context holds the conversation and the answer")])
def test_chat_refuses_a_length_temperature_or_context_llama_cpp_would_misread(
        tmp_path: Path, max_tokens: int, temperature: float, context: int, says: str) -> None:
    """--max-tokens 0 or below answered until the context was full; a negative temperature sampled garbage;
    llama-cpp-python reads a context of 0 as the model's own (up to 128k tokens of cache for R1), and 2**32 wrapped
    to 0."""
    from distillery.commands.chat import chat
    from distillery.core.console import console

    with pytest.raises(UserError, match=re.escape(says)):  # before any GGUF is looked for: this run has none
        chat(load_config(demo_config(tmp_path)), console, None, "hi", None, max_tokens, temperature, context)


@pytest.mark.parametrize("prompt, system, says", [("caf\udce9", None, "--prompt is not UTF-8 text (byte 0xe9 at "
                                                   "character 4)"), ("hi", "\udcff", "--system is not UTF-8 text")])
def test_chat_refuses_a_prompt_that_is_not_utf8_naming_the_byte(tmp_path: Path, prompt: str, system: str | None,
                                                                says: str) -> None:
    """A Latin-1 terminal's byte (kept by Python as a lone surrogate) ended the chat as an unexpected
    UnicodeEncodeError, exit 1."""
    from distillery.commands.chat import chat
    from distillery.core.console import console

    with pytest.raises(UserError, match=re.escape(says)):
        chat(load_config(demo_config(tmp_path)), console, None, prompt, system, 16, 0.0)


def test_an_interactive_message_that_is_not_utf8_is_asked_for_again() -> None:
    """The conversation goes on: such a message was an unexpected error that ended the chat and lost it."""
    from distillery.commands.chat import read_message

    class Terminal:
        def __init__(self, *lines):
            self.lines, self.printed = list(lines), []

        def input(self, prompt: str) -> str:
            line = self.lines.pop(0)
            if isinstance(line, Exception):
                raise line
            return line

        def print(self, text: str) -> None:
            self.printed.append(text)

    terminal = Terminal("caf\udce9", UnicodeDecodeError("utf-8", b"\xc7\xd1", 0, 1, "invalid"), "hi", "/exit")
    assert read_message(terminal) == "hi" and read_message(terminal) is None
    assert ["byte 0xe9 at character 4" in terminal.printed[0], "byte 0xc7" in terminal.printed[1]] == [True, True]


@pytest.mark.integration
@pytest.mark.slow
def test_push_uploads_through_the_hub_api_without_leaking_the_token(exported, monkeypatch, capsys) -> None:
    import huggingface_hub

    from distillery.commands import push as push_command
    from distillery.commands.push import push
    from distillery.core.console import console

    config, run, _ = exported
    # the fixture's ingest, format and finetune are not real stages: push's check of them is in test_tiny_chatml.py
    monkeypatch.setattr(push_command, "first_out_of_date", lambda target, cfg: None)
    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))

        def create_commit(self, **kwargs):
            calls.append(("create_commit", kwargs))

    secret = "hf_test_secret_token_123"
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", secret)
    cfg = load_config(config, ["push.repo_id=me/demo-distilled", "push.upload=[gguf]", "push.gguf_types=[q4_k_m]"])
    result = push(cfg, console)
    assert result["uploaded"]
    assert calls[0] == ("init", secret)
    assert calls[1] == ("create_repo", {"repo_id": "me/demo-distilled", "repo_type": "model", "private": True,
                                        "exist_ok": True})
    commit = calls[2][1]
    assert commit["repo_id"] == "me/demo-distilled"
    assert sorted(op.path_in_repo for op in commit["operations"]) == [
        "README.md", f"{STEM}-Q4_K_M.Modelfile", f"{STEM}-Q4_K_M.gguf"]
    written = "".join(p.read_text() for p in (run.path / "push").iterdir())
    assert secret not in written and secret not in capsys.readouterr().out
    assert secret not in (run.path / "config.yaml").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_push_without_a_token_lists_the_files_and_uploads_nothing(exported, monkeypatch) -> None:
    from distillery.commands import push as push_command
    from distillery.commands.push import push
    from distillery.core.console import console

    config, run, _ = exported
    monkeypatch.setattr(push_command, "first_out_of_date", lambda target, cfg: None)  # as above
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match="no Hugging Face token: set HF_TOKEN"):
        push(load_config(config, ["push.repo_id=me/x"]), console)
    plan = json.loads((run.path / "push" / "upload_plan.json").read_text())
    assert f"{STEM}-Q8_0.gguf" in {f["path_in_repo"] for f in plan["files"]}
    assert (run.path / "push" / "README.md").is_file()


def finished_export(tmp_path: Path, files: dict[str, bytes], passed: bool = True) -> RunDir:
    """A run whose export finished with these GGUFs (type -> content) recorded in summary.json and verify.json."""
    run = RunDir(tmp_path / "runs", "demo")
    gguf = run.stage_dir("export") / "gguf"
    gguf.mkdir(parents=True)
    for quant, content in files.items():
        (gguf / f"{STEM}-{quant.upper()}.gguf").write_bytes(content)
    results = {q: {"file": f"{STEM}-{q.upper()}.gguf", "bytes": len(c), "passed": passed} for q, c in files.items()}
    (run.stage_dir("export") / "verify.json").write_text(json.dumps({"gguf": results, "passed": passed}))
    (run.stage_dir("export") / "summary.json").write_text(json.dumps(
        {"files": {q: r["file"] for q, r in results.items()}, "passed": passed}))
    run.update_stage("export", {"status": "complete", "fingerprint": "fixture-export"})
    return run


def test_push_takes_only_the_ggufs_export_verified_and_refuses_changed_ones(tmp_path: Path, monkeypatch) -> None:
    from distillery.commands import push as push_command
    from distillery.commands.push import push, upload_plan
    from distillery.core.console import console

    # the fixture's stages have no real fingerprints; push's check of them is in tests/e2e/test_tiny_chatml.py
    monkeypatch.setattr(push_command, "first_out_of_date", lambda target, cfg: None)

    run = finished_export(tmp_path, {"q8_0": b"GGUF q8", "q4_k_m": b"GGUF q4"})
    gguf = run.stage_dir("export") / "gguf"
    (gguf / f"{STEM}-Q5_K_M.gguf").write_bytes(b"GGUF from an earlier export")  # not in summary.json
    cfg = load_config(demo_config(tmp_path), ["push.upload=[gguf]"])
    assert [p["path_in_repo"] for p in upload_plan(cfg, run)] == [f"{STEM}-Q4_K_M.gguf", f"{STEM}-Q8_0.gguf"]
    only = load_config(demo_config(tmp_path), ["push.upload=[gguf]", "push.gguf_types=[Q4_K_M]"])
    assert [p["path_in_repo"] for p in upload_plan(only, run)] == [f"{STEM}-Q4_K_M.gguf"]
    (gguf / f"{STEM}-Q8_0.gguf").write_bytes(b"GGUF q8, rewritten after the export")
    with pytest.raises(UserError, match=rf"{STEM}-Q8_0.gguf is not the GGUF the export verified"):
        push(cfg, console, dry_run=True)


@pytest.mark.parametrize("change, named", [
    (lambda export: (export / "summary.json").write_text('{"files": {"q8_0": "../../elsewhere.gguf"'), "summary.json"),
    (lambda export: (export / "merged" / "config.json").write_text('{"edited": true}'), "merged/config.json"),
    (lambda export: (export / "merged" / "notes.txt").write_text("a file dropped in later"), "merged/notes.txt"),
    (lambda export: (export / "merged" / "config.json").unlink(), "merged/config.json")])
def test_push_refuses_an_export_changed_after_it_finished(tmp_path: Path, change, named: str) -> None:
    """An edited summary.json was an unexpected JSONDecodeError (exit 1); merged/ was uploaded as it stood, edited
    or with files added after the export verified it."""
    from distillery.commands.push import export_dir, upload_plan
    from distillery.core.rundir import describe_outputs

    run = finished_export(tmp_path, {"q8_0": b"GGUF q8"})
    export = run.stage_dir("export")
    (export / "merged").mkdir()
    (export / "merged" / "config.json").write_text("{}")
    run.update_stage("export", {"status": "complete", "fingerprint": "x", "outputs": describe_outputs(export)})
    assert export_dir(run) == export and len(upload_plan(load_config(demo_config(tmp_path)), run)) == 2  # as it was
    change(export)
    with pytest.raises(UserError, match=rf"export/{named} is not as the export left it .*Run `distillery export`"):
        export_dir(run)  # what push checks first


def test_push_refuses_the_files_of_an_earlier_export_while_the_last_one_did_not_finish(tmp_path: Path) -> None:
    """A re-export that failed leaves the earlier export's files and entry in place (the runner records the attempt
    beside it): push would upload them with a card of the new config."""
    from distillery.commands.push import export_dir

    run = finished_export(tmp_path, {"q8_0": b"GGUF q8"})
    entry = run.stage_entry("export")
    run.update_stage("export", {**entry, "attempt": {"status": "failed", "fingerprint": "y", "error": "UserError: x"}})
    with pytest.raises(UserError, match=r"the last export in .* did not finish \(failed: UserError: x\): run "
                                        r"`distillery export` \(just export-gguf\) first"):
        export_dir(run)


def test_push_refuses_an_export_that_did_not_pass_or_a_type_it_did_not_write(tmp_path: Path) -> None:
    from distillery.commands.push import upload_plan

    failed = finished_export(tmp_path / "failed", {"q8_0": b"GGUF"}, passed=False)
    with pytest.raises(UserError, match="does not record an export that passed verification"):
        upload_plan(load_config(demo_config(tmp_path / "failed"), ["push.upload=[gguf]"]), failed)
    run = finished_export(tmp_path, {"q8_0": b"GGUF"})
    cfg = load_config(demo_config(tmp_path), ["push.upload=[gguf]", "push.gguf_types=[q4_k_m]"])
    with pytest.raises(UserError, match=r"push.gguf_types: q4_k_m was not exported in this run \(it has q8_0\)"):
        upload_plan(cfg, run)


# --- bad input: each one a UserError before anything is written -------------------------------------------


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, demo_model_path: str) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    make_adapter_run(tmp / "runs", demo_model_path)
    return tmp


def test_no_adapter_says_run_finetune_first(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "runs", "demo")
    run.stage_dir("finetune").mkdir(parents=True)
    run.update_stage("finetune", {"status": "complete", "fingerprint": "x"})
    with pytest.raises(UserError, match=r"no LoRA adapter in .*finetune/adapter .*run `distillery finetune`"):
        run_stage("export", load_config(demo_config(tmp_path)))
    assert not run.partial_dir("export").exists() and not run.stage_dir("export").exists()


def test_unknown_quant_type_exits_2_listing_valid_types(tmp_path: Path) -> None:
    result = cli("export", "-c", str(demo_config(tmp_path)), "--set", "export.quantizations=[q4_k_m, q9_x]")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "unknown GGUF quant type 'q9_x'" in result.stdout and "q5_k_m" in result.stdout


@pytest.mark.integration
def test_i_quant_without_imatrix_is_refused(adapter_run: Path) -> None:
    cfg = load_config(demo_config(adapter_run, quantizations=["iq2_xxs"]))
    with pytest.raises(UserError, match="iq2_xxs need an importance matrix: set export.imatrix"):
        run_stage("export", cfg)


@pytest.mark.integration
def test_too_little_free_disk_is_refused_before_writing(adapter_run: Path) -> None:
    cfg = load_config(demo_config(adapter_run, min_free_disk_gb=10_000_000))
    with pytest.raises(UserError, match=r"not enough free disk .* needs about [\d.]+ GiB"):
        run_stage("export", cfg)
    run = RunDir(adapter_run / "runs", "demo")
    assert not run.partial_dir("export").exists() and not run.stage_dir("export").exists()


def test_the_disk_check_of_a_resumed_export_counts_only_what_is_left_to_write(tmp_path: Path, monkeypatch) -> None:
    """A 10 GiB base: a fresh export needs the merge, the F16 intermediate and both quants; one resumed after the
    merge and the Q8_0 file needs only the F16 and Q4_K_M files, and fits a disk the fresh one does not."""
    import shutil
    from collections import namedtuple

    from distillery.config import ExportConfig
    from distillery.export.gguf import QuantType
    from distillery.stages import export

    cfg, weights = ExportConfig(min_free_disk_gb=0), 10 * 2**30
    types = (QuantType.F16, [QuantType.Q8_0, QuantType.Q4_K_M])
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    for out in (fresh, resumed):
        (out / "gguf").mkdir(parents=True)
    (resumed / "merged").mkdir()
    (resumed / "merged" / "config.json").write_text("{}")
    (resumed / "gguf" / "m-Q8_0.gguf").write_bytes(b"GGUF")
    assert export.still_to_write(fresh, "m", *types) == ["merged", "f16", "q8_0", "q4_k_m"]
    assert export.still_to_write(resumed, "m", *types) == ["f16", "q4_k_m"]
    left = 1.05 * (weights / 2) * (16 + 4.9) / 8  # the F16 and Q4_K_M files
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("Usage", "free")(left + 2**30))
    assert export.check_free_disk(cfg, resumed, weights, export.still_to_write(resumed, "m", *types))[
        "needed_gib"] == round(left / 2**30, 2)
    with pytest.raises(UserError, match=r"needs about 29\.8 GiB \(still to write: merged, f16, q8_0, q4_k_m;"):
        export.check_free_disk(cfg, fresh, weights, export.still_to_write(fresh, "m", *types))


def test_a_prequantized_base_exports_from_its_16_bit_original_or_is_refused_before_writing(
        tmp_path: Path, demo_model_path: str) -> None:
    """A QLoRA run on a base published in 4 bits: without its original 16-bit weights the export writes nothing;
    with them (export.base_16bit) the streamed merge goes onto them and passes the check against them."""
    from distillery.core.summaries import read_finetune_summary
    from distillery.export import merge
    from tests.export.test_merge import prequantized_base

    run = make_adapter_run(tmp_path / "runs", demo_model_path)
    summary_path = run.stage_dir("finetune") / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["base_model"] = str(prequantized_base(tmp_path / "SmolLM2-bnb-4bit", demo_model_path))
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(UserError, match=r"stored quantized \(bitsandbytes\).*set export.base_16bit"):
        run_stage("export", load_config(demo_config(tmp_path, **FAST_VERIFY)))
    assert not run.partial_dir("export").exists() and not run.stage_dir("export").exists()
    original = merge.original_16bit(summary["base_model"], demo_model_path)
    merged, adapter = tmp_path / "merged", run.stage_dir("finetune") / "adapter"
    resolved = read_finetune_summary(summary_path).model_copy(update={"base_model": str(original)})
    assert merge.merge_adapter(resolved, adapter, merged, "bf16", "5GB")["method"] == "streamed"
    assert merge.check_merge(str(original), adapter, merged)["passed"]


def test_the_gguf_stem_is_a_local_base_directory_s_own_name_or_refused(tmp_path: Path, monkeypatch) -> None:
    """model.path `.` named the files '-Q4_K_M.gguf' (an option to the card's and Ollama's commands)."""
    from types import SimpleNamespace

    from distillery.stages.export import model_stem

    cfg = load_config(demo_config(tmp_path))
    (tmp_path / "smol-base" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "smol-base")
    for base in (".", "sub/..", "./"):
        assert model_stem(cfg, SimpleNamespace(base_model=base)) == "smol-base"
    assert model_stem(cfg, SimpleNamespace(base_model="Qwen/Qwen2.5-1.5B-Instruct")) == "Qwen2.5-1.5B-Instruct"
    for base in ("/", "org/" + "x" * 250):
        with pytest.raises(UserError, match=r"has no name the GGUF files can be named after .*set export.model_name"):
            model_stem(cfg, SimpleNamespace(base_model=base))
    named = load_config(demo_config(tmp_path), ["export.model_name=mine"])
    assert model_stem(named, SimpleNamespace(base_model="/")) == "mine"
    # a name with a line break wrote Modelfile lines of its own; `$(...)` went into the card's commands
    for base, stem in (("/m/Evil\nADAPTER evil.bin\nSYSTEM hacked", "Evil-ADAPTER-evil.bin-SYSTEM-hacked"),
                       ("/m/m $(id>&2)", "m-id-2"), ("/m/my model", "my-model")):
        assert model_stem(cfg, SimpleNamespace(base_model=base)) == stem
    with pytest.raises(UserError, match=r"has no name the GGUF files can be named after \('모델'\)"):
        model_stem(cfg, SimpleNamespace(base_model="/m/모델"))


def header_only_base(directory: Path, shapes: dict[str, list[int]]) -> Path:
    """A base of safetensors headers only: the memory estimate reads shapes, never weights."""
    header = json.dumps({name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in shapes.items()}).encode()
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return directory


@pytest.mark.parametrize("shapes, step, advice", [
    ({"model.embed_tokens.weight": [152_000, 64], "model.layers.0.mlp.up_proj.weight": [256, 64]}, "verify",
     "lower export.verify.prompts / export.verify.new_tokens"),
    ({"model.embed_tokens.weight": [1000, 64], "model.layers.0.mlp.up_proj.weight": [200_000, 8192]}, "convert",
     "llama.cpp's converter holds the largest tensor"),
])
def test_too_little_memory_is_refused_with_the_figures_and_advice_for_the_largest_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shapes: dict, step: str, advice: str) -> None:
    from distillery.config import ExportConfig
    from distillery.stages import export

    base = header_only_base(tmp_path / "base", shapes)
    cfg = ExportConfig(verify={"prompts": ["a"] * 8, "new_tokens": 256})
    needed = export.estimate_memory(base, 8, 256)
    assert needed["largest_step"] == step
    monkeypatch.setattr(export, "available_memory", lambda: needed["bytes"] + (1 << 30))
    assert export.check_memory(base, cfg)["largest_step"] == step
    monkeypatch.setattr(export, "available_memory", lambda: needed["bytes"] - (1 << 30))
    with pytest.raises(UserError) as refused:
        export.check_memory(base, cfg)
    message = str(refused.value)
    assert f"needs about {needed['bytes'] / 2**30:.1f} GiB" in message and f"largest step: {step}" in message
    assert f"{(needed['bytes'] - (1 << 30)) / 2**30:.1f} GiB are available" in message and advice in message
    assert ("export.verify" in message) == (step == "verify")


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory, demo_model_path: str) -> Path:
    """A tiny OPT model (an architecture llama.cpp's converter does not support) with the demo tokenizer."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    path = tmp_path_factory.mktemp("opt") / "tiny-opt"
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=49152, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=16)
    OPTForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(demo_model_path).save_pretrained(path)
    return path


@pytest.mark.integration
def test_unsupported_architecture_is_named_before_the_merge(tmp_path: Path, tiny_opt: Path) -> None:
    make_adapter_run(tmp_path / "runs", str(tiny_opt), target_modules=("q_proj", "v_proj"))
    with pytest.raises(UserError, match="does not support the architecture OPTForCausalLM"):
        run_stage("export", load_config(demo_config(tmp_path)))
    assert not RunDir(tmp_path / "runs", "demo").partial_dir("export").exists()


@pytest.mark.integration
def test_a_tokenizer_the_converter_does_not_know_is_refused_before_the_merge(tmp_path: Path, monkeypatch) -> None:
    """A model over SMALL_MODEL_BYTES gets the converter's dry run before its merge (minutes at 8B): a tokenizer
    llama.cpp has no pre-tokenizer entry for (a Llama here; Kanana's, say, before llama.cpp knows it) is refused
    with nothing merged, and the base model is left as it was."""
    from distillery.stages import export
    from tests.fixtures.tiny_lm import build_tiny_lm

    base = build_tiny_lm(tmp_path / "tiny")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    make_adapter_run(tmp_path / "runs", str(base), target_modules=("q_proj", "v_proj"))
    monkeypatch.setattr(export, "SMALL_MODEL_BYTES", 0)
    with pytest.raises(UserError) as refused:
        run_stage("export", load_config(demo_config(tmp_path)))
    message, run = str(refused.value), RunDir(tmp_path / "runs", "demo")
    assert "tokenizer (its pre-tokenizer) is not supported by this llama.cpp version" in message
    assert "said: NotImplementedError: BPE pre-tokenizer was not recognized" in message
    log = run.log_path("export-converter")  # the converter's whole output, named in the message
    assert str(log) in message and "Traceback" in log.read_text() and "get_vocab_base_pre" in log.read_text()
    partial = run.partial_dir("export")
    assert not (partial / "merged").exists() and not (partial / ".conversion-check").exists()
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


@pytest.mark.integration
def test_converter_error_for_unsupported_architecture_names_it(tmp_path: Path, tiny_opt: Path) -> None:
    from distillery.export.gguf import convert_to_gguf

    with pytest.raises(UserError, match="does not support the architecture OPTForCausalLM"):
        convert_to_gguf(tiny_opt, tmp_path / "x-F16.gguf", "f16", "x")
    assert list(tmp_path.iterdir()) == []


# --- interruption --------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_killed_export_leaves_no_final_file_and_a_rerun_completes_it(exported) -> None:
    _, run, killed = exported
    # killed: no stage directory, only the converter's temp file (never a final name), the finished merge kept;
    # stopped as it wrote its reports: every GGUF kept, the 16-bit one too (it was deleted first, and converted again)
    assert killed == {"stage dir": False, "final gguf": False, "merge kept": True,
                      "ggufs kept": [f"{STEM}-F16.gguf", f"{STEM}-Q4_K_M.gguf", f"{STEM}-Q8_0.gguf"]}
    verify = json.loads((run.stage_dir("export") / "verify.json").read_text())
    assert verify["passed"] and verify["timings"]["merge"] == {"resumed": True}
    assert not any(key.startswith(("convert", "quantize", "reference")) for key in verify["timings"]), verify["timings"]
    # stopped after its reports: every check it made holds for the same files, and none is made again
    assert {key: value for key, value in verify["timings"].items() if key.startswith("verify_")} == {
        "verify_merge_seconds": "reused", "verify_f16_seconds": "reused", "verify_q8_0_seconds": "reused",
        "verify_q4_k_m_seconds": "reused"}
    assert sorted(p.name for p in (run.stage_dir("export") / "gguf").glob("*.gguf")) == killed["ggufs kept"][1:]


@pytest.mark.parametrize("stage, name, content", [
    ("ingest", "report.json", b'{"decontamination": {"enabled": true, "sets'),  # cut short
    ("ingest", "report.json", b"[1, 2]"),
    ("ingest", "report.json", b'{"decontamination": {"enabled": true, "sets": "x"}}')])
def test_push_names_a_report_of_the_run_that_was_edited_or_cut_short(tmp_path: Path, stage: str, name: str,
                                                                     content: bytes, monkeypatch) -> None:
    """The model card reads ingest's and evaluate's reports: each of these was an unexpected error, exit 1."""
    from distillery.commands import push as push_command
    from distillery.commands.push import push
    from distillery.core.console import console

    monkeypatch.setattr(push_command, "first_out_of_date", lambda target, cfg: None)  # as above

    run = finished_export(tmp_path, {"q8_0": b"GGUF q8"})
    run.stage_dir(stage).mkdir(parents=True, exist_ok=True)
    (run.stage_dir(stage) / name).write_bytes(content)
    cfg = load_config(demo_config(tmp_path), ["push.upload=[gguf]", "push.repo_id=me/x"])
    with pytest.raises(UserError, match=rf"{stage}/{re.escape(name)} is not what `distillery {stage}` writes \(.*\): it "
                                        rf"was edited or cut short\. Run `distillery {stage} --force`"):
        push(cfg, console, dry_run=True)


def test_the_card_shows_only_an_evaluation_of_this_export_as_evaluate_left_it(tmp_path: Path, monkeypatch) -> None:
    """From an adversarial review: a comparison.md dropped into evaluate/ (no evaluate run), or an older one of
    another model, went into the card as the model's scores."""
    from distillery.commands import push as push_command
    from distillery.commands.push import evaluation_table
    from distillery.core.rundir import describe_outputs

    run = finished_export(tmp_path, {"q8_0": b"GGUF q8"})
    cfg = load_config(demo_config(tmp_path))
    monkeypatch.setattr(push_command, "first_out_of_date", lambda target, cfg: None)  # the fixture's stages
    evaluate = run.stage_dir("evaluate")
    evaluate.mkdir(parents=True)
    (evaluate / "comparison.md").write_text("| gguf | 0.99 (state of the art!) |\n")
    assert evaluation_table(cfg, run).startswith("Not evaluated yet")
    (evaluate / "comparison.md").write_text("| artifact | acc |\n| --- | --- |\n| base | 0.2 |\n")
    run.update_stage("evaluate", {"status": "complete", "fingerprint": "e", "outputs": describe_outputs(evaluate)})
    assert evaluation_table(cfg, run) == "| artifact | acc |\n| --- | --- |\n| base | 0.2 |"
    # the held-out table, each GGUF's check with it (from a review: the demo's card said "Not evaluated yet", its
    # evaluation being held-out data only, and a GGUF past the bound was uploaded without a word)
    scored = {"adapter": {"qa": {"items": 2, "loss": 1.0}}, "m-Q4_K_M": {"qa": {"items": 2, "loss": 1.5, "vs_reference": {
        "reference": "adapter", "loss_increase": 0.5, "passed": False}}}}
    (evaluate / "heldout.json").write_text(json.dumps(scored))
    (evaluate / "results.json").write_text(json.dumps({"heldout": {"reference": "adapter"}}))
    run.update_stage("evaluate", {"status": "complete", "fingerprint": "e", "outputs": describe_outputs(evaluate)})
    table = evaluation_table(cfg, run)
    assert table.startswith("### Held-out data (format's eval split, the training template)\n\n| task (items) | adapter |")
    assert "PAST THE BOUND: m-Q4_K_M on qa." in table and table.endswith("| base | 0.2 |")
    (evaluate / "comparison.md").unlink()
    run.update_stage("evaluate", {"status": "complete", "fingerprint": "e", "outputs": describe_outputs(evaluate)})
    assert evaluation_table(cfg, run).startswith("### Held-out data") and "| base | 0.2 |" not in evaluation_table(cfg, run)
    (evaluate / "comparison.md").write_text("| gguf | 0.99 (state of the art!) |\n")  # dropped in: not evaluate's
    assert "0.99" not in evaluation_table(cfg, run)
    run.update_stage("evaluate", {"status": "complete", "fingerprint": "e", "outputs": describe_outputs(evaluate)})
    (evaluate / "comparison.md").write_text("| gguf | 0.98 (state of the art!) |\n")
    assert evaluation_table(cfg, run).startswith("Not evaluated for this export and config")
    monkeypatch.setattr(push_command, "first_out_of_date", lambda target, cfg: "evaluate")
    (evaluate / "comparison.md").write_text("| artifact | acc |\n| --- | --- |\n| base | 0.2 |\n")
    run.update_stage("evaluate", {"status": "complete", "fingerprint": "e", "outputs": describe_outputs(evaluate)})
    assert evaluation_table(cfg, run).startswith("Not evaluated for this export and config")


def test_the_card_names_the_datasets_the_run_s_ingest_read_not_a_later_config_s(tmp_path: Path) -> None:
    """A config changed after training (another Hub dataset) put a dataset the model never saw in the card."""
    from distillery.commands.push import card_datasets

    run = finished_export(tmp_path, {"q8_0": b"GGUF q8"})
    trained = {"sources": [{"name": "gsm", "kind": "hf", "dataset": "openai/gsm8k"}, {"name": "mine", "kind": "hf"}]}
    run.update_stage("ingest", {"status": "complete", "fingerprint": "i", "inputs": {"config": {"ingest": trained}}})
    later = load_config(demo_config(tmp_path), ["ingest.sources.1.files=null", "ingest.sources.1.dataset=other/set",
                                                "push.datasets=[me/extra]"])
    assert card_datasets(later, run) == ["openai/gsm8k", "me/extra"]


def test_an_adapter_tokenizer_cut_short_is_one_message_naming_it(tmp_path: Path, demo_model_path: str) -> None:
    """A tokenizer.json cut short in the adapter ended export as 'an unexpected JSONDecodeError ... a bug'."""
    import shutil

    from distillery.stages.export import training_template

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(demo_model_path) / name).is_file():
            shutil.copy(Path(demo_model_path) / name, adapter / name)
    (adapter / "tokenizer.json").write_bytes((adapter / "tokenizer.json").read_bytes()[:1000])
    with pytest.raises(UserError, match=rf"the adapter's tokenizer in {re.escape(str(adapter))} cannot be loaded "
                                        r"\(JSONDecodeError: .*\); rerun `distillery finetune --force`"):
        training_template(None, adapter)


def test_an_adapter_merged_with_the_whole_model_counts_the_whole_model_in_the_memory_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """modules_to_save or a rank pattern makes the merge load the whole 16-bit model (PEFT's merge_and_unload), and
    the check counted only the streamed merge's row blocks: it passed, and the merge ran out of memory."""
    from distillery.config import ExportConfig
    from distillery.export import merge
    from distillery.stages import export

    base = header_only_base(tmp_path / "base", {"model.layers.0.mlp.up_proj.weight": [64, 64]})
    cfg = ExportConfig(verify={"prompts": ["a"], "new_tokens": 4})
    streamed = export.estimate_memory(base, 1, 4)
    whole = 8 << 30
    assert export.estimate_memory(base, 1, 4, whole)["bytes"] >= whole > streamed["bytes"]
    monkeypatch.setattr(export, "available_memory", lambda: 4 << 30)
    export.check_memory(base, cfg)  # streamed: its row blocks fit
    with pytest.raises(UserError, match=r"largest step: merge\) and 4\.0 GiB are available\. Close other programs, or "
                                        r"export on a machine with more memory: the adapter uses modules_to_save, so "
                                        r"the merge loads the whole 16-bit model"):
        export.check_memory(base, cfg, (whole, merge.why_whole_model({"modules_to_save": ["lm_head"]})))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"rank_pattern": {"q_proj": 4}, "r": 8}))
    assert export.unstreamed_merge(adapter) == "the adapter uses rank_pattern"
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    assert export.unstreamed_merge(adapter) == ""


@pytest.mark.integration
@pytest.mark.slow
def test_another_list_of_gguf_types_keeps_the_merge_and_the_ggufs_already_written(exported, tmp_path: Path,
                                                                                 capsys) -> None:
    """Dropping Q8_0 from export.quantizations merged, converted and quantized everything again (at 32B, minutes
    each): the merge and the Q4_K_M file are kept (the same file), Q8_0 goes, and every GGUF is verified again."""
    import shutil

    _, run, _ = exported
    shutil.copytree(run.path, tmp_path / "runs" / "demo", symlinks=True, copy_function=os.link)  # the same files
    config = demo_config(tmp_path, quantizations=["q4_k_m"], **FAST_VERIFY)
    out = RunDir(tmp_path / "runs", "demo").stage_dir("export")
    q4 = out / "gguf" / f"{STEM}-Q4_K_M.gguf"
    inode = q4.stat().st_ino
    assert run_stage("export", load_config(config))[0] == "done"
    said = " ".join(capsys.readouterr().out.split())
    assert (f"only export.quantizations changed since the last run: its gguf/{STEM}-Q4_K_M.gguf, merged/ (6 files), "
            "verify.json are kept") in said, said
    assert sorted(p.name for p in (out / "gguf").iterdir()) == [f"{STEM}-Q4_K_M.Modelfile", f"{STEM}-Q4_K_M.gguf"]
    assert q4.stat().st_ino == inode
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and verify["timings"]["merge"] == {"resumed": True} and set(verify["gguf"]) == {
        "f16", "q4_k_m"}
    assert not any(key.startswith("quantize") for key in verify["timings"]), verify["timings"]
    # the same merged files and Q4_K_M file, the same verification settings: their checks hold; the 16-bit GGUF,
    # converted again (it was not kept), is verified again
    assert verify["merge"]["reused"] and verify["gguf"]["q4_k_m"]["reused"] and "reused" not in verify["gguf"]["f16"]
    assert verify["timings"]["verify_merge_seconds"] == verify["timings"]["verify_q4_k_m_seconds"] == "reused"


def test_an_export_publishes_only_the_ggufs_it_writes_whatever_was_carried_over(tmp_path: Path) -> None:
    """From a review: GGUFs are carried over by type, and the name stem is not a setting (an older version gave a
    base directory "my model" the stem "my model", now "my-model"): the old files were published unverified."""
    from distillery.export.gguf import QuantType
    from distillery.stages.export import keep_only_requested

    for name in ("my model-Q4_K_M.gguf", "my-model-Q4_K_M.gguf", "my-model-Q8_0.gguf", "my-model-F16.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    keep_only_requested(tmp_path, "my-model", [QuantType.F16, QuantType.Q4_K_M])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model-F16.gguf", "my-model-Q4_K_M.gguf"]


def test_an_earlier_verification_holds_only_for_the_same_file_settings_and_merged_model(tmp_path: Path) -> None:
    """A GGUF's check is kept across a resume or a carry-over only while nothing it depended on changed: a file
    written again (another inode or time), other verification settings, another merged model, or a check that
    failed is made again."""
    from distillery.stages.export import earlier_result, file_identity

    gguf = tmp_path / "m-Q8_0.gguf"
    gguf.write_bytes(b"GGUF one")
    against = {"settings": {"prompts": ["a"], "new_tokens": 4}, "merged": {"model.safetensors": [1, 2, 3]}}
    result = {"file": gguf.name, "passed": True, "mean_kl": 0.01, "identity": file_identity(gguf)}
    earlier = {"verified_against": against, "gguf": {"q8_0": result}}
    assert earlier_result(earlier, against, "q8_0", gguf) == {**result, "reused": True}
    assert earlier_result(earlier, {**against, "settings": {"prompts": ["b"], "new_tokens": 4}}, "q8_0", gguf) is None
    assert earlier_result(earlier, {**against, "merged": {"model.safetensors": [1, 2, 4]}}, "q8_0", gguf) is None
    assert earlier_result({**earlier, "gguf": {"q8_0": {**result, "passed": False}}}, against, "q8_0", gguf) is None
    assert earlier_result(earlier, against, "q4_k_m", gguf) is None
    gguf.unlink()
    gguf.write_bytes(b"GGUF again")  # quantized again (the file system may give it the same inode)
    assert earlier_result(earlier, against, "q8_0", gguf) is None
