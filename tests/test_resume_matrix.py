"""The resume matrix: every kind of trainer state, killed in the middle of a step, resumes bit-identically.

Each case is the shared tiny run (conftest.tiny_tree) with one kind of state that a resume must carry: an
LR schedule with warm-up (linear, cosine, constant), a LoRA adapter, PPO's value head, a separate critic
(with critic warm-up), the adaptive KL controller, REINFORCE's EMA baseline. The run dies at
``step-after-update`` of step 3 — the weights already updated, the step not yet logged or checkpointed,
with checkpoints every 2 steps — so the resumed run must throw away half a step and redo it from the
checkpoint of step 2. The finished run is compared with an uninterrupted one: metrics.jsonl and
samples.jsonl (minus timings) identical, each step logged exactly once, every tensor file of the final
model (policy, adapter, merged model, value head, critic) bit-identical. Each case also shows that its
state matters (the checkpoint holds it, and a run without it would differ), so that the comparison
would fail if that state were not saved or restored.

One case runs on 2 real processes killed with ``os._exit`` (no cleanup, like SIGKILL). And a Ctrl-C
test: the first SIGINT finishes the step and checkpoints, a second one stops at once, leaving the last
complete checkpoint the latest one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cpu_subprocess_env
from safetensors.torch import load_file
from transformers import get_scheduler

from rlhf_pg import checkpoint, cli
from rlhf_pg.config import batch_plan
from rlhf_pg.faults import InjectedFault
from rlhf_pg.models import TINY_ALIAS, load_model
from rlhf_pg.trainer import Trainer

MAX_STEPS, SAVE_EVERY, KILL_AT = 5, 2, 3  # the kill lands between checkpoints: step 3 is redone
CKPT = f"step_{KILL_AT - 1:06d}"  # what the resumed run starts from
LR = 1.0e-3
BASE = dict(
    seed=7,
    batch={"micro_batch_size": 8},
    train={
        "max_steps": MAX_STEPS,
        "lr": LR,
        "save_every": SAVE_EVERY,
        "keep_checkpoints": 1,
        "samples_every": 1,
        "eval_at_start": False,
        "deterministic": True,
    },
)
VOLATILE = ("time/", "tokens_per_s", "perf/")  # timings and rates derived from them
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "save_merged": True}

# Bit-identical runs on CPU (in-process, and 2 gloo processes against each other): CUDA hidden on any machine.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.cpu_only(reason="bit-identical resume on CPU, 1 process and 2 gloo processes"),
]


def _sections(**over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in over.items():
        out[key] = {**out.get(key, {}), **value}
    return out


# ------------------------------------------------------------------------------------------ helpers
def _records(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)}
        for line in path.read_text().splitlines()
    ]


def _steps(out: Path) -> list[dict]:
    """The training-step records of metrics.jsonl (eval records have no reward)."""
    return [r for r in _records(out / "metrics.jsonl") if "reward" in r]


def _tensor_files(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor file of the final model: policy, adapter, merged model, value head, critic."""
    model = out / "model"
    return {str(p.relative_to(model)): load_file(p) for p in sorted(model.rglob("*.safetensors"))}


def _trainer_json(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer.json").read_text())


def _schedule(cfg) -> list[float]:
    """The lr after each RL step by the documented rule: warm-up and schedule count OPTIMIZER steps
    (optimizer steps per RL step × max_steps in all, whatever the number of processes)."""
    k = batch_plan(cfg, 1).optimizer_steps
    t = cfg.train
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=t.lr)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
    sched = get_scheduler(name, opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps * k)
    lrs = []
    for _ in range(t.max_steps):
        for _ in range(k):
            opt.step()
            sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


def _assert_same_run(out: Path, ref: Path) -> None:
    """Resumed == uninterrupted: logs, each step exactly once, every final tensor bit-identical."""
    assert _records(out / "metrics.jsonl") == _records(ref / "metrics.jsonl")
    assert _records(out / "samples.jsonl") == _records(ref / "samples.jsonl")
    assert [r["step"] for r in _steps(out)] == list(range(1, MAX_STEPS + 1))
    samples = [r["step"] for r in _records(out / "samples.jsonl")]
    assert sorted(set(samples)) == list(range(1, MAX_STEPS + 1)) and samples == sorted(samples)
    a, b = _tensor_files(out), _tensor_files(ref)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        different = [k for k in a[name] if not torch.equal(a[name][k], b[name][k])]
        assert not different, (name, different[:5])
    assert not list((out / "checkpoints").glob(".tmp-step_*"))


def _check_crash_state(out: Path) -> Path:
    """What the kill left: steps 1-2 logged (step 3 died before its log line), step 2's checkpoint latest."""
    assert [r["step"] for r in _steps(out)] == list(range(1, KILL_AT))
    ckpt = checkpoint.latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == CKPT
    assert _trainer_json(ckpt)["step"] == KILL_AT - 1
    return ckpt


def _initial_policy() -> dict[str, torch.Tensor]:
    return load_model(TINY_ALIAS, dtype="float32", device=torch.device("cpu")).state_dict()


# ------------------------------------------------------------- the state each case shows matters
def _schedule_matters(cfg, ref: Path, ckpt: Path) -> None:
    """The lr moves (warm-up then the schedule), the resumed step's lr is the schedule's, and the
    checkpoint's scheduler sits at step 2's optimizer step: a fresh scheduler would restart warm-up."""
    lrs = [r["lr"] for r in _steps(ref)]
    assert lrs == pytest.approx(_schedule(cfg), rel=1e-12, abs=0)
    assert lrs[KILL_AT - 1] != LR and len(set(lrs)) >= 3  # step 3's lr is not the constant lr
    assert lrs[KILL_AT - 1] != lrs[0]  # a scheduler restarted at the resume would log step 1's lr at step 3
    k = batch_plan(cfg, 1).optimizer_steps
    sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == (KILL_AT - 1) * k


def _lora_matters(cfg, ref: Path, ckpt: Path) -> None:
    """The checkpoint holds the adapter only, already trained (a fresh adapter has B = 0); the
    adapter's dropout draws from torch's global RNG, so its state (rng_rank0.pt) must be restored too."""
    state = load_file(ckpt / "model.safetensors")
    assert state and all("lora_" in k for k in state)
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)
    assert cfg.model.lora.dropout > 0 and (ckpt / "rng_rank0.pt").is_file()
    assert {"adapter_model.safetensors", "merged/model.safetensors"} <= _tensor_files(ref).keys()


def _value_head_matters(cfg, ref: Path, ckpt: Path) -> None:
    """The value head (initialised to 0) is trained and checkpointed with the policy."""
    state = load_file(ckpt / "model.safetensors")
    assert state["value_head.weight"].abs().max() > 0
    assert {"model.safetensors", "value_head.safetensors"} <= _tensor_files(ref).keys()


def _critic_matters(cfg, ref: Path, ckpt: Path) -> None:
    """Critic warm-up (2 steps): at the checkpoint only the critic has moved; the policy still equals
    the initial model, and it trains from step 3 on — so the resumed run must know the step and carry
    the critic's weights (and its own optimizer state) separately."""
    state = load_file(ckpt / "model.safetensors")
    init = _initial_policy()
    policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    assert policy and all(torch.equal(v, init[k]) for k, v in policy.items())
    assert state["critic.value_head.weight"].abs().max() > 0
    final = load_file(ref / "model" / "model.safetensors")
    assert any(not torch.equal(v, init[k]) for k, v in final.items() if k in init)
    assert {"model.safetensors", "critic/model.safetensors", "critic/value_head.safetensors"} <= _tensor_files(
        ref
    ).keys()


def _kl_controller_matters(cfg, ref: Path, ckpt: Path) -> None:
    """β changes every step; the checkpoint holds step 2's β, not the initial one."""
    coefs = [r["kl_coef"] for r in _steps(ref)]
    assert len(set(coefs)) == MAX_STEPS and cfg.algo.kl_coef not in coefs
    assert _trainer_json(ckpt)["kl_ctl"]["value"] == coefs[KILL_AT - 2] != cfg.algo.kl_coef


def _ema_matters(cfg, ref: Path, ckpt: Path) -> None:
    """The EMA baseline after step 2 (d·G₁ + (1−d)·G₂ of the batches' mean returns) is in trainer.json;
    a fresh one would give step 3 the baseline 0."""
    assert cfg.algo.options("reinforce").baseline == "ema"
    d = cfg.algo.options("reinforce").ema_decay
    r1, r2 = (r["reward"] for r in _steps(ref)[:2])
    value = _trainer_json(ckpt)["advantage_state"]["value"]
    assert value == pytest.approx(d * r1 + (1 - d) * r2, abs=1e-6) and value != 0


@dataclass(frozen=True)
class Case:
    id: str
    sections: dict[str, Any]
    matters: Any  # (cfg, reference dir, the crash's checkpoint) -> None; asserts


CASES = [
    Case(
        "linear-warmup",
        _sections(train={"lr_scheduler": "linear", "warmup_steps": 2}),
        _schedule_matters,  # warm-up over steps 1-2: the kill in step 3 lands right after it
    ),
    Case(
        "cosine-warmup",
        # 2 minibatches: 2 optimizer steps per RL step; warm-up ends inside step 3 (optimizer steps 5-6)
        _sections(batch={"minibatch_size": 4}, train={"lr_scheduler": "cosine", "warmup_steps": 5}),
        _schedule_matters,
    ),
    # warm-up over steps 1-4: the kill in step 3 lands inside it
    Case("constant-warmup", _sections(train={"lr_scheduler": "constant", "warmup_steps": 4}), _schedule_matters),
    Case("lora-grpo", _sections(model={"lora": LORA}, algo={"name": "grpo", "kl_coef": 0.05}), _lora_matters),
    Case("ppo-value-head", _sections(algo={"name": "ppo", "kl_coef": 0.05}), _value_head_matters),
    Case(
        "ppo-critic-warmup",
        _sections(model={"critic": "separate"}, algo={"name": "ppo", "critic_warmup_steps": 2}),
        _critic_matters,
    ),
    Case(
        "adaptive-kl",
        _sections(algo={"name": "rloo", "kl_coef": 0.05, "kl_target": 0.01, "kl_horizon": 20}),
        _kl_controller_matters,
    ),
    Case("reinforce-ema", _sections(algo={"name": "reinforce"}), _ema_matters),
]
BY_ID = {c.id: c for c in CASES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config, one_thread):
    """``reference(case)`` → the directory of the case's uninterrupted run (run once per module);
    ``reference.config(case, out, **train)`` → the case's config writing into ``out``."""
    runs: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("matrix")

    def config(case: Case, out: Path, **train):
        sections = {**case.sections, "train": {**case.sections["train"], **train}}
        return tiny_config(out.parent, output_dir=str(out), **sections)

    def get(case: Case) -> Path:
        if case.id not in runs:
            out = base / case.id / "uninterrupted"
            Trainer(config(case, out)).train()
            runs[case.id] = out
        return runs[case.id]

    get.config = config
    return get


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_killed_mid_step_resumes_bit_identical(case, reference, tmp_path, monkeypatch):
    ref = reference(case)
    out = tmp_path / "run"
    monkeypatch.setenv("RLHF_PG_FAULT", f"step-after-update@{KILL_AT}")
    monkeypatch.setenv("RLHF_PG_FAULT_MODE", "raise")
    with pytest.raises(InjectedFault):
        Trainer(reference.config(case, out)).train()
    ckpt = _check_crash_state(out)
    case.matters(reference.config(case, out), ref, ckpt)
    monkeypatch.delenv("RLHF_PG_FAULT")
    Trainer(reference.config(case, out, resume=True)).train()
    _assert_same_run(out, ref)


# ------------------------------------------------------------------------- 2 processes, os._exit
TWO = _sections(
    model={"critic": "separate"},
    algo={"name": "ppo", "critic_warmup_steps": 1},
    # PPO's 2 epochs: 2 optimizer steps per RL step, so warm-up ends inside step 2, the kill in step 3 right after
    train={"lr_scheduler": "cosine", "warmup_steps": 3},
)


def _run2(recipe: Path, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = cpu_subprocess_env(TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    for key in ("RLHF_PG_FAULT", "RLHF_PG_FAULT_MODE"):
        env.pop(key, None)
    if fault:
        env["RLHF_PG_FAULT"] = fault  # no MODE: the point ends the process with os._exit(137)
    cmd = [sys.executable, "-m", "rlhf_pg", "train", str(recipe), f"output_dir={out}", "--num-processes", "2", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_killed_mid_step_resume_bit_identical(tmp_path, tiny_recipe, tiny_config):
    """PPO with a separate critic, critic warm-up and a cosine schedule with warm-up, on 2 processes:
    both ranks die with os._exit in step 3, after the update; resumed with --resume, the run equals an
    uninterrupted 2-process run. The lr follows the schedule per optimizer step, as on 1 process."""
    recipe = tiny_recipe(tmp_path, **TWO)
    ref = tmp_path / "uninterrupted"
    p = _run2(recipe, ref)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "run"
    p = _run2(recipe, out, fault=f"step-after-update@{KILL_AT}")
    assert p.returncode != 0, "the injected crash did not happen"
    ckpt = _check_crash_state(out)
    assert {f"rng_rank{r}.pt" for r in (0, 1)} <= {f.name for f in ckpt.iterdir()}
    p = _run2(recipe, out, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_run(out, ref)
    cfg = tiny_config(tmp_path, **TWO)
    assert [r["lr"] for r in _steps(ref)] == pytest.approx(_schedule(cfg), rel=1e-12, abs=0)


# ------------------------------------------------------------------------------------ Ctrl-C twice
def test_second_ctrl_c_stops_at_once_and_the_last_complete_checkpoint_stays(
    reference, tiny_recipe, tmp_path, monkeypatch, capsys
):
    """Through the CLI, in this process, with the signals sent from inside the run at fixed points (no
    timing): the first SIGINT arrives in the middle of step 3 — the step finishes and is logged, and
    the checkpoint of step 3 starts; the second arrives while that checkpoint is half-written (the
    model written, the optimizer state being taken) — KeyboardInterrupt at once, ``rlhf-pg:
    interrupted``, exit 130. The latest checkpoint is still step 2's, complete; the torn one has no
    step_* name. Resumed, the run equals the uninterrupted one."""
    case = BY_ID["constant-warmup"]
    ref = reference(case)
    recipe = tiny_recipe(tmp_path, **case.sections)
    out = tmp_path / "run"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    sent: list[str] = []
    real_optimise, real_state_dict = Trainer.optimise, torch.optim.Optimizer.state_dict

    def optimise(self, batch):
        if self.step_idx == KILL_AT - 1 and not sent:
            sent.append("first")
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 3
        return real_optimise(self, batch)

    def state_dict(self):
        if sent == ["first"]:  # the next optimizer state taken is for step 3's checkpoint
            sent.append("second")
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again while that checkpoint is being written
        return real_state_dict(self)

    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimise", optimise)
        m.setattr(torch.optim.Optimizer, "state_dict", state_dict)
        assert cli.main(["train", str(recipe), f"output_dir={out}"]) == 130
    captured = capsys.readouterr()
    assert sent == ["first", "second"]
    assert f"received SIGINT: finishing step {KILL_AT}" in captured.out
    assert "rlhf-pg: interrupted" in captured.err and "stopped after step" not in captured.err
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone
    assert [r["step"] for r in _steps(out)] == list(range(1, KILL_AT + 1))  # step 3 finished and was logged
    root = checkpoint.checkpoint_root(out)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [CKPT]
    ckpt = checkpoint.latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == CKPT and _trainer_json(ckpt)["step"] == KILL_AT - 1
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer.json", "rng_rank0.pt"):
        assert (ckpt / name).is_file(), name
    torn = [p for p in root.iterdir() if p.name != CKPT]
    assert all(not (p / "trainer.json").exists() for p in torn), torn  # if left, half-written and not step_*
    assert cli.main(["train", str(recipe), f"output_dir={out}", "--resume"]) == 0
    _assert_same_run(out, ref)
