"""core/isolation.py: functions run in a child process; the child's native crash is an error here."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import pytest

from distillery.core.errors import UserError
from distillery.core.isolation import Child, ChildTimeout, NativeCrash, describe_exit, limit_growth, plain


def remember(state: dict[str, Any], emit: Callable[[Any], None], key: str, value: Any) -> int:
    state[key] = value
    return os.getpid()


def recall(state: dict[str, Any], emit: Callable[[Any], None], key: str) -> Any:
    return state[key]


def count_to(state: dict[str, Any], emit: Callable[[Any], None], n: int) -> str:
    for i in range(1, n + 1):
        emit(i)
    return "done"


def refuse(state: dict[str, Any], emit: Callable[[Any], None]) -> None:
    raise UserError("data.jsonl line 3: not JSON")


def segfault(state: dict[str, Any], emit: Callable[[Any], None]) -> None:
    """A real native crash: C code reading address 0."""
    import ctypes

    ctypes.string_at(0)


def sleep_forever(state: dict[str, Any], emit: Callable[[Any], None]) -> None:
    emit("started")
    time.sleep(600)


def test_a_child_keeps_state_between_calls_and_passes_events() -> None:
    with Child("demo-lib", "testing") as child:
        pid = child.call(remember, "model", [1, 2, 3])
        assert pid == child.pid != os.getpid()
        assert child.call(recall, "model") == [1, 2, 3]
        events: list[int] = []
        assert child.call(count_to, 3, on_event=events.append) == "done" and events == [1, 2, 3]
        assert list(child.stream(count_to, 4)) == [1, 2, 3, 4]
        assert child.call(recall, "model") == [1, 2, 3]  # a finished stream leaves the child answering


def test_an_error_in_the_child_is_raised_here_with_its_type_and_the_child_lives_on() -> None:
    with Child("demo-lib", "testing") as child:
        child.call(remember, "x", 1)
        with pytest.raises(UserError, match="line 3: not JSON"):
            child.call(refuse)
        assert child.call(recall, "x") == 1


def test_a_segfault_in_the_child_is_a_native_crash_naming_the_work_the_signal_and_the_hint() -> None:
    child = Child("demo-lib", "scoring model.gguf", hint="Run the self-check.")
    with pytest.raises(NativeCrash) as caught:
        child.call(segfault)
    child.close()
    message = str(caught.value)
    assert caught.value.exitcode == -signal.SIGSEGV
    assert message.startswith("demo-lib crashed with SIGSEGV (signal 11) while scoring model.gguf: "
                              "a segmentation fault inside the native library.")
    assert message.endswith("Run the self-check.")


def test_a_child_killed_from_outside_mid_call_is_a_native_crash() -> None:
    child = Child("demo-lib", "generating")
    stream = child.stream(sleep_forever)
    assert next(stream) == "started"
    os.kill(child.pid, signal.SIGILL)
    with pytest.raises(NativeCrash, match=r"SIGILL \(signal 4\) while generating: an illegal instruction"):
        next(stream)
    child.close()


def test_an_abandoned_stream_stops_the_child_instead_of_answering_the_next_call_with_stale_events() -> None:
    child = Child("demo-lib", "streaming")
    stream = child.stream(sleep_forever)
    assert next(stream) == "started"
    stream.close()  # the consumer stopped reading (Ctrl-C in a chat)
    with pytest.raises(NativeCrash, match="SIGKILL"):
        child.call(recall, "x")
    child.close()


def test_a_call_past_its_time_limit_kills_the_child_and_raises_child_timeout() -> None:
    child = Child("demo-lib", "parsing")
    assert child.call(count_to, 2, timeout_s=30) == "done"  # a call within its limit answers as usual
    started = time.monotonic()
    with pytest.raises(ChildTimeout, match="demo-lib did not finish parsing in time"):
        child.call(sleep_forever, timeout_s=0.5)
    assert time.monotonic() - started < 5
    child.close()
    assert child._process.returncode == -signal.SIGKILL


def test_exit_descriptions() -> None:
    assert describe_exit(-11) == "SIGSEGV (signal 11)"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(None) == "no exit code"
    assert "out of memory" in str(NativeCrash("lib", "merging", -signal.SIGKILL))


def test_a_call_that_cannot_travel_is_an_error_and_leaves_the_child_answering() -> None:
    import pickle

    with Child("demo-lib", "testing") as child:
        child.call(remember, "x", 1)
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            child.call(lambda state, emit: 1)
        assert child.call(recall, "x") == 1


def test_a_function_the_child_cannot_import_is_an_error_saying_so(tmp_path) -> None:
    """Functions travel by name: one defined in a script's __main__ does not exist in the child."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "script.py"
    script.write_text("from distillery.core.isolation import Child\n"
                      "def here(state, emit):\n    return 1\n"
                      "child = Child('demo-lib', 'testing')\n"
                      "try:\n    child.call(here)\nexcept RuntimeError as err:\n    print('refused:', err)\n"
                      "child.close()\n", encoding="utf-8")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert "refused: the child process cannot load the call: AttributeError" in done.stdout, done.stdout + done.stderr


def unpicklable_result(state: dict[str, Any], emit: Callable[[Any], None]) -> Any:
    return lambda: None


def test_a_result_that_cannot_travel_back_is_an_error_and_the_child_lives_on() -> None:
    with Child("demo-lib", "testing") as child:
        with pytest.raises(RuntimeError, match="the result of unpicklable_result cannot be sent back"):
            child.call(unpicklable_result)
        assert child.call(count_to, 1) == "done"


def allocate_past_a_limit(state: dict[str, Any], emit: Callable[[Any], None], limit: int, size: int) -> int:
    limit_growth(limit, cpu_seconds=60)
    return len(bytearray(size))


def abort_with_words(state: dict[str, Any], emit: Callable[[Any], None]) -> None:
    os.write(2, b"memory allocation of 549755813888 bytes failed\n")
    os.abort()


def test_limit_growth_makes_an_allocation_past_it_fail_in_the_child_only() -> None:
    with Child("demo-lib", "testing") as child:
        assert child.call(allocate_past_a_limit, 64 << 20, 16 << 20) == 16 << 20
        with pytest.raises(MemoryError):
            child.call(allocate_past_a_limit, 64 << 20, 512 << 20)
        assert child.call(allocate_past_a_limit, 1 << 30, 512 << 20) == 512 << 20  # a later call may raise it again
    assert len(bytearray(512 << 20)) == 512 << 20  # this process was never limited


def test_a_captured_stderr_keeps_a_crashing_library_s_last_words_from_the_user() -> None:
    child = Child("demo-lib", "reading", capture_stderr=True)
    with pytest.raises(NativeCrash, match=r"SIGABRT"):
        child.call(abort_with_words)
    assert "memory allocation of 549755813888 bytes failed" in child.stderr_tail()
    child.close()


def test_a_child_started_from_a_thread_that_has_ended_still_answers() -> None:
    """distill checks answers from a thread pool: the pool's thread that started the math checker ends, and
    the checker must outlive it (Linux's parent-death signal follows the starting thread, not the process)."""
    started: list[Child] = []

    def start_and_use() -> None:
        child = Child("demo-lib", "testing")
        child.call(remember, "x", 1)  # the child is up and running when this thread ends
        started.append(child)

    starter = threading.Thread(target=start_and_use)
    starter.start()
    starter.join()
    with started[0] as child:
        time.sleep(0.5)
        assert child.call(recall, "x") == 1


def test_a_child_dies_with_the_process_that_started_it() -> None:
    """kill -9 of the pipeline leaves no child behind, even a busy one started from a thread (an idle child
    ends anyway: its parent's end of the socket closes)."""
    script = ("import os, sys, threading, time\n"
              "from distillery.core.isolation import Child, plain\n"
              "children = []\n"
              "def start():\n"
              "    child = Child('demo-lib', 'testing')\n"
              "    child.call(plain, os.getpid)\n"
              "    children.append(child)\n"
              "for _ in range(2):\n"
              "    t = threading.Thread(target=start)\n"
              "    t.start(); t.join()\n"
              "start()\n"
              "for child in children:\n"
              "    threading.Thread(target=child.call, args=(plain, time.sleep, 600), daemon=True).start()\n"
              "time.sleep(0.5)\n"
              "print(' '.join(str(c.pid) for c in children), flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(pids) == 3 and all(alive(pid) for pid in pids)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def imported(state: dict[str, Any], emit: Callable[[Any], None], names: list[str]) -> list[bool]:
    return [name in sys.modules for name in names]


def test_a_child_imports_its_preload_before_the_first_call_and_a_missing_module_is_the_call_s_error() -> None:
    with Child("demo-lib", "testing", preload=("colorsys", "no_such_module_here")) as child:
        assert child.call(imported, ["colorsys", "wave"]) == [True, False]
    with Child("demo-lib", "testing", preload=("no_such_module_here",)) as child:
        with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
            child.call(plain, importlib.import_module, "no_such_module_here")


def test_closing_a_child_that_was_never_called_does_not_wait_for_its_preload() -> None:
    child = Child("demo-lib", "testing", preload=("torch", "transformers"))
    started = time.monotonic()
    child.close()
    assert time.monotonic() - started < 2 and child._process.poll() is not None


def test_a_tethered_script_runs_as_python_script_does_and_ends_with_the_pipeline(tmp_path) -> None:
    """llama.cpp's converter went on converting after a kill -9 of export, orphaned, writing gigabytes into a
    partial directory the next run had removed. Run through `tethered`, a script gets its own argv and its folder's
    modules, and ends with the process that started it."""
    (tmp_path / "sibling.py").write_text("WORD = 'sibling'\n")
    (tmp_path / "script.py").write_text("import os, sys, time\nimport sibling\n"
                                        "print(os.getpid(), sibling.WORD, *sys.argv[1:], __name__, flush=True)\n"
                                        "time.sleep(600)\n")
    starter = ("import subprocess, sys\nfrom distillery.core.tether import tethered\n"
               "subprocess.run(tethered(sys.argv[1], '--outfile', 'x y'))\n")
    parent = subprocess.Popen([sys.executable, "-c", starter, str(tmp_path / "script.py")], stdout=subprocess.PIPE,
                              text=True)
    pid, *rest = parent.stdout.readline().split()
    assert rest == ["sibling", "--outfile", "x", "y", "__main__"] and alive(int(pid))
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(int(pid))
