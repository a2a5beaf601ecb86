"""Running untrusted code (dataset reference code on a model's predicted input) without trusting it.

Each call is a separate process (`python -I sandbox_runner.py`) in its own session; the runner builds the walls
before the code runs (its docstring lists them: namespaces, a new root holding only the Python runtime, limits,
an empty keyring, a throw-away uid when we are root, a seccomp filter). This side:
- makes an empty working directory (only a mount point when the new root holds) and removes it afterwards,
  however deep a tree the code left in it, and passes a scrubbed environment (no HF_TOKEN, no API key);
- puts the run in a cgroup (reasoning/cgroups.py) that bounds the memory and processes of everything it starts,
  or, where no cgroup can be made, watches their memory and kills them past `memory_mb`;
- picks a throw-away uid that no process uses; after the run kills every process below the runner (left its
  session or not), the process group and every process of that uid; stops the run at the wall-clock timeout or
  when its output passes `max_output_kb`;
- reads what comes back as untrusted text: a result that cannot be parsed (huge integers, deep nesting, a forged
  line) is a failed run, printed text is cut and cleaned of control characters and terminal escapes.
A failure of any kind is a SandboxResult with a status, never an exception: the caller turns it into a failed
check and carries on. The one exception is a machine where the walls cannot be built (no mount or network
namespace): with `isolation: required` (the default) the runner refuses to run the code there, and
`check_isolation`, which the stages call before the first run, stops them with one message.
"""

from __future__ import annotations

import json
import os
import re
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

from distillery.core.errors import UserError
from distillery.core.unseen import ESCAPES, unseen_pattern
from distillery.reasoning.cgroups import ResourceGroup

RUNNER = Path(__file__).with_name("sandbox_runner.py")
UID_RANGE = (200_000, 2**31 - 2)  # throw-away uids: no passwd entry, nothing owned by them on the machine
SIGNAL_REASONS = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGXFSZ: "file size limit exceeded",
                  signal.SIGKILL: "killed", signal.SIGSEGV: "crashed (segmentation fault)"}


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    memory_mb: int = 1024  # every process of the run together (and each one alone)
    file_size_mb: int = 8  # everything the run writes, together (its working directory is a tmpfs of this size)
    max_processes: int = 16
    max_output_kb: int = 256  # stdout and stderr together; the result travels on stdout
    isolation: str = "required"  # required: no run without the namespaces and the new root; best-effort: run anyway

    @classmethod
    def from_config(cls, section: Any) -> "Limits":
        return cls(**section.model_dump())


@dataclass
class SandboxResult:
    status: str  # ok | error | timeout | output_limit | memory_limit | refused (no walls, isolation required)
    value: Any = None
    message: str = ""
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    network: str = ""  # what cut the network: namespace or audit-hook
    files: str = ""  # what hides the host's files and contains writes: new-root or audit-hook
    unix_sockets: str = ""  # what refuses sockets (AF_UNIX, AF_VSOCK, ...), io_uring, namespaces: seccomp or audit-hook
    keyring: str = ""  # own (an empty session keyring) or inherited
    processes: str = ""  # namespace (it sees and signals only its own processes) or shared
    memory: str = ""  # what bounds the memory of all its processes together: cgroup-v1, cgroup-v2 or watchdog
    uid: int | None = None  # the throw-away uid it ran under (None: our own uid, when not root)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_function(code: str, funcname: str, args: Any, limits: Limits = Limits(), *,
                 unprivileged: bool = False) -> SandboxResult:
    """Define `code` in a fresh sandboxed interpreter and return the JSON result of `funcname(**args)`.

    As root the code runs under a throw-away uid; `unprivileged` runs it as a non-root user would: under our own
    uid in a user namespace (the same new root and filters, no uid change)."""
    try:
        json.dumps(args)  # the model's predicted input: too deep or not JSON at all is a failed run, not an error here
    except (ValueError, TypeError, RecursionError) as err:
        return SandboxResult("error", message=f"the input cannot be passed to the code: {type(err).__name__}")
    nonce = secrets.token_hex(8)
    workdir = Path(tempfile.mkdtemp(prefix="distill-sandbox-"))
    uid = None
    if os.geteuid() == 0 and not unprivileged:
        uid = unused_uid()
        os.chown(workdir, uid, uid)
    # RLIMIT_NPROC counts every thread of the real uid: our own user already has some.
    nproc = limits.max_processes if uid is not None else count_processes(os.getuid(), threads=True) + limits.max_processes
    job = {"code": code, "funcname": funcname, "args": args, "uid": uid, "nonce": nonce, "pipeline": os.getpid(),
           "user_namespace": uid is None and (unprivileged or os.geteuid() != 0),
           "require_new_root": limits.isolation == "required",
           "limits": {"cpu_s": int(limits.timeout_s) + 1, "memory_mb": limits.memory_mb,
                      "file_size_mb": limits.file_size_mb, "nproc": nproc}}
    group = ResourceGroup.create(f"distill-sandbox-{nonce}", limits.memory_mb * 2**20, limits.max_processes + 1)
    started = time.monotonic()
    proc, stdout, stderr, stopped = None, b"", b"", ""
    try:
        proc = subprocess.Popen([sys.executable, "-I", str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=workdir, env=scrubbed_env(workdir), start_new_session=True)
        if group is not None:
            group.add(proc.pid)  # before it reads its job: nothing of the code runs outside the group
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        over_memory = None if group is not None else memory_watchdog(proc.pid, uid, limits.memory_mb)
        stdout, stderr, stopped = collect_output(proc, started + limits.timeout_s, limits.max_output_kb * 1024,
                                                 over_memory)
    finally:
        if proc is not None:
            kill_everything(proc, uid, group)
            proc.wait()
        if group is not None:
            if group.out_of_memory() and proc is not None and proc.returncode != 0:
                stopped = "memory_limit"
            group.remove()
        remove_tree(workdir)
    result = interpret(proc.returncode, stdout, stderr, stopped, nonce, limits)
    result.seconds, result.uid = round(time.monotonic() - started, 3), uid
    result.memory = group.kind if group is not None else "watchdog"
    return result


NO_WALLS = ("this machine does not let the sandbox hide its files and network from the code: creating mount and "
            "network namespaces failed (unprivileged user namespaces switched off, e.g. Ubuntu 24.04's AppArmor "
            "restriction, or a container without CAP_SYS_ADMIN)")


def check_isolation(limits: Limits) -> None:
    """A UserError when `limits` require isolation and this machine cannot build it (one trivial run, 0.05 s)."""
    if limits.isolation != "required":
        return
    result = run_function("def probe():\n    return 1\n", "probe", {}, limits)
    if result.status == "refused":
        raise UserError(f"distill.sandbox.isolation is required, but {NO_WALLS}. Dataset code would read every file "
                        "your user can (Hugging Face tokens, .env files, SSH keys). Allow unprivileged user "
                        "namespaces (Ubuntu 24.04: `sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`), "
                        "or set distill.sandbox.isolation: best-effort to run it with only the audit hook, which "
                        "refuses writes outside its directory but not reads.")


def unused_uid() -> int:
    """A throw-away uid in UID_RANGE that no process on the machine has (after the run every process of it is
    killed, so it must not be somebody's)."""
    for _ in range(100):
        uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]
        if count_processes(uid) == 0:
            return uid
    raise RuntimeError("no unused uid found for the sandbox")


def remove_tree(path: Path) -> None:
    """Remove the working directory whatever the code left (shutil.rmtree recurses and fails on a deep tree)."""
    subprocess.run(["rm", "-rf", "--", str(path)], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def memory_watchdog(pid: int, uid: int | None, memory_mb: int):
    """Where no cgroup can be made: a check, run every tenth of a second, whether the run's processes (every
    process below the runner `pid`, or every process of its throw-away uid) together hold more than `memory_mb`
    of anonymous memory."""
    limit_kb = memory_mb * 1024

    def over() -> bool:
        total, members = 0, descendants(pid) | {pid} if uid is None else set()
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                mine = (fields.get("Uid", "").split()[:1] == [str(uid)] if uid is not None
                        else int(status.parent.name) in members)
            except (OSError, ValueError):
                continue
            if mine:
                total += int(fields.get("RssAnon", "0 kB").split()[0]) + int(fields.get("RssShmem", "0 kB").split()[0])
        return total > limit_kb

    return over


def scrubbed_env(workdir: Path) -> dict[str, str]:
    """The only environment untrusted code sees."""
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir),
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def collect_output(proc: subprocess.Popen, deadline: float, cap: int, over_memory=None) -> tuple[bytes, bytes, str]:
    """Read stdout/stderr until the process exits, the deadline passes, `cap` bytes arrived or `over_memory()`.

    Returns (stdout, stderr, why it was stopped: "" | "timeout" | "output_limit" | "memory_limit"). Orphaned
    children that keep a pipe open do not hold us: once the process itself has exited we only drain what is
    already there.
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
            if over_memory is not None and over_memory():
                stopped = "memory_limit"
                break
    finally:
        selector.close()
    return bytes(chunks[proc.stdout][:cap]), bytes(chunks[proc.stderr][:cap]), stopped


def descendants(pid: int) -> set[int]:
    """The live processes below `pid` (its children, theirs, ...), from /proc. Below the runner that is every
    process of the run while the runner lives: the runner never runs the code, and an orphan is adopted by the
    PID namespace's first process (or, without one, by the runner as a subreaper), leaving a session or not."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            state, parent = text[text.rindex(")") + 2:].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            children.setdefault(int(parent), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_descendants(pid: int, timeout_s: float = 5.0) -> None:
    """SIGKILL every process below `pid` until none is left (the namespace's first process takes the whole PID
    namespace with it)."""
    deadline = time.monotonic() + timeout_s
    while (found := descendants(pid)) and time.monotonic() < deadline:
        for child in found:
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def kill_everything(proc: subprocess.Popen, uid: int | None, group: ResourceGroup | None = None) -> None:
    """Kill every process below the runner (first, while the runner still holds them in its tree), the runner's
    process group, its cgroup and, under a throw-away uid, every process that uid still has."""
    kill_descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if group is not None:
        group.kill()
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
    """Turn what the process left into a status, the returned value and a one-line message; never raises."""
    out, err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
    layers = next((line.split()[2:] for line in err.splitlines() if line.startswith(f"{nonce} isolation ")), [])
    network, files, syscalls, keyring, processes = (layers + [""] * 5)[:5]
    err = "\n".join(line for line in err.splitlines() if not line.startswith(nonce))
    marked = [line for line in out.splitlines() if line.startswith(nonce + " ")]
    printed = out.replace(marked[-1], "") if marked else out
    result = SandboxResult(status="error", stdout=clean_text(printed.rstrip()), stderr=clean_text(err),
                           network=network, files=files, unix_sockets=syscalls, keyring=keyring,
                           processes=processes)
    # The runner's refusal comes before any code, with "-" for the layers it never built; the code itself can find
    # the nonce in its interpreter and print a refusal of its own, which must not pass for the machine's.
    if syscalls == "-" and f"{nonce} refused" in stderr.decode("utf-8", "replace").splitlines():
        result.status, result.message = "refused", NO_WALLS
    elif stopped == "timeout":
        result.status, result.message = "timeout", f"did not finish within {limits.timeout_s:g} s (killed)"
    elif stopped == "output_limit":
        result.status, result.message = "output_limit", f"printed more than {limits.max_output_kb} KB (killed)"
    elif stopped == "memory_limit":
        result.status, result.message = "memory_limit", f"its processes used more than {limits.memory_mb} MB (killed)"
    elif returncode < 0:
        result.message = SIGNAL_REASONS.get(-returncode, f"killed by signal {-returncode}")
    elif returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        result.message = clean_text(lines[-1].strip(), MESSAGE_CHARS) if lines else f"exited with status {returncode}"
    elif not marked:
        result.message = "the code exited before returning a result"
    else:
        try:
            result.status, result.value = "ok", json.loads(marked[-1][len(nonce) + 1:])
        except (ValueError, RecursionError) as err:  # a forged line, an integer of 5,000 digits, 5,000 nested lists
            result.status, result.message = "error", clean_text(f"the returned value cannot be read: {err}", MESSAGE_CHARS)
    return result


MESSAGE_CHARS, TEXT_CHARS = 300, 2000
# After the terminal escapes (core/unseen.py), any other character that acts on the display: controls, zero-width
# and bidi characters, the line and paragraph separators.
CONTROL = unseen_pattern(keep="\t\n")


def clean_text(text: str, limit: int = TEXT_CHARS) -> str:
    """Untrusted text made safe to log, show and send on: no terminal escapes or control characters (newlines and
    tabs kept), at most `limit` characters (the end kept: tracebacks end with what matters)."""
    text = CONTROL.sub("", ESCAPES.sub("", text))
    if len(text) <= limit:
        return text
    note = f"[{len(text)} characters, the last ones kept] "
    return note + text[len(text) - limit + len(note):]


def preview(value: Any, limit: int = MESSAGE_CHARS) -> str:
    """A value's JSON for a message (feedback to a teacher, a report), cleaned and cut to `limit` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(type(value))
    text = CONTROL.sub("", ESCAPES.sub("", text))
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} characters cut]"
