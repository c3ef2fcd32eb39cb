"""``rlhf-pg train --num-processes N``: the processes under ``accelerate launch``, a user error in one line.

The CLI re-runs itself as ``python -m rlhf_pg.launch <accelerate launch options> -m rlhf_pg train ...``:
accelerate's own launcher (torchrun underneath), with one difference. The CLI names a file in
``RLHF_PG_ERROR_FILE`` for the launch. A process that stops with a :class:`~rlhf_pg.errors.UserError`
(when the processes agree, as around checkpoint writes, every process stops with the same one) does
not print it: the first one writes it into that file (:func:`leave_for_launcher`). Once the file
exists the launcher prints nothing of its own — the log lines about stopping the other processes,
the ``ChildFailedError`` report — and exits 2; the CLI, when every process has ended, prints the one
``rlhf-pg: error: ...`` line (:func:`reported`), after the progress bar, and exits 2, as a single
process does. A failure of any other kind (a crash, a bug) is reported as accelerate reports it.
Launched by hand (``accelerate launch -m rlhf_pg train ...``), every process prints its own line.
"""

from __future__ import annotations

import contextlib
import os
import sys

ERROR_FILE_ENV = "RLHF_PG_ERROR_FILE"
EXIT_USER_ERROR = 2


def leave_for_launcher(message: str) -> bool:
    """Under ``rlhf-pg train --num-processes N``: leave ``message`` (the UserError that stops this
    process) for the CLI to print once — the first process to fail writes it, the others find it
    written — and return True. Otherwise (one process, or no file can be written) False: print it."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    tmp = f"{path}.{os.getpid()}"
    try:
        with open(tmp, "w") as f:  # complete before it has the name the others look for
            f.write(message)
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process said it first
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


def reported(path: str) -> str | None:
    """The user error a process of the launch left in ``path``, or None."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


class _QuietAfterUserError:
    """The launcher's ``sys.stderr``: passes everything on until a process has reported a user error
    (the file exists), then drops it. The processes write to the inherited file descriptor, not here."""

    def __init__(self, stream, flag: str):
        self.stream, self.flag = stream, flag

    def write(self, text: str) -> int:
        return len(text) if os.path.exists(self.flag) else self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)  # flush, fileno, isatty, encoding, ...


def main(argv: list[str] | None = None) -> int:
    flag = os.environ.get(ERROR_FILE_ENV)
    if flag:  # before torch is imported: its log handlers take sys.stderr when they are created
        sys.stderr = _QuietAfterUserError(sys.stderr, flag)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError:
        if flag and os.path.exists(flag):
            return EXIT_USER_ERROR
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
