"""User-facing errors.

Anything the user can fix (a config key, a data file, a reward function, a model path) raises
:class:`UserError` with one line that names the problem and how to fix it. The CLI prints that line
and exits with status 2 — no traceback. Bugs in rlhf-pg itself stay ordinary exceptions.
"""


class UserError(Exception):
    """An error in user input: the message is one line naming the problem and the fix."""
