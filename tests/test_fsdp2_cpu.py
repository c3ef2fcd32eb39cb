"""FSDP2 on CPU (gloo): an ``accelerate launch --config_file recipes/accelerate/fsdp2_full_shard.yaml`` run
really shards (rlhf_pg.distributed.keep_fsdp_on_cpu), trains like 1 process, checkpoints through
accelerate's FSDP save_state, resumes bit-identically after a kill, and saves a plain transformers model."""

import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from rlhf_pg.distributed import keep_fsdp_on_cpu

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import sys, torch
from rlhf_pg.config import load_config
from rlhf_pg.trainer import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(cfg)
tr.train()
full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
params = {n: full(p.detach()).clone() for n, p in tr.acc.unwrap_model(tr.model).named_parameters()}
torch.save({"params": params, "dt": str(tr.acc.distributed_type)}, f"{cfg.output_dir}/rank{tr.rank}.pt")
"""

SECTIONS = dict(
    seed=11,
    data={"eval_limit": 4},
    batch={"prompts_per_step": 4, "group_size": 2, "micro_batch_size": 2, "eval_batch_size": 2},
    algo={"name": "grpo", "kl_coef": 0.05},
    train={
        **{"lr": 1e-3, "max_steps": 2, "save_every": 1, "samples_every": 0},
        **{"deterministic": True, "max_grad_norm": 1.0},
    },
)


@pytest.mark.parametrize(
    "dt,env,flips",
    [
        ("MULTI_CPU", {}, False),  # plain DDP launch on CPU: unchanged
        ("NO", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, False),  # single process: unchanged
        ("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, False),  # FSDP1: unchanged
        ("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True),
    ],
)
def test_keep_fsdp_on_cpu_only_for_fsdp2_launches(dt, env, flips, monkeypatch):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    monkeypatch.setattr(PartialState, "_shared_state", {})
    acc = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType[dt], mixed_precision="no"))
    with mock.patch.dict(os.environ, env, clear=False):
        for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
            if k not in env:
                os.environ.pop(k, None)
        assert keep_fsdp_on_cpu(acc) is flips
    if flips:
        assert acc.state.distributed_type == DistributedType.FSDP and acc.state.fsdp_plugin.fsdp_version == 2
        assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP
    else:
        assert acc.state.distributed_type == DistributedType[dt] and not hasattr(acc.state, "fsdp_plugin")


def _launch(worker, recipe, out, extra_env=None, *overrides):
    from conftest import launch_with_config  # FSDP2 over gloo on CPU processes

    return launch_with_config("fsdp2_full_shard.yaml", worker, recipe, out, extra_env, *overrides)


@pytest.mark.cpu_only(reason="FSDP2 over gloo on CPU processes, compared with a 1-process CPU run")
def test_fsdp2_on_two_cpu_processes_trains_checkpoints_resumes_and_saves(
    tmp_path, one_thread, tiny_recipe, tiny_config
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_pg.trainer import Trainer

    recipe = tiny_recipe(tmp_path, **SECTIONS)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)

    straight = tmp_path / "straight"
    proc = _launch(worker, recipe, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2 · 2 processes (gloo)" in proc.stdout + proc.stderr  # the run header names the engine
    r0, r1 = (torch.load(straight / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["dt"] == "DistributedType.FSDP"
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    engine = straight / "checkpoints" / "step_000002" / "engine"
    assert (engine / "pytorch_model_fsdp.bin").is_file() and (engine / "optimizer.bin").is_file()

    tr = Trainer(tiny_config(tmp_path, output_dir=str(tmp_path / "one"), **SECTIONS))  # the same run, 1 process
    tr.train()
    one = {n: p.detach() for n, p in tr.acc.unwrap_model(tr.model).named_parameters()}
    for k, v in one.items():
        torch.testing.assert_close(r0["params"][k], v, atol=5e-4, rtol=1e-3)

    # killed in step 2 (after checkpoint 1), resumed: bit-identical to the uninterrupted run
    resumed = tmp_path / "resumed"
    proc = _launch(worker, recipe, resumed, {"RLHF_PG_FAULT": "step-after-update@2"})
    assert proc.returncode != 0
    proc = _launch(worker, recipe, resumed, None, "train.resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rr = torch.load(resumed / "rank0.pt", weights_only=True)
    assert all(torch.equal(rr["params"][k], r0["params"][k]) for k in r0["params"])

    # the final save: one ordinary state dict, the trained weights, loadable by plain transformers
    saved = load_file(straight / "model" / "model.safetensors")
    for k, v in saved.items():
        if k in r0["params"]:
            assert torch.equal(v, r0["params"][k]), k
    assert type(AutoModelForCausalLM.from_pretrained(straight / "model")).__name__ == "LlamaForCausalLM"


PPO = dict(
    SECTIONS,
    batch={**SECTIONS["batch"], "epochs": 2, "minibatch_size": 4},
    algo={"name": "ppo", "kl_coef": 0.05},
    train={**SECTIONS["train"], "save_every": 0},
)


def _fsdp2_matches_one_process(tmp_path, sections, tiny_recipe, tiny_config):
    """Train ``sections`` on 2 FSDP2 CPU processes and in 1 process; assert the weights agree. Returns the
    2-process run's directory and its rank-0 weights."""
    from rlhf_pg.trainer import Trainer

    recipe = tiny_recipe(tmp_path, **sections)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "two"
    proc = _launch(worker, recipe, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2 · 2 processes (gloo)" in proc.stdout + proc.stderr
    r0 = torch.load(out / "rank0.pt", weights_only=True)["params"]

    tr = Trainer(tiny_config(tmp_path, output_dir=str(tmp_path / "one"), **sections))
    tr.train()
    one = {n: p.detach() for n, p in tr.acc.unwrap_model(tr.model).named_parameters()}
    assert one.keys() == r0.keys()
    for k, v in one.items():
        torch.testing.assert_close(r0[k], v, atol=5e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")
    return out, r0


@pytest.mark.cpu_only(reason="FSDP2 over gloo on CPU processes, compared with a 1-process CPU run")
def test_ppo_with_a_value_head_under_fsdp2_matches_one_process(tmp_path, one_thread, tiny_recipe, tiny_config):
    """PPO's value head rides on the sharded policy (one FSDP2 module): 2 epochs × 2 minibatches of
    clipped updates on 2 processes train like 1, and the saved value head is the trained one."""
    from safetensors.torch import load_file

    out, r0 = _fsdp2_matches_one_process(tmp_path, PPO, tiny_recipe, tiny_config)
    assert any(k.startswith("value_head") for k in r0)
    head = load_file(out / "model" / "value_head.safetensors")
    trained = {k.removeprefix("value_head."): v for k, v in r0.items() if k.startswith("value_head")}
    assert head.keys() == trained.keys() and all(torch.equal(head[k], trained[k]) for k in head)
    assert not all(torch.equal(v, torch.zeros_like(v)) for v in head.values())  # it trained (starts at 0)


@pytest.mark.cpu_only(reason="FSDP2 over gloo on CPU processes, compared with a 1-process CPU run")
def test_token_budget_under_fsdp2_matches_one_process(tmp_path, one_thread, tiny_recipe, tiny_config):
    """batch.micro_batch_tokens with sharded weights: the processes' rows cut into different numbers of
    micro-batches (here 2 and 4: prompts of 44-46 tokens, completions of 6, a budget of 57) are evened out
    before any forward, since FSDP2 all-gathers at every one (without that the two processes deadlock and
    the launch's 600 s timeout fails the test); 2 processes then train like 1."""
    sections = {**SECTIONS, "batch": {**SECTIONS["batch"], "micro_batch_size": 4, "micro_batch_tokens": 57}}
    _fsdp2_matches_one_process(tmp_path, sections, tiny_recipe, tiny_config)
