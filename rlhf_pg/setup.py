"""Everything a run builds before its first step: accelerator, models, optimizer, data, rewards, backend.

:func:`build` returns a :class:`Components` the trainer holds; :func:`build_datasets` and
:func:`build_rewards` also serve ``rlhf-pg eval``. Cheap checks come first (the batch plan against
the process count, the reward functions importable), so a user error stops a run before any model
is loaded.
"""

from __future__ import annotations

import os
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType
from transformers import get_scheduler

from .backends import GenerationBackend, make_backend
from .config import BatchPlan, RunConfig, batch_plan, check_backend_processes
from .core import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, AdaptiveKLController
from .data import load_prompt_dataset
from .distributed import (
    deepspeed_accelerator_kwargs,
    describe_distributed,
    gathered_for_generation,
    keep_fsdp_on_cpu,
)
from .envs import ChatFormat, Episodes, load_environment
from .errors import UserError
from .forward import PACKABLE_ATTENTION, PassSettings, attention_implementation, store_frozen_in_autocast_dtype
from .models import (
    PolicyWithValue,
    ValueModel,
    apply_lora,
    bitsandbytes_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from .rewards import RewardSet, RewardSpec
from .rollout import NON_REWARD_COLUMNS
from .trackers import check_trackers


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """Accelerator for this run. ``cpu=True`` when no GPU is present: without it, processes launched
    with ``accelerate launch``/``torchrun`` on a CPU machine never synchronise (each trains alone).
    Two launches accelerate would turn into plain DDP under ``cpu=True`` are kept: FSDP2
    (:func:`~rlhf_pg.distributed.keep_fsdp_on_cpu`) and DeepSpeed ZeRO, built with ``cpu=False`` and a gloo
    process group instead (:func:`~rlhf_pg.distributed.deepspeed_accelerator_kwargs`).
    ``train.mixed_precision`` unset (null) leaves the precision to the accelerate config / launch flags."""
    # explicit, also when unset: accelerate's state is a per-process singleton that would otherwise
    # keep the precision of an earlier Accelerator in this process
    precision = cfg.train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    from accelerate.state import AcceleratorState, PartialState

    if (
        AcceleratorState._shared_state
        and PartialState._shared_state.get("num_processes", 1) == 1
        and AcceleratorState._shared_state.get("_mixed_precision", precision) != precision
    ):
        # a second Trainer in one (non-distributed) process with another precision: accelerate
        # refuses to change its singleton state, so start it afresh (harmless with one process)
        AcceleratorState._reset_state()
    report_to = check_trackers(cfg)  # before anything expensive: a missing tracker is one line now
    acc = Accelerator(
        **deepspeed_accelerator_kwargs(cpu=not torch.cuda.is_available()),  # cpu=...; DeepSpeed on CPU: gloo
        mixed_precision=precision,
        # The batch sizes are GLOBAL, split over the processes: one optimizer step is one step of the
        # LR schedule on any number of processes (accelerate's default steps it num_processes times).
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=report_to or None,
        project_dir=cfg.output_dir if report_to else None,
    )
    keep_fsdp_on_cpu(acc)  # CPU + an FSDP2 launch: FSDP2 over gloo, not accelerate's silent fallback to DDP
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # no dataloader goes through prepare(): DeepSpeed cannot infer its "auto" sizes
        conf = ds.deepspeed_config
        conf["train_micro_batch_size_per_gpu"] = cfg.batch.micro_batch_size
        conf["gradient_accumulation_steps"] = 1  # the trainer accumulates micro-batches itself (no_sync)
        if cfg.train.max_grad_norm is not None:
            conf["gradient_clipping"] = cfg.train.max_grad_norm
    return acc


@dataclass
class Algorithm:
    """The selected registry entries with their options, and the KL coefficient's controller."""

    advantage: Any
    advantage_opts: Any
    advantage_state: Any
    policy_loss: Any
    policy_loss_opts: Any
    kl: Any
    aggregation: Any
    aggregation_opts: Any
    kl_ctl: AdaptiveKLController | None


def build_algorithm(cfg: RunConfig) -> Algorithm:
    a = cfg.algo
    est = ADVANTAGES[a.advantage]
    return Algorithm(
        advantage=est,
        advantage_opts=a.options(a.advantage),
        advantage_state=est.state() if est.state else None,
        policy_loss=POLICY_LOSSES[a.policy_loss],
        policy_loss_opts=a.options(a.policy_loss),
        kl=KL_ESTIMATORS[a.kl_estimator],
        aggregation=AGGREGATIONS[a.loss_agg],
        aggregation_opts=a.options(a.loss_agg),
        kl_ctl=AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target else None,
    )


def build_datasets(cfg: RunConfig, tokenizer, train: bool = True):
    """(train, eval) prompt datasets of the recipe (train is None with ``train=False``)."""
    d = cfg.data
    common = dict(
        tokenizer=tokenizer,
        prompt_column=d.prompt_column,
        system_prompt=d.system_prompt,
        max_prompt_tokens=d.max_prompt_tokens,
        too_long=d.too_long,
        task_kwargs=d.task_kwargs,
        seed=cfg.seed,
    )
    eval_config = d.eval_config if d.eval_config is not None or d.eval else d.train_config
    train_data = load_prompt_dataset(d.train, d.train_split, config=d.train_config, **common) if train else None
    eval_data = load_prompt_dataset(d.eval or d.train, d.eval_split, limit=d.eval_limit, config=eval_config, **common)
    return train_data, eval_data


def build_rewards(cfg: RunConfig, tokenizer=None) -> RewardSet:
    r = cfg.rewards
    return RewardSet(
        [RewardSpec(f.name, f.weight, dict(f.kwargs)) for f in r.functions],
        on_error=r.on_error,
        on_nonfinite=r.on_nonfinite,
        on_all_none=r.on_all_none,
        tokenizer=tokenizer,
        timeout_s=r.timeout_s,
        allow_empty=cfg.rollout.episodes,  # an environment's own rewards may be the only ones
    )


def environment_factory(cfg: RunConfig):
    """A factory of fresh environments for rollout.env / rollout.tools (loaded and checked now, before
    any model), or None for single completions."""
    r = cfg.rollout
    if r.env:
        return load_environment(r.env, r.env_kwargs)
    if r.tools:
        from .tools import load_tool_env

        return load_tool_env(list(r.tools), r.tool_parser, r.tool_timeout_s)
    return None


def stop_strings(cfg: RunConfig) -> list[str]:
    """rollout.stop, plus the end of a tool call with the default tool format (a turn that calls a tool
    ends there, and the tool's answer comes next)."""
    r = cfg.rollout
    stops = list(r.stop)
    if r.tools and r.tool_parser is None:
        from .tools import STOP

        stops += [STOP] if STOP not in stops else []
    return stops


def build_episodes(cfg: RunConfig, make_env, tokenizer, train_data) -> Episodes:
    """How episodes are sampled: the environment factory, limits and the chat segments."""
    chat = bool(len(train_data)) and not isinstance(train_data[0]["prompt"], str)
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise UserError("multi-turn episodes with chat prompts need a tokenizer with a chat template")
    r, d = cfg.rollout, cfg.data
    return Episodes(
        make_env=make_env,
        name=getattr(make_env, "name", "env"),
        chat=ChatFormat(tokenizer, chat),
        max_turns=r.max_turns,
        max_episode_tokens=r.max_episode_tokens,
        system_prompt=d.system_prompt,
        max_prompt_tokens=d.max_prompt_tokens,
        timeout_s=r.env_timeout_s,
        stat_keys=(*Episodes.stat_keys, *getattr(make_env(), "info_keys", ())),
    )


def build_tokenizer(cfg: RunConfig, acc: Accelerator):
    """The policy's tokenizer (cheap: no weights), loaded before the model so that every check that needs
    only text — data, reward keywords, chat templates — runs before the weights are read."""
    mc = cfg.model
    with acc.main_process_first():  # one process converts/caches the model, then the rest read it
        return load_tokenizer(mc.name, trust_remote_code=mc.trust_remote_code, revision=mc.revision)


def trained_dtype(cfg: RunConfig) -> str:
    """The dtype of the weights AdamW updates (and of the reference, so that KL starts at 0). ``auto`` is
    float32 for a full fine-tune on every device: an update of about lr·|w| is below bfloat16's resolution
    (8 bits of mantissa) and rounds away, so bf16 weights barely train. bf16 speed comes from autocast
    (``train.mixed_precision: bf16``) over fp32 weights. Under LoRA the base is frozen, so ``auto`` keeps
    its device default (bf16 on a GPU; peft keeps the adapters in fp32)."""
    mc = cfg.model
    if mc.dtype == "auto":
        return "float32" if mc.lora is None else "auto"
    if mc.dtype in ("bfloat16", "float16") and mc.lora is None:
        warnings.warn(
            f"model.dtype={mc.dtype} trains {mc.dtype} weights directly: AdamW updates below their resolution are "
            "lost — for a full fine-tune use model.dtype=float32 (or auto) with train.mixed_precision=bf16",
            stacklevel=2,
        )
    return mc.dtype


@contextmanager
def model_loading(acc: Accelerator, name: str):
    """Around a model load: the main process first (it converts and caches the model; the others then read
    the cache) — except under DeepSpeed ZeRO-3, where ``from_pretrained`` partitions the weights as it
    loads, a collective every rank must join at once (a barrier around it would deadlock): there only the
    conversion runs main process first, and the load itself on every rank together."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None or getattr(plugin, "zero_stage", 0) != 3:
        with acc.main_process_first():
            yield
        return
    with acc.main_process_first():
        resolve_model(name)
    yield


def build_policy(cfg: RunConfig, acc: Accelerator, needs_values: bool):
    """(trained module, separate critic or None, reference model or None).

    The trained module is the policy, or the policy with a value head on its backbone. The reference
    (β > 0 only) is a frozen copy of the initial (or ``ref_name``) model; under LoRA it is None: the
    same weights with the adapter disabled serve as the reference."""
    mc, dev = cfg.model, acc.device
    dtype = trained_dtype(cfg)
    with model_loading(acc, mc.name):
        policy = load_model(
            mc.name, dtype, dev, mc.trust_remote_code, mc.revision, quantization_config=bitsandbytes_config(mc.lora)
        )
    if mc.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.config.use_cache = False
    if mc.lora is not None:
        policy = apply_lora(policy, mc.lora, mc.gradient_checkpointing)
    ref = None
    if cfg.algo.kl_coef > 0 and mc.lora is None:
        ref = (
            load_model(mc.ref_name or mc.name, dtype, dev, mc.trust_remote_code, mc.revision)
            .eval()
            .requires_grad_(False)
        )
        # its passes all run under the run's autocast: keep its linear weights as autocast casts them
        store_frozen_in_autocast_dtype(ref, acc.autocast)
    module = PolicyWithValue(policy) if needs_values and mc.critic == "shared" else policy
    critic = None
    if needs_values and mc.critic == "separate":
        with model_loading(acc, mc.critic_name or mc.name):
            critic = ValueModel(
                load_model(
                    mc.critic_name or mc.name,
                    dtype,
                    dev,
                    mc.trust_remote_code,
                    mc.revision if mc.critic_name is None else None,
                )
            )
        if mc.gradient_checkpointing:
            critic.backbone.gradient_checkpointing_enable()
    return module, critic, ref


def build_optimizer(cfg: RunConfig, modules: list[torch.nn.Module], total_optimizer_steps: int):
    """AdamW over the trainable parameters (fused: one kernel, no model-sized temporaries) and the
    LR schedule over the run's optimizer steps."""
    t = cfg.train
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=fused or None)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max(1, total_optimizer_steps)
    )
    return optimizer, scheduler


@dataclass
class Components:
    """What :func:`build` returns; the trainer keeps these as attributes."""

    acc: Accelerator
    plan: BatchPlan
    algo: Algorithm
    tokenizer: Any
    model: torch.nn.Module
    """The trained module as prepared by accelerate (DDP/FSDP/DeepSpeed-wrapped where applicable)."""
    critic: torch.nn.Module | None
    ref: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_data: Any
    eval_data: Any
    rewards: RewardSet
    backend: GenerationBackend
    passes: PassSettings
    episodes: Episodes | None = None
    """Multi-turn episodes (rollout.env or rollout.tools); None = single completions."""


def _one_model_engine(acc: Accelerator) -> str | None:
    """The engine's name if accelerate's ``prepare`` takes one model under it (DeepSpeed, FSDP2), else None."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "DeepSpeed"
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if acc.distributed_type == DistributedType.FSDP and getattr(plugin, "fsdp_version", 1) == 2:
        return "FSDP2"
    return None


def build(cfg: RunConfig, accelerator: Accelerator | None = None) -> Components:
    acc = accelerator or make_accelerator(cfg)
    plan = batch_plan(cfg, acc.num_processes)  # before anything expensive
    check_backend_processes(cfg, acc.num_processes)
    if cfg.train.push_to_hub and cfg.train.save_model:
        from .model_card import check_hub_access

        check_hub_access(cfg.train.push_to_hub)
    algo = build_algorithm(cfg)
    engine = _one_model_engine(acc)
    if algo.advantage.needs_values and cfg.model.critic == "separate" and engine is not None:
        raise UserError(
            f"model.critic=separate does not run under {engine} (accelerate prepares one model per engine "
            "there): use model.critic=shared (the value head on the policy), or DDP"
        )
    make_env = environment_factory(cfg)  # the user's environment or tools load before any model
    needs_values = algo.advantage.needs_values
    tokenizer = build_tokenizer(cfg, acc)
    rewards = build_rewards(cfg, tokenizer)
    train_data, eval_data = build_datasets(cfg, tokenizer)
    d = cfg.data
    for data, what in ((train_data, f"train data '{d.train}'"), (eval_data, f"eval data '{d.eval or d.train}'")):
        # a column only the eval set lacks would otherwise fail at the first evaluation, after training
        rewards.check_keywords([c for c in data.column_names if c not in NON_REWARD_COLUMNS], what)
    episodes = build_episodes(cfg, make_env, tokenizer, train_data) if make_env is not None else None
    module, critic, ref = build_policy(cfg, acc, needs_values)  # the weights, after every check above
    optimizer, scheduler = build_optimizer(
        cfg, [m for m in (module, critic) if m is not None], cfg.train.max_steps * plan.optimizer_steps
    )
    if critic is None:
        model, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    else:
        model, critic, optimizer, scheduler = acc.prepare(module, critic, optimizer, scheduler)
    for m in (model, critic):
        # Accelerate's mixed precision also wraps forward to cast every output to fp32: a full fp32 copy of
        # the logits in every training pass, and its cast back in the backward. Every caller here enters the
        # run's autocast itself (PassSettings.autocast, the backend's context, evaluation), and the log-probs
        # read the logits in fp32 chunks (core.gathered_logprobs), so the wrapper is removed from the module.
        if m is not None:
            acc.unwrap_model(m, keep_fp32_wrapper=False)
    passes = PassSettings(
        temperature=cfg.rollout.temperature,
        shared_prefix=cfg.train.shared_prefix and not cfg.model.gradient_checkpointing,
        packed=cfg.train.packing and attention_implementation(module) in PACKABLE_ATTENTION,
        entropy_grad=cfg.algo.entropy_coef > 0,
        autocast=acc.autocast,
    )
    backend = build_backend(cfg, acc, model, tokenizer)
    return Components(
        acc,
        plan,
        algo,
        tokenizer,
        model,
        critic,
        ref,
        optimizer,
        scheduler,
        train_data,
        eval_data,
        rewards,
        backend,
        passes,
        episodes,
    )


def bare_policy(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model being trained, without DDP or the value head."""
    m = acc.unwrap_model(model)
    return m.policy if isinstance(m, PolicyWithValue) else m


def build_backend(cfg: RunConfig, acc: Accelerator, model: torch.nn.Module, tokenizer) -> GenerationBackend:
    """The generation backend. One that samples with the trained module does so inside the context it
    needs: weights gathered once under ZeRO-3/FSDP (not per token), and the run's autocast."""

    def context() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(gathered_for_generation(acc, model))
        stack.enter_context(acc.autocast())
        return stack

    r = cfg.rollout
    return make_backend(
        r.backend, bare_policy(acc, model), tokenizer, context=context, decode=r.decode, **r.backend_options
    )


def describe(cfg: RunConfig, c: Components) -> str:
    """The run header: the algorithm's effective settings, the batch plan, the engine, values, reference."""
    a, mc = cfg.algo, cfg.model
    values = (
        "separate critic" if c.critic is not None else "head on the policy" if c.algo.advantage.needs_values else "none"
    )
    reference = (
        "none" if a.kl_coef == 0 else "policy with the LoRA adapter disabled" if c.ref is None else "frozen model"
    )
    stored = {str(p.dtype).removeprefix("torch.") for p in c.ref.parameters()} if c.ref is not None else set()
    if len(stored) > 1:  # store_frozen_in_autocast_dtype converted its linear weights
        reference += f" (linear weights in {', '.join(sorted(stored - {'float32'}))}, as autocast casts them)"
    line = (
        f"algorithm {a.name}: "
        + ", ".join(f"{k}={v}" for k, v in a.model_dump().items() if k != "name")
        + f" | {describe_distributed(c.acc)}, values={values}, reference={reference}"
    )
    if mc.lora is not None:
        n = sum(  # ZeRO-3 holds a shard of each parameter: count it whole
            int(getattr(p, "ds_numel", p.numel()))
            for m in (c.model, c.critic)
            if m is not None
            for p in m.parameters()
            if p.requires_grad
        )
        line += (
            f", LoRA r={mc.lora.r} ({n / 1e6:.2f}M trainable parameters)"
            if n >= 1e6
            else f", LoRA r={mc.lora.r} ({n} trainable parameters)"
        )
    if c.episodes is not None:
        e = c.episodes
        line += (
            f"\nepisodes: environment {e.name}, at most {e.max_turns} turns and {e.max_episode_tokens} tokens "
            f"({cfg.rollout.max_new_tokens} per model turn); environment tokens are context, not actions"
        )
    return line + "\nbatch plan: " + c.plan.describe()
