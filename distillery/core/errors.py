"""The one exception type for mistakes a user can fix, and how a command that is stopped ends.

The CLI turns a `UserError` into one red message and exit code 2, never a traceback. Raise it with a
message that names the file / sheet / row / field and says what to do about it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator


class UserError(Exception):
    """Bad input or environment the user can fix; the message must say where and how."""


class StageFailed(Exception):
    """A stage (or a command such as chat) ended with an error that is not the user's to fix: a bug, or a native
    crash (core.isolation.NativeCrash). The full traceback is in `log` (None: no log could be written); the CLI
    prints one line."""

    def __init__(self, step: str, cause: BaseException, log: str | None):
        self.step, self.cause, self.log = step, cause, log
        super().__init__(f"{step}: {type(cause).__name__}: {cause}")


def exit_code(action: Callable[[], object]) -> int:
    """Run a `python -m` tool's work (setup runs them): 0 when it returns, 2 with one line on stderr when it raises
    a UserError or meets a full, read-only or forbidden place to write (the cache under DISTILLERY_HOME)."""
    try:
        action()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        message = writing_refusal(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def writing_refusal(err: BaseException) -> str | None:
    """One line for a tool that could not write (setup's: into the cache, or the venv): a full disk or quota, a
    file-size limit, a read-only file system, a folder of either it may not write; None for any other error (a
    permission refused elsewhere is a bug's traceback)."""
    from distillery.core.machine import cache_home

    number = os_error_number(err)
    filename = getattr(err, "filename2", None) or getattr(err, "filename", None)
    if number in (errno.EACCES, errno.EPERM, errno.ENOTDIR):  # ENOTDIR: DISTILLERY_HOME names a file
        place = Path(os.path.abspath(filename)) if filename else None
        if place is None or not (place.is_relative_to(cache_home()) or place.is_relative_to(sys.prefix)):
            return None
        what, remedy = "cannot write there", (
            "Set DISTILLERY_HOME to a directory you can write to (the cache of compiled llama.cpp builds and bundled "
            "models)" if place.is_relative_to(cache_home()) else f"Make {place.parent} writable")
    elif number == errno.EROFS:
        what, remedy = STORAGE_REFUSALS[number][0], "Set DISTILLERY_HOME to a directory on a writable disk"
    elif number == errno.EFBIG:
        what, remedy = STORAGE_REFUSALS[number][0], "Raise the limit (`ulimit -f unlimited`)"
    elif number in STORAGE_REFUSALS:
        what, remedy = STORAGE_REFUSALS[number]
    else:
        return None
    return refusal(err, number, what, remedy, f" while writing {filename}" if filename else "") + "."


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `docker stop`, `kill`): ends the command as Ctrl-C does, so that its
    reading processes are stopped, the stage is recorded as interrupted and the same command resumes."""


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises Terminated in this process's main thread (Python's default lets it die at once,
    its child processes orphaned and the stage recorded as running)."""

    def terminated(signum: int, frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminated)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back while the block runs and delivered as it ends (to the handlers they had): a
    finished stage is published and recorded both or neither (stopped between the two, a trained adapter was
    recorded as running, and trained again). Python handlers, not a signal mask: the kernel would hand a masked
    signal to another thread. Only the main thread can set them; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, frame: caught.append(number)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    for number in dict.fromkeys(caught):
        signal.raise_signal(number)


STORAGE_REFUSALS = {
    errno.ENOSPC: ("the disk is full", "Free some space"),
    errno.EDQUOT: ("the disk quota is used up", "Free some space or raise the quota"),
    errno.EFBIG: ("a file grew past the largest size allowed for one file (the shell's `ulimit -f`, or the file "
                  "system's own limit)", "Raise the limit (`ulimit -f unlimited`) or set run.root on another disk"),
    errno.EROFS: ("the file system is read-only", "Set run.root to a directory on a writable disk"),
}


def os_error_number(err: BaseException) -> int | None:
    """The OS error behind `err`: an OSError's errno, or the one a native writer quotes (`(os error 28)`)."""
    number = err.errno if isinstance(err, OSError) else None
    if number is None and (quoted := re.search(r"\(os error (\d+)\)", str(err))):
        number = int(quoted.group(1))
    return number


def storage_refusal(err: BaseException, where: str) -> str | None:
    """What to tell the user when `err` is a full disk or quota, a file-size limit or a read-only disk met while
    writing (an OSError, or a native writer's error quoting the OS's, as safetensors' `(os error 28)` does); None
    for any other error."""
    number = os_error_number(err)
    if number not in STORAGE_REFUSALS:
        return None
    filename = getattr(err, "filename", None)
    written = f" while writing {filename}" if filename else f" {where}"
    return refusal(err, number, *STORAGE_REFUSALS[number], written) + ": the stages that finished are kept."


def refusal(err: BaseException, number: int, what: str, remedy: str, written: str) -> str:
    strerror = getattr(err, "strerror", None) or os.strerror(number)
    return f"{what} ({strerror}{written}). {remedy} and run the same command again"
