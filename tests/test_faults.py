"""Faults injected where state is written (rlhf_pg/faults.py), at every point, on 1 and 2 processes.

Each run dies at one point of step 4 (a checkpoint being written, or a metrics line half-written);
the test then checks the directory as the crash left it (the previous checkpoint is complete; no
half-written checkpoint has a step_* name), resumes, and compares the finished run with an
uninterrupted one: metrics and samples hold each step exactly once and equal the reference's, and
the final weights are bit-identical. One process: in-process (``RLHF_PG_FAULT_MODE=raise``: the point
raises a BaseException that nothing catches, so no cleanup code can run that a kill would not).
Two processes: real processes ended with ``os._exit`` on rank 0 (the launcher takes rank 1 down).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_subprocess_env
from safetensors.torch import load_file

from rlhf_pg import checkpoint
from rlhf_pg.faults import POINTS, InjectedFault
from rlhf_pg.trainer import Trainer

# The shared tiny run (conftest.tiny_tree) as PPO with an adaptive KL; a checkpoint every 2 steps.
FAULTS = dict(
    seed=7,
    batch={"epochs": 1, "micro_batch_size": 8},
    rewards={"functions": [{"name": "length_penalty", "kwargs": {"target": 3, "scale": 1}}]},
    algo={"name": "ppo", "kl_coef": 0.05, "kl_target": 0.5, "kl_horizon": 100},
    train={
        "max_steps": 6,
        "lr": 1.0e-3,
        "save_every": 2,
        "keep_checkpoints": 1,
        "samples_every": 1,
        "deterministic": True,
    },
)
AT = 4
VOLATILE = ("time/", "tokens_per_s", "perf/")  # timings and rates derived from them

# Bit-identical runs of CPU processes (in-process and 2 processes over gloo): CUDA hidden on any machine.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.cpu_only(reason="bit-identical resume on CPU, 1 process and 2 gloo processes"),
]


def _records(path: Path) -> list[dict]:
    import json

    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)}
        for line in path.read_text().splitlines()
    ]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def _check_crash_state(out: Path, point: str) -> None:
    """What the crash left: complete checkpoints only, the right one last."""
    ckpt = checkpoint.latest_checkpoint(out)
    expected = AT if point == "ckpt-after-rename" else AT - 2
    assert ckpt is not None and ckpt.name == f"step_{expected:06d}", (point, ckpt)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer.json"):
        assert (ckpt / name).is_file(), (point, name)
    if point.startswith("ckpt-") and point != "ckpt-after-rename":
        assert list((out / "checkpoints").glob(".tmp-step_*")), point  # the torn write, never picked
    if point == "ckpt-after-rename":  # renamed, the older one not yet pruned: both complete
        assert (out / "checkpoints" / f"step_{AT - 2:06d}").is_dir()
    if point == "metrics-mid-line":
        assert not (out / "metrics.jsonl").read_text().endswith("\n")  # a torn last line


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config, one_thread):
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    Trainer(tiny_config(out.parent, output_dir=str(out), **FAULTS)).train()
    return out


@pytest.mark.parametrize("point", POINTS)
def test_one_process_dies_at_each_point_and_resumes_bit_identical(point, reference, tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("RLHF_PG_FAULT", f"{point}@{AT}")
    monkeypatch.setenv("RLHF_PG_FAULT_MODE", "raise")
    with pytest.raises(InjectedFault):
        Trainer(tiny_config(tmp_path, output_dir=str(out), **FAULTS)).train()
    _check_crash_state(out, point)
    monkeypatch.delenv("RLHF_PG_FAULT")
    resume = {**FAULTS, "train": {**FAULTS["train"], "resume": True}}
    Trainer(tiny_config(tmp_path, output_dir=str(out), **resume)).train()
    assert _records(out / "metrics.jsonl") == _records(reference / "metrics.jsonl")
    assert _records(out / "samples.jsonl") == _records(reference / "samples.jsonl")
    a, b = _weights(out), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob(".tmp-step_*"))  # the torn write is cleaned up


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory, tiny_recipe):
    base = tmp_path_factory.mktemp("faults2")
    recipe = tiny_recipe(base, **FAULTS)
    out = base / "uninterrupted"
    p = _run2(recipe, out)
    assert p.returncode == 0, p.stderr[-3000:]
    return recipe, out


def _run2(recipe: Path, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = cpu_subprocess_env(TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env.pop("RLHF_PG_FAULT", None)
    if fault:
        env["RLHF_PG_FAULT"] = fault
    cmd = [sys.executable, "-m", "rlhf_pg", "train", str(recipe), f"output_dir={out}", "--num-processes", "2", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


# Every point is killed in one process above; on two processes the fast suite kills at one point of each
# kind (a torn checkpoint, an unrenamed one, a finished update) and the other three run with --runslow:
# each 2-process crash-and-resume costs ~1 min of CI.
TWO_PROCESS_FAST = ("ckpt-after-model", "ckpt-before-rename", "step-after-update")


@pytest.mark.parametrize(
    "point", [p if p in TWO_PROCESS_FAST else pytest.param(p, marks=pytest.mark.slow) for p in POINTS]
)
def test_two_processes_die_at_each_point_and_resume_bit_identical(point, two_process_reference, tmp_path):
    recipe, ref = two_process_reference
    out = tmp_path / "run"
    p = _run2(recipe, out, fault=f"{point}@{AT}")
    assert p.returncode != 0, "the injected crash did not happen"
    _check_crash_state(out, point)
    p = _run2(recipe, out, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert _records(out / "metrics.jsonl") == _records(ref / "metrics.jsonl")
    assert _records(out / "samples.jsonl") == _records(ref / "samples.jsonl")
    a, b = _weights(out), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
