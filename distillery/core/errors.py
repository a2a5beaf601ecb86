"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into one red message and exit code 2, never a traceback. Raise it with a
message that names the file / sheet / row / field and says what to do about it.
"""


class UserError(Exception):
    """Bad input or environment the user can fix; the message must say where and how."""


class StageFailed(Exception):
    """A stage (or a command such as chat) ended with an error that is not the user's to fix: a bug, or a native
    crash (pipeline.isolation.NativeCrash). The full traceback is in `log`; the CLI prints one line."""

    def __init__(self, step: str, cause: BaseException, log: str):
        self.step, self.cause, self.log = step, cause, log
        super().__init__(f"{step}: {type(cause).__name__}: {cause}")
