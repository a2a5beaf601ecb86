"""The sandbox contains each kind of hostile code and reports it as a failed run, never an exception.

Every test caps the run at about 2 s. They run as root here: the fork-bomb and /proc tests check the throw-away
uid layer, which only exists when the pipeline runs as root (elsewhere RLIMIT_NPROC binds the user itself); the
`unprivileged` runs and the test as `nobody` check the same walls as a non-root user gets them (a user namespace).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from distillery.reasoning import sandbox
from distillery.reasoning.sandbox import Limits, count_processes, remove_tree, run_function

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
    # refused by the audit hook, or (in the new root) the host's directory does not exist
    assert result.status == "error" and result.message.split(":")[0] in ("PermissionError", "FileNotFoundError")
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
        assert peek.status == "error" and peek.message.split(":")[0] in ("PermissionError", "FileNotFoundError")


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
    assert result.files == "new-root" and result.status in ("ok", "error"), result
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


# ---- what the code can see, reach and leave behind -------------------------------------------------------

READ_EVERYTHING = ("import os\n"
                   "def main(paths):\n"
                   "    seen = {}\n"
                   "    for path in paths:\n"
                   "        try:\n"
                   "            seen[path] = sorted(os.listdir(path)) if os.path.isdir(path) else open(path).read()\n"
                   "        except OSError as err:\n"
                   "            seen[path] = type(err).__name__\n"
                   "    return seen\n")


@pytest.fixture
def planted_secrets():
    """World-readable secrets where users keep them: a project's .env under /home, a Hugging Face token in a
    user's cache, a token under /opt; yielded as {path: content}, removed afterwards."""
    import secrets
    import shutil

    tag = f"distillery-test-{secrets.token_hex(4)}"
    files = {Path("/home") / tag / "project" / ".env": "HF_TOKEN=hf_planted_dotenv",
             Path("/home") / tag / ".cache" / "huggingface" / "token": "hf_planted_cache",
             Path("/opt") / tag / "token": "planted_opt_secret"}
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(0o644)
    try:
        yield {str(p): c for p, c in files.items()}
    finally:
        for top in {Path("/home") / tag, Path("/opt") / tag}:
            shutil.rmtree(top, ignore_errors=True)


@AS_ROOT
@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_only_the_python_runtime_is_visible(planted_secrets: dict, unprivileged: bool) -> None:
    from distillery.reasoning.sandbox_runner import runtime_paths

    project = Path(__file__).resolve().parents[2]
    paths = [*planted_secrets, "/home", "/opt", "/srv", "/run", "/etc/passwd", str(project / "pyproject.toml")]
    result = run_function(READ_EVERYTHING, "main", {"paths": [*paths, "/root"]}, FAST, unprivileged=unprivileged)
    assert result.ok and result.files == "new-root", result
    assert all(result.value[p] in ("FileNotFoundError", "PermissionError") for p in paths), result.value
    assert not any(secret in json_text(result) for secret in planted_secrets.values())
    # /root holds only the way to a runtime directory there (pyenv's Python), if any
    leading = {Path(p).parts[2] for p in runtime_paths() if p.startswith("/root/")}
    assert result.value["/root"] in ("FileNotFoundError", "PermissionError") or set(result.value["/root"]) <= leading


def json_text(result) -> str:
    import json

    return json.dumps(result.value) + result.stdout + result.stderr + result.message


@pytest.mark.skipif(not Path("/usr/bin/python3").is_file() or os.geteuid() != 0,
                    reason="needs root to become `nobody`, and a Python that `nobody` can run")
def test_a_normal_user_gets_the_same_walls(planted_secrets: dict) -> None:
    """Distillery run by a non-root user (`nobody`, with the system's Python): the user namespace gives it the
    new root, the network namespace and the filters; a cgroup is out of reach, so the watchdog bounds memory."""
    import json
    import subprocess

    import tempfile

    project = Path(__file__).resolve().parents[2]
    tmp_path = Path(tempfile.mkdtemp(prefix="distillery-nobody-"))  # pytest's own tmp_path is root's (0700)
    script = tmp_path / "as_nobody.py"
    script.write_text(f"import json, sys\nsys.path.insert(0, {str(project)!r})\n"
                      "from distillery.reasoning.sandbox import Limits, run_function\n"
                      f"r = run_function({READ_EVERYTHING!r}, 'main', {{'paths': {list(planted_secrets)!r}}}, "
                      "Limits(timeout_s=5))\n"
                      "print(json.dumps([r.status, r.value, r.files, r.network, r.unix_sockets, r.memory, r.uid]))\n")
    tmp_path.chmod(0o755)
    script.chmod(0o644)
    try:
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               str(script)], capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        remove_tree(tmp_path)
    assert done.returncode == 0, done.stderr
    status, value, files, network, syscalls, memory, uid = json.loads(done.stdout.strip().splitlines()[-1])
    assert (status, files, network, syscalls, memory, uid) == ("ok", "new-root", "namespace", "seccomp", "watchdog", None)
    assert set(value.values()) <= {"FileNotFoundError", "PermissionError"}, value


def test_host_unix_sockets_are_unreachable_by_any_call(tmp_path: Path) -> None:
    """socket, socketpair (the raw syscall, then sendto a host path), io_uring and AF_VSOCK all fail, and the
    host's listeners receive nothing."""
    import secrets
    import shutil

    directory = Path("/run") / f"distillery-test-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o755)
    stream_path, dgram_path = directory / "stream.sock", directory / "dgram.sock"
    stream, dgram = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        stream.bind(str(stream_path))
        dgram.bind(str(dgram_path))
        for path in (stream_path, dgram_path):
            path.chmod(0o777)
        stream.listen(1)
        stream.settimeout(0.3)
        dgram.settimeout(0.3)
        code = (LIBC + "class Addr(ctypes.Structure):\n"
                "    _fields_ = [('family', ctypes.c_ushort), ('path', ctypes.c_char * 108)]\n"
                "def call(*args):\n"
                "    value = libc.syscall(*args)\n"
                "    return [value, ctypes.get_errno()]\n"
                "def main(stream, dgram):\n"
                "    pair = (ctypes.c_int * 2)(-1, -1)\n"
                "    out = {'socket': call(41, 1, 1, 0), 'socketpair': call(53, 1, 2, 0, ctypes.byref(pair)),\n"
                "           'vsock': call(41, 40, 1, 0), 'io_uring_setup': call(425, 8, ctypes.byref((ctypes.c_char * 120)()))}\n"
                "    addr = Addr(1, dgram.encode())\n"
                "    out['sendto'] = call(44, pair[0], b'x', 1, 0, ctypes.byref(addr), ctypes.sizeof(addr))\n"
                "    out['visible'] = os.path.exists(stream) or os.path.exists(dgram)\n"
                "    return out\n")
        result = run_function(code, "main", {"stream": str(stream_path), "dgram": str(dgram_path)}, FAST)
        assert result.ok and result.unix_sockets == "seccomp", result
        assert result.value["socket"][0] == result.value["socketpair"][0] == result.value["vsock"][0] == -1
        assert result.value["io_uring_setup"][0] == -1 and result.value["sendto"][0] == -1
        assert result.value["visible"] is (result.files != "new-root")
        with pytest.raises(socket.timeout):
            stream.accept()
        with pytest.raises(socket.timeout):
            dgram.recv(16)
    finally:
        stream.close()
        dgram.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_the_kernel_interfaces_of_escapes_are_refused() -> None:
    """Each refused call fails with the seccomp filter's errno, not the kernel's own answer to odd arguments."""
    from distillery.reasoning.sandbox_runner import DENIED, SYSCALLS

    import platform

    column = 0 if platform.machine() == "x86_64" else 1
    calls = {name: SYSCALLS[name][column] for name in ("unshare", "setns", "userfaultfd", "perf_event_open", "bpf",
                                                       "keyctl", "add_key", "mount", "ptrace", "io_uring_setup",
                                                       "open_by_handle_at", "clone3", "syslog")}
    code = (LIBC + "def main(calls):\n"
            "    out = {}\n"
            "    for name, number in calls.items():\n"
            "        value = libc.syscall(number, 0x10000000 if name == 'unshare' else 0, 0, 0, 0, 0)\n"
            "        out[name] = [value, ctypes.get_errno()]\n"
            "    out['clone_newuser'] = [libc.syscall(%d, 0x10000000 | 17, 0, 0, 0, 0), ctypes.get_errno()]\n"
            "    return out\n") % SYSCALLS["clone"][column]
    result = run_function(code, "main", {"calls": calls}, FAST)
    assert result.ok and result.unix_sockets == "seccomp", result
    assert {name: tuple(got) for name, got in result.value.items()} == {
        **{name: (-1, DENIED[name]) for name in calls}, "clone_newuser": (-1, 1)}


# The code's capabilities and bounding set, then open_tree_attr (Linux 6.15, syscall 467 everywhere) cloning the
# runtime's read-only site-packages mount with MOUNT_ATTR_RDONLY cleared, and a file created through the clone.
CLONED_MOUNT = (LIBC + "import sys\n"
                "class MountAttr(ctypes.Structure):\n"
                "    _fields_ = [(n, ctypes.c_uint64) for n in ('set', 'clear', 'propagation', 'userns_fd')]\n"
                "def main(name):\n"
                "    data = (ctypes.c_uint32 * 6)()\n"
                "    libc.capget((ctypes.c_uint32 * 2)(0x20080522, 0), data)\n"
                "    bounding = [c for c in range(64) if libc.prctl(23, c, 0, 0, 0) == 1]\n"
                "    target = [p for p in sys.path if p.endswith('site-packages')][0]\n"
                "    attr = MountAttr(0, 1, 0, 0)\n"
                "    fd = libc.syscall(467, -100, target.encode(), 1 | 0o2000000, ctypes.byref(attr), 32)\n"
                "    opened = [fd, ctypes.get_errno()]\n"
                "    newer = [libc.syscall(461, 0, 0, 0), ctypes.get_errno()]  # lsm_list_modules, Linux 6.8\n"
                "    if fd >= 0:\n"
                "        libc.openat(fd, name.encode(), os.O_WRONLY | os.O_CREAT, 0o644)\n"
                "    return {'capabilities': list(data), 'bounding': bounding, 'open_tree_attr': opened, 'newer': newer,\n"
                "            'target': target}\n")


@AS_ROOT
@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_the_code_holds_no_capability_and_cannot_make_the_runtime_writable(unprivileged: bool) -> None:
    """In a user namespace the code kept every capability inside it; with a mount call newer than the seccomp list
    (open_tree_attr) it cloned the runtime's read-only bind mount writable and wrote into the host's site-packages
    (a .pth file there runs at every start of Python). Now it holds no capability, none can come back, and calls
    past the vetted ones answer ENOSYS."""
    import errno
    import secrets

    name = f"distillery-sandbox-probe-{secrets.token_hex(4)}"
    result = run_function(CLONED_MOUNT, "main", {"name": name}, FAST, unprivileged=unprivileged)
    planted = Path(result.value["target"]) / name if result.ok else None
    try:
        assert result.ok and result.files == "new-root", result
        assert result.value["capabilities"] == [0] * 6 and result.value["bounding"] == []
        assert result.value["open_tree_attr"] == [-1, errno.ENOSYS]
        assert result.value["newer"] == [-1, errno.ENOSYS]  # the filter's answer on kernels that have the call too
        assert not planted.exists()
    finally:
        if planted is not None:
            planted.unlink(missing_ok=True)


# System V shared memory and message queues are refused (test_memory_no_process_maps_is_refused); semaphores and
# POSIX message queues are not.
IPC_OBJECTS = (LIBC + "def main(key, queue):\n"
               "    rt = ctypes.CDLL('librt.so.1', use_errno=True)\n"
               "    return [libc.semget(key, 1, 0o1666), rt.mq_open(queue.encode(), os.O_CREAT | os.O_RDWR, 0o666, None)]\n")


def host_ipc_keys() -> set[int]:
    """The keys of every System V segment, semaphore set and message queue in the host's IPC namespace."""
    keys = set()
    for kind in ("shm", "sem", "msg"):
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            keys.add(int(line.split()[0]))
    return keys


@pytest.mark.skipif(not Path("/proc/sysvipc/shm").exists(), reason="no System V IPC in this kernel")
@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_ipc_objects_of_the_code_are_gone_with_the_run(unprivileged: bool) -> None:
    """POSIX message queues (System V semaphores, shared memory and queues too before they were refused) live in
    an IPC namespace, not in a directory: in the host's they outlived the run and a host service's 0666 ones could
    be opened."""
    import ctypes
    import secrets
    import subprocess

    key, queue = 0x5A000000 + secrets.randbelow(1 << 24), f"/distillery-test-{secrets.token_hex(4)}"
    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    try:
        result = run_function(IPC_OBJECTS, "main", {"key": key, "queue": queue}, FAST, unprivileged=unprivileged)
        assert result.ok and result.value[0] == -1 and result.value[1] >= 0, result  # semget refused; the queue made
        assert key not in host_ipc_keys()
        assert rt.mq_unlink(queue.encode()) == -1 and ctypes.get_errno() == 2  # ENOENT: no queue on the host
    finally:
        for kind in ("M", "S", "Q"):
            subprocess.run(["ipcrm", f"-{kind}", str(key)], capture_output=True, check=False)
        rt.mq_unlink(queue.encode())


# Memory that no process maps, by each route: 8 MB memfds written and kept open; 8 MB System V segments touched and
# detached; message queues filled to their 16 KB. Returns the MB held that way (or the errno that refused the route).
UNMAPPED_MEMORY = (LIBC + "libc.shmat.restype = ctypes.c_void_p\n"
                   "def main(route, count):\n"
                   "    held = []\n"
                   "    for _ in range(count):\n"
                   "        if route == 'memfd':\n"
                   "            try:\n"
                   "                fd = os.memfd_create('x')\n"
                   "            except OSError as err:\n"
                   "                return 'errno %d' % err.errno\n"
                   "            os.write(fd, b'x' * (8 << 20))\n"
                   "        elif route == 'shm':\n"
                   "            fd = libc.shmget(0, 8 << 20, 0o1600)\n"  # IPC_PRIVATE
                   "            if fd < 0:\n"
                   "                return 'errno %d' % ctypes.get_errno()\n"
                   "            address = libc.shmat(fd, None, 0)\n"
                   "            ctypes.memset(address, 1, 8 << 20)\n"
                   "            libc.shmdt(ctypes.c_void_p(address))\n"
                   "        elif route == 'sem':\n"
                   "            fd = libc.semget(0, 32000, 0o1600)\n"  # about 2 MB of kernel memory a set
                   "            if fd < 0:\n"
                   "                return 'errno %d' % ctypes.get_errno()\n"
                   "        else:\n"
                   "            fd = libc.msgget(0, 0o1600)\n"
                   "            if fd < 0:\n"
                   "                return 'errno %d' % ctypes.get_errno()\n"
                   "            message = ctypes.create_string_buffer(8 + 8000)\n"
                   "            ctypes.memset(message, 1, 8)\n"
                   "            libc.msgsnd(fd, message, 8000, 0o4000)\n"  # IPC_NOWAIT
                   "            libc.msgsnd(fd, message, 8000, 0o4000)\n"
                   "        held.append(fd)\n"
                   "    return len(held) * {'msg': 0.016, 'sem': 2}.get(route, 8)\n")


@pytest.mark.parametrize("route, count", [("memfd", 30), ("shm", 30), ("msg", 100), ("sem", 200)])
def test_memory_no_process_maps_is_refused(route: str, count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog (a normal user's bound) sums what the run's processes map: 30 memfds of 8 MB (240 MB) held
    under memory_mb=128 went unseen, and so would segments touched and detached, queued messages, or semaphore
    sets (from a review: 200 sets held 425 MB past memory_mb=256)."""
    monkeypatch.setattr(sandbox.ResourceGroup, "create", classmethod(lambda cls, *args: None))
    limits = Limits(timeout_s=5.0, memory_mb=128, file_size_mb=8, max_processes=8, max_output_kb=64)
    result = run_function(UNMAPPED_MEMORY, "main", {"route": route, "count": count}, limits, unprivileged=True)
    assert result.memory == "watchdog" and result.unix_sockets == "seccomp", result
    assert result.ok and result.value == "errno 1", result


@AS_ROOT
def test_root_session_keyring_is_not_inherited() -> None:
    import ctypes
    import platform
    import secrets

    from distillery.reasoning.sandbox_runner import SYSCALLS

    column = 0 if platform.machine() == "x86_64" else 1
    libc = ctypes.CDLL(None, use_errno=True)
    payload = f"planted-key-{secrets.token_hex(4)}".encode()
    key = libc.syscall(SYSCALLS["add_key"][column], b"user", b"distillery-test", payload, len(payload), -3)  # @s
    assert key > 0, ctypes.get_errno()
    try:
        code = (LIBC + "def main(key, keyctl):\n"
                "    buffer = ctypes.create_string_buffer(256)\n"
                "    read = libc.syscall(keyctl, 11, key, buffer, 256)\n"  # KEYCTL_READ
                "    session = libc.syscall(keyctl, 0, -3, 0)\n"  # KEYCTL_GET_KEYRING_ID of @s
                "    return [read, session, buffer.raw.rstrip(b'\\0').decode(errors='replace')]\n")
        result = run_function(code, "main", {"key": key, "keyctl": SYSCALLS["keyctl"][column]}, FAST)
        assert result.ok and result.keyring == "own", result
        assert result.value[0] == -1 and result.value[1] == -1 and payload.decode() not in json_text(result)
    finally:
        libc.syscall(SYSCALLS["keyctl"][column], 3, key)  # KEYCTL_REVOKE


# Returns how many children hold their block at once: alive, and past the allocation (each says so on a pipe). A
# child still alive but waiting in the kernel for memory the limit will not give does not hold it (under a loaded
# machine cgroup v1's OOM kill can take that long).
FORK_AND_HOLD = ("import os, time\n"
                 "def main(children, mb):\n"
                 "    read, write = os.pipe()\n"
                 "    pids = []\n"
                 "    for k in range(children):\n"
                 "        pid = os.fork()\n"
                 "        if pid == 0:\n"
                 "            block = b'x' * (mb << 20)\n"
                 "            os.write(write, bytes([k]))\n"
                 "            time.sleep(4)\n"
                 "            os._exit(0)\n"
                 "        pids.append(pid)\n"
                 "    time.sleep(2)\n"  # by now each child holds its block, was killed, or waits for memory
                 "    os.set_blocking(read, False)\n"
                 "    try:\n"
                 "        held = set(os.read(read, 64))\n"
                 "    except BlockingIOError:\n"
                 "        held = set()\n"
                 "    return sum(k in held and os.waitpid(pid, os.WNOHANG)[0] == 0 for k, pid in enumerate(pids))\n")


@pytest.mark.parametrize("bound", ["cgroup", "watchdog"])
def test_memory_is_bounded_across_all_processes(bound: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four children of 300 MB each, each under the per-process limit: at most one holds its block at a time
    within memory_mb=512 (the value is how many are alive, each holding 300 MB)."""
    if bound == "watchdog":
        monkeypatch.setattr(sandbox.ResourceGroup, "create", classmethod(lambda cls, *args: None))
    limits = Limits(timeout_s=6.0, memory_mb=512, file_size_mb=1, max_processes=8, max_output_kb=64)
    result = run_function(FORK_AND_HOLD, "main", {"children": 4, "mb": 300}, limits)
    assert result.memory == ("watchdog" if bound == "watchdog" else result.memory)
    if bound == "cgroup" and not result.memory.startswith("cgroup"):
        pytest.skip("no cgroup can be made here: the watchdog case covers this machine")
    assert result.status == "memory_limit" or (result.ok and result.value <= 1), result
    if result.uid is not None:
        assert count_processes(result.uid) == 0


def test_the_watchdog_counts_children_that_leave_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A normal user's run (a user namespace, no cgroup): four children that setsid() and hold 300 MB each are
    still the run's, and stopped together within memory_mb=512."""
    monkeypatch.setattr(sandbox.ResourceGroup, "create", classmethod(lambda cls, *args: None))
    code = FORK_AND_HOLD.replace("            block =", "            os.setsid()\n            block =")
    limits = Limits(timeout_s=6.0, memory_mb=512, file_size_mb=1, max_processes=8, max_output_kb=64)
    result = run_function(code, "main", {"children": 4, "mb": 300}, limits, unprivileged=True)
    assert result.memory == "watchdog" and result.uid is None
    assert result.status == "memory_limit" or (result.ok and result.value <= 1), result


@pytest.fixture
def own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The sandbox's work directories go here: /tmp is shared with the other xdist worker, whose own sandbox runs
    come and go there while this test looks."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_writes_are_bounded_together_and_never_reach_the_host(own_tempdir: Path) -> None:
    code = ("def main():\n"
            "    written = 0\n"
            "    for i in range(50):\n"
            "        try:\n"
            "            with open(f'part-{i}', 'wb') as handle:\n"
            "                handle.write(b'x' * (512 << 10))\n"
            "        except OSError as err:\n"
            "            return [written, err.errno]\n"
            "        written += 512 << 10\n"
            "    return [written, 0]\n")
    result = run_function(code, "main", {}, Limits(timeout_s=3.0, memory_mb=512, file_size_mb=2))
    assert result.ok, result
    written, error = result.value
    if result.files == "new-root":
        assert written <= 2 << 20 and error == 28  # ENOSPC: 2 MB for all files together
    assert list(own_tempdir.iterdir()) == []  # its work directory went with it


HOSTILE_RESULTS = {
    "huge_int": "import sys\ndef main():\n    sys.set_int_max_str_digits(0)\n    return 10 ** 5000\n",
    "deep_nesting": ("import os, sys\ndef main():\n    nonce = sys._getframe(1).f_locals['job']['nonce']\n"
                     "    print('\\n' + nonce + ' ' + '[' * 5000 + ']' * 5000, flush=True)\n    os._exit(0)\n"),
    "forged_line": ("import os, sys\ndef main():\n    nonce = sys._getframe(1).f_locals['job']['nonce']\n"
                    "    print('\\n' + nonce + ' {not json', flush=True)\n    os._exit(0)\n"),
    "forged_refusal": ("import os, sys\ndef main():\n    nonce = sys._getframe(1).f_locals['job']['nonce']\n"
                       "    print(nonce + ' refused', file=sys.stderr, flush=True)\n    os._exit(1)\n"),
    "deep_directories": ("import os\ndef main():\n    for _ in range(3000):\n        os.mkdir('d')\n"
                         "        os.chdir('d')\n    return 'deep'\n"),
}


@pytest.mark.parametrize("case", list(HOSTILE_RESULTS))
def test_hostile_results_become_failed_runs_and_leave_nothing(case: str, own_tempdir: Path) -> None:
    result = run_function(HOSTILE_RESULTS[case], "main", {}, FAST)
    assert isinstance(result, sandbox.SandboxResult)
    if case == "deep_directories":
        assert result.ok and result.value == "deep"
    else:
        assert result.status == "error" and len(result.message) <= 400, result
    assert list(own_tempdir.iterdir()) == []


def test_a_deep_tree_left_on_the_host_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no new root holds, the code writes into the host directory: its removal must not recurse."""
    top = tmp_path / "work"
    top.mkdir()
    monkeypatch.chdir(top)  # the test's working directory comes back afterwards (later tests use relative paths)
    try:
        for _ in range(3000):
            os.mkdir("d")
            os.chdir("d")
    finally:
        os.chdir(tmp_path)
    remove_tree(top)
    assert not top.exists()


def test_printed_text_is_cleaned_and_bounded() -> None:
    code = ("import sys\ndef main():\n"
            "    print('\\x1b[2J\\x1b]0;owned\\x07visible\\x00\\x08')\n"
            "    print('\\x1b[31m' + 'E' * 240000, file=sys.stderr)\n"
            "    raise ValueError('\\x1b[1m' + 'A' * 200000)\n")
    result = run_function(code, "main", {}, Limits(timeout_s=3.0, memory_mb=512, max_output_kb=1024))
    assert result.status == "error"
    for text in (result.stdout, result.stderr, result.message):
        assert "\x1b" not in text and "\x00" not in text and "\x08" not in text
    assert "visible" in result.stdout
    assert len(result.message) <= 400 and len(result.stderr) <= 2100


@AS_ROOT
def test_the_throw_away_uid_is_one_no_process_has(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    low = sandbox.UID_RANGE[0]
    busy = subprocess.Popen(["setpriv", f"--reuid={low + 7}", f"--regid={low + 7}", "--clear-groups", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while not count_processes(low + 7) and time.monotonic() < deadline:
            time.sleep(0.01)
        picks = iter([7, 7, 9])
        monkeypatch.setattr(sandbox.secrets, "randbelow", lambda n: next(picks))
        assert sandbox.unused_uid() == low + 9
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_the_code_can_signal_only_its_own_processes(unprivileged: bool) -> None:
    """kill(-1) and kill(parent) from inside reach nothing outside: the code is PID 1 of its own namespace.
    (Under a user namespace run by root the code has root's uid: without the PID namespace it could kill the
    test itself.) It only fires when it is PID 1, so a missing namespace fails the test instead of the machine."""
    import signal
    import subprocess

    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        code = ("import os, signal\ndef main(target):\n    if os.getpid() != 1:\n        return os.getpid()\n"
                "    hits = 0\n"
                "    for pid in (-1, target):\n"
                "        try:\n"
                "            os.kill(pid, signal.SIGKILL)\n"
                "            hits += 1\n"
                "        except ProcessLookupError:\n"
                "            pass\n"
                "    return 1 + hits\n")
        result = run_function(code, "main", {"target": sentinel.pid}, FAST, unprivileged=unprivileged)
        assert result.processes == "namespace" and result.ok and result.value == 1, result
        assert sentinel.poll() is None  # still alive
    finally:
        sentinel.send_signal(signal.SIGKILL)
        sentinel.wait()


KILL_MY_GROUP = ("import os, signal, time\n"
                 "def main():\n"
                 "    signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
                 "    os.kill(0, signal.SIGUSR1)\n"  # the process group: the runner's too, when it was shared
                 "    time.sleep(0.3)\n"
                 "    return os.getpid() == os.getpgid(0) == os.getsid(0)\n")


@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_the_code_cannot_signal_the_runner_through_its_process_group(unprivileged: bool) -> None:
    """From a review: under a user namespace (a normal user's walls) the code shared the runner's process group
    and uid, so kill(0, ...) killed or stopped the runner, and code that had left the group outlived the run. The
    code has a session of its own."""
    result = run_function(KILL_MY_GROUP, "main", {}, FAST, unprivileged=unprivileged)
    assert result.ok and result.value is True, result


def test_text_that_acts_on_the_display_is_removed() -> None:
    """Control characters (carriage return included), zero-width and bidi characters (overrides and isolates),
    the line and paragraph separators and lone surrogates: none survives into a message, a log or feedback."""
    hostile = ("a\u2066b\u2067c\u2068d\u2069e\u202ef\u200bg\u2028h\u2029i\ufeffj\x00k\rl\x85m\u061cn\u00ado\ud800p"
               "\u180eq\U000e0041r")
    assert sandbox.clean_text(hostile + "\tz\n") == "abcdefghijklmnopqr\tz\n"
    assert sandbox.preview(hostile) == '"abcdefghij\\u0000k\\rlmnopqr"'  # JSON's visible escapes stay


def live_processes_named(name: str) -> list[int]:
    """Host pids of processes (not zombies) whose command name is `name`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1:text.rindex(")")] == name and text[text.rindex(")") + 2] != "Z":
            found.append(int(stat.parent.name))
    return found


def gone_soon(name: str, seconds: float = 1.0) -> bool:
    deadline = time.monotonic() + seconds
    while live_processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not live_processes_named(name)


# The code names itself (PR_SET_NAME) so that the test can find it on the host, leaves its session and sleeps:
# as PID 1 of the namespace itself ("stay"), or as a daemon child whose parent returns at once.
SETSID_AND_SLEEP = ("import ctypes, os, time\n"
                    "def main(name, stay):\n"
                    "    if not stay and os.fork() != 0:\n"
                    "        return 'left'\n"
                    "    if os.getsid(0) != os.getpid():\n"  # the first process leads a session of its own already
                    "        os.setsid()\n"
                    "    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)\n"
                    "    time.sleep(30)\n")


@pytest.mark.parametrize("stay", [True, False], ids=["first-process", "daemon"])
@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_nothing_the_code_starts_outlives_the_run(stay: bool, unprivileged: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving the session (setsid) escapes a kill of the process group; the run's processes must still all
    be gone when run_function returns, also without a cgroup to kill or a throw-away uid to sweep (a normal user's
    case)."""
    import secrets

    monkeypatch.setattr(sandbox.ResourceGroup, "create", classmethod(lambda cls, *args: None))
    name = f"dst-{secrets.token_hex(5)}"
    try:
        result = run_function(SETSID_AND_SLEEP, "main", {"name": name, "stay": stay}, FAST, unprivileged=unprivileged)
        assert result.status == ("timeout" if stay else "ok"), result
        assert gone_soon(name), f"{name} outlived the run"
    finally:
        for pid in live_processes_named(name):
            os.kill(pid, 9)


@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_the_code_ends_with_the_pipeline_that_ran_it(unprivileged: bool) -> None:
    """A kill -9 of distill left the code of a run it had started sleeping on: its time limit was the pipeline's
    to enforce. The runner kills it when the pipeline ends."""
    import secrets
    import signal
    import subprocess
    import sys

    name = f"dst-{secrets.token_hex(5)}"
    starter = ("import sys\nfrom distillery.reasoning.sandbox import Limits, run_function\n"
               "from tests.reasoning.test_sandbox import SETSID_AND_SLEEP\n"
               "run_function(SETSID_AND_SLEEP, 'main', {'name': sys.argv[1], 'stay': True}, Limits(timeout_s=60), "
               "unprivileged=sys.argv[2] == '1')\n")
    pipeline = subprocess.Popen([sys.executable, "-c", starter, name, str(int(unprivileged))],
                                cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 30
        while not live_processes_named(name):
            assert pipeline.poll() is None and time.monotonic() < deadline, "the code did not start"
            time.sleep(0.02)
        pipeline.send_signal(signal.SIGKILL)
        pipeline.wait()
        assert gone_soon(name, seconds=5), f"{name} outlived the pipeline"
    finally:
        for pid in live_processes_named(name):
            os.kill(pid, 9)
        pipeline.kill()


@pytest.mark.skipif(not Path("/usr/bin/python3").is_file() or os.geteuid() != 0,
                    reason="needs root to become `nobody`, and a Python that `nobody` can run")
def test_without_namespaces_the_runner_ends_what_the_code_left() -> None:
    """Where no namespace can be made (a normal user's job that asks for no user namespace: unshare is refused),
    the code still runs in a child of the runner, a subreaper, which kills what the code left before it exits."""
    import json
    import secrets
    import subprocess
    import tempfile

    name = f"dst-{secrets.token_hex(5)}"
    workdir = Path(tempfile.mkdtemp(prefix="distillery-nobody-"))
    workdir.chmod(0o777)
    job = {"code": SETSID_AND_SLEEP, "funcname": "main", "args": {"name": name, "stay": False}, "uid": None,
           "nonce": "n0nce", "user_namespace": False, "require_new_root": False,
           "limits": {"cpu_s": 5, "memory_mb": 512, "file_size_mb": 1, "nproc": 10_000}}
    try:
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               "-I", str(sandbox.RUNNER)], input=json.dumps(job), capture_output=True, text=True,
                              timeout=10, cwd=workdir)
        assert "n0nce isolation audit-hook audit-hook" in done.stderr and "shared" in done.stderr, done.stderr
        assert done.returncode == 0 and 'n0nce "left"' in done.stdout, done.stderr
        assert gone_soon(name), f"{name} outlived the run"
    finally:
        for pid in live_processes_named(name):
            os.kill(pid, 9)
        remove_tree(workdir)


@pytest.mark.skipif(not Path("/usr/bin/python3").is_file() or os.geteuid() != 0,
                    reason="needs root to become `nobody`, and a Python that `nobody` can run")
def test_without_namespaces_required_isolation_refuses_before_the_code_runs() -> None:
    """isolation: required (the default): where no namespace can be made, not a line of the code runs."""
    import json
    import subprocess

    workdir = Path(tempfile.mkdtemp(prefix="distillery-nobody-"))
    workdir.chmod(0o777)
    code = "open('ran', 'w').write('x')\ndef main():\n    return 'ran'\n"
    job = {"code": code, "funcname": "main", "args": {}, "uid": None, "nonce": "n0nce", "user_namespace": False,
           "limits": {"cpu_s": 5, "memory_mb": 512, "file_size_mb": 1, "nproc": 10_000}}
    try:
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               "-I", str(sandbox.RUNNER)], input=json.dumps(job), capture_output=True, text=True,
                              timeout=10, cwd=workdir)
        assert done.returncode == 1 and "n0nce refused" in done.stderr.splitlines(), done.stderr
        assert "ran" not in done.stdout and not (workdir / "ran").exists()
        result = sandbox.interpret(done.returncode, done.stdout.encode(), done.stderr.encode(), "", "n0nce", FAST)
        assert result.status == "refused" and result.files == "audit-hook" and "namespaces failed" in result.message
    finally:
        remove_tree(workdir)


def test_check_isolation_passes_where_the_walls_hold_and_names_the_way_out_where_they_do_not(monkeypatch) -> None:
    from distillery.core.errors import UserError

    walls = run("def f():\n    return 1\n")
    sandbox.check_isolation(FAST)  # the machine the suite runs on builds them (the tests above check each wall)
    assert walls.files == "new-root"
    refused = sandbox.SandboxResult(status="refused", files="audit-hook", network="audit-hook")
    monkeypatch.setattr(sandbox, "run_function", lambda *args, **kwargs: refused)
    required = Limits(timeout_s=3.0)
    with pytest.raises(UserError, match="isolation is required.*best-effort"):
        sandbox.check_isolation(required)
    sandbox.check_isolation(Limits(timeout_s=3.0, isolation="best-effort"))  # nothing refused: it may run


# hf_xet (a dependency of huggingface_hub, so installed wherever Distillery is) starts native threads when imported.
# A signal that the main thread blocks runs a C-level handler in one of them.
IN_AN_IMPORTED_THREAD = (
    "import hf_xet\n" + LIBC +
    "import signal, threading, time\n"
    "def main():\n"
    "    seen = []\n"
    "    def in_a_native_thread(number):\n"
    "        header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()\n"
    "        libc.capget(header, data)\n"
    "        fd = libc.socket(1, 1, 0)\n"
    "        seen.append({'thread': threading.get_native_id(), 'socket': [fd, ctypes.get_errno()],\n"
    "                     'no_new_privs': libc.prctl(39, 0, 0, 0, 0), 'capabilities': list(data)})\n"
    "    handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(in_a_native_thread)\n"
    "    libc.signal(signal.SIGUSR1, handler)\n"
    "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
    "    os.kill(os.getpid(), signal.SIGUSR1)\n"
    "    time.sleep(0.5)\n"
    "    return {'main': threading.get_native_id(), 'seen': seen}\n")


@AS_ROOT
@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_threads_an_import_started_are_as_walled_in_as_the_code(unprivileged: bool) -> None:
    """The modules the code names are imported before the walls go up, and seccomp and capabilities are per
    thread: hf_xet's threads ran with no filter (a socket opened) and, in a user namespace, every capability
    (enough to make the host's site-packages writable). Now the filter covers every thread and the capabilities
    go before the imports."""
    import errno

    pytest.importorskip("hf_xet", reason="hf_xet comes with huggingface_hub in the project's pins")
    result = run_function(IN_AN_IMPORTED_THREAD, "main", {}, FAST, unprivileged=unprivileged)
    assert result.ok and result.unix_sockets == "seccomp", result
    seen = result.value["seen"]
    assert seen and all(entry["thread"] != result.value["main"] for entry in seen), result.value
    for entry in seen:
        assert entry["socket"] == [-1, errno.EACCES] and entry["no_new_privs"] == 1
        assert entry["capabilities"] == [0] * 6


def test_a_project_on_sys_path_is_not_part_of_the_runtime(tmp_path: Path) -> None:
    """A venv made in the project's own folder (`python -m venv .`) has the project as its prefix, and an
    editable install's .pth puts the project on sys.path: the whole project, `.env` included, was bound into the
    new root. Only the library directories are."""
    import subprocess
    import sys
    import sysconfig

    project = tmp_path / "project"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(project)], check=True)
    (project / ".env").write_text("HF_TOKEN=hf_secret\n")
    site = Path(sysconfig.get_path("purelib", vars={"base": str(project), "platbase": str(project)}))
    (site / "editable-project.pth").write_text(f"{project}\n")
    probe = (f"import json, sys; sys.path.insert(0, {str(Path(sandbox.RUNNER).parent)!r}); import sandbox_runner; "
             "print(json.dumps([sandbox_runner.runtime_paths(), sys.path]))")
    paths, sys_path = json.loads(subprocess.run([str(project / "bin" / "python"), "-I", "-c", probe],
                                                capture_output=True, text=True, check=True).stdout)
    assert str(project) in sys_path  # the .pth did put it there
    assert str(site) in paths and not any(path in (str(project), str(tmp_path), "/") for path in paths), paths


DEVICE_TIMES = (LIBC + "def main():\n"
                "    touched = [libc.utimensat(-100, b'/dev/null', None, 0), ctypes.get_errno()]\n"
                "    sink = libc.open(b'/dev/null', os.O_WRONLY)\n"
                "    written = libc.write(sink, b'still a sink', 12)\n"
                "    with open(os.devnull, 'w') as devnull:\n"  # Python's open passes the audit hook
                "        written += devnull.write('quiet')\n"
                "    return {'touched': touched, 'written': written, 'random': len(open('/dev/urandom', 'rb').read(8))}\n")


@AS_ROOT
@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_the_host_s_device_nodes_are_used_but_not_changed(unprivileged: bool) -> None:
    """/dev/null and the random devices are the host's inodes: the code changed /dev/null's times (and, owning it
    in a user namespace, could chmod it). Bound read-only, they are still read and written (the audit hook refused
    Python's own open(os.devnull, 'w'): from a review)."""
    import errno

    before = os.stat("/dev/null")
    result = run_function(DEVICE_TIMES, "main", {}, FAST, unprivileged=unprivileged)
    assert result.ok, result
    assert result.value == {"touched": [-1, errno.EROFS], "written": 12 + 5, "random": 8}
    after = os.stat("/dev/null")
    assert (after.st_mtime_ns, after.st_mode) == (before.st_mtime_ns, before.st_mode)


def test_an_input_too_deep_to_pass_is_a_failed_run_not_an_exception() -> None:
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    result = run("def main(x):\n    return 1\n", {"x": deep})
    assert result.status == "error" and "cannot be passed" in result.message


OOM_KILLS_THE_CODE = ("import os, time\n"
                      "def main():\n"
                      "    for k in range(2):\n"
                      "        if os.fork() == 0:\n"
                      "            block = b'y' * (90 << 20)\n"
                      "            time.sleep(5)\n"
                      "            os._exit(0)\n"
                      "    time.sleep(0.5)\n"
                      "    block = b'x' * (200 << 20)\n"  # the biggest process: the one the kernel's OOM killer picks
                      "    time.sleep(3)\n"
                      "    return 1\n")


@pytest.mark.parametrize("unprivileged", [False, True], ids=["throw-away-uid", "user-namespace"])
def test_the_code_killed_by_the_group_s_oom_killer_is_a_memory_limit(unprivileged: bool) -> None:
    """Each process under memory_mb, together over it: the cgroup's OOM killer kills the code's process with
    SIGKILL. The runner, passing the signal on, set a handler for SIGKILL (EINVAL) and died with a traceback; and
    cgroup v1 counts such a kill in memory.oom_control, not in memory.failcnt. A memory_limit now."""
    limits = Limits(timeout_s=6.0, memory_mb=256, file_size_mb=1, max_processes=8, max_output_kb=64)
    result = run_function(OOM_KILLS_THE_CODE, "main", {}, limits, unprivileged=unprivileged)
    if not result.memory.startswith("cgroup"):
        pytest.skip("no cgroup can be made here: the watchdog stops such runs (test_memory_is_bounded_across_all_processes)")
    assert result.status == "memory_limit", result
    assert "Traceback" not in result.stderr


def test_a_venv_reached_through_a_symlink_still_imports_its_packages(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The new root holds the runtime at its real paths, and sys.path spelled the venv through the symlink
    (a clone whose .venv links to another's): every installed package was missing to the code."""
    import sys

    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a venv")
    linked = tmp_path / "linked-venv"
    linked.symlink_to(sys.prefix)
    monkeypatch.setattr(sys, "executable", str(linked / "bin" / Path(sys.executable).name))
    result = run("import yaml\ndef main():\n    return yaml.safe_load('a: 1')\n")
    assert result.ok and result.value == {"a": 1}, result


def test_a_program_named_in_an_import_runs_only_inside_every_wall() -> None:
    """The runner imports the modules the code names before the last walls go up (as root, before seccomp):
    `import venv.__main__` ran venv's command line there, whose exit ended the runner. Programs are left to the
    code's own import."""
    result = run("import venv.__main__\ndef main():\n    return 1\n")
    assert result.status == "error" and "isolation" not in result.message, result
    assert result.unix_sockets == "seccomp", result  # the walls were up when venv ran
