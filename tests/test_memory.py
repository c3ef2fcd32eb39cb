"""The C-heap settings of rlhf_pg.memory: which allocator a process runs with, and where it puts a large
tensor."""

import ctypes
import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import cpu_subprocess_env

from rlhf_pg import cli, memory
from rlhf_pg.errors import UserError
from rlhf_pg.trainer import Trainer

needs_mimalloc = pytest.mark.skipif(memory.mimalloc_library() is None, reason="cmeel-mimalloc is not installed")
in_glibc = pytest.mark.skipif(
    memory.active_allocator() != "glibc", reason="this test process runs without glibc malloc"
)


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


@in_glibc
@pytest.mark.parametrize("reuse", [True, False])
def test_trainer_applies_the_setting_only_when_asked(tmp_path, tiny_config, monkeypatch, reuse):
    """In a process started without mimalloc (this one), `auto` falls back to glibc's malloc with the policy."""
    calls = []
    monkeypatch.setattr(memory, "reuse_freed_memory", lambda: calls.append(1) or True)
    tr = Trainer(tiny_config(tmp_path, train={"reuse_freed_memory": reuse}))
    assert calls == ([1] if reuse else [])
    assert tr.heap.startswith("glibc malloc") and ("kept in the heap" in tr.heap) == reuse


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_heap_env_is_the_same_policy_for_another_process():
    """memory.HEAP_ENV (what the benchmark gives TRL's children under --peer-heap same): a process started with
    it serves a 64 MiB tensor from the heap, as reuse_freed_memory() does in ours."""
    probe = PROBE.replace("applied = reuse_freed_memory()", "applied = True")
    env = dict(os.environ, **memory.HEAP_ENV)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    _, mmap_first, heap_first, *_ = out.stdout.split()
    assert int(mmap_first) < 64 <= int(heap_first)  # the very first tensor, before any mallopt call


MIMALLOC_PROBE = textwrap.dedent(
    """
    import resource, torch
    from rlhf_pg.memory import active_allocator

    ptrs, faults = [], []
    for _ in range(4):  # allocate, touch and free a 64 MiB tensor, four times
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 << 20, dtype=torch.float32)
        t.fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        ptrs.append(t.data_ptr())
        del t
    print(active_allocator(), len(set(ptrs[1:])), max(faults[1:]), faults[0])
    """
)


@needs_mimalloc
def test_a_process_started_with_allocator_env_runs_mimalloc_and_reuses_a_freed_tensor():
    """allocator_env('auto', keep=True) (what `rlhf-pg train` re-executes with): the process's malloc is
    mimalloc, and a freed 64 MiB tensor's memory serves the next one of the same size without new pages."""
    env = cpu_subprocess_env(**memory.allocator_env("auto", keep=True))
    out = subprocess.run([sys.executable, "-c", MIMALLOC_PROBE], capture_output=True, text=True, check=True, env=env)
    allocator, distinct_later, later_faults, first_faults = out.stdout.split()
    assert allocator == "mimalloc"
    assert int(distinct_later) == 1  # the same block each time
    assert int(later_faults) < int(first_faults) / 10  # 64 MiB = 16384 pages of 4 KiB: faulted in once


def test_allocator_env_under_glibc_is_glibcs_variables():
    assert memory.allocator_env("glibc", keep=True) == memory.HEAP_ENV
    assert memory.allocator_env("glibc", keep=False) == {}


@needs_mimalloc
def test_allocator_env_prepends_mimalloc_to_ld_preload(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    env = memory.allocator_env("mimalloc", keep=False)
    assert env == {"LD_PRELOAD": f"{memory.mimalloc_library()} /opt/other.so"}  # keep=False: mimalloc's purging
    assert memory.allocator_env("auto", keep=True)["MIMALLOC_PURGE_DELAY"] == "-1"


def test_mimalloc_missing_is_one_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(memory, "mimalloc_library", lambda: None)
    with pytest.raises(UserError, match="train.allocator=mimalloc: its library is not installed.*pip install"):
        memory.resolve_allocator("mimalloc")
    assert memory.resolve_allocator("auto") == "glibc"
    assert memory.allocator_env("auto", keep=False) == {}


@needs_mimalloc
@in_glibc
def test_explicit_mimalloc_in_a_process_started_without_it_is_an_error():
    """A notebook or a script that builds a Trainer itself cannot switch allocators any more: say how."""
    with pytest.raises(UserError, match="this process started without it; run through `rlhf-pg train`"):
        memory.configure("mimalloc", keep=True)


@needs_mimalloc
@in_glibc
def test_exec_with_allocator_replaces_the_process_once(monkeypatch):
    calls = []
    monkeypatch.setattr(memory.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.delenv(memory.PRELOADED_ENV, raising=False)
    memory.exec_with_allocator("glibc", keep=True)
    assert calls == []  # glibc asked for: nothing to do
    memory.exec_with_allocator("auto", keep=True)
    ((exe, argv, env),) = calls
    assert exe == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"].startswith(memory.mimalloc_library()) and env["MIMALLOC_PURGE_DELAY"] == "-1"
    monkeypatch.setenv(memory.PRELOADED_ENV, "1")  # the re-executed process, had the preload not taken
    memory.exec_with_allocator("auto", keep=True)
    assert len(calls) == 1


@needs_mimalloc
def test_cli_train_runs_with_mimalloc(tmp_path, tiny_recipe):
    """`rlhf-pg train` (a command line, `train.allocator: auto`): the run starts over with mimalloc preloaded
    and says so; the same command with train.allocator=glibc keeps glibc's malloc."""
    recipe = tiny_recipe(tmp_path)
    for allocator, want in (("auto", "C heap: mimalloc (freed memory kept)"), ("glibc", "C heap: glibc malloc")):
        cmd = [sys.executable, "-m", "rlhf_pg", "train", str(recipe), f"output_dir={tmp_path / allocator}"]
        cmd += ["train.max_steps=1", "train.eval_at_start=false", f"train.allocator={allocator}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=cpu_subprocess_env())
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert want in proc.stdout


@needs_mimalloc
def test_num_processes_starts_every_process_with_the_allocator(tmp_path, tiny_recipe, monkeypatch):
    """--num-processes N: the launching CLI gives accelerate's processes the allocator in their environment
    (none of them re-executes itself)."""
    seen = {}
    monkeypatch.setattr("subprocess.call", lambda cmd, env: seen.update(env) or 0)
    recipe = tiny_recipe(tmp_path)
    assert cli.main(["train", str(recipe), f"output_dir={tmp_path / 'out'}", "--num-processes", "2"]) == 0
    assert seen["LD_PRELOAD"].startswith(memory.mimalloc_library()) and seen[memory.PRELOADED_ENV] == "1"
