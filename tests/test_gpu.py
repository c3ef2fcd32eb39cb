"""On a CUDA GPU: bf16 training, FSDP2 on one GPU, the vLLM backend with a real engine, and N processes.

Every test here but the launch-decision ones at the end is marked ``gpu``: skipped without CUDA (with the
reason), a failure instead with ``RLHF_PG_REQUIRE_GPU=1``. scripts/gpu_check.sh runs them with both that and
``RLHF_PG_REQUIRE_VLLM=1``, so that on the GPU machine nothing passes by being skipped: a missing vllm, bf16
support or SmolLM2 package is a failure there, not a skip.

* bf16: the tiny run in one process on cuda, fp32 weights under Accelerate's bf16 autocast: finite loss,
  every weight changed, the run header names the device and the precision.
* FSDP2 (recipes/accelerate/fsdp2_full_shard.yaml with ``--num_processes 1``: accelerate starts one process
  under torchrun, so ``distributed_type`` is FSDP on one rank): train, checkpoint (``accelerator.save_state``),
  resume; the resumed run matches an uninterrupted one.
* vLLM (real engine, in-process "colocate" mode, SmolLM2-135M: the tiny model's head size 16 is not one
  vLLM's attention kernels are sure to take): a GRPO step; weight sync (after ``sync_weights`` the engine's
  log-probs of its own samples equal the policy's within bf16 noise, and a policy change the engine was not
  told about shows as a large gap); the engine's peak GPU memory, bounded by its ``gpu_memory_utilization``.
  It runs in a subprocess of its own: vLLM sets up process-wide state (torch.distributed, environment) that
  must not leak into the rest of the suite, and the memory figures are then the engine's alone.
* ``--num-processes 2``: one clear line on a one-GPU machine, DDP over NCCL with two or more.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_subprocess_env
from safetensors.torch import load_file

from rlhf_pg import cli
from rlhf_pg.models import SMOLLM2_ALIAS

REPO = Path(__file__).resolve().parents[1]
FSDP2_CONFIG = REPO / "recipes" / "accelerate" / "fsdp2_full_shard.yaml"
VOLATILE = ("time/", "tokens_per_s", "perf/")  # timings and rates derived from them


def _require_bf16() -> None:
    """bf16 is what the recipes train in on a GPU: a GPU without it fails the check (not a skip)."""
    if not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(0)
        cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
        pytest.fail(f"{name} (compute capability {cc}) has no bf16: the GPU check needs an Ampere or newer GPU")


def _require_vllm() -> None:
    """vllm installed, or: a skip with the reason, or a failure under RLHF_PG_REQUIRE_VLLM=1 (scripts/gpu_check.sh)."""
    if importlib.util.find_spec("vllm") is not None:
        return
    why = "vllm is not installed: pip install -c constraints.txt -e '.[vllm]'"
    if os.environ.get("RLHF_PG_REQUIRE_VLLM") == "1":
        pytest.fail(why + " (RLHF_PG_REQUIRE_VLLM=1: a missing vllm is a failure)", pytrace=False)
    pytest.skip(why + " (RLHF_PG_REQUIRE_VLLM=1 makes this a failure)")


def _gpu_env(**extra: str) -> dict[str, str]:
    """The environment of a GPU subprocess: this one's (CUDA visible), progress bars off."""
    return dict(os.environ, TQDM_DISABLE="1", **extra)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in recs]


def _steps(out: Path) -> list[dict]:
    return [r for r in _records(out) if "reward" in r]


def _report(capsys, line: str) -> None:
    """A line on the terminal even while pytest captures output (scripts/gpu_check.sh shows them)."""
    with capsys.disabled():
        print(f"\n[gpu report] {line}")


@pytest.fixture
def fresh_accelerate():
    """Accelerate's per-process state started afresh (an earlier test may have built it for the CPU)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------------ bf16
@pytest.mark.gpu
def test_bf16_training_step_on_cuda(tmp_path, tiny_config, capsys, fresh_accelerate):
    from rlhf_pg.trainer import Trainer

    _require_bf16()
    cfg = tiny_config(tmp_path, train={"mixed_precision": "bf16", "max_steps": 2, "eval_at_start": False})
    tr = Trainer(cfg)
    policy = tr.policy
    assert tr.acc.device.type == "cuda" and next(policy.parameters()).device.type == "cuda"
    assert tr.acc.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # fp32 master weights, bf16 autocast
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    capsys.readouterr()
    tr.train()
    printed = capsys.readouterr()
    header = next(line for line in (printed.out + printed.err).splitlines() if line.startswith("algorithm "))
    assert "mixed precision bf16" in header and f"· {tr.acc.device}" in header, header
    steps = _steps(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps), steps
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, f"weights the bf16 steps did not change: {unchanged}"
    _report(
        capsys,
        f"bf16 step on {torch.cuda.get_device_name(0)}: loss {steps[-1]['loss']:.4f}, "
        f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB; header: {header.split(' | ')[-1]}",
    )


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_closed_form_logprobs_on_cuda(temperature):
    """core.gathered_logprobs's closed-form backward on CUDA: tests/test_core.py's check, on the GPU."""
    from test_core import check_gathered_logprobs

    check_gathered_logprobs(temperature, 3, "cuda")


@pytest.mark.gpu
def test_bf16_reference_storage_on_cuda(tmp_path, tiny_config, fresh_accelerate):
    """The reference's linear weights stored in bf16 under CUDA autocast: tests/test_trainer.py's check."""
    from test_trainer import check_reference_storage

    from rlhf_pg.trainer import Trainer

    _require_bf16()
    tr = Trainer(tiny_config(tmp_path, algo={"kl_coef": 0.05}, train={"mixed_precision": "bf16"}))
    assert tr.acc.device.type == "cuda"
    check_reference_storage(tr)


# ------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.gpu
def test_fsdp2_on_one_gpu_trains_checkpoints_and_resumes(tmp_path, tiny_recipe, capsys):
    """accelerate's FSDP2 config with one process: 3 steps straight, and 2 steps + a resume for the third."""
    _require_bf16()
    recipe = tiny_recipe(
        tmp_path,
        # mixed precision from the accelerate config (bf16); deterministic kernels so the two runs can agree
        train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 3, "eval_at_start": False, "deterministic": True},
    )
    env = _gpu_env(CUBLAS_WORKSPACE_CONFIG=":4096:8")

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG)]
        cmd += ["--num_processes", "1", "--main_process_port", str(_free_port())]
        cmd += ["-m", "rlhf_pg", "train", str(recipe), f"output_dir={out}", *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc

    straight = tmp_path / "straight"
    proc = run(straight)
    header = next(line for line in proc.stdout.splitlines() if line.startswith("algorithm "))
    assert "FSDP2 · 1 process" in header and "mixed precision bf16" in header and "cuda" in header, header

    cut = tmp_path / "cut"
    run(cut, "train.max_steps=2")
    from rlhf_pg.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(cut)
    assert ckpt is not None and ckpt.name == "step_000002", ckpt
    after_two = load_file(cut / "model" / "model.safetensors")
    run(cut, "--resume")

    assert [s["step"] for s in _steps(cut)] == [1, 2, 3]  # each step once: the resume did step 3 only
    assert [s["step"] for s in _steps(straight)] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) for s in _steps(cut) + _steps(straight))
    resumed, ref = load_file(cut / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert resumed.keys() == ref.keys() == after_two.keys()
    # The resumed third step lands where the uninterrupted one did, closer than one step moves the weights:
    # a resume that restarted from the initial weights would be two steps off. Not bit-identical: GPU kernels
    # (attention backward) add in a varying order, and AdamW turns that noise on near-zero gradients into
    # updates of ~lr, so the tolerance is a fraction of a step, not a float epsilon.
    gap = sum((resumed[k].float() - ref[k].float()).abs().sum().item() for k in ref)
    step3 = sum((ref[k].float() - after_two[k].float()).abs().sum().item() for k in ref)
    assert step3 > 0 and gap < 0.5 * step3, (gap, step3)
    _report(capsys, f"FSDP2 on 1 GPU: resumed vs uninterrupted |dW| {gap:.3g} (step 3 moved {step3:.3g})")


# ------------------------------------------------------------------------------------------- vLLM
VLLM_WORKER = r"""
import json, sys, time
import torch
from rlhf_pg import setup
from rlhf_pg.backends import vllm_logprobs_match_policy
from rlhf_pg.config import load_config
from rlhf_pg.rollout import sample
from rlhf_pg.trainer import Trainer

recipe, run_dir, out = sys.argv[1:4]
res = {}
build_backend = setup.build_backend


def measured(*a, **k):  # the engine's own GPU memory: what building the backend allocated, and its peak
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    backend = build_backend(*a, **k)
    torch.cuda.synchronize()
    res["engine_start_s"] = time.perf_counter() - t0
    res["engine_allocated"] = torch.cuda.memory_allocated() - before
    res["engine_peak"] = torch.cuda.max_memory_allocated() - before
    res["before_engine"] = before
    return backend


setup.build_backend = measured
cfg = load_config(recipe, [f"output_dir={run_dir}"])
tr = Trainer(cfg)
res["backend"] = type(tr.backend).__name__
res["device"] = str(tr.acc.device)
res["gpu"] = torch.cuda.get_device_name(0)
res["total_memory"] = torch.cuda.get_device_properties(0).total_memory
res["logprobs_mode"] = tr.backend.logprobs_mode
res["logprobs_comparable"] = vllm_logprobs_match_policy(tr.backend.logprobs_mode, tr.sampling)

m = tr.step()  # a GRPO step: the engine samples, the trainer recomputes old log-probs and updates
res["step"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
res["peak_after_step"] = torch.cuda.max_memory_allocated()
policy = tr.policy


def gap():
    # the engine samples with its weights; the policy scores the same tokens with its own forward pass
    batch = sample(tr.backend, tr.tokenizer, tr.train_data, list(range(4)), 4, tr.sampling)
    mask = batch.action_mask.bool()
    d = (batch.old_logprobs - tr.logprobs(policy, batch)).abs()[mask].float()
    return {"mean": d.mean().item(), "p99": d.quantile(0.99).item(), "max": d.max().item(), "tokens": int(mask.sum())}


tr.backend.sync_weights(policy)  # the step changed the policy: the engine gets its weights
res["synced"] = gap()
with torch.no_grad():
    policy.model.norm.weight.mul_(2.0)  # doubles every logit: a large change of every log-prob
res["stale"] = gap()  # not synced: the engine still samples (and scores) with the old weights
tr.backend.sync_weights(policy)
res["resynced"] = gap()
res["peak"] = torch.cuda.max_memory_allocated()
with open(out, "w") as f:
    json.dump(res, f)
"""

VLLM_MEMORY = 0.3
"""The engine's ``gpu_memory_utilization`` in the test (the backend's default)."""


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, tiny_recipe):
    """The worker above, once: SmolLM2 (fp32 weights, bf16 autocast) with rollout.backend=vllm."""
    _require_bf16()
    _require_vllm()
    base = tmp_path_factory.mktemp("vllm")
    recipe = tiny_recipe(
        base,
        model={"name": SMOLLM2_ALIAS},
        batch={"prompts_per_step": 4, "group_size": 4, "micro_batch_size": 8},
        # temperature 1, no top-k/top-p: the engine's log-probs are then the policy's (vllm_logprobs_match_policy)
        rollout={
            "max_new_tokens": 16,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "backend": "vllm",
            "backend_options": {
                "gpu_memory_utilization": VLLM_MEMORY,
                "dtype": "bfloat16",
                "max_model_len": 1024,
                "enforce_eager": True,  # no CUDA-graph capture: a faster start
            },
        },
        train={"max_steps": 1, "lr": 1e-5, "mixed_precision": "bf16", "samples_every": 0, "save_model": False},
    )
    out = base / "result.json"
    script = base / "vllm_worker.py"
    script.write_text(VLLM_WORKER)
    proc = subprocess.run(
        [sys.executable, str(script), str(recipe), str(base / "run"), str(out)],
        env=_gpu_env(),
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=base,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


# bf16 noise between two implementations of the same weights: the trainer's fp32 weights under bf16 autocast
# and the engine's bf16 weights and kernels. Mean |Δ log p| over sampled tokens is ~1e-2 for such pairs.
LOGP_MEAN_TOL = 0.05


@pytest.mark.gpu
def test_vllm_grpo_step(vllm_run, capsys):
    r = vllm_run
    assert r["backend"] == "VLLMBackend" and r["device"].startswith("cuda")
    s = r["step"]
    assert math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) and s["completion_len"] > 0, s
    assert s["tokens_per_s"] > 0
    _report(capsys, f"vLLM GRPO step on {r['gpu']}: loss {s['loss']:.4f}, {s['tokens_per_s']:.0f} tokens/s")


@pytest.mark.gpu
def test_vllm_logprobs_equal_the_policy_after_weight_sync(vllm_run, capsys):
    r = vllm_run
    assert r["logprobs_comparable"], f"logprobs_mode={r['logprobs_mode']}: vLLM's log-probs are not the policy's"
    synced, stale, resynced = r["synced"], r["stale"], r["resynced"]
    assert synced["tokens"] > 0 and resynced["tokens"] > 0
    assert synced["mean"] < LOGP_MEAN_TOL, synced
    assert resynced["mean"] < LOGP_MEAN_TOL, resynced
    # the comparison can fail: an engine that missed a weight change is far off
    assert stale["mean"] > max(0.1, 4 * resynced["mean"]), (stale, resynced)
    _report(
        capsys,
        "vLLM vs policy |Δ log p| mean/p99/max: synced {:.4f}/{:.3f}/{:.3f}, stale {:.3f}, resynced {:.4f}".format(
            synced["mean"], synced["p99"], synced["max"], stale["mean"], resynced["mean"]
        ),
    )


@pytest.mark.gpu
def test_vllm_engine_memory_within_its_budget(vllm_run, capsys):
    r = vllm_run
    budget = VLLM_MEMORY * r["total_memory"]
    mib = 2**20
    alloc, peak, total, whole = (r[k] / mib for k in ("engine_allocated", "engine_peak", "total_memory", "peak"))
    _report(
        capsys,
        f"vLLM engine GPU memory: allocated {alloc:.0f} MiB, peak {peak:.0f} MiB (budget {VLLM_MEMORY} x "
        f"{total:.0f} MiB = {budget / mib:.0f} MiB; engine start {r['engine_start_s']:.0f} s); "
        f"peak of the process with the trainer {whole:.0f} MiB",
    )
    assert 0 < r["engine_allocated"] <= r["engine_peak"]
    assert r["engine_peak"] <= 1.02 * budget, (r["engine_peak"], budget)


# -------------------------------------------------------------------------------- N processes
@pytest.mark.gpu
def test_two_processes_on_this_gpu_machine(tmp_path, tiny_recipe):
    """One GPU: ``--num-processes 2`` is one line and exit 2, nothing launched; two or more: DDP over NCCL."""
    recipe = tiny_recipe(tmp_path, train={"max_steps": 1, "eval_at_start": False, "save_model": False})
    cmd = [sys.executable, "-m", "rlhf_pg", "train", str(recipe), f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [*cmd, "--num-processes", "2"], env=_gpu_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    gpus = torch.cuda.device_count()
    if gpus < 2:
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == (
            f"rlhf-pg: error: --num-processes 2 needs 2 GPUs, found {gpus}: use --num-processes {gpus}, "
            "or CUDA_VISIBLE_DEVICES= for CPU processes"
        )
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "DDP · 2 processes (nccl)" in proc.stdout and "cuda" in proc.stdout


# ------------------------------------------------- the launch decision (no GPU needed: runs everywhere)
@pytest.mark.parametrize("n, gpus, mode", [(2, 0, "cpu"), (8, 0, "cpu"), (2, 2, "gpu"), (2, 8, "gpu"), (1, 1, "gpu")])
def test_launch_devices(n, gpus, mode):
    assert cli.launch_devices(n, gpus) == mode


def test_fewer_gpus_than_processes_is_one_line_before_any_process(tmp_path, tiny_recipe, monkeypatch, capsys):
    recipe = tiny_recipe(tmp_path)
    monkeypatch.setattr(cli, "visible_gpus", lambda: 1)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("processes were launched"))
    assert cli.main(["train", str(recipe), f"output_dir={tmp_path / 'run'}", "--num-processes", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [
        "rlhf-pg: error: --num-processes 2 needs 2 GPUs, found 1: use --num-processes 1, "
        "or CUDA_VISIBLE_DEVICES= for CPU processes"
    ]


@pytest.mark.parametrize("gpus", [0, 2])
def test_cpu_and_gpu_processes_are_launched_alike(gpus, tmp_path, tiny_recipe, monkeypatch):
    """No CUDA or enough GPUs: the same accelerate launch (--multi_gpu: torchrun starts the processes; each
    one's Accelerator then takes cuda:LOCAL_RANK, or the CPU and gloo without CUDA)."""
    recipe = tiny_recipe(tmp_path)
    monkeypatch.setattr(cli, "visible_gpus", lambda: gpus)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    assert cli.main(["train", str(recipe), f"output_dir={tmp_path / 'run'}", "--num-processes", "2"]) == 0
    ((cmd, env),) = calls
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert cmd[-5:] == ["-m", "rlhf_pg", "train", str(recipe), f"output_dir={tmp_path / 'run'}"]
    assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")  # the user's choice, kept


def test_hidden_cuda_means_cpu_processes():
    """``CUDA_VISIBLE_DEVICES=`` (what the CPU suite's subprocesses get) leaves no GPU to count."""
    code = "from rlhf_pg.cli import visible_gpus; print(visible_gpus())"
    out = subprocess.run([sys.executable, "-c", code], env=cpu_subprocess_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0"
