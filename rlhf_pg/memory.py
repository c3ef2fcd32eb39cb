"""How the process's C heap treats the large, short-lived tensors of a CPU step.

Which allocator (``train.allocator``): `mimalloc` (PyPI ``cmeel-mimalloc``; the CLI starts the process
with it through ``LD_PRELOAD``, see :func:`exec_with_allocator`) or the C library's malloc (glibc). glibc
2.36 cannot reuse a freed block for the next aligned allocation of the same size (torch asks for 64-byte
alignment, and ``memalign`` pads the request), so the heap grows and each step's large tensors are fresh
pages again; mimalloc reuses them. Under glibc, two policies, chosen by ``train.reuse_freed_memory``
(both no-ops where the C library is not glibc):

* keep (the default, :func:`reuse_freed_memory`, set once when a trainer starts): every allocation is
  served from the heap and freed memory stays there for the next allocation, so the large tensors of
  each step are not fresh pages that the kernel must fault in and zero;
* return (glibc's defaults): blocks above the mmap threshold are their own ``mmap``, and
  :func:`release_memory` hands the heap's free pages back to the OS between the phases of a step, so
  one phase's peak does not sit on the previous phase's freed activations (a lower peak RSS).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Literal

from .errors import UserError

Allocator = Literal["auto", "mimalloc", "glibc"]
"""``train.allocator`` (the config validates it): `auto` = mimalloc where its library is installed (Linux),
else the C library's."""

PRELOADED_ENV = "RLHF_PG_PRELOADED"
"""Set in the environment of a process this module re-executed with an allocator (no second attempt)."""

MIMALLOC_KEEP_ENV = {"MIMALLOC_PURGE_DELAY": "-1"}
"""mimalloc's option for freed memory: never hand it back to the OS (``reuse_freed_memory``)."""

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""glibc's ``mallopt`` parameter numbers (``malloc.h``)."""

TRIM_THRESHOLD = 2**31 - 1
"""Bytes of free heap top above which glibc would trim on its own: the most ``mallopt`` takes, i.e. never."""

HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
"""The same policy as :func:`reuse_freed_memory`, as glibc's environment variables (for another program's
process, e.g. the benchmark's TRL children under ``--peer-heap same``)."""

_keep = False
"""Whether :func:`reuse_freed_memory` applied (then :func:`release_memory` does nothing)."""

_policy = "glibc"
"""The allocator :func:`configure` found: under mimalloc, :func:`release_memory` leaves it to mimalloc."""


def reuse_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and keep freed memory in it (``mallopt``
    ``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD`` 2 GiB; :func:`release_memory` then no longer trims).

    By default glibc gives each block above its mmap threshold (at most 32 MiB) its own ``mmap`` and
    unmaps it when freed. A training step allocates such blocks again and again: the (rows, vocabulary)
    logits, the embedding's dense gradient, autocast's bf16 copy of the LM head. Each new block's pages
    are faulted in and zeroed by the kernel on first touch, which in a VM is slow; in a profile of the
    benchmark's training pass, zero-filling the (49152, 576) embedding gradient took 158 ms and casting
    a (1536, 576) weight 1.7 ms, at under 1 GB/s. Trimming the heap between phases has the same cost
    for the pages it returns. Process-wide and lasting; returns whether it applied."""
    global _keep
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    _keep = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _keep


def mimalloc_library() -> str | None:
    """The path of the installed ``libmimalloc.so`` (PyPI ``cmeel-mimalloc``) on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    from importlib import metadata

    try:
        path = metadata.distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib/libmimalloc.so")
    except metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.exists(str(path)) else None


def active_allocator() -> str:
    """`mimalloc` when this process's malloc is mimalloc's (preloaded), else `glibc` (or `libc` when the C
    library is another one)."""
    import ctypes

    if hasattr(ctypes.CDLL(None), "mi_version"):
        return "mimalloc"
    return "glibc" if _libc_function("mallopt") is not None else "libc"


def resolve_allocator(allocator: Allocator) -> str:
    """`mimalloc` or `glibc` for a ``train.allocator`` value; a clear error when mimalloc is asked for
    and missing."""
    if allocator == "glibc":
        return "glibc"
    if mimalloc_library() is not None:
        return "mimalloc"
    if allocator == "auto":
        return "glibc"
    raise UserError(
        "train.allocator=mimalloc: its library is not installed (Linux only: pip install cmeel-mimalloc); "
        "or set train.allocator=auto"
    )


def allocator_env(allocator: Allocator, keep: bool) -> dict[str, str]:
    """The environment variables that give a new process ``allocator`` (a ``train.allocator`` value) with
    the ``reuse_freed_memory`` policy ``keep``: ``LD_PRELOAD`` (prepended to the current one) for mimalloc,
    glibc's ``MALLOC_*`` variables (:data:`HEAP_ENV`) for glibc when keeping."""
    if resolve_allocator(allocator) == "mimalloc":
        preload = " ".join(x for x in (mimalloc_library(), os.environ.get("LD_PRELOAD")) if x)
        return {"LD_PRELOAD": preload, **(MIMALLOC_KEEP_ENV if keep else {})}
    return dict(HEAP_ENV) if keep else {}


def exec_with_allocator(allocator: Allocator, keep: bool) -> None:
    """Re-execute this process (the same interpreter and command line, ``sys.orig_argv``) with
    ``allocator`` preloaded, when it asks for mimalloc and runs without it. Only for a command-line
    entry point, before any work: the process image is replaced (the PID stays, so launchers that
    watch it are unaffected). Does nothing when mimalloc is already active, when glibc is asked for,
    or when this process was already re-executed (then :func:`configure` reports what it got)."""
    if resolve_allocator(allocator) != "mimalloc" or active_allocator() == "mimalloc" or os.environ.get(PRELOADED_ENV):
        return
    env = {**os.environ, **allocator_env(allocator, keep), PRELOADED_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def configure(allocator: Allocator, keep: bool) -> str:
    """Apply ``train.allocator`` / ``train.reuse_freed_memory`` in this process (a trainer calls it once);
    returns a description for the run's log. An explicit `mimalloc` that this process does not run with
    (it must be preloaded at start: ``rlhf-pg train`` does it) is an error; `auto` then falls back to glibc."""
    global _policy
    wanted, active = resolve_allocator(allocator), active_allocator()
    if allocator == "mimalloc" and active != "mimalloc":
        raise UserError(
            f"train.allocator=mimalloc: this process started without it; run through `rlhf-pg train`, or start "
            f"Python with LD_PRELOAD={mimalloc_library()}, or set train.allocator=auto"
        )
    _policy = active
    if active == "mimalloc":
        kept = os.environ.get("MIMALLOC_PURGE_DELAY") == MIMALLOC_KEEP_ENV["MIMALLOC_PURGE_DELAY"]
        return f"mimalloc (freed memory {'kept' if kept else 'returned to the OS'})"
    kept = keep and reuse_freed_memory()
    fallback = " (mimalloc not preloaded in this process)" if wanted == "mimalloc" else ""
    return f"{active} malloc{fallback} (freed memory {'kept in the heap' if kept else 'trimmed between phases'})"


def release_memory() -> None:
    """Hand freed heap memory back to the OS between phases (glibc ``malloc_trim``).

    On CPU, glibc keeps the freed activations of a phase (many medium-sized tensors) in its heap; the
    next phase then peaks on top of them. Trimming at phase boundaries lowered the peak RSS of the
    benchmark step by ~1.3 GB under glibc's default mmap policy. A no-op after :func:`reuse_freed_memory`
    (whose point is to keep that memory) and outside glibc."""
    if _keep or _policy == "mimalloc":
        return
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


@functools.cache
def _libc_function(name: str):
    """A glibc function by name, or None (another C library)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
