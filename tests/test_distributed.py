"""Accelerate configs under recipes/accelerate and rlhf_pg.distributed.

* Every config is read by accelerate's own loader and launcher (``accelerate launch`` argument
  validation → the environment it hands the training processes → the FSDP/DeepSpeed plugin the
  ``Accelerator`` builds from that environment), so a mistyped key or value fails here, not on a
  GPU cluster.
* ``gathered_for_generation``: a no-op for a replicated module; ZeRO-3 and FSDP1 dispatch checked
  with fakes (no deepspeed, no GPU here); FSDP2 checked for real in a 2-process gloo run on CPU: one
  all-gather on entry, none while decoding token by token, the same tokens as the unsharded model,
  and the module back to its sharded, reshard-after-forward state afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import cpu_subprocess_env

from rlhf_pg import distributed
from rlhf_pg.distributed import describe_distributed, gathered_for_generation, sharding_kind

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "recipes" / "accelerate"

# file -> what accelerate must read from it
EXPECTED = {
    "single_gpu.yaml": dict(distributed_type="NO", num_processes=1, num_machines=1),
    "multi_gpu_ddp.yaml": dict(distributed_type="MULTI_GPU", num_machines=1),
    "fsdp2_full_shard.yaml": dict(distributed_type="FSDP", num_machines=1, fsdp_version=2),
    "deepspeed_zero2.yaml": dict(distributed_type="DEEPSPEED", num_machines=1, zero_stage=2),
    "deepspeed_zero3.yaml": dict(distributed_type="DEEPSPEED", num_machines=1, zero_stage=3),
    "multi_node_ddp.yaml": dict(distributed_type="MULTI_GPU", num_machines=2),
}


def _launch_args(path: Path):
    """What ``accelerate launch --config_file PATH -m rlhf_pg train RECIPE`` resolves to, up to the
    environment the training processes get (accelerate's own code; nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "rlhf_pg", "train", "recipes/grpo_arithmetic.yaml"]
    )
    args, defaults, _ = _validate_launch_command(args)
    with mock.patch("accelerate.utils.launch.is_port_in_use", return_value=False):
        if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before the launcher
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            _, env = prepare_deepspeed_cmd_env(args)
        elif args.multi_gpu or args.use_fsdp:
            env = prepare_multi_gpu_env(args)
        else:
            _, env = prepare_simple_launcher_cmd_env(args)
    return args, defaults, env


# ------------------------------------------------------------------------------------- configs
def test_every_config_has_expectations():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    exp = EXPECTED[name]
    cfg = load_config_from_file(str(CONFIG_DIR / name))  # raises on unknown top-level keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == exp["distributed_type"]
    assert cfg.mixed_precision == "bf16"
    assert cfg.use_cpu is False
    assert cfg.num_machines == exp["num_machines"]
    if "num_processes" in exp:
        assert cfg.num_processes == exp["num_processes"]
    else:
        assert cfg.num_processes >= 2 * cfg.num_machines
    if "fsdp_version" in exp:
        assert cfg.fsdp_config["fsdp_version"] == exp["fsdp_version"]
    else:
        assert cfg.fsdp_config == {}
    if "zero_stage" in exp:
        assert cfg.deepspeed_config["zero_stage"] == exp["zero_stage"]
    else:
        assert cfg.deepspeed_config == {}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_header_names_its_launch_command(name):
    text = (CONFIG_DIR / name).read_text()
    assert text.startswith("# Accelerate config: ")
    header = text.split("\ncompute_environment:")[0]
    assert f"accelerate launch --config_file recipes/accelerate/{name} " in header
    assert "-m rlhf_pg train recipes/" in header


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_engine_keys_are_known_to_the_launcher(name):
    # accelerate copies fsdp_config/deepspeed_config entries onto its argparse namespace without
    # checking them, so a misspelt key would be ignored silently: compare with the parser's options
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    dests = {a.dest for a in launch_command_parser()._actions}
    cfg = load_config_from_file(str(CONFIG_DIR / name))
    for key in cfg.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in dests, key
    for key in cfg.deepspeed_config:
        assert key in dests, key


@pytest.mark.parametrize("name", ["single_gpu.yaml", "multi_gpu_ddp.yaml", "multi_node_ddp.yaml"])
def test_ddp_configs_through_the_launcher(name):
    args, defaults, env = _launch_args(CONFIG_DIR / name)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert not args.use_fsdp and not args.use_deepspeed
    assert args.multi_gpu == (name != "single_gpu.yaml")
    assert "ACCELERATE_USE_CPU" not in env or env["ACCELERATE_USE_CPU"] == "False"
    if name == "multi_node_ddp.yaml":
        assert (args.nnodes, args.nproc_per_node) == ("2", "8")  # num_processes is the total
        assert args.node_rank == 0
        endpoint = (
            f"{args.master_addr}:{args.master_port}" if hasattr(args, "master_addr") else args.rdzv_endpoint
        )  # which of the two depends on --same_network
        assert endpoint == f"{defaults.main_process_ip}:29500"


def test_fsdp2_config_through_the_launcher_to_the_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    args, _, env = _launch_args(CONFIG_DIR / "fsdp2_full_shard.yaml")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()  # what Accelerator() builds in each process
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2 full shard
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.activation_checkpointing is False
    assert plugin.cpu_ram_efficient_loading is False


def test_fsdp2_wrap_policy_picks_the_decoder_layers_of_our_models():
    # the policy accelerate applies before fully_shard: one unit per LlamaDecoderLayer, also when the
    # LM sits inside the value-head wrapper (which has no _no_split_modules of its own)
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_pg.models import PolicyWithValue

    _, _, env = _launch_args(CONFIG_DIR / "fsdp2_full_shard.yaml")
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    for model in (lm, PolicyWithValue(lm)):
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        picked = [m for m in model.modules() if policy(m)]
        assert picked == list(lm.model.layers)


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_through_the_launcher_to_the_plugin(name, stage):
    from accelerate.utils import DeepSpeedPlugin

    args, _, env = _launch_args(CONFIG_DIR / name)
    assert args.use_deepspeed and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # needs no deepspeed install to build its config
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1
    assert plugin.zero3_init_flag is (stage == 3)
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)


# ------------------------------------------------------------------------------------- no-op
class _Acc:
    """The part of an Accelerator that gathered_for_generation uses."""

    @staticmethod
    def unwrap_model(model):
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(model)


def test_plain_module_is_a_no_op():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    params = [(p, p.detach().clone()) for p in model.parameters()]
    x = torch.randn(3, 4)
    y = model(x)
    assert sharding_kind(model) == "none"
    with gathered_for_generation(_Acc, model) as gen:
        assert gen is model
        assert torch.equal(gen(x), y)
        with gathered_for_generation(_Acc, model) as inner:  # nests
            assert inner is model
    assert [p for p, _ in params] == list(model.parameters())
    assert all(torch.equal(p, v) for p, v in params)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert "forward" not in model.__dict__


# ------------------------------------------------------------------------------------- ZeRO-3 (fakes)
class _FakeGathered:
    """deepspeed.zero.GatheredParameters: records what it gathers; params are 'available' inside."""

    log: list = []

    def __init__(self, params, modifier_rank=None):
        self.params = params
        self.modifier_rank = modifier_rank

    def __enter__(self):
        _FakeGathered.log.append(("enter", self.params, self.modifier_rank))
        for p in self.params:
            p.ds_status = "AVAILABLE"

    def __exit__(self, *exc):
        _FakeGathered.log.append(("exit",))
        for p in self.params:
            p.ds_status = "NOT_AVAILABLE"
        return False


class _FakeOffload:
    """DeepSpeedZeRoOffload: per-module pre-forward hooks that fetch (all-gather) each layer."""

    def __init__(self, module, new_api=True):
        self.module = module
        self.forward_hooks, self.backward_hooks = [], []
        self.fetches = 0
        self.registrations = 0
        if new_api:
            self._register_deepspeed_module = self._register
        else:
            self._register_hooks_recursively = self._register
        self._register(module)

    def _register(self, module):
        self.registrations += 1
        for m in module.modules():
            self.forward_hooks.append(m.register_forward_pre_hook(self._fetch))

    def _fetch(self, module, args):
        self.fetches += 1


class _FakeEngine(torch.nn.Module):
    def __init__(self, module, new_api=True):
        super().__init__()
        self.module = module
        self.optimizer = SimpleNamespace(parameter_offload=_FakeOffload(module, new_api))

    def forward(self, x):
        return self.module(x)


class _EngineAcc:
    @staticmethod
    def unwrap_model(model):
        return model.module if isinstance(model, _FakeEngine) else model


def _zero3_partitioned(module):
    for i, p in enumerate(module.parameters()):
        p.ds_id, p.ds_status, p.ds_active_sub_modules = i, "NOT_AVAILABLE", {1, 2}
    return module


@pytest.fixture
def fake_deepspeed(monkeypatch):
    ds = types.ModuleType("deepspeed")
    ds.zero = SimpleNamespace(GatheredParameters=_FakeGathered)
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    _FakeGathered.log = []
    return _FakeGathered.log


@pytest.mark.parametrize("new_api", [True, False], ids=["deepspeed>=0.16.4", "older"])
def test_zero3_gathers_once_and_suspends_fetch_hooks(fake_deepspeed, new_api):
    inner = _zero3_partitioned(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    engine = _FakeEngine(inner, new_api)
    offload = engine.optimizer.parameter_offload
    x = torch.randn(2, 4)
    engine(x)
    assert offload.fetches == 3  # root + 2 layers, every forward
    assert sharding_kind(engine) == "zero3"

    with gathered_for_generation(_EngineAcc, engine) as gen:
        assert gen is inner
        ((kind, params, modifier_rank),) = fake_deepspeed
        assert kind == "enter" and modifier_rank is None
        assert isinstance(params, list) and [id(p) for p in params] == [id(p) for p in engine.parameters()]
        assert all(p.ds_status == "AVAILABLE" for p in inner.parameters())
        assert all(p.ds_active_sub_modules == set() for p in inner.parameters())
        for _ in range(5):  # "tokens": no per-layer fetches while the weights are gathered
            gen(x)
        assert offload.fetches == 3
    assert fake_deepspeed[-1] == ("exit",)
    assert all(p.ds_status == "NOT_AVAILABLE" for p in inner.parameters())
    assert offload.registrations == 2  # hooks registered again, through the API of that version
    engine(x)
    assert offload.fetches == 6


def test_zero3_restores_hooks_when_generation_fails(fake_deepspeed):
    engine = _FakeEngine(_zero3_partitioned(torch.nn.Linear(4, 2)))
    offload = engine.optimizer.parameter_offload
    with pytest.raises(KeyError):
        with gathered_for_generation(_EngineAcc, engine):
            raise KeyError("boom")
    assert fake_deepspeed[-1] == ("exit",) and offload.registrations == 2
    engine(torch.randn(1, 4))
    assert offload.fetches == 1  # the fetch hook is back (one module, one forward)


def test_zero3_bare_partitioned_module_is_gathered(fake_deepspeed):
    # e.g. the reference model, created under deepspeed.zero.Init but never wrapped in an engine
    ref = _zero3_partitioned(torch.nn.Linear(4, 2))
    with gathered_for_generation(_EngineAcc, ref) as gen:
        assert gen is ref
        assert all(p.ds_status == "AVAILABLE" for p in ref.parameters())
    assert [e[0] for e in fake_deepspeed] == ["enter", "exit"]


def test_zero3_without_deepspeed_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    ref = _zero3_partitioned(torch.nn.Linear(4, 2))
    with pytest.raises(RuntimeError, match="deepspeed"):
        with gathered_for_generation(_EngineAcc, ref):
            pass


# ------------------------------------------------------------------------------------- FSDP1 (fakes)
class _FakeFSDP1(torch.nn.Module):
    """FullyShardedDataParallel: a forward through the wrapper inside summon_full_params is illegal."""

    summons: list = []
    summoned = False

    def __init__(self, module):
        super().__init__()
        self._fsdp_wrapped_module = module

    @property
    def module(self):
        return self._fsdp_wrapped_module

    def forward(self, *args):
        if _FakeFSDP1.summoned:
            raise AssertionError("FSDP pre/post-forward ran inside summon_full_params")
        return self._fsdp_wrapped_module(*args)

    @staticmethod
    @contextmanager
    def summon_full_params(
        module, recurse=True, writeback=True, rank0_only=False, offload_to_cpu=False, with_grads=False
    ):
        _FakeFSDP1.summons.append((module, recurse, writeback, rank0_only))
        _FakeFSDP1.summoned = True
        try:
            yield
        finally:
            _FakeFSDP1.summoned = False


def test_fsdp1_summons_full_params_once_and_bypasses_the_wrappers(monkeypatch):
    monkeypatch.setattr(distributed, "_fsdp_classes", lambda: (None, _FakeFSDP1))
    _FakeFSDP1.summons = []
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))  # the wrapped module's own hooks still run
    root = _FakeFSDP1(torch.nn.Sequential(_FakeFSDP1(layer), torch.nn.Linear(4, 2)))
    acc = SimpleNamespace(unwrap_model=lambda m: m.module)
    x = torch.randn(2, 4)
    y = root(x)
    assert sharding_kind(root) == "fsdp1"

    with gathered_for_generation(acc, root) as gen:
        assert gen is root.module
        assert _FakeFSDP1.summons == [(root, True, False, False)]  # recurse, writeback=False, every rank
        for _ in range(3):
            assert torch.equal(gen(x), y)
    assert len(calls) == 4
    assert all("forward" not in w.__dict__ for w in root.modules() if isinstance(w, _FakeFSDP1))
    assert torch.equal(root(x), y)  # the wrappers' own forward again


# ------------------------------------------------------------------------------------- FSDP2 (real)
_FSDP2_WORKER = r"""
import copy, json, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from accelerate.utils import extract_model_from_parallel
sys.path.insert(0, REPO)
from rlhf_pg.distributed import gathered_for_generation, sharding_kind

class Acc:  # the one Accelerator method used: unwrap_model (= extract_model_from_parallel)
    unwrap_model = staticmethod(extract_model_from_parallel)

GATHERS = [0]
def counting(fn):
    def wrapper(*a, **k):
        GATHERS[0] += 1
        return fn(*a, **k)
    return wrapper
for name in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather"):
    if hasattr(dist, name):
        setattr(dist, name, counting(getattr(dist, name)))

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
    def forward(self, h):
        return h + self.fc2(torch.tanh(self.fc1(h)))

class TinyLM(nn.Module):  # embedding, decoder blocks, norm, head: the layout of a causal LM
    def __init__(self, vocab=64, d=32, n=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))

class WithValue(nn.Module):  # like rlhf_pg.models.PolicyWithValue; the rollout calls .policy directly
    def __init__(self, lm):
        super().__init__()
        self.policy, self.value_head = lm, nn.Linear(32, 1)
    def forward(self, ids):
        return self.policy(ids)

@torch.no_grad()
def greedy(lm, ids, n):  # one forward per generated token
    for _ in range(n):
        ids = torch.cat([ids, lm(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids

def reshard_state(model):
    return {n: (m._get_fsdp_state()._auto_reshard_after_forward,
                [g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups])
            for n, m in model.named_modules() if isinstance(m, FSDPModule)}

def sharded():  # as accelerate's FSDP2 prepare: one unit per decoder block, then the root
    torch.manual_seed(0)
    model = WithValue(TinyLM())
    ref = copy.deepcopy(model)
    for layer in model.policy.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, ref

dist.init_process_group("gloo")
rank = dist.get_rank()
ids = torch.tensor([[1, 5, 7, 9], [3, 2, 8, 4]]) + rank  # each rank its own prompts
N = 8
res = {"rank": rank}

model, ref = sharded()
expected = greedy(ref.policy, ids, N)
res["kind"] = sharding_kind(model)
res["sharded_before"] = all(isinstance(p, DTensor) for p in model.parameters())
g0 = GATHERS[0]
with gathered_for_generation(Acc, model) as gen:  # the first forward ever happens inside
    res["gathers_on_entry"] = GATHERS[0] - g0
    res["yields_model"] = gen is model
    res["full_inside"] = not any(isinstance(p, DTensor) for p in gen.parameters())
    g1 = GATHERS[0]
    out = greedy(gen.policy, ids, N)  # bypasses the root's hooks: root-owned weights must be gathered
    res["gathers_while_decoding"] = GATHERS[0] - g1
res["tokens_match"] = torch.equal(out, expected)
res["sharded_after"] = all(isinstance(p, DTensor) for p in model.parameters())

twin, _ = sharded()  # the same model generating without the context: FSDP's own behaviour
g0 = GATHERS[0]
res["tokens_match_plain"] = torch.equal(greedy(twin, ids, N), expected)
res["gathers_plain"] = GATHERS[0] - g0
res["reshard_state_restored"] = reshard_state(model) == reshard_state(twin)

loss = model(ids).logsumexp(-1).mean()  # training after a rollout: blocks reshard after forward again
res["layers_resharded"] = all(not g.is_unsharded for layer in model.policy.layers
                              for g in layer._get_fsdp_state()._fsdp_param_groups)
loss.backward()
res["grads_sharded"] = all(isinstance(p.grad, DTensor) for p in model.policy.parameters())

ddp = DDP(copy.deepcopy(ref))
g0 = GATHERS[0]
with gathered_for_generation(Acc, ddp) as gen:
    res["ddp_kind"] = sharding_kind(ddp)
    res["ddp_yields_module"] = gen is ddp.module
    res["ddp_tokens_match"] = torch.equal(greedy(gen.policy, ids, N), expected)
res["ddp_gathers"] = GATHERS[0] - g0
with open(f"{OUT}/result_{rank}.json", "w") as f:
    json.dump(res, f)
# Teardown: both ranks done with every collective before the group goes, then no interpreter teardown (a
# clean-clone CI run once saw rank 1 abort in exit-time cleanup, "terminate called without an active
# exception", after both results were written).
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(0)
"""


def test_fsdp2_unshards_once_per_rollout_on_two_cpu_processes(tmp_path):
    script = tmp_path / "fsdp2_worker.py"
    script.write_text(f"REPO = {str(REPO)!r}\nOUT = {str(tmp_path)!r}\n" + _FSDP2_WORKER)
    env = cpu_subprocess_env(OMP_NUM_THREADS="1")  # CPU tensors over gloo: fully_shard would pick cuda if visible
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in (0, 1)]
    n_tokens = 8
    for r in results:
        assert r["kind"] == "fsdp2" and r["sharded_before"] and r["yields_model"]
        assert r["gathers_on_entry"] >= 1 and r["full_inside"]
        assert r["gathers_while_decoding"] == 0
        assert r["gathers_plain"] >= n_tokens  # without the context: every token gathers again
        assert r["tokens_match"] and r["tokens_match_plain"]
        assert r["sharded_after"] and r["reshard_state_restored"]
        assert r["layers_resharded"] and r["grads_sharded"]
        assert r["ddp_kind"] == "none" and r["ddp_yields_module"] and r["ddp_tokens_match"]
        assert r["ddp_gathers"] == 0


# ------------------------------------------------------------------------------------- header line
def _fake_acc(dt, n=1, mp="no", device="cpu", **state):
    return SimpleNamespace(
        distributed_type=dt,
        num_processes=n,
        mixed_precision=mp,
        device=torch.device(device),
        state=SimpleNamespace(**state),
    )


def test_describe_distributed(monkeypatch):
    from accelerate.utils import DistributedType as D

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert describe_distributed(_fake_acc(D.NO, backend=None)) == "single process · mixed precision no · cpu"
    assert (
        describe_distributed(_fake_acc(D.MULTI_CPU, 2, backend="gloo"))
        == "DDP on CPU · 2 processes (gloo) · mixed precision no · cpu"
    )
    assert (
        describe_distributed(
            _fake_acc(D.DEEPSPEED, 8, "bf16", "cuda:0", backend="nccl", deepspeed_plugin=SimpleNamespace(zero_stage=3))
        )
        == "DeepSpeed ZeRO-3 · 8 processes (nccl) · mixed precision bf16 · cuda:0"
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert (
        describe_distributed(
            _fake_acc(D.FSDP, 16, "bf16", "cuda:0", backend="nccl", fsdp_plugin=SimpleNamespace(fsdp_version=2))
        )
        == "FSDP2 · 16 processes on 2 machines (nccl) · mixed precision bf16 · cuda:0"
    )
    assert (
        describe_distributed(_fake_acc(D.MULTI_GPU, 8, "bf16", "cuda:0", backend="nccl"))
        == "DDP · 8 processes (nccl) · mixed precision bf16 · cuda:0"
    )  # one machine: no count


def test_a_deepspeed_run_checkpoints_through_the_engine():
    """ZeRO-1/2 keep the weights whole but shard the optimizer state: a main-process torch.save of the
    optimizer would hold rank 0's part only, so any DeepSpeed run checkpoints with save_state."""
    from accelerate.utils import DistributedType

    from rlhf_pg.distributed import engine_checkpoint

    lin = torch.nn.Linear(2, 2)
    assert engine_checkpoint(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED), lin)
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        assert not engine_checkpoint(SimpleNamespace(distributed_type=kind), lin)


def test_under_zero3_every_rank_loads_the_model_together(monkeypatch):
    """ZeRO-3 partitions weights inside from_pretrained, a collective: a main_process_first barrier around
    the load would deadlock (rank 1 at the barrier, rank 0 in the broadcast). Only the conversion/caching
    runs main process first there; elsewhere the whole load does."""
    import contextlib

    from rlhf_pg import setup

    events = []

    @contextlib.contextmanager
    def first():
        events.append("enter")
        yield
        events.append("exit")

    monkeypatch.setattr(setup, "resolve_model", lambda name: events.append(f"resolve {name}"))
    for stage, expected in ((3, ["enter", "resolve m", "exit", "load"]), (2, ["enter", "load", "exit"])):
        events.clear()
        acc = SimpleNamespace(
            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)), main_process_first=first
        )
        with setup.model_loading(acc, "m"):
            events.append("load")
        assert events == expected, (stage, events)


def test_a_separate_critic_is_refused_under_engines_that_prepare_one_model(tiny_config, tmp_path):
    """accelerate's DeepSpeed and FSDP2 prepare take one model: a separate critic would fail deep inside
    prepare (an AssertionError) after the weights loaded; it is one line before anything loads."""
    from accelerate.utils import DistributedType

    from rlhf_pg import setup
    from rlhf_pg.errors import UserError

    cfg = tiny_config(tmp_path, algo={"name": "ppo"}, model={"critic": "separate"})
    for kind, plugin, name in (
        (DistributedType.DEEPSPEED, None, "DeepSpeed"),
        (DistributedType.FSDP, SimpleNamespace(fsdp_version=2), "FSDP2"),
    ):
        acc = SimpleNamespace(
            distributed_type=kind, state=SimpleNamespace(fsdp_plugin=plugin), num_processes=1, process_index=0
        )
        with pytest.raises(UserError, match=f"model.critic=separate does not run under {name}"):
            setup.build(cfg, accelerator=acc)
