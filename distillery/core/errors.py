"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into one red message and exit code 2, never a traceback. Raise it with a
message that names the file / sheet / row / field and says what to do about it.
"""

from __future__ import annotations

import sys
from typing import Callable


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
    """Run a `python -m` tool's work: 0 when it returns, 2 with one line on stderr when it raises a UserError."""
    try:
        action()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
