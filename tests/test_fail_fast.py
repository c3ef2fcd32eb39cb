"""Fail fast: every user mistake of scripts/time_to_error.py gives one line and exit 2, and — unless it
is about the model itself — before any model is loaded (the loaders are made to fail here).

The cases are the script's (one list: the README's time-to-error column is measured on exactly these),
run in-process on the tiny recipe through ``rlhf_pg.cli.main``.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_pg import evaluate, setup
from rlhf_pg.cli import main
from rlhf_pg.run_dir import DirLock

_SPEC = importlib.util.spec_from_file_location("time_to_error", Path(__file__).parents[1] / "scripts/time_to_error.py")
tte = importlib.util.module_from_spec(_SPEC)
sys.modules["time_to_error"] = tte  # dataclasses look their module up while the class is built
_SPEC.loader.exec_module(tte)


@pytest.mark.parametrize("case", tte.CASES, ids=[c.name for c in tte.CASES])
def test_each_mistake_is_one_line_before_the_model_loads(case, tmp_path, tiny_recipe, monkeypatch, capsys):
    recipe = tiny_recipe(tmp_path / "base")
    argv, out = tte.prepare(case, tmp_path / "case", str(recipe), tte.model_of(str(recipe)))
    if not case.needs_model:

        def loaded(*a, **k):
            pytest.fail(f"{case.name}: the model was loaded before the error")

        monkeypatch.setattr(setup, "build_policy", loaded)
        monkeypatch.setattr(evaluate, "load_eval_model", loaded)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("processes were launched before the error"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    lock = DirLock(out) if case.live_run else None  # this test plays the live run
    try:
        code = main(argv)
    finally:
        if lock is not None:
            lock.release()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, (case.name, err)
    errors = [line for line in err if line.startswith("rlhf-pg: error: ")]
    assert len(errors) == 1 and case.expect in errors[0], (case.name, err)
    if case.previous_run:
        assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing written is lost
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert set(before) <= set(after)  # nothing that was there is removed
