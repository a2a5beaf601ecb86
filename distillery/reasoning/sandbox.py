"""Running untrusted code (dataset reference code on a model's predicted input) without trusting it.

Each call is a separate process (`python -I sandbox_runner.py`) in its own session, with:
- an empty temporary working directory, removed afterwards, and a scrubbed environment (PATH, locale, HOME/TMPDIR
  pointing at that directory, one BLAS thread: no HF_TOKEN, no API key, nothing else of ours);
- limits on CPU seconds, address space, file size, open files and processes (the runner sets them);
- when we are root, a throw-away uid: RLIMIT_NPROC binds it (not root), it cannot read root's files of mode 0600
  or another process's /proc/<pid>/environ, and after the run every process left under that uid is killed;
- when we are root, a private mount namespace: the file tree read-only, fresh tmpfs on /tmp, /var/tmp and
  /dev/shm that vanish with the run, only the working directory writable;
- no network: an empty network namespace where the kernel allows it, else an audit hook that refuses sockets;
  and no Unix-domain sockets (a seccomp filter), which a network namespace does not cover;
- a wall-clock timeout after which the whole process group is killed, and stdout + stderr capped in size.
A failure of any kind is a SandboxResult with a status, never an exception: the caller turns it into a failed
check and carries on.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNNER = Path(__file__).with_name("sandbox_runner.py")
UID_RANGE = (200_000, 2**31 - 2)  # throw-away uids: no passwd entry, nothing owned by them on the machine
SIGNAL_REASONS = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGXFSZ: "file size limit exceeded",
                  signal.SIGKILL: "killed", signal.SIGSEGV: "crashed (segmentation fault)"}


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    memory_mb: int = 1024
    file_size_mb: int = 8
    max_processes: int = 16
    max_output_kb: int = 256

    @classmethod
    def from_config(cls, section: Any) -> "Limits":
        return cls(**section.model_dump())


@dataclass
class SandboxResult:
    status: str  # ok | error | timeout | output_limit
    value: Any = None
    message: str = ""
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    network: str = ""  # what cut the network: namespace or audit-hook
    files: str = ""  # what contains file writes: private-mounts or audit-hook
    unix_sockets: str = ""  # what refuses AF_UNIX sockets: seccomp or audit-hook
    uid: int | None = None  # the throw-away uid it ran under (None: our own uid, when not root)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_function(code: str, funcname: str, args: Any, limits: Limits = Limits()) -> SandboxResult:
    """Define `code` in a fresh sandboxed interpreter and return the JSON result of `funcname(**args)`."""
    nonce = secrets.token_hex(8)
    workdir = Path(tempfile.mkdtemp(prefix="distill-sandbox-"))
    uid = None
    if os.geteuid() == 0:
        uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]
        os.chown(workdir, uid, uid)
    # RLIMIT_NPROC counts every thread of the real uid: our own user already has some.
    nproc = limits.max_processes if uid is not None else count_processes(os.getuid(), threads=True) + limits.max_processes
    job = {"code": code, "funcname": funcname, "args": args, "uid": uid, "nonce": nonce,
           "limits": {"cpu_s": int(limits.timeout_s) + 1, "memory_mb": limits.memory_mb,
                      "file_size_mb": limits.file_size_mb, "nproc": nproc}}
    started = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=workdir, env=scrubbed_env(workdir), start_new_session=True)
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        stdout, stderr, stopped = collect_output(proc, started + limits.timeout_s, limits.max_output_kb * 1024)
        kill_everything(proc, uid)
        proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = interpret(proc.returncode, stdout, stderr, stopped, nonce, limits)
    result.seconds, result.uid = round(time.monotonic() - started, 3), uid
    return result


def scrubbed_env(workdir: Path) -> dict[str, str]:
    """The only environment untrusted code sees."""
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir),
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def collect_output(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str]:
    """Read stdout/stderr until the process exits, the deadline passes or `cap` bytes arrived.

    Returns (stdout, stderr, why it was stopped: "" | "timeout" | "output_limit"). Orphaned children that keep a
    pipe open do not hold us: once the process itself has exited we only drain what is already there.
    """
    chunks = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in chunks:
        selector.register(stream, selectors.EVENT_READ)
    stopped = ""
    try:
        while selector.get_map():
            exited = proc.poll() is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not exited:
                stopped = "timeout"
                break
            events = selector.select(timeout=0 if exited else min(remaining, 0.1))
            if exited and not events:
                break
            for key, _ in events:
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                chunks[key.fileobj] += data
            if sum(len(c) for c in chunks.values()) > cap:
                stopped = "output_limit"
                break
    finally:
        selector.close()
    return bytes(chunks[proc.stdout][:cap]), bytes(chunks[proc.stderr][:cap]), stopped


def kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the run's process group and, under a throw-away uid, every process that uid still has."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + 5
    while uid is not None and count_processes(uid) and time.monotonic() < deadline:
        # kill(-1) from inside the uid reaches exactly that uid's processes, also those that left the group.
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.01)


def count_processes(uid: int, threads: bool = False) -> int:
    """Live (not zombie) processes (or their threads) whose real uid is `uid`, from /proc (0 where it is absent)."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            count += int(fields.get("Threads", "1")) if threads else 1
    return count


def interpret(returncode: int, stdout: bytes, stderr: bytes, stopped: str, nonce: str, limits: Limits) -> SandboxResult:
    """Turn what the process left into a status, the returned value and a one-line message."""
    out, err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
    layers = next((line.split()[2:] for line in err.splitlines() if line.startswith(f"{nonce} isolation ")), [])
    network, files, unix_sockets = (layers + ["", "", ""])[:3]
    err = "\n".join(line for line in err.splitlines() if not line.startswith(nonce))
    result = SandboxResult(status="error", stdout=out[-2000:], stderr=err[-2000:], network=network, files=files,
                           unix_sockets=unix_sockets)
    if stopped == "timeout":
        result.status, result.message = "timeout", f"did not finish within {limits.timeout_s:g} s (killed)"
    elif stopped == "output_limit":
        result.status, result.message = "output_limit", f"printed more than {limits.max_output_kb} KB (killed)"
    elif returncode < 0:
        result.message = SIGNAL_REASONS.get(-returncode, f"killed by signal {-returncode}")
    elif returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        result.message = lines[-1].strip() if lines else f"exited with status {returncode}"
    else:
        marked = [line for line in out.splitlines() if line.startswith(nonce + " ")]
        if not marked:
            result.message = "the code exited before returning a result"
        else:
            result.status, result.value = "ok", json.loads(marked[-1][len(nonce) + 1:])
            result.stdout = out.replace(marked[-1], "").rstrip()[-2000:]
    return result
