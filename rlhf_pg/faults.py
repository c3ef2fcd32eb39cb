"""Fault injection: die at a named point of a state-writing path, as a crash or SIGKILL would.

The reliability tests set ``RLHF_PG_FAULT=<point>@<step>`` (``@<step>`` optional: the first time the
point is reached) and the process ends there with ``os._exit(137)`` — no ``finally``, no flush, no
cleanup, like a SIGKILL — so the tests can show, point by point, that the previous checkpoint stays
usable and that a resumed run is bit-identical to an uninterrupted one. With
``RLHF_PG_FAULT_MODE=raise`` the point raises :class:`InjectedFault` instead (a ``BaseException``,
which no ``except Exception`` in the code catches), for in-process tests. With
``RLHF_PG_FAULT_MODE=enospc`` or ``=erofs`` the point raises the ``OSError`` a full disk or a
read-only filesystem gives (``OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)``, ``filename``
the file or directory being written there) instead of ending the process: the tests use it to show
that a write failure leaves the previous checkpoint intact and stops the run with one line
(:mod:`rlhf_pg.run_dir`), on 1 and on 2 processes. These two modes are meant for the write points
(``ckpt-*``, ``metrics-mid-line``). Unset, :func:`fault` is a dictionary lookup and nothing else.

Points (where each sits, in write order):

* ``ckpt-after-model``      checkpoint: model tensors written, optimizer not yet
* ``ckpt-after-optimizer``  checkpoint: optimizer written, scheduler and trainer state not yet
* ``ckpt-before-rename``    checkpoint: every file written and fsynced, not yet renamed to step_*
* ``ckpt-after-rename``     checkpoint: renamed, older checkpoints not yet pruned
* ``metrics-mid-line``      half of a metrics.jsonl line written and flushed
* ``step-after-update``     a training step: the optimizer has updated the weights, the step is not
                            yet logged or checkpointed (a kill in the middle of the work)
"""

from __future__ import annotations

import errno
import os

POINTS = (
    "ckpt-after-model",
    "ckpt-after-optimizer",
    "ckpt-before-rename",
    "ckpt-after-rename",
    "metrics-mid-line",
    "step-after-update",
)


OS_ERRORS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}  # RLHF_PG_FAULT_MODE → the errno raised


class InjectedFault(BaseException):
    """Raised at a fault point with RLHF_PG_FAULT_MODE=raise."""


def fault(point: str, step: int | None = None, filename: str | os.PathLike | None = None) -> None:
    """End the process here if RLHF_PG_FAULT names this point (and this step, when it gives one); with
    RLHF_PG_FAULT_MODE=raise raise :class:`InjectedFault`, with ``enospc``/``erofs`` that ``OSError``
    (naming ``filename``, what is being written at this point)."""
    spec = os.environ.get("RLHF_PG_FAULT")
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name != point or (at and step is not None and int(at) != step):
        return
    mode = os.environ.get("RLHF_PG_FAULT_MODE")
    if mode == "raise":
        raise InjectedFault(f"{point}@{step}")
    if mode in OS_ERRORS:
        code = OS_ERRORS[mode]
        raise OSError(code, os.strerror(code), None if filename is None else os.fspath(filename))
    os._exit(137)
