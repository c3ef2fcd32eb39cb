"""The run directory's own policy (rlhf_pg/run_dir.py): one live run per output_dir, a lock a killed
run does not leave stuck, and refusals that come before any model is loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import cpu_subprocess_env

from rlhf_pg.cli import main
from rlhf_pg.errors import UserError
from rlhf_pg.run_dir import LOCK_NAME, DirLock, check_output_dir, lock_holder


def test_a_second_run_into_a_live_runs_directory_is_refused(tmp_path, tiny_config):
    from rlhf_pg.trainer import Trainer

    cfg = tiny_config(tmp_path)
    live = DirLock(tmp_path / "run")  # a live run holds the directory
    with pytest.raises(UserError) as e:
        check_output_dir(cfg)
    assert "in use by a running rlhf-pg (pid " in str(e.value) and "\n" not in str(e.value)
    tr = Trainer(cfg)
    with pytest.raises(UserError, match="in use by a running rlhf-pg"):
        tr.train()  # the library path refuses too, before it reads or removes anything
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    live.release()
    assert lock_holder(tmp_path / "run") is None
    tr.train()  # and once the directory is free, the run goes ahead and releases it at the end
    assert lock_holder(tmp_path / "run") is None


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    out = tmp_path / "run"
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from rlhf_pg.run_dir import DirLock
        lock = DirLock(Path({str(out)!r}))
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=cpu_subprocess_env()
    )
    assert p.returncode == -9 and "locked" in p.stdout
    assert (out / LOCK_NAME).read_text().startswith("pid ")  # the file stays ...
    assert lock_holder(out) is None  # ... but the kernel dropped the lock with the process
    DirLock(out).release()


def test_train_refuses_a_previous_run_before_loading_the_model(tmp_path, tiny_recipe, monkeypatch, capsys):
    from rlhf_pg import setup

    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setattr(setup, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", str(recipe), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlhf-pg: error: output_dir") and "already holds a run" in err[-1]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing written is lost
