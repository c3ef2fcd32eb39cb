"""User-facing errors.

Anything the user can fix (a config key, a data file, a reward function, a model path) raises
:class:`UserError` with one line that names the problem and how to fix it. The CLI prints that line
and exits with status 2 — no traceback. Bugs in rlhf-pg itself stay ordinary exceptions.
:func:`one_line` turns a caught exception into the short reason quoted in such a message;
:func:`os_error_of`, :func:`os_error_text` and :func:`os_error_fix` do it for a write the operating
system refused (a full disk, a read-only filesystem, permissions).
"""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """An error in user input: the message is one line naming the problem and the fix."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """``str(err)`` squeezed onto one line (runs of whitespace, newlines included, become one
    space) and cut to at most ``limit`` characters, ending in ``…`` when cut; ``(no message)`` when
    the message is empty. The exception type is not included: callers that want it add it."""
    text = " ".join(str(err).split()) or "(no message)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


_OS_ERROR_IN_WORDS = re.compile(r"\(os error (\d+)\)")


def os_error_of(err: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, or None if ``err`` is not one: ``err`` itself
    when it is an ``OSError``, or rebuilt from a library's message (safetensors reports a full disk as
    ``SafetensorError('... No space left on device (os error 28)')``)."""
    if isinstance(err, OSError):
        return err
    m = _OS_ERROR_IN_WORDS.search(str(err))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code))


def os_error_text(err: OSError) -> str:
    """``[Errno 28] No space left on device``: the errno and its text (the file is the caller's to name)."""
    if err.errno is None:
        return one_line(err)
    return f"[Errno {err.errno}] {err.strerror}"


def os_error_fix(code: int | None) -> str:
    """What the user does about a failed write with errno ``code`` (the start of an instruction)."""
    return {
        errno.ENOSPC: "free space",
        errno.EDQUOT: "free space or raise the disk quota",
        errno.EROFS: "make the filesystem writable",
        errno.EACCES: "fix the permissions",
        errno.EPERM: "fix the permissions",
        errno.EFBIG: "raise the file-size limit (ulimit -f)",
    }.get(code, "fix the cause")
