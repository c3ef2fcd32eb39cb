"""How the process's C heap (glibc malloc) treats the large, short-lived tensors of a CPU step.

Two policies, chosen by ``train.reuse_freed_memory`` (both no-ops where the C library is not glibc):

* keep (the default, :func:`reuse_freed_memory`, set once when a trainer starts): every allocation is
  served from the heap and freed memory stays there for the next allocation, so the large tensors of
  each step are not fresh pages that the kernel must fault in and zero;
* return (glibc's defaults): blocks above the mmap threshold are their own ``mmap``, and
  :func:`release_memory` hands the heap's free pages back to the OS between the phases of a step, so
  one phase's peak does not sit on the previous phase's freed activations (a lower peak RSS).
"""

from __future__ import annotations

import functools

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


def release_memory() -> None:
    """Hand freed heap memory back to the OS between phases (glibc ``malloc_trim``).

    On CPU, glibc keeps the freed activations of a phase (many medium-sized tensors) in its heap; the
    next phase then peaks on top of them. Trimming at phase boundaries lowered the peak RSS of the
    benchmark step by ~1.3 GB under glibc's default mmap policy. A no-op after :func:`reuse_freed_memory`
    (whose point is to keep that memory) and outside glibc."""
    if _keep:
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
