"""The HTTP teacher against a real OpenAI-compatible server: llama-cpp-python's own (`llama_cpp.server`, what
`just serve-teacher` starts) on the bundled SmolLM2 GGUF, on 127.0.0.1. The same client code talks to vLLM,
SGLang or llama-server on a GPU box."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.reasoning.teachers import OpenAITeacher
from tests.fixtures.llama_server import LlamaServer
from tests.stages.test_distill import run_through, write_project

SECRET = "sk-distillery-test-0123456789"


@pytest.fixture
def llama_server():
    server = LlamaServer().start()
    yield server
    server.kill()


def secret_anywhere(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and SECRET in p.read_text(errors="replace")]


@pytest.mark.integration
@pytest.mark.slow
def test_real_server_k_samples_at_concurrency_4_and_the_key_never_written(tmp_path, monkeypatch, llama_server,
                                                                          capfd) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STUB_KEY", SECRET)
    cfg = load_config(write_project(tmp_path, llama_server.url, concurrency=4, samples_per_prompt=2, max_tokens=48,
                                    keep="all"))
    status, result, _ = run_through("distill", cfg)
    assert status == "done" and result.metrics["prompts"] == 6 and result.metrics["generated"] == 12
    traces = [json.loads(line) for line in (tmp_path / "runs/t/distill/traces.jsonl").read_text().splitlines()]
    assert len(traces) >= 12 and all(t.get("teacher") == "openai:stub" for t in traces if "teacher" in t)
    out, err = capfd.readouterr()
    assert SECRET not in out + err and secret_anywhere(tmp_path / "runs") == []


@pytest.mark.integration
@pytest.mark.slow
def test_server_killed_mid_run_then_restarted_resumes(tmp_path, monkeypatch, llama_server) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_project(tmp_path, llama_server.url, concurrency=1, retries=1, max_tokens=64,
                                    keep="all"))
    progress = tmp_path / "runs/t/.distill.partial/progress.jsonl"

    def kill_after_two_prompts() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if progress.is_file() and len(progress.read_text().splitlines()) >= 2:
                llama_server.kill()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_two_prompts, daemon=True)
    watcher.start()
    with pytest.raises(UserError, match=r"did not answer after 2 attempt\(s\).*a rerun resumes"):
        run_through("distill", cfg)
    watcher.join()
    kept = tmp_path / "runs/t/.distill.partial/progress.jsonl"  # the runner keeps it for the rerun
    assert len(kept.read_text().splitlines()) >= 2
    llama_server.start()
    status, result, _ = run_through("distill", cfg)
    assert status == "done" and result.metrics["prompts"] == 6
    assert not kept.exists()


class FlakyProxy:
    """Answers 429, then 503, then forwards every request to the real server."""

    def __init__(self, target: str) -> None:
        self.statuses, self.seen = [429, 503], 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.seen += 1
                if proxy.statuses:
                    self.send_response(proxy.statuses.pop(0))
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                answer = httpx.post(target + self.path.removeprefix("/v1"), content=body, timeout=60,
                                    headers={"Content-Type": "application/json"})
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.mark.integration
@pytest.mark.slow
def test_429_and_503_are_retried_with_backoff(llama_server) -> None:
    proxy = FlakyProxy(llama_server.url)
    teacher = OpenAITeacher(proxy.url, "smollm2", "NO_SUCH_KEY", timeout_s=60, retries=2)
    started = time.time()
    try:
        [answer] = teacher.complete([{"role": "user", "content": "What is 2 + 2?"}], n=1, temperature=0.0,
                                    max_tokens=8, seed=1)
    finally:
        teacher.close()
        proxy.httpd.shutdown()
    assert answer.strip() and proxy.seen == 3
    assert time.time() - started >= 0.5 + 1.0  # the backoff waited 0.5 s, then 1 s
