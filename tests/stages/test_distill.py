"""Distill: the stage end to end against a local OpenAI-compatible HTTP server (a real round trip), CodeI/O++
revision, rejection sampling, resuming after an interruption, hostile code, and the real demo GGUF teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

import distillery.stages.distill as distill
from distillery.config import DistillConfig, load_config
from distillery.core.errors import UserError
from distillery.core.records import make_record, read_jsonl, write_jsonl
from distillery.core.rundir import describe_outputs
from distillery.runner import plan, run_stage
from distillery.reasoning.teachers import OpenAITeacher
from tests.fixtures.crash import crash_child_of
from tests.fixtures.gsm_problems import gsm_rows

MATHQA = [
    {"Problem": f"what is {a} times {b} ?", "Rationale": f"{a} * {b} = {a * b}",
     "options": f"a ) {a * b} , b ) {a * b + 1} , c ) {a * b + 2} , d ) {a * b + 3} , e ) {a * b + 4}", "correct": "a"}
    for a, b in [(2, 3), (4, 5), (6, 7), (8, 9), (3, 3), (5, 5)]
]
ADD = "def main_solution(a, b):\n    return a + b\n"
LOOP = "def main_solution(a, b):\n    while True:\n        pass\n"


def run_through(target: str, cfg):
    """Run `target` after its upstream stages, as the CLI does; returns the target's (status, result, seconds)."""
    for name in plan(target, cfg):
        outcome = run_stage(name, cfg)
    return outcome


class ChatServer:
    """An OpenAI-style /v1/chat/completions endpoint whose answers come from `reply(messages)`: the content, or
    (status, error message) for an error reply."""

    def __init__(self, reply: Callable[[list[dict]], str], fail_first: int = 0):
        self.reply, self.fail_first = reply, fail_first
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.auth.append(self.headers.get("Authorization"))
                if len(server.requests) <= server.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                answer, status = server.reply(body["messages"]), 200
                if isinstance(answer, tuple):
                    status, payload = answer[0], json.dumps({"error": {"message": answer[1], "code": answer[0]}})
                else:
                    payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def math_reply(messages: list[dict]) -> str:
    """Right on the first turn for '2 times 3', wrong then right (after feedback) for the others."""
    question = next(m["content"] for m in messages if m["role"] == "user")
    if "2 times 3" in question:
        return "<think>2 * 3 = 6</think>\nThe answer is (a)"
    if messages[-1]["role"] == "user" and "not correct" in messages[-1]["content"]:
        return "Let me redo it: the product is option a.\nThe answer is (a)"
    return "I think it is b.\nThe answer is (b)"


@pytest.fixture
def server():
    servers = []

    def start(reply=math_reply, fail_first: int = 0) -> ChatServer:
        servers.append(ChatServer(reply, fail_first))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def write_project(tmp_path: Path, url: str, **distill_overrides) -> Path:
    (tmp_path / "mathqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATHQA), encoding="utf-8")
    section = {"enabled": True, "teacher": {"kind": "openai", "url": url, "model": "stub", "api_key_env": "STUB_KEY"},
               "max_prompts": None, "concurrency": 2, "retries": 2, **distill_overrides}
    config = {"run": {"name": "t", "root": "runs"},
              "ingest": {"eval_fraction": 0.0,
                         "sources": [{"name": "mathqa", "kind": "hf", "files": "mathqa.jsonl", "format": "mathqa"}]},
              "distill": section}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return tmp_path / "config.yaml"


def test_http_teacher_revision_and_rejection(tmp_path, monkeypatch, server) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STUB_KEY", "sk-test-key")
    chat = server()
    status, result, _ = run_through("distill", load_config(write_project(tmp_path, chat.url)))
    assert status == "done"
    out = tmp_path / "runs/t/distill"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png", "traces.jsonl", "train.jsonl"]
    # 6 prompts: 1 right at once, 5 wrong then fixed by the feedback turn = 11 requests, all with the key.
    assert len(chat.requests) == 11 and set(chat.auth) == {"Bearer sk-test-key"}
    report = json.loads((out / "report.json").read_text())["tasks"]["math_mc"]
    assert {k: report[k] for k in ("prompts", "generated", "verified", "verified_first_turn", "revised",
                                   "revised_verified", "rejected", "kept")} == {
        "prompts": 6, "generated": 6, "verified": 6, "verified_first_turn": 1, "revised": 5, "revised_verified": 5,
        "rejected": 0, "kept": 6}
    train = list(read_jsonl(out / "train.jsonl"))
    first = next(r for r in train if "2 times 3" in r["messages"][0]["content"])
    assert first["messages"][-1]["content"] == "<think>\n2 * 3 = 6\n</think>\n\nThe answer is (a) 6."
    assert first["task"] == "math_mc" and first["label"] == 0 and first["meta"]["distill"]["verified"]
    revised = next(r for r in train if "4 times 5" in r["messages"][0]["content"])
    content = revised["messages"][-1]["content"]
    # CodeI/O++: turn 1, its feedback, turn 2, its feedback, then the verified answer.
    assert content.index("I think it is b") < content.index("Feedback: The chosen option (b)") \
        < content.index("Let me redo it") < content.index("Feedback: Correct.") < content.index("The answer is (a) 20.")
    assert [m["role"] for m in revised["messages"]] == ["user", "assistant"]
    traces = list(read_jsonl(out / "traces.jsonl"))
    assert len(traces) == 6 and sum(t["revised"] for t in traces) == 5
    assert "sk-test-key" not in (tmp_path / "runs/t/config.yaml").read_text()
    assert run_through("distill", load_config(tmp_path / "config.yaml"))[0] == "up to date"
    assert len(chat.requests) == 11


def test_rejection_sampling_keeps_only_verified(tmp_path, monkeypatch, server) -> None:
    monkeypatch.chdir(tmp_path)
    chat = server()
    cfg = load_config(write_project(tmp_path, chat.url, revise=False, samples_per_prompt=2))
    run_through("distill", cfg)
    out = tmp_path / "runs/t/distill"
    train = list(read_jsonl(out / "train.jsonl"))
    # Only the one prompt answered right is kept; its 2 samples are the same text, so one training example.
    assert len(train) == 1 and train[0]["meta"]["distill"]["verified"]
    assert len(list(read_jsonl(out / "traces.jsonl"))) == 12
    keep_all = load_config(write_project(tmp_path, chat.url, revise=False, keep="all"))
    run_through("distill", keep_all)
    kept = list(read_jsonl(out / "train.jsonl"))
    assert len(kept) == 6 and sum(r["meta"]["distill"]["verified"] for r in kept) == 1


def interrupt_progress_after(monkeypatch, prompts: int) -> list[str]:
    """Ctrl-C right after the `prompts`-th finished prompt is saved; the ids saved, in order."""
    real_append, written = distill.append_progress, []

    def append_then_interrupt(path, entry):
        real_append(path, entry)
        written.append(entry["id"])
        if len(written) == prompts:
            raise KeyboardInterrupt

    monkeypatch.setattr(distill, "append_progress", append_then_interrupt)
    return written


def test_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, server) -> None:
    monkeypatch.chdir(tmp_path)
    chat = server(reply=lambda messages: "The answer is (a)")
    cfg = load_config(write_project(tmp_path, chat.url, concurrency=1))
    real_append, written = distill.append_progress, interrupt_progress_after(monkeypatch, 2)
    run_stage("ingest", cfg)
    with pytest.raises(KeyboardInterrupt):
        run_stage("distill", cfg)
    assert len(chat.requests) == 2
    assert (tmp_path / "runs/t/.distill.partial/progress.jsonl").is_file()
    monkeypatch.setattr(distill, "append_progress", real_append)
    status, result, _ = run_stage("distill", cfg)
    assert status == "done"
    assert len(chat.requests) == 6  # only the 4 prompts left were sent
    asked = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in chat.requests]
    assert len(set(asked)) == 6
    assert result.metrics["train_records"] == 6


def test_prompts_in_flight_at_an_interruption_are_saved_not_asked_again(tmp_path, monkeypatch, server) -> None:
    """Ctrl-C with 3 prompts in flight: the 2 still running finish (the pool waits for them anyway) and are saved,
    so the rerun sends only the 3 never started; they were dropped and asked again."""
    monkeypatch.chdir(tmp_path)

    def slow_reply(messages: list[dict]) -> str:
        time.sleep(0.3)
        return "The answer is (a)"

    chat = server(reply=slow_reply)
    cfg = load_config(write_project(tmp_path, chat.url, concurrency=3, revise=False))
    real_append, written = distill.append_progress, interrupt_progress_after(monkeypatch, 1)
    run_stage("ingest", cfg)
    with pytest.raises(KeyboardInterrupt):
        run_stage("distill", cfg)
    assert len(chat.requests) == 3 and len(set(written)) == 3
    progress = tmp_path / "runs/t/.distill.partial/progress.jsonl"
    assert len(progress.read_text().splitlines()) == 3
    monkeypatch.setattr(distill, "append_progress", real_append)
    status, result, _ = run_stage("distill", cfg)
    assert status == "done" and result.metrics["prompts"] == 6 and result.metrics["train_records"] == 6
    assert len(chat.requests) == 6  # every prompt asked once


def test_http_teacher_keeps_concurrency_prompts_in_flight(tmp_path, monkeypatch, server) -> None:
    monkeypatch.chdir(tmp_path)
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def slow_reply(messages: list[dict]) -> str:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.3)
        with lock:
            state["now"] -= 1
        return "The answer is (a)"

    chat = server(reply=slow_reply)
    started = time.monotonic()
    run_through("distill", load_config(write_project(tmp_path, chat.url, concurrency=3)))
    assert len(chat.requests) == 6 and state["most"] == 3
    assert time.monotonic() - started < 6 * 0.3 + 1.5  # overlapped, not one after another


def test_http_teacher_location_from_the_environment(tmp_path, monkeypatch, server) -> None:
    monkeypatch.chdir(tmp_path)
    chat = server(reply=lambda messages: "The answer is (a)")
    path = write_project(tmp_path, chat.url, max_prompts=1)
    config = yaml.safe_load(path.read_text())
    config["distill"]["teacher"] = {"kind": "openai"}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with pytest.raises(UserError, match=r"needs url \(or \$OPENAI_BASE_URL\)"):
        run_through("distill", load_config(path))
    monkeypatch.setenv("OPENAI_BASE_URL", chat.url)
    monkeypatch.setenv("OPENAI_MODEL", "from-env")
    run_through("distill", load_config(path))
    assert [r["model"] for r in chat.requests] == ["from-env"]


def test_a_teacher_switched_through_the_environment_redoes_distill(tmp_path, monkeypatch, server) -> None:
    """$OPENAI_BASE_URL and $OPENAI_MODEL are in the fingerprint when the config leaves them out; the key is not."""
    monkeypatch.chdir(tmp_path)
    first, second = server(reply=lambda messages: "The answer is (a)"), server(reply=lambda messages: "The answer is (a)")
    path = write_project(tmp_path, first.url, max_prompts=1)
    config = yaml.safe_load(path.read_text())
    config["distill"]["teacher"] = {"kind": "openai"}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setenv("OPENAI_BASE_URL", first.url)
    monkeypatch.setenv("OPENAI_MODEL", "teacher-a")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-key-one")
    assert run_through("distill", load_config(path))[0] == "done"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-key-two")
    assert run_through("distill", load_config(path))[0] == "up to date"
    monkeypatch.setenv("OPENAI_MODEL", "teacher-b")
    assert run_through("distill", load_config(path))[0] == "done"
    monkeypatch.setenv("OPENAI_BASE_URL", second.url)
    assert run_through("distill", load_config(path))[0] == "done"
    assert [r["model"] for r in first.requests + second.requests] == ["teacher-a", "teacher-b", "teacher-b"]
    manifest = (tmp_path / "runs/t/manifest.json").read_text()
    assert json.loads(manifest)["stages"]["distill"]["inputs"]["environment"] == {
        "OPENAI_BASE_URL": second.url, "OPENAI_MODEL": "teacher-b"}
    assert "sk-env-key" not in manifest
    monkeypatch.setenv("OPENAI_BASE_URL", second.url.replace("://", "://user:s3cret@"))  # the same teacher
    assert run_through("distill", load_config(path))[0] == "up to date"
    assert "s3cret" not in (tmp_path / "runs/t/manifest.json").read_text()
    monkeypatch.delenv("OPENAI_BASE_URL")  # another shell: a finished distill is not redone, nor its teacher asked
    monkeypatch.delenv("OPENAI_MODEL")
    assert run_through("format", load_config(path))[0] == "done"
    assert run_stage("distill", load_config(path))[0] == "up to date"


def test_a_teacher_url_is_stored_without_its_credentials_or_query() -> None:
    from distillery.stages.distill import shown_url

    assert shown_url("https://bob:pw@api.example.com/v1") == "https://api.example.com/v1"
    shown = shown_url("https://api.example.com/v1?api-key=sekrit")
    assert shown.startswith("https://api.example.com/v1 (query sha256:") and "sekrit" not in shown
    assert shown != shown_url("https://api.example.com/v1?api-key=other")


def test_teacher_going_away_is_a_user_error_and_the_rerun_resumes(tmp_path, monkeypatch, server) -> None:
    monkeypatch.chdir(tmp_path)
    chat = server(reply=lambda messages: "The answer is (a)")
    cfg = load_config(write_project(tmp_path, chat.url, concurrency=1, retries=0))
    real_reply = chat.reply

    def down_after_three(messages):
        if len(chat.requests) > 3:
            raise ConnectionAbortedError  # the handler dies: the client sees a broken connection
        return real_reply(messages)

    chat.reply = down_after_three
    with pytest.raises(UserError, match=r"did not answer after 1 attempt\(s\)"):
        run_through("distill", cfg)
    assert len(chat.requests) == 4
    chat.reply = real_reply
    status, result, _ = run_through("distill", cfg)
    assert status == "done" and result.metrics["train_records"] == 6
    assert len(chat.requests) == 4 + 3  # the failed prompt and the two never sent
    assert not list((tmp_path / "runs/t").glob(".distill.progress-*"))


def progress_line(prompt: str, **change: Any) -> str:
    record = {"id": f"{prompt}-0", "task": "math_mc", "messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]}
    entry = {"id": prompt, "task": "math_mc", "verifier": "option", "teacher": "t", "seconds": 0.5,
             "attempts": [{"sample": 0, "verified": True, "revised": False, "turns": [{"text": "a", "ok": True}]}],
             "kept": [record], **change}
    return json.dumps(entry) + "\n"


def test_torn_progress_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    path.write_text(progress_line("a") + progress_line("b") + '{"id": "c', encoding="utf-8")
    assert [e["id"] for e in distill.load_progress(path)] == ["a", "b"]
    assert path.read_text() == progress_line("a") + progress_line("b")
    # torn at its newline: the whole object is there, and the next line appended joined it ('}{'), a KeyError later
    path.write_text(progress_line("a") + progress_line("b").rstrip("\n"), encoding="utf-8")
    assert [e["id"] for e in distill.load_progress(path)] == ["a"]
    distill.append_progress(path, json.loads(progress_line("c")))
    assert [e["id"] for e in distill.load_progress(path)] == ["a", "c"]


def test_a_progress_line_not_as_distill_writes_it_is_asked_again_not_trained_on(tmp_path: Path) -> None:
    """`[1]`, `{"id": ...}` alone or `"attempts": 1` ended every rerun in a TypeError or KeyError (exit 1), and a
    `kept` record without messages went into distill's train.jsonl."""
    path = tmp_path / "progress.jsonl"
    wrong = ["[1]\n", '{"id": "b"}\n', progress_line("c", attempts=1), progress_line("d", kept=[{"x": 1}]),
             progress_line("e", attempts=[{"verified": True, "revised": False, "turns": []}])]
    path.write_text(progress_line("a") + "".join(wrong) + progress_line("f"), encoding="utf-8")
    assert [e["id"] for e in distill.load_progress(path)] == ["a", "f"]


def test_a_progress_line_whose_log_probs_are_not_as_distill_writes_them_is_asked_again(tmp_path: Path) -> None:
    """From an adversarial review: top-k log-probs that are not base64 ended every rerun as 'a bug' (binascii's
    'Incorrect padding'), and a line with fewer log-prob entries than kept traces put the next record's log-probs
    on this one in the sidecar (format then stopped on an IndexError)."""
    import numpy as np

    from distillery.core.topk import TopK

    good = TopK.of([5, 6], np.array([[5, 1], [6, 2]]), np.array([[-0.1, -3.0], [-0.2, -2.0]])).encode()
    path = tmp_path / "progress.jsonl"
    lines = [progress_line("a", logprobs=[good]), progress_line("b", logprobs=[{**good, "ids": "not base64"}]),
             progress_line("c", logprobs=[]), progress_line("d", logprobs=[good, good]),
             progress_line("e", logprobs=[{**good, "k": 0}]), progress_line("f", logprobs=[{"unscored": "why"}]),
             progress_line("g", logprobs=[None]), progress_line("h")]
    path.write_text("".join(lines), encoding="utf-8")
    assert [e["id"] for e in distill.load_progress(path)] == ["a", "f", "g", "h"]


def test_http_teacher_retries_then_gives_a_clear_error(server) -> None:
    chat = server(fail_first=2)
    teacher = OpenAITeacher(chat.url, "stub", "UNSET_KEY_VAR", timeout_s=5, retries=2)
    assert teacher.complete([{"role": "user", "content": "hi"}], 1, 0.0, 8, 0) == ["I think it is b.\nThe answer is (b)"]
    assert len(chat.requests) == 3 and chat.auth[-1] is None
    down = OpenAITeacher("http://127.0.0.1:9/v1", "stub", "UNSET_KEY_VAR", timeout_s=1, retries=1)
    with pytest.raises(UserError, match=r"did not answer after 2 attempt\(s\)"):
        down.complete([{"role": "user", "content": "hi"}], 1, 0.0, 8, 0)


def codeio_records() -> list[dict]:
    rows = []
    for i, (refcode, task) in enumerate([(ADD, "code_io_output"), (ADD, "code_io_input"), (LOOP, "code_io_input"),
                                         (ADD, "code_io_input")]):
        meta = {"line": i + 1, "funcname": "main_solution", "refcode": refcode, "io_input": {"a": i, "b": 2},
                "io_output": i + 2}
        messages = [{"role": "user", "content": f"[{i}] Predict for main_solution:\n{refcode}"},
                    {"role": "assistant", "content": json.dumps({"output": i + 2})}]
        rows.append(make_record("codeio", task, messages, meta))
    return rows


def codeio_reply(messages: list[dict]) -> str:
    index = int(next(m["content"] for m in messages if m["role"] == "user")[1])
    if index == 0:
        return 'a + b = 0 + 2.\n{"output": 2}'
    if index == 3 and len(messages) < 4:
        return 'Perhaps a=1, b=1: {"input": {"a": 1, "b": 1}}'
    return f'{{"input": {{"a": {index}, "b": 2}}}}'


def test_codeio_records_through_the_stage_with_hostile_code(tmp_path, monkeypatch, server) -> None:
    """Records in the codeio source's shape; one's reference code never ends: a failed check, the rest carry on."""
    monkeypatch.chdir(tmp_path)
    chat = server(reply=codeio_reply)
    config = write_project(tmp_path, chat.url, sandbox={"timeout_s": 2.0})
    cfg = load_config(config)
    run_stage("ingest", cfg)
    write_jsonl(tmp_path / "runs/t/ingest/train.jsonl", codeio_records())  # as the codeio source writes them
    from distillery.core.rundir import RunDir
    from distillery.stage import StageContext
    from distillery.core.console import console

    run = RunDir("runs", "t")
    out = tmp_path / "out"
    out.mkdir()
    result = distill.run(StageContext(cfg=cfg, run=run, out=out, console=console))
    report = json.loads((out / "report.json").read_text())["tasks"]
    assert report["code_io_output"]["verified"] == 1
    assert report["code_io_input"] == {**report["code_io_input"], "prompts": 3, "verified": 2, "revised": 2,
                                       "revised_verified": 1, "rejected": 1}
    traces = {t["id"]: t for t in read_jsonl(out / "traces.jsonl")}
    hostile = traces[codeio_records()[2]["id"]]
    assert not hostile["verified"] and hostile["turns"][0]["sandbox"]["status"] == "timeout"
    fixed = traces[codeio_records()[3]["id"]]
    assert fixed["revised"] and "gives 2, not the required output 5" in fixed["turns"][0]["feedback"]
    train = list(read_jsonl(out / "train.jsonl"))
    assert result.metrics["train_records"] == len(train) == 3
    assert all(r["meta"]["funcname"] == "main_solution" for r in train)


def test_an_answer_nested_too_deeply_to_write_is_a_dropped_sample(tmp_path, monkeypatch, server) -> None:
    """A worker thread (concurrency 2) parses an answer nested 970 deep on its short stack; written to
    progress.jsonl from the main thread's deeper one it raised RecursionError and ended the stage."""
    monkeypatch.chdir(tmp_path)
    nested = "[" * 970 + "2" + "]" * 970

    def reply(messages: list[dict]) -> str:
        index = int(next(m["content"] for m in messages if m["role"] == "user")[1])
        return f'{{"output": {nested}}}' if index == 0 else f'{{"output": {index + 2}}}'

    chat = server(reply=reply)
    cfg = load_config(write_project(tmp_path, chat.url, revise=False, concurrency=2))
    run_stage("ingest", cfg)
    records = [make_record("codeio", "code_io_output", [{"role": "user", "content": f"[{i}] Predict for {ADD}"}],
                           {"funcname": "main_solution", "io_input": {"a": i, "b": 2}, "io_output": i + 2})
               for i in range(2)]
    write_jsonl(tmp_path / "runs/t/ingest/train.jsonl", records)
    from distillery.core.console import console
    from distillery.core.rundir import RunDir
    from distillery.stage import StageContext

    out = tmp_path / "out"
    out.mkdir()
    result = distill.run(StageContext(cfg=cfg, run=RunDir("runs", "t"), out=out, console=console))
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {"unreadable reply": {"replies": 1, "example": "its answer nests lists or objects "
                                                                                 "more than 100 deep"}}
    assert result.metrics["train_records"] == 1 and result.metrics["prompts"] == 2


GSM = gsm_rows(6)


def gsm_answer(row: dict) -> int:
    return int(row["RESPONSE"].rsplit("#### ", 1)[1])


def gsm_reply(messages: list[dict]) -> str:
    """Odd rows: wrong at first, then right in a \\boxed{} after the feedback; even rows: right, with a unit."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    index = next(i for i, row in enumerate(GSM) if row["INSTRUCTION"] in user)
    answer = gsm_answer(GSM[index])
    if messages[-1]["role"] == "user" and "is not correct" in messages[-1]["content"]:
        return f"<think>Once more.</think>\nSo the total is $\\boxed{{{answer:,}}}$"
    if index % 2:
        return f"<think>{GSM[index]['RESPONSE']}</think>\nThe answer is {answer + 1}."
    return f"<think>{GSM[index]['RESPONSE']}</think>\nThe answer is {answer} dollars."


def test_gsm_records_through_the_stage_keep_which_extraction_found_the_answer(tmp_path, monkeypatch, server) -> None:
    """`numeric` checks free-form answers with math-verify from the stage's worker threads (concurrency 2)."""
    monkeypatch.chdir(tmp_path)
    chat = server(reply=gsm_reply)
    cfg = load_config(write_project(tmp_path, chat.url, tasks={"qa": "numeric"}))
    run_stage("ingest", cfg)
    records = [make_record("gsm", "qa", [{"role": "user", "content": row["INSTRUCTION"]},
                                         {"role": "assistant", "content": row["RESPONSE"]}], {}) for row in GSM]
    write_jsonl(tmp_path / "runs/t/ingest/train.jsonl", records)
    from distillery.core.console import console
    from distillery.core.rundir import RunDir
    from distillery.stage import StageContext

    out = tmp_path / "out"
    out.mkdir()
    distill.run(StageContext(cfg=cfg, run=RunDir("runs", "t"), out=out, console=console))
    report = json.loads((out / "report.json").read_text())["tasks"]["qa"]
    assert {k: report[k] for k in ("prompts", "verified", "verified_first_turn", "revised_verified")} == {
        "prompts": 6, "verified": 6, "verified_first_turn": 3, "revised_verified": 3}
    traces = {t["id"]: t for t in read_jsonl(out / "traces.jsonl")}
    for index, (row, record) in enumerate(zip(GSM, records)):
        turns, answer = traces[record["id"]]["turns"], gsm_answer(row)
        if index % 2:
            assert turns[0]["feedback"] == f"The final answer {answer + 1} is not correct."
            assert turns[1]["math"] == {"how": "boxed", "predicted": f"{answer:,}", "expected": str(answer), "error": None}
        else:
            assert turns[0]["math"]["how"] == "the answer is" and turns[0]["math"]["predicted"] == f"{answer} dollars"
    train = {r["meta"]["distill"]["from_id"]: r for r in read_jsonl(out / "train.jsonl")}
    assert all(train[r["id"]]["messages"][-1]["content"].endswith(f"The answer is {gsm_answer(row)}.")
               for row, r in zip(GSM, records))


def test_no_checkable_prompt_is_a_user_error(tmp_path, monkeypatch, server) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_project(tmp_path, "http://127.0.0.1:9/v1", tasks={"qa": "numeric"}))
    run_stage("ingest", cfg)
    with pytest.raises(UserError, match="no ingest train record has a task in distill.tasks"):
        run_stage("distill", cfg)


def test_switched_off_distill_says_how_to_switch_it_on(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_project(tmp_path, "http://127.0.0.1:9/v1", enabled=False))
    run_stage("ingest", cfg)
    with pytest.raises(UserError, match="--set distill.enabled=true"):
        run_stage("distill", cfg)
    assert not (tmp_path / "runs/t/distill").exists() and not (tmp_path / "runs/t/.distill.partial").exists()


def test_select_prompts_spreads_over_tasks() -> None:
    records = [make_record("s", task, [{"role": "user", "content": f"{task} {i}"}], {}, ["1", "2"], 0)
               for task in ("math_mc", "other") for i in range(5)]
    records += [make_record("s", "qa", [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"#### {i}"}],
                            {}) for i in range(5)]
    cfg = DistillConfig(tasks={"math_mc": "math_mc", "qa": "numeric"}, max_prompts=4)
    chosen, skipped = distill.select_prompts(records, cfg)
    assert [r["task"] for r in chosen] == ["math_mc", "qa", "math_mc", "qa"]
    assert skipped == {}


@pytest.mark.integration
@pytest.mark.slow
def test_demo_gguf_teacher_feeds_format(tmp_path, monkeypatch) -> None:
    """The bundled SmolLM2 GGUF through llama-cpp-python as the teacher on MathQA and the bundled CodeI/O sample,
    then format reads the traces."""
    monkeypatch.chdir(tmp_path)
    path = write_project(tmp_path, "unused")
    config = yaml.safe_load(path.read_text())
    # every CodeI/O sample record: max_prompts=3 then takes one prompt of each task (a seeded cap could keep
    # only one task's prompts)
    config["ingest"]["sources"].append({"name": "codeio", "kind": "codeio",
                                        "path": str(Path(__file__).resolve().parents[2] / "configs/samples/codeio/raw.jsonl")})
    config["distill"] = {"enabled": True, "teacher": {"kind": "gguf", "path": "bundled:SmolLM2-135M-Instruct",
                                                      "context_length": 2048},
                         "max_prompts": 3, "max_tokens": 48, "keep": "all", "revise": True}
    config["format"] = {"template": "r1", "max_length": 512}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    cfg = load_config(path)
    status, result, _ = run_through("format", cfg)
    assert status == "done"
    out = tmp_path / "runs/t"
    report = json.loads((out / "distill/report.json").read_text())
    assert report["teacher"] == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {task: row["generated"] for task, row in report["tasks"].items()} == {
        "code_io_input": 1, "code_io_output": 1, "math_mc": 1}
    distilled = list(read_jsonl(out / "distill/train.jsonl"))
    assert len(distilled) == 3 and all(r["messages"][-1]["content"].startswith("<think>\n") for r in distilled)
    formatted = {r["id"]: r for r in read_jsonl(out / "format/train.jsonl")}
    assert all(r["id"] in formatted and "<think>" in formatted[r["id"]]["completion"] for r in distilled)


@pytest.mark.integration
def test_a_native_crash_of_the_gguf_teacher_fails_the_stage_and_keeps_what_came_before(tmp_path, monkeypatch) -> None:
    """SIGSEGV to the teacher's llama.cpp child mid-stage: one message naming the stage, the file and the signal,
    exit code 1, distill marked failed with its log, nothing published, ingest's artifacts untouched."""
    monkeypatch.chdir(tmp_path)
    path = write_project(tmp_path, "unused")
    config = yaml.safe_load(path.read_text())
    config["distill"] = {"enabled": True, "teacher": {"kind": "gguf", "path": "bundled:SmolLM2-135M-Instruct",
                                                      "context_length": 1024}, "max_prompts": 2, "max_tokens": 400}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_stage("ingest", load_config(path))
    ingest_before = describe_outputs(tmp_path / "runs/t/ingest")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "distillery", "distill", "-c", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "400", "PYTHONPATH": str(root)})
    crash_child_of(proc)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert "error: distill failed: llama.cpp crashed with SIGSEGV (signal 11) while generating teacher answers " \
           "with " in output and "SmolLM2-135M-Instruct.Q4_1.gguf" in output and "Traceback" not in output
    entry = json.loads((tmp_path / "runs/t/manifest.json").read_text())["stages"]["distill"]
    assert entry["status"] == "failed" and entry["error"].startswith("NativeCrash: llama.cpp crashed with SIGSEGV")
    assert f"Log: {entry['log']}" in output and "NativeCrash" in Path(entry["log"]).read_text()
    assert not (tmp_path / "runs/t/distill").exists()
    assert describe_outputs(tmp_path / "runs/t/ingest") == ingest_before


@pytest.mark.integration
@pytest.mark.slow
def test_hf_teacher_samples_k_answers(demo_model_path) -> None:
    from distillery.reasoning.teachers import HFTeacher

    teacher = HFTeacher(demo_model_path)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}]
    answers = teacher.complete(messages, 2, 0.7, 12, seed=1)
    assert len(answers) == 2 and all(isinstance(a, str) and a.strip() for a in answers)
    assert teacher.complete(messages, 1, 0.0, 12, seed=1) == teacher.complete(messages, 1, 0.0, 12, seed=2)


def test_a_prompt_longer_than_the_gguf_teachers_context_is_a_dropped_sample() -> None:
    """As an HTTP teacher's 400: that prompt's samples are dropped with the reason, and the teacher goes on; it was
    llama-cpp-python's ValueError, an unexpected error (exit 1) that ended the stage. A reply that would overrun
    the context is cut off at its end."""
    from distillery.reasoning.teachers import CutOff, Dropped, GGUFTeacher, resolve_gguf_path

    teacher = GGUFTeacher(resolve_gguf_path("bundled:SmolLM2-135M-Instruct"), 256)
    try:
        replies = teacher.complete([{"role": "user", "content": "word " * 400}], 2, 0.0, 8, 0)
        assert [r.reason for r in replies] == ["prompt too long for the teacher"] * 2
        assert all(isinstance(r, Dropped) and "context_length 256" in r.detail for r in replies)
        counting = [{"role": "user", "content": "Count: " + "one two three four five " * 38}]
        assert isinstance(teacher.complete(counting, 1, 0.0, 200, 0)[0], CutOff)
        assert isinstance(teacher.complete([{"role": "user", "content": "Hi"}], 1, 0.0, 4, 0)[0], str)
    finally:
        teacher.close()


def test_a_bundled_model_without_a_runnable_gguf_is_refused_as_a_teacher() -> None:
    from distillery.reasoning.teachers import resolve_gguf_path

    with pytest.raises(UserError, match="bundled:tiny-qwen2-r1 has no runnable GGUF"):
        resolve_gguf_path("bundled:tiny-qwen2-r1")
    with pytest.raises(UserError, match="unknown bundled model 'nope'"):
        resolve_gguf_path("bundled:nope")
    assert resolve_gguf_path("bundled:SmolLM2-135M-Instruct").suffix == ".gguf"


# ---- a teacher whose replies have no usable text, or that never finishes one ----------------------------------

def test_a_teacher_without_text_in_any_reply_fails_naming_it_and_writes_nothing(tmp_path, monkeypatch, server) -> None:
    """content null from every sample: one message and exit code 2, not a finished run with 0 records."""
    monkeypatch.chdir(tmp_path)
    chat = server(reply=lambda messages: None)
    path = write_project(tmp_path, chat.url, max_prompts=2)
    run_stage("ingest", load_config(path))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "distillery", "distill", "-c", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400", "PYTHONPATH": str(root)})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "teacher openai:stub gave no usable text in any of its 2 replies: 2 no text (e.g. content null, " \
           "finish_reason None)" in output and "Traceback" not in output
    assert len(chat.requests) == 2  # a reply without text is not sent back for revision
    run = tmp_path / "runs/t"
    assert not (run / "distill").exists() and not (run / ".distill.partial").exists()
    assert not list(run.glob(".distill.progress-*"))


def test_replies_without_text_or_too_large_are_dropped_counted_and_never_kept(tmp_path, monkeypatch, server,
                                                                                capsys) -> None:
    """One prompt answered with content null, one with 10 MB for 64 tokens: both dropped with their reason, in the
    report, the summary and a warning; traces.jsonl stays small; keep: all keeps only the other four."""
    monkeypatch.chdir(tmp_path)

    def reply(messages: list[dict]) -> str | None:
        question = next(m["content"] for m in messages if m["role"] == "user")
        if "2 times 3" in question:
            return None
        if "4 times 5" in question:
            return "x" * 10_000_000
        return "The answer is (a)"

    chat = server(reply=reply)
    status, result, _ = run_through("distill", load_config(write_project(tmp_path, chat.url, keep="all",
                                                                         max_tokens=64)))
    assert status == "done" and len(chat.requests) == 6
    out = tmp_path / "runs/t/distill"
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {
        "no text": {"replies": 1, "example": "content null, finish_reason None"},
        "reply too large": {"replies": 1, "example": "over 67,584 bytes, the cap for max_tokens 64; the rest was not read"}}
    assert report["tasks"]["math_mc"]["dropped"] == 2 and report["tasks"]["math_mc"]["kept"] == 4
    assert "Teacher replies without usable text, dropped: 1 no text" in (out / "report.md").read_text()
    assert ("dropped replies", "1 no text, 1 reply too large") in result.summary
    assert result.metrics["dropped_replies"] == 2 and result.metrics["train_records"] == 4
    assert "teacher replies without usable text, dropped" in capsys.readouterr().out
    assert (out / "traces.jsonl").stat().st_size < 20_000
    dropped = [t for t in read_jsonl(out / "traces.jsonl") if "dropped" in t["turns"][0]]
    assert sorted(t["turns"][0]["dropped"] for t in dropped) == ["no text", "reply too large"]
    assert all(t["turns"][0]["text"] == "" and not t["verified"] and not t["revised"] for t in dropped)


def test_a_prompt_the_teacher_refuses_is_dropped_and_the_stage_goes_on(tmp_path, monkeypatch, server) -> None:
    """A 400 for one prompt (too long for the teacher's context) is that prompt's dropped sample, with the status
    and the server's message; the other prompts are distilled, and a rerun is up to date."""
    monkeypatch.chdir(tmp_path)

    def reply(messages: list[dict]) -> str | tuple[int, str]:
        if "4 times 5" in next(m["content"] for m in messages if m["role"] == "user"):
            return 400, "This model's maximum context length is 4096 tokens. [/INST]"  # rich would read markup
        return "The answer is (a)"

    chat = server(reply=reply)
    cfg = load_config(write_project(tmp_path, chat.url))
    status, result, _ = run_through("distill", cfg)
    assert status == "done" and len(chat.requests) == 6  # the refused sample is neither retried nor revised
    out = tmp_path / "runs/t/distill"
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {"refused by the teacher (HTTP 400)": {
        "replies": 1, "example": "This model's maximum context length is 4096 tokens. [/INST]"}}
    assert result.metrics["train_records"] == 5 and result.metrics["dropped_replies"] == 1
    refused = [t for t in read_jsonl(out / "traces.jsonl") if "dropped" in t["turns"][0]]
    assert len(refused) == 1 and refused[0]["turns"][0]["dropped_detail"].startswith("This model's maximum")
    assert run_through("distill", cfg)[0] == "up to date"


def test_a_teacher_that_trickles_stops_the_stage_within_its_timeout_and_the_rerun_resumes(tmp_path,
                                                                                          monkeypatch) -> None:
    """After two good answers the server sends a byte every 0.2 s: each read is in time, the request is not."""
    from tests.fixtures.http_faults import FaultServer, chat_reply, send, trickle

    monkeypatch.chdir(tmp_path)
    trickling = threading.Event()

    def answer(handler, n: int) -> None:
        if trickling.is_set():
            send(handler, chat_reply("The answer is (a)"))
        elif n <= 2:
            send(handler, chat_reply("The answer is (a)"))
        else:
            handler.send_response(200)
            handler.end_headers()
            trickle(handler, chat_reply("The answer is (a)"), 0.2)

    fault = FaultServer(answer)
    cfg = load_config(write_project(tmp_path, fault.url, concurrency=1, retries=0, teacher={
        "kind": "openai", "url": fault.url, "model": "stub", "timeout_s": 1.0}))
    run_stage("ingest", cfg)
    started = time.monotonic()
    try:
        with pytest.raises(UserError, match=r"no whole reply within teacher.timeout_s \(1 s\).*a rerun resumes"):
            run_stage("distill", cfg)
        assert time.monotonic() - started < 1.0 + 2.0
        kept = tmp_path / "runs/t/.distill.partial/progress.jsonl"  # the runner keeps it for the rerun
        assert len(kept.read_text().splitlines()) == 2
        trickling.set()
        status, result, _ = run_stage("distill", cfg)
    finally:
        fault.close()
    assert status == "done" and result.metrics["prompts"] == 6 and fault.requests == 3 + 4


def test_where_the_sandbox_cannot_build_its_walls_distill_stops_before_asking_the_teacher(tmp_path, monkeypatch,
                                                                                         server) -> None:
    """isolation: required (the default) with a codeio_input task: one message, no prompt sent, no code run."""
    from distillery.core.console import console
    from distillery.core.rundir import RunDir
    from distillery.reasoning import sandbox
    from distillery.stage import StageContext

    monkeypatch.chdir(tmp_path)
    chat = server(reply=codeio_reply)
    cfg = load_config(write_project(tmp_path, chat.url))
    run_stage("ingest", cfg)
    write_jsonl(tmp_path / "runs/t/ingest/train.jsonl", codeio_records())
    ran: list[str] = []
    monkeypatch.setattr(sandbox, "run_function", lambda code, *args, **kwargs: ran.append(code) or
                        sandbox.SandboxResult(status="refused", files="audit-hook", network="audit-hook"))
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="distill.sandbox.isolation is required"):
        distill.run(StageContext(cfg=cfg, run=RunDir("runs", "t"), out=tmp_path / "out", console=console))
    assert chat.requests == [] and len(ran) == 1 and "probe" in ran[0]


def test_a_reply_cut_off_at_max_tokens_is_never_verified_and_keeps_no_final_answer() -> None:
    """Half a thought whose last option happens to be right is not a verified trace; under keep: all it is kept
    unverified, its reasoning without an answer (not the cut-off text a second time as the answer)."""
    from distillery.reasoning.sandbox import Limits
    from distillery.reasoning.teachers import CutOff
    from distillery.reasoning.verifiers import VERIFIERS

    record = make_record("mathqa", "math_mc", [{"role": "user", "content": "1 + 2?"},
                                               {"role": "assistant", "content": "The answer is (c) 3."}],
                         {}, ["1", "2", "3", "4", "5"], 2)
    reply = CutOff("Option (a) gives 1, too small. Option (c) gives 3, let me check whether")
    text, verdict = distill.checked_turn(record, reply, VERIFIERS["math_mc"], Limits())
    assert verdict.ok is False and "cut off" in verdict.feedback and "dropped" not in verdict.details
    assert VERIFIERS["math_mc"](record, str(reply), Limits()).ok  # read as a whole reply, it would have passed
    trace = distill.training_record(record, [(text, verdict)], verdict, 0, "t")
    assert trace["messages"][-1]["content"] == f"<think>\n{reply}\n</think>"


def test_the_report_counts_each_kind_of_unscored_trace_once_and_keeps_an_example(tmp_path: Path) -> None:
    """Reasons were cut at their first ':' (a URL became 'http') and every number made a kind of its own."""
    reasons = ["the server gave 3 of 5 top log-probs at token 17", "the server gave 1 of 5 top log-probs at token 2",
               "malformed reply from http://127.0.0.1:8000/v1 (ValueError)", "refused by the teacher (HTTP 400): long"]
    entries = [json.loads(progress_line(str(i), logprobs=[{"unscored": why}])) for i, why in enumerate(reasons)]
    report = distill.write_logprobs(tmp_path / "t.safetensors", entries, 5, "t")
    assert report["records"] == 0 and report["unscored"] == {
        "the server gave N of N top log-probs at token N": 2, "malformed reply from http://N.N:N/vN (ValueError)": 1,
        "refused by the teacher (HTTP N)": 1}
    assert report["unscored_examples"]["the server gave N of N top log-probs at token N"] == reasons[0]
