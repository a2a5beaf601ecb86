"""Native code in a child process, so that its crash becomes an error instead of the death of the pipeline.

llama.cpp (through llama-cpp-python) can die outright on a CPU it was not built for: a segfault or an illegal
instruction kills the whole process, with no Python exception to catch. `Child` runs functions in one child
Python process that keeps state between calls (a loaded model); when the child dies, the parent raises
`NativeCrash`, naming what was being done, the signal and what to try.

    child = Child("llama.cpp", "verifying model-Q4_K_M.gguf", hint="...")
    info = child.call(load_model, path)         # runs load_model(state, emit, path) in the child
    child.call(parse, text, timeout_s=5)        # past 5 s the child is killed and ChildTimeout raised
    for piece in child.stream(generate, prompt):  # whatever the child function emit()s, as it comes
        ...
    child.close()

Child functions are module-level functions `fn(state: dict, emit: Callable, *args)` (pickled by name, so they
must be importable: never in a script's __main__); `state` lives as long as the child, `emit(x)` sends `x` to
the parent (progress counts, streamed text) before the function returns. Arguments and results are pickled.
`child.call(plain, f, *args)` runs any importable function `f(*args)`: heavy numeric work done that way gives all
of its memory back to the system when the child ends, which a long-lived process never does.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator

_CRASH_HINTS = {
    signal.SIGKILL: "SIGKILL usually means the machine ran out of memory (the kernel's OOM killer)",
    signal.SIGILL: "an illegal instruction: the library was compiled for a CPU with instructions this one lacks",
    signal.SIGSEGV: "a segmentation fault inside the native library",
    signal.SIGBUS: "a bus error inside the native library (a truncated or changed memory-mapped file?)",
    signal.SIGABRT: "the native library aborted (an assertion failed)",
    signal.SIGXCPU: "it used up the CPU time allowed to it",
}


def describe_exit(exitcode: int | None) -> str:
    """'SIGSEGV (signal 11)', 'exit code 3' or 'no exit code' for a child's exit."""
    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            return f"{signal.Signals(-exitcode).name} (signal {-exitcode})"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class NativeCrash(Exception):
    """A child process running native code died before answering."""

    def __init__(self, library: str, doing: str, exitcode: int | None, hint: str = "", last_words: str = ""):
        self.library, self.doing, self.exitcode, self.hint = library, doing, exitcode, hint
        self.last_words = last_words  # what it wrote to stderr last, with capture_stderr
        cause = _CRASH_HINTS.get(-exitcode) if exitcode is not None and exitcode < 0 else None
        message = f"{library} crashed with {describe_exit(exitcode)} while {doing}"
        message += f": {cause}." if cause else "."
        if last_words:
            message += f" Its last words: {last_words!r}."
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def __reduce__(self):
        return (NativeCrash, (self.library, self.doing, self.exitcode, self.hint, self.last_words))


class ChildTimeout(Exception):
    """A call did not finish within its time limit; the child was killed (close it and start another)."""


class Child:
    """One spawned process that runs functions for this one; see the module docstring."""

    def __init__(self, library: str, doing: str, hint: str = "", capture_stderr: bool = False,
                 preload: tuple[str, ...] = ()):
        """capture_stderr: keep what the child writes to stderr (a native library's dying words) for
        `stderr_tail()` instead of showing it to the user. preload: modules the child imports as soon as it
        starts, while the caller goes on (torch and transformers take seconds to import); the first call waits
        for them."""
        self.library, self.doing, self.hint = library, doing, hint
        self._stderr = tempfile.TemporaryFile() if capture_stderr else None
        # A fresh interpreter (never a fork of a process holding torch's threads), started as a plain subprocess
        # so that nothing of the caller's __main__ runs again in it; it talks over one end of a socket pair.
        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the modules we see
        code = ("import sys; from distillery.core.isolation import serve; "
                "serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])")
        try:
            self._process = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid()), *preload],
                                             env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                             stderr=self._stderr)
        finally:
            theirs.close()  # only the child holds its end now: its death is an EOF here
        self._conn = Connection(mine.detach())
        self._busy = self._called = False

    @property
    def pid(self) -> int:
        return self._process.pid

    def stderr_tail(self, limit: int = 4000) -> str:
        """The last `limit` bytes the child wrote to stderr (with capture_stderr; else empty)."""
        if self._stderr is None:
            return ""
        size = self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, size - limit))
        return self._stderr.read().decode("utf-8", errors="replace")

    def call(self, fn: Callable[..., Any], *args: Any, on_event: Callable[[Any], None] | None = None,
             timeout_s: float | None = None) -> Any:
        """fn(state, emit, *args) in the child; each emitted value goes to on_event; returns fn's result.
        With timeout_s, a call still running after that many seconds kills the child and raises ChildTimeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for kind, value in self._exchange(fn, args, deadline):
            if kind == "event" and on_event is not None:
                on_event(value)
            elif kind == "result":
                return value
        raise AssertionError("unreachable: _exchange ends with a result or raises")

    def stream(self, fn: Callable[..., Any], *args: Any) -> Iterator[Any]:
        """The values fn(state, emit, *args) emits in the child, as they come."""
        for kind, value in self._exchange(fn, args):
            if kind == "event":
                yield value
            elif kind == "result":
                return

    def close(self) -> None:
        """Stop the child (politely when it is idle, at once when it is busy, gone or never called)."""
        if self._process.poll() is None and not self._busy and self._called:
            try:
                self._conn.send(None)
                self._process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._conn.close()
        if self._stderr is not None:
            self._stderr.close()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _exchange(self, fn: Callable[..., Any], args: tuple[Any, ...],
                  deadline: float | None = None) -> Iterator[tuple[str, Any]]:
        if self._busy:
            raise RuntimeError(f"the {self.library} child is still answering an earlier call")
        payload = pickle.dumps((fn, args))  # a function or argument that cannot travel fails here, not there
        self._busy = self._called = True
        finished = False
        try:
            try:
                self._conn.send_bytes(payload)
            except OSError:
                self._crashed()
            while True:
                if deadline is not None and not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    raise ChildTimeout(f"{self.library} did not finish {self.doing} in time")
                try:
                    kind, value = self._conn.recv()
                except (EOFError, OSError):
                    self._crashed()
                if kind == "error":
                    finished = True
                    raise value
                finished = kind == "result"
                yield kind, value
                if finished:
                    return
        finally:
            self._busy = False
            if not finished:  # abandoned mid-answer (an interrupt, a consumer that stopped reading)
                self._process.kill()

    def _crashed(self) -> None:
        try:
            code = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it closed its end but lives on: stop it
            self._process.kill()
            code = self._process.wait()
        raise NativeCrash(self.library, self.doing, code, self.hint, last_lines(self.stderr_tail())) from None


def last_lines(text: str, lines: int = 2, limit: int = 300) -> str:
    """The last non-blank `lines` of a crashed child's stderr, one after another, at most `limit` characters."""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[-limit:]


def plain(state: dict[str, Any], emit: Callable[[Any], None], fn: Callable[..., Any], *args: Any) -> Any:
    """In the child: an ordinary function `fn(*args)`."""
    return fn(*args)


def serve(fd: int, parent_pid: int, preload: list[str] | None = None) -> None:
    """The child's loop: receive (fn, args), send events and then a result or an error; None ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops the child
    die_with(parent_pid)
    for module in preload or ():
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the call that needs the module raises the real error, in context
            pass
    conn = Connection(fd)
    state: dict[str, Any] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as err:  # noqa: BLE001 - e.g. a function the child cannot import (defined in __main__)
            conn.send(("error", RuntimeError(f"the child process cannot load the call: {type(err).__name__}: {err}")))
            continue
        if message is None:
            return
        fn, args = message
        try:
            reply = ("result", fn(state, lambda value: conn.send(("event", value)), *args))
        except Exception as err:  # noqa: BLE001 - every error goes back to the parent, which raises it
            reply = ("error", _transportable(err))
        try:
            conn.send(reply)
        except Exception as err:  # noqa: BLE001 - a result that cannot be pickled
            conn.send(("error", RuntimeError(f"the result of {getattr(fn, '__name__', fn)} cannot be sent back: "
                                             f"{type(err).__name__}: {err}")))


def limit_growth(memory_bytes: int, cpu_seconds: float) -> None:
    """Called in a child: from now on this process may take at most `memory_bytes` more address space and
    `cpu_seconds` more CPU time. Past the first an allocation fails (a native library aborts, Python raises
    MemoryError) at once, instead of the machine filling up; past the second SIGXCPU ends it (without a core
    dump). Only lowers soft limits, so a later call may raise them again. Linux only (elsewhere it does nothing)."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as status:
            mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_capped(mapped + memory_bytes, hard), hard))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (_capped(int(usage.ru_utime + usage.ru_stime + cpu_seconds) + 1, hard), hard))
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))  # SIGXCPU dumps core by default: no core file in the cwd


def _capped(value: int, hard: int) -> int:
    import resource

    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _transportable(err: Exception) -> Exception:
    """The exception itself when it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


def die_with(pid: int) -> None:
    """End this process soon after process `pid` ends, whoever its parent is: a child of the pipeline (kill -9 of
    the pipeline leaves no orphan), or the training process under `accelerate launch`, where the pipeline is its
    grandparent. A pidfd becomes readable when `pid` exits (a zombie not yet reaped included); where there is none
    (not Linux, a kernel before 5.3) `pid` is polled.

    Linux's PR_SET_PDEATHSIG cannot do it: it fires when the *thread* that started the child ends, and distill
    starts the math checker from a thread pool whose threads end long before the process (the checker was then
    found dead, reported as SIGKILL)."""
    import select

    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while alive(pid):
                time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=watch, name=f"die-with-{pid}", daemon=True).start()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        return True
    return True
