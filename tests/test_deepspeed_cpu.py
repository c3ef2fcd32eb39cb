"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo): an ``accelerate launch --config_file
recipes/accelerate/deepspeed_zero{2,3}.yaml`` run of the real trainer keeps DeepSpeed
(rlhf_pg.distributed.deepspeed_accelerator_kwargs: ``cpu=False`` with a gloo process group, DeepSpeed's
CPU accelerator), trains like 1 process, checkpoints through accelerate's DeepSpeed save_state, resumes
bit-identically after a kill, and saves a plain transformers model. Skipped without the ``deepspeed``
extra (``pip install -e '.[deepspeed]'``)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from rlhf_pg.distributed import deepspeed_accelerator_kwargs
from rlhf_pg.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAVE_DEEPSPEED, reason="deepspeed is not installed (the `deepspeed` extra: pip install -e '.[deepspeed]')"
)

pytestmark = pytest.mark.cpu_only(reason="DeepSpeed over gloo on CPU processes, compared with a 1-process CPU run")

WORKER = """
import sys, torch
from rlhf_pg.config import load_config
from rlhf_pg.distributed import gathered_for_generation, sharding_kind
from rlhf_pg.trainer import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(cfg)
tr.train()
engine = tr.model
info = dict(dt=str(tr.acc.distributed_type), stage=engine.zero_optimization_stage(), kind=sharding_kind(engine),
            optimizer=type(engine.optimizer).__name__, ref_kind=sharding_kind(tr.ref))
with torch.no_grad(), gathered_for_generation(tr.acc, engine) as m:  # ZeRO-3: every rank gathers the full weights
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
torch.save({"params": params, **info}, f"{cfg.output_dir}/rank{tr.rank}.pt")
"""

SECTIONS = dict(
    seed=11,
    data={"eval_limit": 4},
    batch={"prompts_per_step": 4, "group_size": 2, "micro_batch_size": 2, "eval_batch_size": 2},
    algo={"name": "grpo", "kl_coef": 0.05},  # a frozen reference: partitioned too under ZeRO-3, gathered for use
    train={
        **{"lr": 1e-3, "max_steps": 2, "save_every": 1, "samples_every": 0, "eval_at_start": False},
        **{"deterministic": True, "max_grad_norm": 1.0},
    },
)

STAGES = {2: ("DeepSpeedZeroOptimizer", "none"), 3: ("DeepSpeedZeroOptimizer_Stage3", "zero3")}
"""ZeRO stage → (the engine's optimizer, how the weights are held after training)."""


# ------------------------------------------------------------------------------------- the switch
def test_not_a_deepspeed_launch_is_unchanged(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_accelerator_kwargs(cpu=True) == {"cpu": True}
    assert deepspeed_accelerator_kwargs(cpu=False) == {"cpu": False}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert deepspeed_accelerator_kwargs(cpu=True) == {"cpu": True}


def test_a_deepspeed_launch_without_deepspeed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # already set: the helper leaves it alone
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.ops", None)
    with pytest.raises(UserError, match=r"needs deepspeed .*pip install -e '\.\[deepspeed\]'") as e:
        deepspeed_accelerator_kwargs(cpu=True)
    assert "\n" not in str(e.value)


@needs_deepspeed
def test_a_deepspeed_launch_on_cpu_keeps_deepspeed(monkeypatch):
    import deepspeed.ops

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # not started by a launcher: as before (accelerate: no DeepSpeed)
    assert deepspeed_accelerator_kwargs(cpu=True) == {"cpu": True}
    assert deepspeed_accelerator_kwargs(cpu=False) == {"cpu": False}  # CUDA: accelerate's own path
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert deepspeed_accelerator_kwargs(cpu=False) == {"cpu": False}
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    monkeypatch.setenv("DS_ACCELERATOR", "unset below")  # restored (removed) after the test
    monkeypatch.delenv("DS_ACCELERATOR")
    kw = deepspeed_accelerator_kwargs(cpu=True)
    assert kw["cpu"] is False and [h.backend for h in kw["kwargs_handlers"]] == ["gloo"]
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False  # no C++ build when comm starts


# ------------------------------------------------------------------------------------- 2 processes
def _launch(stage, worker, recipe, out, extra_env=None, *overrides):
    from conftest import launch_with_config  # DeepSpeed over gloo on CPU processes

    return launch_with_config(f"deepspeed_zero{stage}.yaml", worker, recipe, out, extra_env, *overrides)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, one_thread, tiny_config) -> dict[str, torch.Tensor]:
    """The trained parameters of the same run on 1 process (no DeepSpeed), shared by both stages."""
    from rlhf_pg.trainer import Trainer

    path = tmp_path_factory.mktemp("one_process")
    tr = Trainer(tiny_config(path, **SECTIONS))
    tr.train()
    return {n: p.detach().clone() for n, p in tr.acc.unwrap_model(tr.model).named_parameters()}


@needs_deepspeed
# ZeRO-3 (parameters sharded too) in the fast suite; ZeRO-2 with --runslow (~1.5 min of CI each)
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3], ids=["zero2", "zero3"])
def test_deepspeed_on_two_cpu_processes_trains_checkpoints_resumes_and_saves(
    stage, tmp_path, one_thread, tiny_recipe, one_process
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe(tmp_path, **SECTIONS)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)

    straight = tmp_path / "straight"
    proc = _launch(stage, worker, recipe, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"DeepSpeed ZeRO-{stage} · 2 processes (gloo)" in out  # the run header names the engine
    assert "deepspeed_shm_comm" not in out  # no C++ op was built (or needed) when DeepSpeed's comm started
    r0, r1 = (torch.load(straight / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    optimizer, kind = STAGES[stage]
    assert (r0["dt"], r0["stage"], r0["optimizer"]) == ("DistributedType.DEEPSPEED", stage, optimizer)
    assert r0["kind"] == r0["ref_kind"] == kind  # ZeRO-3: policy and frozen reference stay partitioned
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    engine = straight / "checkpoints" / "step_000002" / "engine"
    assert len(list(engine.glob("pytorch_model/*zero_pp_rank_*_optim_states.pt"))) == 2  # each rank's part

    assert one_process.keys() == r0["params"].keys()
    for k, v in one_process.items():  # the same run on 1 process
        torch.testing.assert_close(r0["params"][k], v, atol=5e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")

    # killed in step 2 (after checkpoint 1), resumed: bit-identical to the uninterrupted run
    resumed = tmp_path / "resumed"
    proc = _launch(stage, worker, recipe, resumed, {"RLHF_PG_FAULT": "step-after-update@2"})
    assert proc.returncode != 0
    assert [c.name for c in sorted((resumed / "checkpoints").glob("step_*"))] == ["step_000001"]
    proc = _launch(stage, worker, recipe, resumed, None, "train.resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rr = torch.load(resumed / "rank0.pt", weights_only=True)
    assert all(torch.equal(rr["params"][k], r0["params"][k]) for k in r0["params"])

    # the final save: one ordinary state dict, the trained weights, loadable by plain transformers
    saved = load_file(straight / "model" / "model.safetensors")
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    for k, v in saved.items():
        if k in r0["params"]:
            assert torch.equal(v, r0["params"][k]), k
    assert type(AutoModelForCausalLM.from_pretrained(straight / "model")).__name__ == "LlamaForCausalLM"
