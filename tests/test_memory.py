"""The C-heap settings of rlhf_pg.memory: they change where glibc puts a large tensor."""

import ctypes
import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from rlhf_pg import memory
from rlhf_pg import trainer as trainer_mod
from rlhf_pg.trainer import Trainer


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2  # noqa: B018
        return True
    except (OSError, AttributeError):
        return False


PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys
    import torch
    from rlhf_pg.memory import release_memory, reuse_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped_and_heap_mb(n_bytes):
        t = torch.empty(n_bytes // 4, dtype=torch.float32)
        t.fill_(1.0)
        info = libc.mallinfo2()
        del t
        return info.hblkhd >> 20, info.arena >> 20

    before = mmapped_and_heap_mb(64 << 20)
    applied = reuse_freed_memory()
    after = mmapped_and_heap_mb(64 << 20)
    heap_before_release = libc.mallinfo2().arena >> 20
    release_memory()  # kept: no trim after reuse_freed_memory()
    print(applied, *before, *after, heap_before_release, libc.mallinfo2().arena >> 20)
    """
)


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_reuse_freed_memory_serves_a_large_tensor_from_the_heap():
    """A fresh process: a 64 MiB tensor is its own mmap block by default; after reuse_freed_memory() it
    comes from the heap (which then keeps it when it is freed)."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    applied, mmap_before, _, mmap_after, heap_after, heap_unreleased, heap_released = out.stdout.split()
    assert applied == "True"
    assert int(mmap_before) >= 64  # default glibc: the tensor is its own mmap block
    assert int(mmap_after) <= int(mmap_before) - 64  # now it is not
    assert int(heap_after) >= 64  # but in the heap,
    assert int(heap_released) == int(heap_unreleased) >= 64  # which keeps the freed block through release_memory()


def test_release_memory_trims_unless_freed_memory_is_kept(monkeypatch):
    """glibc's default policy: release_memory() calls malloc_trim(0); after reuse_freed_memory() it does not."""
    calls = []
    monkeypatch.setattr(memory, "_libc_function", lambda name: calls.append)
    monkeypatch.setattr(memory, "_keep", False)
    memory.release_memory()
    assert calls == [0]
    monkeypatch.setattr(memory, "_keep", True)
    memory.release_memory()
    assert calls == [0]


@pytest.mark.parametrize("reuse", [True, False])
def test_trainer_applies_the_setting_only_when_asked(tmp_path, tiny_config, monkeypatch, reuse):
    calls = []
    monkeypatch.setattr(trainer_mod, "reuse_freed_memory", lambda: calls.append(1) or True)
    Trainer(tiny_config(tmp_path, train={"reuse_freed_memory": reuse}))
    assert calls == ([1] if reuse else [])


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_heap_env_is_the_same_policy_for_another_process():
    """memory.HEAP_ENV (what the benchmark gives TRL's children under --peer-heap same): a process started with
    it serves a 64 MiB tensor from the heap, as reuse_freed_memory() does in ours."""
    probe = PROBE.replace("applied = reuse_freed_memory()", "applied = True")
    env = dict(os.environ, **memory.HEAP_ENV)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    _, mmap_first, heap_first, *_ = out.stdout.split()
    assert int(mmap_first) < 64 <= int(heap_first)  # the very first tensor, before any mallopt call
