"""Checkpoint integrity and refused writes (rlhf_pg/checkpoint.py manifests, rlhf_pg/run_dir.py).

Integrity: a run dies while writing its step-6 checkpoint, leaving step 2 and step 4; the test then
damages step 4 (truncated, a file deleted, one byte flipped), resumes, and checks that the damage was
found (one warning line naming the checkpoint and what is wrong), that step 4 was set aside as
``corrupt-step_000004`` and the run resumed from step 2, and that the finished run is bit-identical
to an uninterrupted one (compared as in tests/test_faults.py). Also: with keep_checkpoints=1 pruning
never deletes the good checkpoint in favour of the corrupt one; when no checkpoint is usable the
resume is refused in one line and nothing is changed; a checkpoint without a manifest (an older
rlhf-pg) is used when its files are there.

Refused writes: a full disk / read-only filesystem (``RLHF_PG_FAULT_MODE=enospc|erofs`` at a write
point, a fake file that fills up under the real ``torch.save``, a safetensors error, and a real
kernel refusal via ``RLIMIT_FSIZE``) stop the run with one line naming the file and the error, the
previous checkpoint stays intact, and resuming from it ends bit-identical; through the CLI exit code
2 and one stderr line without a traceback, on 1 and on 2 processes (no process hangs).
"""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_subprocess_env
from safetensors.torch import load_file

from rlhf_pg import checkpoint
from rlhf_pg.errors import UserError
from rlhf_pg.faults import InjectedFault
from rlhf_pg.run_dir import LOCK_NAME
from rlhf_pg.trainer import Trainer

# The shared tiny run (conftest.tiny_tree) as PPO with an adaptive KL; a checkpoint every 2 steps, 2 kept.
INTEGRITY = dict(
    seed=7,
    batch={"epochs": 1, "micro_batch_size": 8},
    rewards={"functions": [{"name": "length_penalty", "kwargs": {"target": 3, "scale": 1}}]},
    algo={"name": "ppo", "kl_coef": 0.05, "kl_target": 0.5, "kl_horizon": 100},
    train={
        "max_steps": 6,
        "lr": 1.0e-3,
        "save_every": 2,
        "keep_checkpoints": 2,
        "samples_every": 1,
        "deterministic": True,
    },
)
VOLATILE = ("time/", "tokens_per_s", "perf/")  # timings and rates derived from them
STEP = "step_{:06d}".format

# Bit-identical runs of CPU processes (in-process and 2 processes over gloo): CUDA hidden on any machine.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.cpu_only(reason="bit-identical resume on CPU, 1 process and 2 gloo processes"),
]


def _sections(**train):
    return {**INTEGRITY, "train": {**INTEGRITY["train"], **train}}


def _records(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)}
        for line in path.read_text().splitlines()
    ]


def _assert_same_run(out: Path, ref: Path) -> None:
    """Every step logged once and equal to the reference's; final weights bit-identical."""
    assert _records(out / "metrics.jsonl") == _records(ref / "metrics.jsonl")
    assert _records(out / "samples.jsonl") == _records(ref / "samples.jsonl")
    a, b = load_file(out / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def _tree(out: Path) -> dict[str, str]:
    """Every file under ``out`` (but the run lock) → its sha256: to show that nothing changed."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


PROGRESS_BAR = re.compile(r"^[^:]+: *\d+%\|")  # tqdm: "train:  50%|█████     | 2/4 [...]"


def _messages(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm redraws them after carriage returns): the lines a user reads."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip() and not PROGRESS_BAR.match(line)]


@pytest.fixture(scope="module")
def config(tiny_config):
    """``config(out, **train)``: the INTEGRITY run writing into ``out``."""
    return lambda out, **train: tiny_config(out.parent, output_dir=str(out), **_sections(**train))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config, one_thread):
    out = tmp_path_factory.mktemp("integrity") / "uninterrupted"
    Trainer(config(out)).train()
    return out


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, config, one_thread):
    """A run that died while writing its step-6 checkpoint: step_000002 and step_000004 complete."""
    out = tmp_path_factory.mktemp("integrity") / "crashed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_PG_FAULT", "ckpt-after-model@6")
        mp.setenv("RLHF_PG_FAULT_MODE", "raise")
        with pytest.raises(InjectedFault):
            Trainer(config(out)).train()
    assert _steps(out) == [STEP(2), STEP(4)]
    assert all((out / "checkpoints" / s / checkpoint.MANIFEST).is_file() for s in _steps(out))
    return out


@pytest.fixture
def run(crashed, tmp_path):
    """A copy of the crashed run to damage and resume."""
    out = tmp_path / "run"
    shutil.copytree(crashed, out)
    return out


def _truncate(path: Path, size: int = 1200) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)  # inside the tensor data: safetensors alone would load it
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


# ---------------------------------------------------------------------------------------- integrity
@pytest.mark.parametrize("damage", ["truncated", "missing", "flipped"])
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_bit_identical(
    damage, run, reference, config, capsys
):
    step4 = run / "checkpoints" / STEP(4)
    size = (step4 / "model.safetensors").stat().st_size
    if damage == "truncated":
        _truncate(step4 / "model.safetensors")
        why = f"model.safetensors: 1200 of {size} bytes — truncated"
    elif damage == "missing":
        (step4 / "optimizer.pt").unlink()
        why = "optimizer.pt: missing"
    else:
        _flip_byte(step4 / "model.safetensors")  # same size: only the hash can tell
        assert (step4 / "model.safetensors").stat().st_size == size
        why = "model.safetensors: sha256 differs from the one written — the file is corrupted"
    damaged = _tree(step4)
    capsys.readouterr()
    Trainer(config(run, resume=True)).train()
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert warnings == [
        f"warning: checkpoint {step4} is unusable ({why}); moved to corrupt-{STEP(4)}; resuming from {STEP(2)}"
    ]
    assert f"resumed from {run / 'checkpoints' / STEP(2)} (step 2)" in out
    _assert_same_run(run, reference)
    assert _tree(run / "checkpoints" / f"corrupt-{STEP(4)}") == damaged  # kept as it was, for the user
    assert _steps(run) == [STEP(4), STEP(6)]  # step 4 written again, and good
    assert all(checkpoint.problem(run / "checkpoints" / s) is None for s in _steps(run))


def test_keep_one_never_prunes_the_good_checkpoint_for_a_corrupt_newer_one(run, reference, config, monkeypatch):
    """keep_checkpoints=1: step 4 corrupt, resume from step 2 and write step 3. Pruning must keep step 3
    (the corrupt step 4, were it still called step_*, has the higher step and would win)."""
    _truncate(run / "checkpoints" / STEP(4) / "model.safetensors")
    after_commit = []
    real_commit = checkpoint.commit

    def commit(output_dir, step, keep):
        final = real_commit(output_dir, step, keep)
        after_commit.append((step, _steps(Path(output_dir))))
        return final

    monkeypatch.setattr(checkpoint, "commit", commit)
    Trainer(config(run, resume=True, save_every=1, keep_checkpoints=1)).train()
    assert after_commit[0] == (3, [STEP(3)])
    assert after_commit[-1] == (6, [STEP(6)])
    assert (run / "checkpoints" / f"corrupt-{STEP(4)}").is_dir()
    _assert_same_run(run, reference)


def test_no_usable_checkpoint_refuses_in_one_line_and_changes_nothing(run, tiny_recipe, capsys):
    from rlhf_pg import cli

    ckpts = run / "checkpoints"
    _truncate(ckpts / STEP(4) / "model.safetensors")
    (ckpts / STEP(2) / "optimizer.pt").unlink()
    before = _tree(run)
    recipe = tiny_recipe(run.parent, **INTEGRITY)
    assert cli.main(["train", str(recipe), f"output_dir={run}", "--resume"]) == 2
    err = _messages(capsys.readouterr().err)
    size = (ckpts / STEP(4) / "model.safetensors").stat().st_size
    assert len(err) == 1 and err[0].startswith(f"rlhf-pg: error: cannot resume: no checkpoint in {ckpts} is usable")
    assert f"{STEP(4)} (model.safetensors: {size} of " in err[0] and f"{STEP(2)} (optimizer.pt: missing)" in err[0]
    assert "overwrite=true" in err[0]
    assert _tree(run) == before  # nothing renamed, truncated or deleted


def test_checkpoints_without_manifest_from_an_older_version_are_used(run, reference, config, capsys):
    """No manifest: accepted when the files a resume needs are there (no hash check); step 4 lacks
    optimizer.pt, so the run resumes from step 2 — also without a manifest."""
    ckpts = run / "checkpoints"
    for step in (2, 4):
        (ckpts / STEP(step) / checkpoint.MANIFEST).unlink()
    (ckpts / STEP(4) / "optimizer.pt").unlink()
    assert checkpoint.problem(ckpts / STEP(2)) is None
    assert checkpoint.problem(ckpts / STEP(4)) == "optimizer.pt: missing"
    capsys.readouterr()
    Trainer(config(run, resume=True)).train()
    out = capsys.readouterr().out
    assert f"warning: checkpoint {ckpts / STEP(4)} is unusable (optimizer.pt: missing)" in out
    assert f"resumed from {ckpts / STEP(2)} (step 2)" in out
    _assert_same_run(run, reference)


# ---------------------------------------------------------------------------------- refused writes
def _check_after_failed_step4(out: Path) -> None:
    """What a refused write of checkpoint 4 leaves: step 2 intact, no trace of step 4."""
    assert _steps(out) == [STEP(2)]
    assert checkpoint.problem(out / "checkpoints" / STEP(2)) is None
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize(
    ("mode", "reason", "fix"),
    [
        ("enospc", "[Errno 28] No space left on device", "free space"),
        ("erofs", "[Errno 30] Read-only file system", "make the filesystem writable"),
    ],
    ids=["enospc", "erofs"],
)
def test_refused_checkpoint_write_is_one_line_and_the_previous_checkpoint_resumes(
    mode, reason, fix, tmp_path, reference, config, monkeypatch
):
    out = tmp_path / "run"
    monkeypatch.setenv("RLHF_PG_FAULT", "ckpt-after-optimizer@4")
    monkeypatch.setenv("RLHF_PG_FAULT_MODE", mode)
    with pytest.raises(UserError) as e:
        Trainer(config(out)).train()
    assert str(e.value) == (
        f"could not write checkpoint step 4 to {out / 'checkpoints'}: {reason} (.tmp-step_000004/scheduler.pt); "
        f"the last complete checkpoint is step_000002 — {fix} and resume with --resume"
    )
    _check_after_failed_step4(out)
    monkeypatch.delenv("RLHF_PG_FAULT")
    Trainer(config(out, resume=True)).train()
    _assert_same_run(out, reference)


def test_a_disk_that_fills_under_the_real_torch_save(tmp_path, config, monkeypatch):
    """Not a fault point: the file optimizer.pt of checkpoint 4 refuses bytes after the first 4 KiB, as
    a full disk does. torch.save turns that into a RuntimeError; the OSError behind it is what the user reads."""
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.room = f, 4096

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as Python's write: no file name
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def filling_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if str(path).endswith(".tmp-step_000004/optimizer.pt") else f

    monkeypatch.setattr(checkpoint, "open", filling_open, raising=False)  # the module's open, not builtins
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        Trainer(config(out)).train()
    assert str(e.value).startswith(
        f"could not write checkpoint step 4 to {out / 'checkpoints'}: [Errno 28] No space left on device "
        "(.tmp-step_000004/optimizer.pt); the last complete checkpoint is step_000002"
    )
    assert isinstance(e.value.__cause__, OSError)
    _check_after_failed_step4(out)


def test_refused_metrics_line_is_one_line_and_resumes(tmp_path, reference, config, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("RLHF_PG_FAULT", "metrics-mid-line@3")
    monkeypatch.setenv("RLHF_PG_FAULT_MODE", "enospc")
    with pytest.raises(UserError) as e:
        Trainer(config(out)).train()
    assert str(e.value) == (
        f"could not write {out / 'metrics.jsonl'}: [Errno 28] No space left on device; "
        "the last complete checkpoint is step_000002 — free space and resume with --resume"
    )
    assert not (out / "metrics.jsonl").read_text().endswith("\n")  # the half line the full disk took
    monkeypatch.delenv("RLHF_PG_FAULT")
    Trainer(config(out, resume=True)).train()
    _assert_same_run(out, reference)


def test_refused_final_model_save_is_one_line_and_resuming_saves_it(tmp_path, config, monkeypatch):
    """save_pretrained writes with safetensors, which reports a full disk as a SafetensorError."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "run"
    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(UserError) as e:
        Trainer(config(out, max_steps=2)).train()
    assert str(e.value) == (
        f"could not save the model to {out / 'model'}: [Errno 28] No space left on device; the last complete "
        "checkpoint is step_000002 — free space and resume with --resume (it saves the model again)"
    )
    monkeypatch.undo()
    Trainer(config(out, max_steps=2, resume=True)).train()
    assert (out / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- CLI
def _env(**extra: str) -> dict:
    env = cpu_subprocess_env(TQDM_DISABLE="1", OMP_NUM_THREADS="1", **extra)
    return {k: v for k, v in env.items() if not k.startswith("RLHF_PG_FAULT") or k in extra}


def _cli(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_pg", "train", str(recipe), f"output_dir={out}", *extra]


@pytest.mark.parametrize("processes", [1, 2])
def test_cli_full_disk_at_a_checkpoint_exits_2_with_one_line(processes, tmp_path, tiny_recipe):
    """On 2 processes only rank 0 fails (it writes the model and optimizer); rank 1 must not wait for
    it at a barrier, nor die with a traceback: both stop with the same error, printed once. Then, on 2
    processes, a newer checkpoint that is corrupt: the main process alone verifies, warns once and
    sets it aside, and both processes load step 2 (one that chose for itself would load the corrupt one)."""
    recipe = tiny_recipe(tmp_path, **INTEGRITY)
    out = tmp_path / "run"
    env = _env(RLHF_PG_FAULT="ckpt-after-model@4", RLHF_PG_FAULT_MODE="enospc")
    p = subprocess.run(
        _cli(recipe, out, "--num-processes", str(processes)), env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert _messages(p.stderr) == [
        f"rlhf-pg: error: could not write checkpoint step 4 to {out / 'checkpoints'}: [Errno 28] No space left on "
        "device (.tmp-step_000004/optimizer.pt); the last complete checkpoint is step_000002 — free space and "
        "resume with --resume"
    ]
    _check_after_failed_step4(out)
    if processes == 1:
        return
    ckpts = out / "checkpoints"
    assert (ckpts / STEP(2) / "rng_rank1.pt").is_file()
    shutil.copytree(ckpts / STEP(2), ckpts / STEP(3))
    _truncate(ckpts / STEP(3) / "model.safetensors")
    p = subprocess.run(
        _cli(recipe, out, "--num-processes", "2", "--resume"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [line for line in p.stdout.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and f"{ckpts / STEP(3)} is unusable (model.safetensors: 1200 of " in warnings[0]
    assert f"resumed from {ckpts / STEP(2)} (step 2)" in p.stdout
    assert _steps(out) == [STEP(4), STEP(6)] and (ckpts / f"corrupt-{STEP(3)}").is_dir()


def test_cli_a_real_refused_write_rlimit_fsize(tmp_path, tiny_recipe):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG past 1 MB; Python ignores SIGXFSZ): safetensors
    reports it in words ('os error 27'), and it still ends as one line naming the file."""
    recipe = tiny_recipe(tmp_path, **INTEGRITY)
    out = tmp_path / "run"
    child = (
        "import resource, runpy, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        f"sys.argv = ['rlhf-pg', 'train', {str(recipe)!r}, 'output_dir={out}']\n"
        "runpy.run_module('rlhf_pg', run_name='__main__')\n"
    )
    p = subprocess.run([sys.executable, "-c", child], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert _messages(p.stderr) == [
        f"rlhf-pg: error: could not write checkpoint step 2 to {out / 'checkpoints'}: [Errno 27] File too large "
        "(.tmp-step_000002/model.safetensors); no checkpoint was completed yet — raise the file-size limit "
        "(ulimit -f) and start again with --resume (it starts from step 0)"
    ]
    assert not list((out / "checkpoints").iterdir())
