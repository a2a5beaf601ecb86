"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into one red message and exit code 2, never a traceback. Raise it with a
message that names the file / sheet / row / field and says what to do about it.
"""


class UserError(Exception):
    """Bad input or environment the user can fix; the message must say where and how."""

