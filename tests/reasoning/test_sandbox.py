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

from distillery.reasoning.sandbox import Limits, count_processes, run_function

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


AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the private mount namespace and the throw-away uid exist "
                                                     "only when the pipeline runs as root (docs/distill.md: Sandbox)")
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# Five ways out seen against the earlier sandbox, each as plain os calls and as raw libc calls (ctypes skips the
# audit hook, so only the kernel's layers stand). {name} is a fresh name each run.
ESCAPES = {
    "dir_fd": ("import os\ndef main(name):\n    d = os.open('/tmp', os.O_RDONLY | os.O_DIRECTORY)\n"
               "    os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=d))\n    return 'made'\n",
               ["/tmp/{name}"]),
    "dir_fd_libc": (LIBC + "def main(name):\n    d = libc.open(b'/tmp', os.O_RDONLY | os.O_DIRECTORY)\n"
                    "    fd = libc.openat(d, name.encode(), os.O_WRONLY | os.O_CREAT, 0o666)\n    return fd\n",
                    ["/tmp/{name}"]),
    "mkfifo": ("import os\ndef main(name):\n    os.mkfifo('/tmp/' + name)\n    os.mkfifo('/var/tmp/' + name)\n"
               "    return 'made'\n", ["/tmp/{name}", "/var/tmp/{name}"]),
    "symlink_libc": (LIBC + "def main(name):\n    libc.symlink(('/var/tmp/' + name).encode(), b'link')\n"
                     "    fd = libc.open(b'link', os.O_WRONLY | os.O_CREAT, 0o666)\n"
                     "    libc.write(fd, b'x', 1)\n    return fd\n", ["/var/tmp/{name}"]),
    "dev_shm_libc": (LIBC + "def main(name):\n    written = 0\n    for i in range(5):\n"
                     "        fd = libc.open(f'/dev/shm/{name}-{i}'.encode(), os.O_WRONLY | os.O_CREAT, 0o666)\n"
                     "        written += max(0, libc.write(fd, b'x' * (4 << 20), 4 << 20))\n    return written\n",
                     [f"/dev/shm/{{name}}-{i}" for i in range(5)]),
}


@AS_ROOT
@pytest.mark.parametrize("escape", list(ESCAPES))
def test_code_creates_nothing_outside_its_directory_by_any_route(escape: str) -> None:
    import secrets

    code, host_paths = ESCAPES[escape]
    name = f"esc-{secrets.token_hex(6)}"
    result = run_function(code, "main", {"name": name}, Limits(timeout_s=5.0, memory_mb=512, file_size_mb=8))
    assert result.files == "private-mounts" and result.status in ("ok", "error"), result
    left = [p.format(name=name) for p in host_paths if os.path.lexists(p.format(name=name))]
    assert left == [], f"{escape} left {left} on the host"
    if escape == "dev_shm_libc" and result.ok:
        assert result.value <= 8 << 20  # the private /dev/shm holds file_size_mb, not unbounded host memory


@AS_ROOT
def test_a_host_unix_socket_on_a_filesystem_path_is_not_reachable(tmp_path: Path) -> None:
    """A listener any user may connect to (mode 0777, under /run): the network namespace does not hide it, the
    seccomp filter refuses the socket itself."""
    import secrets
    import shutil

    directory = Path("/run") / f"distillery-test-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o755)
    path = directory / "host.sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen(1)
        listener.settimeout(0.5)
        code = (LIBC + "class Addr(ctypes.Structure):\n"
                "    _fields_ = [('family', ctypes.c_ushort), ('path', ctypes.c_char * 108)]\n"
                "def main(path):\n    fd = libc.socket(1, 1, 0)\n    if fd < 0:\n"
                "        return 'socket refused: errno %d' % ctypes.get_errno()\n"
                "    addr = Addr(1, path.encode())\n"
                "    return 'connect %d' % libc.connect(fd, ctypes.byref(addr), ctypes.sizeof(addr))\n")
        result = run_function(code, "main", {"path": str(path)}, FAST)
        assert result.ok and result.value == "socket refused: errno 13" and result.unix_sockets == "seccomp", result
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)
