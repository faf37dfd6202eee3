"""The one exception type for bad user input: its message is a single line naming the problem and the fix."""


class UserError(Exception):
    """Bad input (files, configs, checkpoints). The CLI prints `error: <message>` and exits 2, no traceback."""
