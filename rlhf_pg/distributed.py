"""Helpers for running under Accelerate's engines: plain DDP, FSDP (1 and 2) and DeepSpeed ZeRO.

``gathered_for_generation`` is the one thing RL needs beyond what ``accelerate`` does by itself.
Under parameter sharding (ZeRO-3, FSDP full shard) every forward call gathers each layer's weights
from all ranks and frees them again. Training does one forward per micro-batch, so that is cheap;
sampling does one forward per generated *token*, and would repeat the all-gather of the entire model
``max_new_tokens`` times per rollout. The context manager gathers the weights once, keeps them for
the whole rollout, and re-shards afterwards.

``describe_distributed`` gives a one-line run-header description of the setup.

``keep_fsdp_on_cpu`` lets an FSDP2 launch run as FSDP2 on a CPU machine (gloo) instead of silently as DDP;
``deepspeed_accelerator_kwargs`` does the same for a DeepSpeed ZeRO launch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

__all__ = [
    "gathered_for_generation",
    "sharding_kind",
    "engine_checkpoint",
    "describe_distributed",
    "keep_fsdp_on_cpu",
    "deepspeed_accelerator_kwargs",
]


# ------------------------------------------------------------------------------------- detection
def _fsdp_classes() -> tuple[type | None, type | None]:
    """``(FSDPModule, FullyShardedDataParallel)``, each None where this torch lacks it (tests replace this)."""
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6 (FSDP2 public API)
    except ImportError:  # pragma: no cover - older torch
        FSDPModule = None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        FullyShardedDataParallel = None
    return FSDPModule, FullyShardedDataParallel


def _is_zero3_param(p: torch.Tensor) -> bool:
    # deepspeed.zero.Init / ZeRO-3 attach ds_id, ds_status, ds_tensor, ... to every partitioned parameter
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


def sharding_kind(model: torch.nn.Module) -> str:
    """How ``model``'s weights are held: ``"zero3"``, ``"fsdp2"``, ``"fsdp1"`` or ``"none"``
    (replicated: single process, DDP, ZeRO-1/2).

    Decided from the module itself — DeepSpeed-partitioned parameters, FSDP modules inside it —
    not from the accelerator's settings, so it is exact for the module at hand: a ZeRO-3 engine and
    a module created under ``deepspeed.zero.Init`` without an engine (a reference model) are
    ``"zero3"``; a module left unprepared under a ZeRO-3/FSDP run is ``"none"``.
    """
    if any(_is_zero3_param(p) for p in model.parameters()):
        return "zero3"
    fsdp2_cls, fsdp1_cls = _fsdp_classes()
    modules = list(model.modules())
    if fsdp2_cls is not None and any(isinstance(m, fsdp2_cls) for m in modules):
        return "fsdp2"
    if fsdp1_cls is not None and any(isinstance(m, fsdp1_cls) for m in modules):
        return "fsdp1"
    return "none"


def engine_checkpoint(accelerator: Any, model: torch.nn.Module) -> bool:
    """Whether checkpoints must go through ``accelerator.save_state`` (every rank writes its part): the
    weights are sharded (FSDP, ZeRO-3), or — any DeepSpeed stage ≥ 1 — the optimizer state is, which a
    ``torch.save(optimizer.state_dict())`` on the main process alone would write only rank 0's part of."""
    from accelerate.utils import DistributedType

    return sharding_kind(model) != "none" or accelerator.distributed_type == DistributedType.DEEPSPEED


# ------------------------------------------------------------------------------------- the context
@contextmanager
def gathered_for_generation(accelerator: Any, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Make ``model``'s full weights resident for a whole rollout; yield the module to generate with.

    ``model`` is what ``accelerator.prepare`` returned (DeepSpeedEngine, FSDP module, DDP, or the
    bare module); the context yields ``accelerator.unwrap_model(model)`` — call the Hugging Face
    model inside it (``.policy`` of a value-head wrapper) directly, as the rollout does now.

    * **DeepSpeed ZeRO-3**: ``deepspeed.zero.GatheredParameters`` over all parameters (one
      all-gather), and the engine's per-module fetch/release hooks are suspended for the duration,
      so the layers neither re-fetch nor release (re-partition) their weights at every token. Also
      works on a module created under ``deepspeed.zero.Init`` without an engine (e.g. a reference
      model): its weights are gathered for the duration.
    * **FSDP2** (``fully_shard``): the root is lazily initialised (as its first forward would),
      then every FSDP module is unsharded (all-gathers overlapped), with reshard-after-forward
      switched off so forwards keep the weights; on exit each module's previous setting is
      restored and the module resharded. Calling a sub-module (``.policy``) inside is fine: its
      weights, including those owned by the root, are plain tensors for the duration.
    * **FSDP1** (``FullyShardedDataParallel``): ``summon_full_params(recurse=True,
      writeback=False)``. Torch forbids running a forward *through* the FSDP wrappers inside that
      context (their post-forward would free the summoned weights), so for its duration each
      wrapper's ``forward`` is pointed straight at its wrapped module; the original is restored on
      exit.
    * **Replicated** (single process, DDP, ZeRO-1/2): nothing to do; yields the unwrapped model.

    Memory trade-off: inside the context every rank holds the *entire* model (in the all-gather
    dtype: bf16 under FSDP2/ZeRO-3 with bf16 mixed precision; the fp32 parameters for FSDP1) on top
    of its own shards, the optimizer state and the rollout's KV cache; outside it a rank holds its
    shards plus only the few units being computed. That extra ``parameters × bytes per weight`` per
    device (a 7B model in bf16: 14 GB) buys one all-gather per rollout instead of one per layer per
    generated token — about 64× less all-gather traffic for a 64-token rollout. If the full weights
    do not fit next to the shards, generate without this context (the engine then gathers layer by
    layer for every token: slow, but lean).

    Every rank must enter it (the gathers are collectives). Use it under ``torch.no_grad()``: the
    gathered weights are read-only (``writeback=False`` / ``modifier_rank=None``), changes made
    inside are discarded or undefined.
    """
    unwrapped = accelerator.unwrap_model(model)
    kind = sharding_kind(model)
    if kind == "zero3":
        with _zero3_gathered(model):
            yield unwrapped
    elif kind == "fsdp2":
        with _fsdp2_unsharded(model):
            yield unwrapped
    elif kind == "fsdp1":
        with _fsdp1_full_params(model):
            yield unwrapped
    else:
        yield unwrapped


# ------------------------------------------------------------------------------------- DeepSpeed
def _zero3_param_offload(engine: Any) -> Any | None:
    """The object holding a ZeRO-3 engine's module hooks (``forward_hooks``/``backward_hooks``):
    ``engine.optimizer.parameter_offload`` (current DeepSpeed) or the stage-3 optimizer itself (older);
    None for a bare module or an engine without a ZeRO-3 optimizer (e.g. inference-only)."""
    opt = getattr(engine, "optimizer", None)
    if opt is None:
        return None
    offload = getattr(opt, "parameter_offload", None) or opt
    return offload if hasattr(offload, "forward_hooks") and hasattr(offload, "module") else None


def _suspend_zero3_hooks(offload: Any) -> None:
    # As DeepSpeed's own deepspeed.runtime.zero.stage3.unwrap_model_for_generation and TRL do: drop
    # the per-module fetch/release hooks and forget which sub-modules hold each parameter.
    for p in offload.module.parameters():
        active = getattr(p, "ds_active_sub_modules", None)
        if active is not None:
            active.clear()
    for h in list(offload.forward_hooks) + list(getattr(offload, "backward_hooks", [])):
        h.remove()
    offload.forward_hooks = []
    if hasattr(offload, "backward_hooks"):
        offload.backward_hooks = []


def _restore_zero3_hooks(offload: Any) -> None:
    # renamed in DeepSpeed 0.16.4 (deepspeedai/DeepSpeed#6847)
    register = getattr(offload, "_register_deepspeed_module", None) or offload._register_hooks_recursively
    register(offload.module)


@contextmanager
def _zero3_gathered(model: torch.nn.Module) -> Iterator[None]:
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(
            "the model holds DeepSpeed ZeRO-3 partitioned parameters but `import deepspeed` "
            f"failed ({e}); install deepspeed"
        ) from e
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):  # modifier_rank=None: read-only, on every rank
        offload = _zero3_param_offload(model)
        if offload is None:
            yield
            return
        _suspend_zero3_hooks(offload)
        try:
            yield
        finally:
            _restore_zero3_hooks(offload)


# ------------------------------------------------------------------------------------- FSDP2
def _fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    fsdp2_cls, _ = _fsdp_classes()
    return [m for m in model.modules() if isinstance(m, fsdp2_cls)]


def _fsdp2_lazy_init_roots(mods: list[torch.nn.Module]) -> None:
    """Run FSDP2's lazy initialisation from the outermost FSDP module(s), as their first forward would.

    FSDP2 makes whichever FSDP module runs forward first the root. Generation calls the Hugging
    Face model *inside* the wrapper (``PolicyWithValue.policy``), bypassing the root's hooks; if that
    were the first forward, a decoder layer would become a root of its own and the next forward
    through the real root fails ("FSDP state has already been lazily initialized for ...")."""
    inner: set[int] = set()
    for m in mods:
        if id(m) in inner:
            continue
        inner.update(id(d) for d in m.modules() if d is not m)
        state = getattr(m, "_get_fsdp_state", lambda: None)()
        lazy_init = getattr(state, "_lazy_init", None)  # private (torch 2.6-2.13); no-op once initialised
        if lazy_init is not None:
            lazy_init()


def _fsdp2_save_reshard(mod: Any) -> tuple[Any, Any, list] | None:
    """The module's reshard-after-forward state (private FSDP2 fields, torch 2.6-2.13), or None."""
    try:
        state = mod._get_fsdp_state()
        return state, state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]
    except AttributeError:
        return None


def _fsdp2_restore_reshard(mod: Any, saved: tuple[Any, Any, list] | None) -> None:
    if saved is None:  # unknown torch internals: fall back to FSDP2's default (reshard after forward)
        mod.set_reshard_after_forward(True, recurse=False)
        return
    state, auto, mesh_infos = saved
    state._auto_reshard_after_forward = auto
    for g, info in zip(state._fsdp_param_groups, mesh_infos):
        g.post_forward_mesh_info = info


@contextmanager
def _fsdp2_unsharded(model: torch.nn.Module) -> Iterator[None]:
    mods = _fsdp2_modules(model)
    _fsdp2_lazy_init_roots(mods)  # before saving: lazy init settles the root's reshard setting
    saved = [_fsdp2_save_reshard(m) for m in mods]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)  # forwards must not free the gathered weights
    try:
        handles = [m.unshard(async_op=True) for m in mods]  # issue every all-gather, then wait
        for h in handles:
            if h is not None:
                h.wait()
        yield
    finally:
        for m, s in zip(mods, saved):
            _fsdp2_restore_reshard(m, s)
        for m in mods:
            m.reshard()


# ------------------------------------------------------------------------------------- FSDP1
@contextmanager
def _fsdp1_full_params(model: torch.nn.Module) -> Iterator[None]:
    _, fsdp1_cls = _fsdp_classes()
    wrappers = [m for m in model.modules() if isinstance(m, fsdp1_cls)]
    with fsdp1_cls.summon_full_params(model, recurse=True, writeback=False):
        for w in wrappers:  # bypass FSDP's pre/post-forward (which would reshard) for the duration;
            w.forward = w._fsdp_wrapped_module.__call__  # __call__: the wrapped module's own hooks still run
        try:
            yield
        finally:
            for w in wrappers:
                w.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------- FSDP2 on CPU
def keep_fsdp_on_cpu(accelerator: Any) -> bool:
    """Switch a CPU run launched for FSDP2 from accelerate's DDP to FSDP2; True if it did.

    On a machine without GPUs rlhf-pg needs ``Accelerator(cpu=True)`` (else the processes never
    synchronise), and accelerate then always decides ``DistributedType.MULTI_CPU``: its FSDP branch
    exists only for GPU-like devices, so the plugin that ``accelerate launch --config_file
    recipes/accelerate/fsdp2_full_shard.yaml`` describes in the environment (``ACCELERATE_USE_FSDP``,
    ``FSDP_*``) is dropped and the run is plain DDP. FSDP2 itself (``fully_shard`` on CPU tensors over
    gloo) works, and so does everything accelerate does for it once its state says FSDP: ``prepare``
    (per-layer units, the optimizer re-pointed at the sharded parameters), ``no_sync``,
    ``clip_grad_norm_``, ``get_state_dict``, ``save_state``/``load_state``. So the plugin is built
    from the environment as ``Accelerator()`` builds it, and set on the state the way accelerate's GPU
    path sets it. Nothing changes unless the run is MULTI_CPU *and* the launcher asked for FSDP
    version 2 (FSDP1 on CPU is left as it was: DDP).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment variables
    if plugin.fsdp_version != 2:
        return False
    if state.mixed_precision != "no":  # as AcceleratorState does for its FSDP plugin
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # gather/reduce read it here
    return True


# ------------------------------------------------------------------------------------- DeepSpeed on CPU
def deepspeed_accelerator_kwargs(cpu: bool) -> dict[str, Any]:
    """``Accelerator`` arguments for this process: ``{"cpu": cpu}``, except under a DeepSpeed launch.

    ``accelerate launch`` with a DeepSpeed config (``recipes/accelerate/deepspeed_zero*.yaml``) tells each
    process through ``ACCELERATE_USE_DEEPSPEED=true``. Without deepspeed installed that is a
    :class:`~rlhf_pg.errors.UserError` naming the extra (accelerate's own message is an ImportError
    deep in ``Accelerator()``). On a machine without CUDA (``cpu`` True) accelerate keeps the DeepSpeed
    plugin only from a non-CPU state — under ``cpu=True`` it decides ``MULTI_CPU`` and the run is plain DDP
    without a word — so a process started by the launcher (``LOCAL_RANK`` set) gets ``cpu=False`` and a
    gloo process group instead; accelerate then initialises ``deepspeed.comm`` over gloo and decides
    ``DistributedType.DEEPSPEED`` on the CPU device. Before that, DeepSpeed's CPU accelerator is selected
    (``DS_ACCELERATOR=cpu`` unless set) and its shared-memory all-reduce op is switched off: DeepSpeed
    JIT-builds that C++ op when its comm backend starts (a C++ compiler, ~30 s of g++ on 2 idle cores per
    fresh install), and only DeepSpeed-Inference's tensor-parallel layers use it; training reduces over
    gloo either way.
    Nothing changes for a run that is not a DeepSpeed launch, or on a machine with CUDA (beyond the check
    that deepspeed is installed).
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return {"cpu": cpu}
    from .errors import UserError, one_line

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if cpu and launched:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed first picks its accelerator
    try:
        import deepspeed.ops
    except ImportError as e:
        raise UserError(
            f"a DeepSpeed launch (ACCELERATE_USE_DEEPSPEED=true) needs deepspeed ({one_line(e, 120)}): "
            "pip install -e '.[deepspeed]' (the `deepspeed` extra: deepspeed==0.19.8)"
        ) from None
    if not (cpu and launched):
        return {"cpu": cpu}
    from accelerate.utils import InitProcessGroupKwargs

    compatible = deepspeed.ops.__compatible_ops__  # probed once per process; deepspeed.comm reads this dict
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


# ------------------------------------------------------------------------------------- run header
def describe_distributed(accelerator: Any) -> str:
    """One line for the run header, e.g. ``"FSDP2 · 8 processes on 2 machines (nccl) · mixed precision
    bf16 · cuda:0"`` or ``"single process · mixed precision no · cpu"``."""
    from accelerate.utils import DistributedType

    state = getattr(accelerator, "state", None)
    dt = accelerator.distributed_type
    n = accelerator.num_processes
    if dt == DistributedType.NO:
        engine = "single process"
    elif dt == DistributedType.FSDP:
        plugin = getattr(state, "fsdp_plugin", None)
        engine = f"FSDP{getattr(plugin, 'fsdp_version', '')}"
    elif dt == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        engine = f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
    elif dt == DistributedType.MULTI_CPU:
        engine = "DDP on CPU"
    else:
        engine = "DDP" if str(dt.value).startswith("MULTI_") else str(dt.value)
    parts = [engine]
    if dt != DistributedType.NO:
        machines = ""
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local and local.isdigit() and 0 < int(local) < n:
            machines = f" on {n // int(local)} machines"
        backend = getattr(state, "backend", None)
        parts.append(f"{n} process{'es' if n != 1 else ''}{machines}" + (f" ({backend})" if backend else ""))
    parts.append(f"mixed precision {accelerator.mixed_precision}")
    parts.append(str(accelerator.device))
    return " · ".join(parts)


def accumulation_boundary(accelerator: Any, modules, sync: bool) -> ExitStack:
    """Inside gradient accumulation (``sync`` False: not the last micro-batch), skip DDP's all-reduce for
    each of ``modules`` (None entries are skipped) and tell DeepSpeed — whose engine steps inside
    ``backward`` at a sync boundary — that this is no boundary. A no-op context on the last one."""
    stack = ExitStack()
    if not sync:
        for m in modules:
            if m is not None:
                stack.enter_context(accelerator.no_sync(m))
        accelerator.sync_gradients = False
        stack.callback(setattr, accelerator, "sync_gradients", True)
    return stack
