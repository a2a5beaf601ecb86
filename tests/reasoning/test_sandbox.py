"""The sandbox contains each kind of hostile code and reports it as a failed run, never an exception.

Every test caps the run at about 2 s. They run as root here: the fork-bomb and /proc tests check the throw-away
uid layer, which only exists when the pipeline runs as root (elsewhere RLIMIT_NPROC binds the user itself).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from reasoning.sandbox import Limits, count_processes, run_function

FAST = Limits(timeout_s=2.0, memory_mb=512, file_size_mb=1, max_processes=8, max_output_kb=64)


def run(code: str, args=None, limits: Limits = FAST):
    return run_function(code, "main", args if args is not None else {}, limits)


def test_returns_the_json_result_and_keeps_prints_apart() -> None:
    result = run("def main(a, b):\n    print('working')\n    return {'sum': a + b, 'items': [a, b]}\n", {"a": 2, "b": 3})
    assert result.ok, result.message
    assert result.value == {"sum": 5, "items": [2, 3]}
    assert result.stdout == "working"


def test_exception_is_reported_with_its_last_line() -> None:
    result = run("def main(x):\n    return 1 / x\n", {"x": 0})
    assert result.status == "error" and result.message == "ZeroDivisionError: division by zero"


def test_infinite_loop_is_killed_at_the_timeout() -> None:
    started = time.monotonic()
    result = run("def main():\n    while True:\n        pass\n")
    assert result.status == "timeout" and "killed" in result.message
    assert time.monotonic() - started < 6


def test_fork_bomb_is_capped_and_every_child_killed() -> None:
    # Counts how many children it manages to start: the process limit must stop it well short of 200.
    code = ("import os, time\n"
            "def main():\n"
            "    started = 0\n"
            "    for _ in range(200):\n"
            "        try:\n"
            "            pid = os.fork()\n"
            "        except OSError:\n"
            "            break\n"
            "        if pid == 0:\n"
            "            os.setsid()\n"  # leave the process group: only the uid sweep reaches it
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "        started += 1\n"
            "    return started\n")
    result = run(code)
    assert result.ok, result.message
    assert result.value < FAST.max_processes
    if result.uid is not None:
        assert count_processes(result.uid) == 0


def test_endless_fork_loop_ends_at_the_timeout() -> None:
    code = "import os\ndef main():\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n"
    started = time.monotonic()
    result = run(code)
    assert result.status == "timeout"
    assert time.monotonic() - started < 8
    if result.uid is not None:
        assert count_processes(result.uid) == 0


def test_memory_bomb_fails_with_memory_error() -> None:
    result = run("def main():\n    block = bytearray(4 * 1024 ** 3)\n    return len(block)\n")
    assert result.status == "error" and "MemoryError" in result.message


def test_writing_outside_the_working_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    result = run("def main(path):\n    open(path, 'w').write('x')\n    return 'written'\n", {"path": str(target)})
    assert result.status == "error" and "PermissionError" in result.message
    assert not target.exists()
    inside = run("def main():\n    open('scratch.txt', 'w').write('ok')\n    return open('scratch.txt').read()\n")
    assert inside.ok and inside.value == "ok"


def test_large_files_stop_at_the_file_size_limit() -> None:
    result = run("def main():\n    open('big.bin', 'wb').write(b'x' * (8 * 1024 * 1024))\n")
    assert result.status == "error" and "File too large" in result.message


def test_parent_secrets_are_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_parent_secret_123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-parent-secret-456")
    result = run("import os\ndef main():\n    return dict(os.environ)\n")
    assert result.ok
    assert "HF_TOKEN" not in result.value and "OPENAI_API_KEY" not in result.value
    assert not any("secret" in value for value in result.value.values())
    if os.geteuid() == 0:  # a throw-away uid may not read another user's /proc/<pid>/environ
        peek = run("import os\ndef main():\n    return open(f'/proc/{os.getppid()}/environ').read()\n")
        assert peek.status == "error" and "Permission" in peek.message


def test_sockets_are_refused_and_nothing_connects() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = ("import socket\n"
            "def main(port):\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            "    s.connect(('127.0.0.1', port))\n"
            "    return 'connected'\n")
    try:
        result = run(code, {"port": port})
        assert result.status == "error" and result.network in ("namespace", "audit-hook")
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_printing_gigabytes_is_cut_off_quickly() -> None:
    started = time.monotonic()
    result = run("import sys\ndef main():\n    while True:\n        sys.stdout.write('x' * 65536)\n")
    assert result.status == "output_limit"
    assert len(result.stdout) <= 2000
    assert time.monotonic() - started < 6


def test_result_that_is_not_json_is_an_error() -> None:
    result = run("def main():\n    return {1, 2}\n")
    assert result.status == "error" and "JSON serializable" in result.message
