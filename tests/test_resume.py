"""Checkpoints and resume: a run SIGKILLed at random moments (checkpoint writes included) and
resumed ends bit-identical to an uninterrupted run; SIGTERM stops cleanly with a checkpoint;
non-finite updates are skipped and, repeated, stop the run with the last good state saved."""

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cpu_subprocess_env
from safetensors.torch import load_file

from rlhf_pg import checkpoint
from rlhf_pg.errors import UserError
from rlhf_pg.trainer import Interrupted, Trainer

# The shared tiny run (conftest.tiny_tree) as PPO with an adaptive KL, a checkpoint every step.
RESUME = dict(
    seed=7,
    batch={"epochs": 1, "micro_batch_size": 8},
    rewards={"functions": [{"name": "length_penalty", "kwargs": {"target": 3, "scale": 1}}]},
    algo={"name": "ppo", "kl_coef": 0.05, "kl_target": 0.5, "kl_horizon": 100},
    train={
        "max_steps": 8,
        "lr": 1.0e-3,
        "save_every": 1,
        "keep_checkpoints": 2,
        "samples_every": 2,
        "deterministic": True,
    },
)


def _sections(**train):
    return {**RESUME, "train": {**RESUME["train"], **train}}


VOLATILE = ("time/", "tokens_per_s", "perf/")  # timings and rates derived from them


def _cli(recipe, out, *extra):
    return [sys.executable, "-m", "rlhf_pg", "train", str(recipe), f"output_dir={out}", *extra]


def _deterministic(path: Path) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in recs]


def _env():
    # the same thread count as the in-process runs (float sums differ by threads); CPU processes on any machine
    return cpu_subprocess_env(TQDM_DISABLE="1", OMP_NUM_THREADS="1")


# Bit-identical comparisons between this process and CLI subprocesses (OMP_NUM_THREADS=1) need the
# same thread count on both sides, whatever earlier tests left behind, and the same device: the CPU
# (the subprocesses get CUDA_VISIBLE_DEVICES=; this process runs with CUDA hidden).
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.cpu_only(reason="bit-identical runs: this process against CPU subprocesses, 2 gloo processes"),
]


def _steps_logged(out: Path) -> int:
    try:
        return sum('"reward"' in line for line in (out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _kill_processes_mentioning(text: str) -> None:
    """SIGKILL every process whose command line contains ``text`` (read from /proc: no procps needed)."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone already, or not ours to read
            continue
        if text in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc_dir.name), signal.SIGKILL)


def _kill_after_progress(proc, out: Path, steps: int, delay: float, kill) -> bool:
    """Kill ``proc`` ``delay`` seconds after ``steps`` training steps are in the metrics log (progress,
    not wall-clock time, so a fast or slow machine is killed at the same point of the run; the small
    random delay lands the kill anywhere in the following step or checkpoint write). False if the run
    finished first."""
    while proc.poll() is None and _steps_logged(out) < steps:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    kill()
    return True


@pytest.fixture(scope="module")
def config(tiny_config):
    """``config(out, **train)``: the RESUME run writing into ``out``."""
    return lambda out, **train: tiny_config(out.parent, output_dir=str(out), **_sections(**train))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, one_thread, tiny_recipe, config):
    """The uninterrupted run, in this process (deterministic algorithms: identical to a subprocess)."""
    base = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(base, **RESUME)
    out = base / "uninterrupted"
    Trainer(config(out)).train()
    return recipe, out


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference_run, tmp_path):
    recipe, ref = reference_run
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(40):
        args = _cli(recipe, out) + (["--resume"] if attempt else [])
        proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < 3:  # kill the first attempts at random points of steps 2-7
            at = 2 * attempt + rng.randint(1, 2)
            kills += _kill_after_progress(
                proc, out, at, rng.uniform(0.0, 0.2), lambda: proc.send_signal(signal.SIGKILL)
            )
        rc = proc.wait()
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert rc == 0 and kills >= 1
    assert _deterministic(out / "metrics.jsonl") == _deterministic(ref / "metrics.jsonl")
    assert _deterministic(out / "samples.jsonl") == _deterministic(ref / "samples.jsonl")
    a, b = load_file(out / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _deterministic(out / "metrics.jsonl") if "reward" in r]
    assert steps == list(range(1, 9))  # no duplicated or skipped steps
    assert len(list((out / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_sigterm_finishes_the_step_writes_checkpoint_and_resumes_exactly(reference_run, config, tmp_path):
    _, ref = reference_run
    out = tmp_path / "term"
    tr = Trainer(config(out, save_every=0))
    real_step = tr.step
    before = signal.getsignal(signal.SIGTERM)

    def step_then_signal():
        m = real_step()
        if tr.step_idx == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run; the handler lets the step finish
        return m

    tr.step = step_then_signal
    with pytest.raises(Interrupted) as stop:
        tr.train()
    assert stop.value.step == 3 and stop.value.signum == signal.SIGTERM
    assert checkpoint.latest_checkpoint(out).name == "step_000003"
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone: the previous one is back
    Trainer(config(out, save_every=0, resume=True)).train()
    assert _deterministic(out / "metrics.jsonl") == _deterministic(ref / "metrics.jsonl")


def test_cli_prints_how_to_resume(monkeypatch, tmp_path, capsys, tiny_recipe):
    from rlhf_pg import cli

    recipe = tiny_recipe(tmp_path, **RESUME)

    def interrupted(self):
        raise Interrupted(2, tmp_path / "checkpoints" / "step_000002", signal.SIGINT)

    monkeypatch.setattr(Trainer, "train", interrupted)
    assert cli.main(["train", str(recipe), "train.max_steps=3"]) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert f"resume with: rlhf-pg train {recipe} train.max_steps=3 --resume" in err


def test_half_written_checkpoint_is_never_picked(tmp_path):
    (tmp_path / "checkpoints" / "step_000003").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step_000004").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000003"


def test_nonfinite_updates_are_skipped_then_stop(tmp_path, monkeypatch, tiny_config):
    cfg = tiny_config(
        tmp_path,
        output_dir=str(tmp_path / "nan"),
        train={"max_steps": 5, "max_nonfinite_steps": 2, "eval_at_start": False},
    )
    tr = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    real = tr.algo.policy_loss.fn
    monkeypatch.setattr(
        tr.algo,
        "policy_loss",
        dataclasses.replace(tr.algo.policy_loss, fn=lambda *a: (real(*a)[0] * float("nan"), real(*a)[1])),
    )
    with pytest.raises(UserError, match="2 consecutive updates with non-finite"):
        tr.train()
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())  # no NaN reached weights
    assert checkpoint.latest_checkpoint(tmp_path / "nan") is not None


@pytest.mark.slow  # 50 s; in the fast suite, 2-process kills land at each fault point (test_faults, test_resume_matrix)
def test_two_processes_sigkill_then_resume_is_bit_identical(tmp_path, tiny_recipe):
    """Data-parallel on 2 CPU processes (gloo): killed at a random moment and resumed, the run ends
    identical to an uninterrupted 2-process run (each rank restores its own RNG state)."""
    recipe = tiny_recipe(tmp_path, **_sections(max_steps=5))
    env = _env()
    env["OMP_NUM_THREADS"] = "1"

    def run(out, *extra, kill_at=None):
        proc = subprocess.Popen(
            _cli(recipe, out, "--num-processes", "2", *extra),
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def crash():  # a machine crash: the launcher and every rank die at once
            os.killpg(proc.pid, signal.SIGKILL)
            _kill_processes_mentioning(str(out))  # ranks in a session of their own, if any

        killed = kill_at is not None and _kill_after_progress(
            proc, out, kill_at, random.Random(1).uniform(0, 0.3), crash
        )
        _, err = proc.communicate()
        return proc.returncode, err.decode(), killed

    rc, err, _ = run(tmp_path / "ref")
    assert rc == 0, err[-3000:]
    out = tmp_path / "killed"
    rc, _, killed = run(out, kill_at=2)
    assert killed
    for _ in range(3):
        if rc == 0:
            break
        rc, err, _ = run(out, "--resume")
    assert rc == 0, err[-3000:]
    assert _deterministic(out / "metrics.jsonl") == _deterministic(tmp_path / "ref" / "metrics.jsonl")
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any("rng_rank1.pt" == p.name for p in (out / "checkpoints").rglob("*"))
