"""llama.cpp in a child process on the real bundled GGUF: metadata and tokens, a native crash that is an error
naming the file, the signal and what to try (also through the CLI), the setup self-check, and every quant type
the project writes decoding on this machine's CPU with F16's top-1 token."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distillery.export import gguf as gguf_io
from distillery.export import verify
from distillery.export import llama_check
from distillery.export.llama_child import GGUFLoadError, LlamaChild, greedy_decode, has_gguf_magic
from distillery.core.errors import UserError
from distillery.core.isolation import NativeCrash
from tests.evals.test_gguf_backend import bundled_gguf
from tests.fixtures.adapter_run import demo_config
from tests.fixtures.crash import crash_child_of

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of "
           "France is", "1, 2, 3, 4, 5, 6, 7, 8,"]
# Every type the presets and the README offer, beside the converter's f16/bf16.
QUANTS = ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q2_k")

pytestmark = pytest.mark.integration


def test_the_model_lives_in_a_child_and_answers_for_its_metadata_and_tokens() -> None:
    pytest.importorskip("llama_cpp")
    with LlamaChild(bundled_gguf(), "testing", n_ctx=128) as llama:
        assert llama.pid != os.getpid()
        assert llama.metadata["architecture"] == "llama" and llama.metadata["eos_token"] == "<|im_end|>"
        assert "<|im_start|>" in llama.metadata["chat_template"] and llama.metadata["n_vocab"] == 49152
        hello, special = llama.tokenize(["Hello world", "<|im_end|>"], add_bos=False, special=True)
        assert len(hello) == 2 and special == [llama.metadata["eos_token_id"]]


def test_chat_renders_the_ggufs_own_template_even_when_it_equals_a_built_in_format(tmp_path: Path) -> None:
    """llama-cpp-python swaps a template equal to its ChatML string for its built-in `chatml` formatter, which adds
    an empty system turn training never saw; the child keeps the GGUF's own template (rendered by Jinja)."""
    from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE

    chatml = tmp_path / "chatml.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(bundled_gguf()), str(chatml),
                    "--chat-template", CHATML_CHAT_TEMPLATE, "--force"], check=True, capture_output=True)
    with LlamaChild(chatml, "chatting with", n_ctx=256) as llama:
        prompt = llama.call(_chat_prompt_tokens, [{"role": "user", "content": "Hi"}])
        expected = llama.tokenize(["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"], add_bos=False,
                                  special=True)[0]
    assert prompt == expected


def _chat_prompt_tokens(state: dict, emit, messages: list[dict]) -> list[int]:
    """In the child: the tokens create_chat_completion puts before the answer."""
    llm = state["llm"]
    llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
    return [int(t) for t in llm.input_ids[:llm.n_tokens]]  # the answer's one token is sampled, not decoded


def test_a_file_llama_cpp_refuses_is_a_load_error_not_a_crash(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    path = tmp_path / "half.gguf"
    path.write_bytes(bundled_gguf().read_bytes()[:4096])
    with pytest.raises(GGUFLoadError, match=f"llama.cpp cannot load {path}"):
        LlamaChild(path, "testing")


def test_a_gguf_whose_chat_template_is_not_jinja_is_a_load_error(tmp_path: Path) -> None:
    """llama-cpp-python compiles the GGUF's chat template as it loads: a broken one ended chat as a bug."""
    broken = tmp_path / "broken-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(bundled_gguf()), str(broken),
                    "--chat-template", "{% fox message in messages %}{{ message.content }}{% endfor %}", "--force"],
                   check=True, capture_output=True)
    with pytest.raises(GGUFLoadError, match=r"its chat template \(tokenizer.chat_template\) is not valid Jinja"):
        LlamaChild(broken, "chatting with", n_ctx=256)


def test_a_fifo_named_like_a_gguf_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "model-Q4_K_M.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFLoadError, match="not a regular file"):
        LlamaChild(fifo, "chatting with", n_ctx=256)
    assert not has_gguf_magic(fifo)


def installed_profile() -> str:
    """The level `just setup` built llama.cpp for on this machine (x86-64-v4 or v3)."""
    from distillery.export.llama_build import installed_build

    return installed_build()["profile"]


def test_a_crashed_child_is_a_native_crash_naming_the_file_the_signal_and_what_to_try() -> None:
    pytest.importorskip("llama_cpp")
    llama = LlamaChild(bundled_gguf(), "scoring", n_ctx=128)
    os.kill(llama.pid, signal.SIGSEGV)
    with pytest.raises(NativeCrash) as caught:
        llama.tokenize(["hi"], add_bos=False, special=False)
    llama.close()
    message = str(caught.value)
    assert message.startswith(f"llama.cpp crashed with SIGSEGV (signal 11) while scoring {bundled_gguf()}: ")
    assert "CPU " in message and f"installed llama.cpp build: {installed_profile()}" in message
    assert "python -m distillery.export.llama_check" in message and "just setup" in message


def test_a_gguf_chat_template_that_loops_only_on_the_users_message_is_one_message(tmp_path: Path, monkeypatch) -> None:
    """From a review: a template that passes the probe ("Hello") and loops on a longer message hung the chat at
    100% CPU (llama.cpp renders with no budget): each conversation is rendered within the budget first."""
    from rich.console import Console

    from distillery.commands.chat import answer, open_gguf
    from distillery.core import chat_render

    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(chat_render, "CPU_SECONDS", 2.0)
    template = ("{% for m in messages %}{% if m.content|length > 10 %}{% for a in range(99999) %}{% for b in "
                "range(99999) %}{% endfor %}{% endfor %}{% endif %}{{ m.content }}{% endfor %}")
    hostile = tmp_path / "hostile.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(bundled_gguf()), str(hostile),
                    "--chat-template", template, "--force"], check=True, capture_output=True)
    with chat_render.ChatRenderer() as renderer, open_gguf(hostile, 256, renderer) as llama:
        with pytest.raises(UserError, match=r"hostile.gguf: its chat template \(tokenizer.chat_template\) took more "
                                            r"than 2 s of CPU time to render this conversation"):
            answer(llama, Console(file=io.StringIO()), [{"role": "user", "content": "a longer message"}], 4, 0.0, 0,
                   renderer)
        assert answer(llama, Console(file=io.StringIO()), [{"role": "user", "content": "short"}], 2, 0.0, 0, renderer)


def gguf_with_token_ids_past_its_vocabulary(path: Path) -> Path:
    """The bundled GGUF with BOS and EOS ids past its vocabulary: llama.cpp throws std::out_of_range as it loads."""
    import shutil

    from gguf import GGUFReader

    shutil.copy(bundled_gguf(), path)
    reader = GGUFReader(path, "r+")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        reader.fields[key].parts[-1][0] = 99_999_999
    del reader  # its memory map written back
    return path


def test_a_crash_names_llama_cpps_last_words_and_shows_no_debugger_backtrace(tmp_path: Path) -> None:
    """From a review: a GGUF that makes llama.cpp throw printed some 80 lines of gdb backtrace (ggml attaches a
    debugger when it aborts) on the user's terminal; the one line that says why is now in the message."""
    pytest.importorskip("llama_cpp")
    path = gguf_with_token_ids_past_its_vocabulary(tmp_path / "bad.gguf")
    script = ("from distillery.export.llama_child import LlamaChild\nfrom distillery.core.isolation import NativeCrash\n"
              f"try:\n    LlamaChild({str(path)!r}, 'chatting with')\nexcept NativeCrash as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "llama.cpp crashed with SIGABRT" in result.stdout and "Its last words: " in result.stdout
    assert "std::out_of_range" in result.stdout and "99999999" in result.stdout
    assert result.stderr == "", result.stderr[-2000:]  # nothing of the child's on the terminal


def test_chat_survives_a_crash_of_its_model_as_one_message_and_exit_code_1(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    config = demo_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "distillery", "chat", "-c", str(config), "--gguf",
                             str(bundled_gguf()), "-p", "Tell me a long story.", "--max-tokens", "2000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    crash_child_of(proc)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert f"error: chat failed: llama.cpp crashed with SIGSEGV (signal 11) while chatting with {bundled_gguf()}" \
        in output and "Traceback" not in output
    log = tmp_path / "runs" / "demo" / "logs" / "chat.log"
    assert f"Log: {log}" in output and "NativeCrash" in log.read_text()


def test_chat_with_a_file_that_is_not_a_gguf_or_a_prompt_past_the_context_is_one_message(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    config = demo_config(tmp_path)
    (tmp_path / "notes.gguf").write_text("not a model")
    for args, says in ((["--gguf", str(tmp_path / "notes.gguf"), "-p", "hi"], "Chat with a GGUF that"),
                       (["--gguf", str(bundled_gguf()), "-p", "word " * 5000], "--prompt does not fit llama.cpp's "
                        "context of 4096 tokens")):
        result = subprocess.run([sys.executable, "-m", "distillery", "chat", "-c", str(config), *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
        assert result.returncode == 2 and says in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_an_interactive_chat_that_outgrows_the_context_drops_its_oldest_exchange(tmp_path: Path) -> None:
    """A conversation past llama.cpp's context ended the chat with a traceback (and lost it). A context of 256
    tokens: one message of 320 words cannot fit, two of 160 words cannot fit together."""
    pytest.importorskip("llama_cpp")
    config = demo_config(tmp_path)
    turns = "Hi!\n" + "word " * 320 + "\n" + ("word " * 160 + "\n") * 2 + "/exit\n"
    result = subprocess.run([sys.executable, "-m", "distillery", "chat", "-c", str(config), "--gguf",
                             str(bundled_gguf()), "--max-tokens", "48", "--context", "256"], cwd=ROOT, input=turns,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "that message does not fit llama.cpp's context of 256 tokens" in result.stdout  # the 320 words: taken back
    assert "its oldest exchange was dropped" in result.stdout and result.stdout.count("model> ") >= 3


def test_a_context_llama_cpp_cannot_allocate_is_one_message_naming_the_option(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    result = subprocess.run([sys.executable, "-m", "distillery", "chat", "-c", str(demo_config(tmp_path)), "--gguf",
                             str(bundled_gguf()), "-p", "hi", "--context", "16000000"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert "--context 16000000 asks for a key/value cache of that many tokens; pass a smaller --context" in result.stdout


def test_the_setup_self_check_decodes_the_bundled_quantized_model(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    assert llama_check.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"llama.cpp self-check: ok ({installed_profile()} build, SmolLM2-135M-Instruct.Q4_1.gguf decoded")
    assert "Paris" in out


def test_the_self_check_says_what_failed_the_cpu_and_the_remedy(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    path = tmp_path / "not-a-model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    assert llama_check.main(["--gguf", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"llama.cpp self-check FAILED: llama.cpp cannot load {path}")
    assert "  CPU: " in err and "avx2" in err and f"installed llama-cpp-python build: {installed_profile()}" in err
    assert "remedy: `just setup`" in err
    assert llama_check.main(["--gguf", str(path), "--no-remedy"]) == 1  # setup's own fallback runs it so
    assert "remedy" not in capsys.readouterr().err


@pytest.mark.parametrize("given", ["missing.gguf", "a-directory", "notes.txt", "empty.gguf"])
def test_a_gguf_that_is_not_a_file_is_bad_input_exit_2(tmp_path: Path, given: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert llama_check.main(["--gguf", str(tmp_path / given)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llama.cpp self-check: --gguf: {tmp_path / given} ") and err.count("\n") == 1, err
    assert "FAILED" not in err and "remedy" not in err  # nothing is wrong with the build


def test_a_build_that_decodes_the_wrong_answer_fails_the_self_check(monkeypatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A build that runs but computes wrong numbers (what a bad AMX kernel would do) is no better than a crash."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(llama_check, "check", lambda path: {"text": " Lyon.", "seconds": 0.1})
    assert llama_check.main([]) == 1
    assert "decoded ' Lyon.', where every quantization of it answers 'Paris'" in capsys.readouterr().err


@pytest.mark.slow
def test_every_quant_type_written_from_the_demo_model_decodes_here_and_agrees_with_f16(
        demo_model_path: str, tmp_path: Path) -> None:
    """On whatever CPU runs this: llama.cpp's converter writes f16 and bf16, its quantizer every other type,
    and each file decodes (a prompt batch, then token by token) with F16's next token on fixed prompts."""
    pytest.importorskip("llama_cpp")
    files = {}
    for outtype in ("f16", "bf16"):
        files[outtype] = tmp_path / gguf_io.gguf_filename("m", outtype)
        gguf_io.convert_to_gguf(Path(demo_model_path), files[outtype], outtype, "m")
    for name in QUANTS:
        files[name] = tmp_path / gguf_io.gguf_filename("m", name)
        gguf_io.quantize_gguf(files["f16"], files[name], gguf_io.parse_quant(name))
    top1, decoded = {}, {}
    for name, path in files.items():
        with LlamaChild(path, "decoding", n_ctx=128, logits_all=True) as llama:
            decoded[name] = llama.call(greedy_decode, llama_check.PROMPT, 3)  # what the self-check decodes
            token_lists = llama.tokenize(PROMPTS, add_bos=False, special=True)
            top1[name] = [int(lp[-1].argmax()) for lp in verify.gguf_logprobs(llama, token_lists)]
    assert {name: tokens for name, tokens in top1.items() if tokens != top1["f16"]} == {}, top1
    assert all(text.strip() for text in decoded.values()), decoded


@pytest.mark.parametrize("template, words", [
    ("{{ raise_exception('no chat here') }}", "failed on this conversation: ValueError: no chat here"),
    ("{% for m in messages %}{{ m.content / 0 }}{% endfor %}", "failed on this conversation: TypeError"),
    ("{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{% endfor %}{% endfor %}"
     "{% endfor %}", "took more than 2 s of CPU time to render one short message"),
])
def test_a_gguf_chat_template_that_raises_or_never_ends_is_one_message(template: str, words: str, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """From an adversarial review: a template that raised ended chat as 'a bug' (exit 1); one that loops hung it."""
    from rich.console import Console

    from distillery.commands.chat import answer, open_gguf
    from distillery.core import chat_render

    monkeypatch.setattr(chat_render, "CPU_SECONDS", 2.0)
    hostile = tmp_path / "hostile.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(bundled_gguf()), str(hostile),
                    "--chat-template", template, "--force"], check=True, capture_output=True)
    with pytest.raises(UserError, match=re.escape(words)):
        with open_gguf(hostile, 256) as llama:
            answer(llama, Console(file=io.StringIO()), [{"role": "user", "content": "hi"}], 4, 0.0, 0)
