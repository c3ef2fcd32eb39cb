"""User-facing errors.

Anything the user can fix (a config key, a data file, a reward function, a model path) raises
:class:`UserError` with one line that names the problem and how to fix it. The CLI prints that line
and exits with status 2 — no traceback. Bugs in rlhf-pg itself stay ordinary exceptions.
:func:`one_line` turns a caught exception into the short reason quoted in such a message.
"""


class UserError(Exception):
    """An error in user input: the message is one line naming the problem and the fix."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """``str(err)`` squeezed onto one line (runs of whitespace, newlines included, become one
    space) and cut to at most ``limit`` characters, ending in ``…`` when cut; ``(no message)`` when
    the message is empty. The exception type is not included: callers that want it add it."""
    text = " ".join(str(err).split()) or "(no message)"
    return text if len(text) <= limit else text[: limit - 1] + "…"
