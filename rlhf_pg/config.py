"""Run configuration: nested pydantic models, recipe loading, dotted overrides, presets, validation.

The models below are the single source of truth for every option: each field's docstring (the
string literal under it) is its documentation, shown by ``rlhf-pg config`` and carried into the
JSON schema. A recipe YAML maps one-to-one onto them. Unknown keys, wrong types, out-of-range values
and impossible combinations all become a one-line :class:`~rlhf_pg.errors.UserError`.

Resolution order: preset defaults for ``algo.name`` < recipe YAML < command-line ``key=value``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .memory import Allocator

TooLong = Literal["truncate", "error"]
"""data.too_long: what to do with a prompt over max_prompt_tokens (data.load_prompt_dataset takes it too)."""
OnError = Literal["raise", "zero"]
OnNonfinite = Literal["raise", "zero", "none"]
OnAllNone = Literal["raise", "zero"]
"""The rewards.on_* policies (rewards.RewardSet takes them too)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator: the update is (alpha / r)·B·A."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names that get adapters (e.g. `[q_proj, v_proj]`), or `all-linear` (every linear layer but the
    LM head)."""
    load_in_4bit: bool = False
    """Load the frozen base in 4-bit (QLoRA; needs bitsandbytes and a CUDA GPU)."""
    load_in_8bit: bool = False
    """Load the frozen base in 8-bit (needs bitsandbytes and a CUDA GPU)."""
    save_merged: bool = False
    """Also save the base with the adapter merged in (output_dir/model/merged), loadable without peft."""

    @model_validator(mode="after")
    def _one_quantisation(self) -> LoraConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.lora: choose load_in_4bit or load_in_8bit, not both")
        return self


class ModelConfig(_Section):
    name: str = "smollm2-135m-instruct"
    """Policy model: a built-in alias (`smollm2-135m-instruct`, `tiny-random-llama`), a local directory, or a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. `auto` = float32 for trained weights on every device (bf16 weights lose AdamW updates smaller than
    their resolution; bf16 speed comes from `train.mixed_precision: bf16`); under LoRA the frozen base is bfloat16 on
    GPUs that support it (else float16), float32 on CPU."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the hub (only for models you trust)."""
    ref_name: str | None = None
    """Reference model for the KL term; default: a frozen copy of the initial policy (`name`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights (section: r, alpha, dropout, target_modules, ...); null = full
    fine-tune. The reference model is then the same weights with the adapter disabled (no second copy)."""
    critic: Literal["shared", "separate"] = "shared"
    """Value function (estimators that need values, e.g. gae): a head on the policy's last hidden state (`shared`
    backbone) or a `separate` critic model."""
    critic_name: str | None = None
    """Backbone of the separate critic (alias, directory or hub id); default: the policy's `name`."""


class DataConfig(_Section):
    train: str = "arithmetic"
    """Prompt source: a built-in task (`arithmetic`), a local .jsonl/.json/.csv/.parquet file, or a hub dataset name."""
    train_split: str = "train"
    """Split of `train` used for training."""
    train_config: str | None = None
    """Configuration (subset) name of a hub dataset or dataset folder, e.g. `main` for gsm8k; null = its default."""
    eval: str | None = None
    """Held-out prompt source (same forms as `train`); default: the same source as `train`."""
    eval_split: str = "test"
    """Split of the eval source."""
    eval_config: str | None = None
    """Configuration name of the eval source; default: `train_config` when eval is the train source, else null."""
    eval_limit: int | None = Field(200, ge=1)
    """Use at most this many eval prompts (the first ones); null = all."""
    prompt_column: str = "prompt"
    """Column holding the prompt: a string (used as is) or a list of chat messages (chat template applied)."""
    system_prompt: str | None = None
    """System message prepended to conversational prompts that have none."""
    max_prompt_tokens: int = Field(512, ge=1)
    """Longest prompt in tokens; longer prompts are handled by `too_long`."""
    too_long: TooLong = "truncate"
    """Prompts over `max_prompt_tokens`: keep the last tokens (with a warning) or stop with an error."""
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Options of a built-in task, e.g. `{max_operand: 20, n_train: 5000, seed: 0}` for `arithmetic`."""


class BatchConfig(_Section):
    """Every size of a step, one unit each. A step samples prompts_per_step × group_size completions (the
    rollout), optimises on them for `epochs` passes of minibatches, each accumulated over micro-batches."""

    prompts_per_step: int = Field(8, ge=1)
    """Prompts sampled per RL step, GLOBAL (over all processes; a multiple of the process count)."""
    group_size: int = Field(4, ge=1)
    """G: completions sampled per prompt (the rollout holds prompts_per_step × group_size completions)."""
    epochs: int = Field(1, ge=1)
    """Optimisation passes over each rollout."""
    minibatch_size: int | None = Field(None, ge=1)
    """Completions per optimizer step, GLOBAL; divides the rollout and is a multiple of the process count.
    null = the whole rollout (one optimizer step per epoch)."""
    micro_batch_size: int = Field(8, ge=1)
    """Completions per forward/backward, PER PROCESS; a minibatch is accumulated over micro-batches. With
    `micro_batch_tokens`, the most completions in one."""
    micro_batch_tokens: int | None = Field(None, ge=1)
    """Token budget of one forward/backward, PER PROCESS (null = off: fixed micro-batches of `micro_batch_size`).
    Consecutive completions share a micro-batch while their tokens (completions' real tokens, each distinct
    prompt once, as the packed passes run them) fit the budget and they are at most `micro_batch_size`: the
    activations' memory is bounded by tokens, not by completions, and short completions make larger
    micro-batches. The same gradient up to rounding (every loss is normalised by the minibatch's global counts).
    E.g. `micro_batch_size: 64, micro_batch_tokens: 2048`."""
    eval_batch_size: int = Field(64, ge=1)
    """Prompts per generation batch during evaluation (greedy decoding), PER PROCESS."""


class RolloutConfig(_Section):
    max_new_tokens: int = Field(64, ge=1)
    """Longest completion in tokens; sampling stops earlier at EOS or a stop string."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature τ. The policy trained is softmax(logits/τ), so log-probs use the same τ."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1 = off). Log-probs stay those of the untruncated policy, as in peers."""
    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens (0 = off)."""
    stop: list[str] = Field(default_factory=list)
    """Extra stop strings; the completion ends with the token that completes one."""
    backend: Literal["hf", "vllm"] = "hf"
    """Generation engine: `hf` samples with the training model itself (log-probs recorded while sampling are exact);
    `vllm` runs a vLLM engine on the GPU (pip install vllm; one process) that receives the policy's weights after each
    RL step, and the trainer recomputes the old log-probs."""
    decode: Literal["auto", "lean", "hf"] = "auto"
    """How the hf backend runs each decoding step: `lean` = rlhf-pg's own step for Llama-architecture models
    (Llama, SmolLM, Mistral, Qwen2: the same arithmetic as the model's forward, the same tokens, with a preallocated
    KV cache and none of the per-token bookkeeping; rlhf_pg/decode.py), `hf` = the model's own forward, `auto` =
    lean where the model is covered, else hf. Single completions, multi-turn episodes and evaluation alike."""
    backend_options: dict[str, Any] = Field(default_factory=dict)
    """Backend options, e.g. for vllm `{gpu_memory_utilization: 0.3, dtype: bfloat16, max_model_len: 2048}`; none
    for hf."""
    is_correction: Literal["auto", "none", "token", "sequence"] = "auto"
    """Sampler/trainer mismatch: an engine's sampling distribution μ is not exactly the trainer's π_old (kernels,
    precision), so the policy loss is weighted by w = π_old/μ of the sampled tokens — per token (`token`) or one
    weight per completion, the product over its tokens (`sequence`) — truncated at `is_cap`. `auto`: `token` with
    the vllm backend, `none` with hf (which samples with the trainer's own model: w = 1 exactly). Logged as
    is/ratio_mean, is/ratio_max, is/truncated, is/masked. Biases: see the README's estimator table."""
    is_cap: float | None = Field(3.0, gt=0)
    """Truncation of the importance weight (truncated IS); null = untruncated (full IS: unbiased at the sequence
    level, unbounded variance)."""
    is_mask_above: float | None = Field(None, gt=0)
    """Drop (weight 0) a token (`token`) or a whole completion (`sequence`) whose ratio is above this; null = off."""
    is_mask_below: float | None = Field(None, ge=0)
    """Drop a token or completion whose ratio is below this; null = off."""
    env: str | None = None
    """Multi-turn episodes: an environment class `path/to/env.py:Class` or `package.module:Class` (see
    rlhf_pg/envs.py), created per episode with `env_kwargs`. null = single completions."""
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment class."""
    tools: list[str] = Field(default_factory=list)
    """Tools the model may call (`path/to/tools.py:function`, plain functions with type hints and docstrings):
    episodes with the built-in tool environment (rlhf_pg/tools.py). Exclusive with `env`."""
    tool_parser: str | None = None
    """How calls are read from a turn: null = `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, or your
    own `path.py:function(text) -> list of calls`."""
    tool_timeout_s: float = Field(10.0, gt=0)
    """A tool call running longer becomes an error observation the model sees."""
    env_timeout_s: float | None = Field(None, gt=0)
    """An environment's reset or step that has not returned after this many seconds stops the run with one line
    naming it (null = no limit). Tool calls have their own limit, `tool_timeout_s`."""
    max_turns: int = Field(4, ge=1)
    """Most model turns in an episode (with `env` or `tools`)."""
    max_episode_tokens: int = Field(512, ge=1)
    """Most tokens after the prompt in an episode, model and environment turns together; `max_new_tokens` bounds
    each model turn."""

    @model_validator(mode="after")
    def _one_environment(self) -> RolloutConfig:
        if self.env and self.tools:
            raise ValueError("rollout.env and rollout.tools are exclusive: tools run in the built-in tool environment")
        if not (self.env or self.tools) and (self.env_kwargs or self.tool_parser):
            raise ValueError("rollout.env_kwargs / rollout.tool_parser need rollout.env or rollout.tools")
        return self

    @property
    def episodes(self) -> bool:
        """Multi-turn: an environment or tools are configured."""
        return bool(self.env or self.tools)

    def is_correction_for(self, exact_logprobs: bool):
        """The :class:`rlhf_pg.core.ISCorrection` of this section for a backend (``exact_logprobs``: it samples
        with the trainer's own model), or None for no correction."""
        from .core import ISCorrection

        level = self.is_correction
        if level == "auto":
            level = "none" if exact_logprobs else "token"
        if level == "none":
            return None
        return ISCorrection(level, self.is_cap, self.is_mask_above, self.is_mask_below)


class RewardFunctionConfig(_Section):
    name: str
    """A built-in (`accuracy`, `format`, `length_penalty`, `sentiment`, ...), `package.module:function` or
    `path/to/file.py:function`."""
    weight: float = 1.0
    """Weight of this function in the summed reward."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments bound to the function (e.g. `{pattern: ...}` for `format`)."""


class RewardsConfig(_Section):
    functions: list[RewardFunctionConfig] = Field(default_factory=lambda: [RewardFunctionConfig(name="accuracy")])
    """Reward functions, summed with their weights; each one is also logged on its own."""
    on_error: OnError = "raise"
    """A reward function raises: stop with its message, or treat its values for the batch as missing (0)."""
    on_nonfinite: OnNonfinite = "raise"
    """A reward function returns NaN/inf: stop, use 0, or treat as missing."""
    on_all_none: OnAllNone = "raise"
    """Every function returns None for a sample: stop, or score it 0."""
    timeout_s: float | None = Field(None, gt=0)
    """A reward function that has not returned after this many seconds (on one batch) is treated as failed
    (`on_error`); null = no limit. A synchronous one that overruns is abandoned in a thread, an async one cancelled."""


class AlgoConfig(_Section):
    """The estimator, loss and KL. Each registry entry with options has its own section here, named after
    it (`algo.grpo.scale`, `algo.reinforce.baseline`, `algo.gae.lam`, `algo.clip.eps_high`, ...); see
    `rlhf-pg config` for all of them."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True, validate_assignment=True)

    name: Literal["grpo", "reinforce", "rloo", "ppo"] = "grpo"
    """Preset: fills the defaults of the fields below (see PRESETS); any field can still be set."""
    advantage: str = "grpo"
    """Advantage estimator (core.ADVANTAGES): grpo, rloo, reinforce, gae, or one you registered."""
    policy_loss: str = "clip"
    """Policy loss (core.POLICY_LOSSES): `clip` (PPO ratio clip) or `pg` (−Â·log π)."""
    kl_coef: float = Field(0.0, ge=0)
    """β: weight of the KL to the reference model. 0 = no reference model is loaded at all."""
    kl_estimator: str = "k3"
    """KL estimator (core.KL_ESTIMATORS, Schulman 2020): k1 = log π/π_ref, k2 = ½(log ratio)², k3 = (r − 1) − log r."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL goes: a term in the loss (GRPO) or a per-token penalty in the reward (PPO)."""
    kl_target: float | None = Field(None, gt=0)
    """Adaptive KL controller target (Ziegler et al. 2019); null = fixed β."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive KL controller horizon in samples."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight: loss −= coef × entropy."""
    loss_agg: str = "token-mean"
    """How per-token losses become one number (core.AGGREGATIONS: token-mean, seq-mean-token-mean,
    seq-mean-token-sum, constant), normalised over the whole minibatch, all processes."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount γ for returns (reinforce, gae)."""
    whiten_advantages: bool = False
    """Normalise advantages to zero mean, unit std over the whole batch (masked, across processes)."""
    vf_coef: float = Field(0.1, ge=0)
    """Value loss weight (estimators that need values, e.g. gae)."""
    value_clip: float | None = Field(0.2, gt=0)
    """Clip range of the value prediction around the rollout's values; null = no clipping."""
    critic_warmup_steps: int = Field(0, ge=0)
    """First RL steps that train only the value function: the loss is the value loss alone (no policy loss,
    KL or entropy term). A separate critic alone changes; a shared head's value loss also reaches the backbone."""

    @model_validator(mode="after")
    def _option_sections(self) -> AlgoConfig:
        """Validate every `algo.<entry>` section with its entry's options model; the selected entries
        get their defaults when the recipe has no section for them."""
        from .core import REGISTRIES  # local: the math module imports torch

        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        owners = {n: e.options for reg in REGISTRIES for n, e in reg.items() if e.options is not None}
        for key, value in list(extra.items()):
            if key not in owners:
                names = sorted(set(type(self).model_fields) | set(owners))
                close = difflib.get_close_matches(key, names, n=1)
                raise ValueError(
                    f"unknown config key 'algo.{key}'"
                    + (f" — did you mean 'algo.{close[0]}'?" if close else f" — known keys here: {', '.join(names)}")
                )
            if not isinstance(value, owners[key]):
                try:
                    extra[key] = owners[key].model_validate(value if value is not None else {})
                except ValidationError as err:
                    raise ValueError(_explain(err, f"algo.{key}.", owners[key])) from None
        for sel in (self.advantage, self.policy_loss, self.kl_estimator, self.loss_agg):
            if sel in owners and sel not in extra:
                extra[sel] = owners[sel]()
        return self

    def options(self, name: str) -> Any:
        """The options section of registry entry ``name`` (None when it has none)."""
        return (self.__pydantic_extra__ or {}).get(name)


class TrainConfig(_Section):
    max_steps: int = Field(30, ge=0)
    """RL steps (each = one rollout + its optimisation)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.99)
    """AdamW β1, β2."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up, in optimizer steps."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warm-up, over all optimizer steps of the run."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm; null = off."""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """Accelerate autocast precision; null = what the accelerate config / `accelerate launch` flags say (default no)."""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML reads a bare `no` as false

    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (0 = only at start and end)."""
    eval_at_start: bool = True
    """Evaluate the initial policy before training."""
    samples_every: int = Field(5, ge=0)
    """Write the step's completions to samples.jsonl every N steps (0 = never)."""
    save_every: int = Field(10, ge=0)
    """Write a checkpoint every N steps (0 = only at the end); the run can resume from any of them."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the latest checkpoints to keep in output_dir/checkpoints."""
    resume: bool | Literal["auto"] = False
    """Continue from the latest complete checkpoint in output_dir (CLI: --resume); true and `auto`
    both start fresh when there is none."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop (saving the last good state) after this many consecutive updates with non-finite loss or
    gradients; each such update is skipped with a warning."""
    grad_noise_scale: bool = False
    """Log the gradient noise scale and SNR estimated from the micro-batch gradients (needs
    gradient accumulation: micro_batch_size < minibatch; one process). Costs a gradient copy per micro-batch."""
    deterministic: bool = False
    """Use torch's deterministic algorithms: with it, a run (and a resumed run) is bit-identical to a
    rerun with the same seed on the same machine; without it, multi-threaded CPU kernels (e.g. the
    embedding backward) add in a varying order."""
    shared_prefix: bool = True
    """Training/reference passes run each prompt once and let its G completions attend to that one
    copy (same gradients as the padded batch, fewer FLOPs). Off under gradient checkpointing."""
    packing: bool = True
    """Training/reference passes pack each prompt's completions into one row after one copy of the
    prompt, with no padding between them (a block attention mask; same gradients as the padded batch).
    Needs an attention kernel that takes a custom mask (sdpa or eager); elsewhere ``shared_prefix`` applies."""
    allocator: Allocator = "auto"
    """The process's C heap allocator. `mimalloc` (PyPI ``cmeel-mimalloc``, a dependency on Linux): reuses
    freed blocks for the next step's tensors of the same size, which glibc 2.36 cannot for torch's
    64-byte-aligned allocations (its heap grows and each step faults in fresh pages). It must be loaded
    when the process starts: ``rlhf-pg train`` (also under ``--num-processes``) re-executes itself with
    ``LD_PRELOAD`` before any work. `glibc`: the C library's malloc. `auto`: mimalloc where installed and
    the process could start with it (the CLI), else glibc's; the run's log names which."""
    reuse_freed_memory: bool = True
    """Keep freed memory in the process for reuse rather than handing it back to the OS: the large
    tensors of each step are then not fresh pages that the kernel must fault in and zero. Under mimalloc:
    ``MIMALLOC_PURGE_DELAY=-1`` at start. Under glibc (``mallopt``, once per process, lasting): every
    block from the heap, no trims. The benchmark step's training pass ran about twice as fast with it on a
    2-core VM, for 0.2–0.3 GB more peak RSS (README "Speed and memory"). false: the allocator's defaults,
    and under glibc free memory handed back to the OS between the phases of a step (lower RSS), unless an
    earlier trainer of the same process set it."""
    save_model: bool = True
    """Save the final policy with save_pretrained into output_dir/model, with a model card (README.md) and
    config.yaml."""
    report_to: list[str] = Field(default_factory=list)
    """Experiment trackers through Accelerate (`tensorboard`, `wandb`, `trackio`, `mlflow`, ...): every metrics.jsonl
    record and the resolved config as hyper-parameters; files under output_dir. W&B without a key runs offline."""
    push_to_hub: str | None = None
    """Hub model repo (`user/name`) to upload output_dir/model to at the end (needs a token; checked at start).
    `rlhf-pg push RUN_DIR REPO` does the same later."""


class RunConfig(_Section):
    output_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, samples.jsonl and the model go."""
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a run."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    imports: list[str] = Field(default_factory=list)
    """Your modules or files (`pkg.module`, `path/to/file.py`) imported before the recipe is validated: they
    register their own advantage estimators, policy losses, KL estimators or aggregations (see docs/architecture.md)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        a, b = self.algo, self.batch
        if self.model.critic_name is not None and self.model.critic != "separate":
            raise ValueError("model.critic_name needs model.critic=separate")
        if self.model.lora is not None and self.model.ref_name is not None:
            raise ValueError(
                "with model.lora the reference is the base model with the adapter disabled: remove model.ref_name"
            )
        if self.train.push_to_hub and not self.train.save_model:
            raise ValueError("train.push_to_hub uploads output_dir/model: set train.save_model=true")
        if a.kl_target is not None and a.kl_in != "reward":
            raise ValueError("algo.kl_target (adaptive KL) needs algo.kl_in=reward")
        if a.kl_target is not None and a.kl_coef == 0:
            raise ValueError("algo.kl_target needs a starting algo.kl_coef > 0")
        n = b.prompts_per_step * b.group_size
        if b.minibatch_size is not None and n % b.minibatch_size:
            raise ValueError(
                f"batch.minibatch_size={b.minibatch_size} does not divide the rollout of "
                f"{n} completions (batch.prompts_per_step × batch.group_size)"
            )
        return self


# Preset defaults per algo.name; the recipe and overrides win over these.
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"algo": dict(advantage="grpo", policy_loss="clip", kl_in="loss")},
    "rloo": {"algo": dict(advantage="rloo", policy_loss="clip", kl_in="reward", kl_estimator="k1")},
    "reinforce": {
        "algo": dict(
            advantage="reinforce",
            policy_loss="pg",
            kl_in="reward",
            kl_estimator="k1",
            reinforce={"reward_to_go": True, "baseline": "ema"},
        )
    },
    "ppo": {
        "algo": dict(
            advantage="gae",
            policy_loss="clip",
            kl_in="reward",
            kl_estimator="k1",
            gamma=1.0,
            gae={"lam": 0.95},
            whiten_advantages=True,
        ),
        "batch": dict(epochs=2),
    },
}
"""Each preset's defaults, per section. PPO's usual minibatches are a size of its rollout, so recipes set
batch.minibatch_size themselves (e.g. half the rollout for 2 optimizer steps per epoch)."""

RENAMED: dict[str, str] = {
    "rollout.prompts_per_step": "batch.prompts_per_step",
    "rollout.group_size": "batch.group_size",
    "rollout.eval_batch_size": "batch.eval_batch_size",
    "train.micro_batch_size": "batch.micro_batch_size",
    "algo.epochs": "batch.epochs",
    "algo.minibatches": "batch.minibatch_size (now completions per minibatch: the rollout size / minibatches)",
    "algo.scale": "algo.grpo.scale",
    "algo.reward_to_go": "algo.reinforce.reward_to_go",
    "algo.baseline": "algo.reinforce.baseline",
    "algo.ema_decay": "algo.reinforce.ema_decay",
    "algo.lam": "algo.gae.lam",
    "algo.clip_eps_low": "algo.clip.eps_low",
    "algo.clip_eps_high": "algo.clip.eps_high",
    "algo.dual_clip": "algo.clip.dual_clip",
    "algo.loss_agg_constant": "algo.constant.value",
}
"""Keys of earlier versions → where they live now (a recipe using one gets a one-line error)."""


def _check_renamed(tree: dict) -> None:
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            raise UserError(f"config key '{old}' was renamed: use '{new}'")


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``key='a.b'``, creating sections as needed."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise UserError(f"override '{key}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``['algo.kl_coef=0.02', 'train.max_steps=5']`` → nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not key=value (e.g. train.max_steps=5)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file '{path}' not found: pass the path of a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise UserError(f"recipe '{path}' is not valid YAML at {where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe '{path}' is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"recipe '{path}' must be a mapping of sections (model:, data:, ...), got {type(data).__name__}"
        )
    return data


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Known field names of the section at ``loc`` (for 'did you mean')."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        f = cls.model_fields.get(part)
        if f is None:
            return []
        ann = f.annotation
        inner = getattr(ann, "__args__", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            cls = inner[0]
        else:
            return []
    return list(cls.model_fields)


def _explain(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line for the first error; ``prefix``/``model``: the section that was validated (default the run)."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = prefix + ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        names = _field_names(model or RunConfig, loc)
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = (
            f" — did you mean '{prefix}{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?"
            if close
            else (f" — known keys here: {', '.join(names)}" if names else "")
        )
        return f"unknown config key '{key}'{hint}"
    if e["type"] == "value_error":
        msg = e["msg"].removeprefix("Value error, ")
        return msg if msg.startswith(("unknown config key", "config key")) else f"invalid config: {msg}"
    got = e.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"config key '{key}': {e['msg']}{got_s}"


def build_config(recipe: dict | None = None, overrides: dict | None = None) -> RunConfig:
    """Merge preset < recipe < overrides and validate; errors become one-line UserErrors."""
    tree = _merge(recipe or {}, overrides or {})
    _check_renamed(tree)
    imports = tree.get("imports") or []
    if not isinstance(imports, list) or not all(isinstance(x, str) for x in imports):
        raise UserError("config key 'imports' must be a list of module names or .py paths")
    if imports:
        from .user_code import import_plugins  # local: user code may import torch

        import_plugins(imports)
    algo = tree.get("algo")
    if algo is not None and not isinstance(algo, dict):
        raise UserError("config section 'algo' must be a mapping")
    name = (algo or {}).get("name", "grpo")
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        raise UserError(
            f"unknown algo.name '{name}'; choose one of {', '.join(PRESETS)}"
            + (f" (did you mean '{close[0]}'?)" if close else "")
        )
    tree = _merge(PRESETS[name], tree)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(_explain(err)) from None
    check_registries(cfg)
    return cfg


def check_registries(cfg: RunConfig) -> None:
    """What the selected registry entries need, read from their metadata (never from their names)."""
    from .core import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES  # local: keep config import light

    a = cfg.algo
    for reg, name in (
        (ADVANTAGES, a.advantage),
        (POLICY_LOSSES, a.policy_loss),
        (KL_ESTIMATORS, a.kl_estimator),
        (AGGREGATIONS, a.loss_agg),
    ):
        if name not in reg:
            raise UserError(reg.unknown_message(name))
    est = ADVANTAGES[a.advantage]
    need = est.group_size_needed(a.options(a.advantage))
    if cfg.batch.group_size < need:
        raise UserError(
            f"algo.advantage={a.advantage} compares samples of the same prompt (here at least {need}): "
            f"set batch.group_size >= {need}"
        )
    if cfg.model.critic == "separate" and not est.needs_values:
        raise UserError(
            f"model.critic=separate trains a value model, which algo.advantage={a.advantage} does not use: "
            "remove model.critic or use an estimator that needs values (algo.name=ppo)"
        )
    if est.needs_values and a.vf_coef == 0:
        raise UserError(f"algo.advantage={a.advantage} learns a value function: set algo.vf_coef > 0")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe file (or defaults when ``path`` is None) with ``key=value`` overrides."""
    recipe = read_yaml(path) if path is not None else {}
    return build_config(recipe, parse_overrides(overrides or []))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


@dataclass(frozen=True)
class BatchPlan:
    """The sizes of one RL step on ``world`` processes, derived from the ``batch`` section."""

    prompts: int
    group_size: int
    epochs: int
    minibatch_size: int
    micro_batch_size: int
    world: int
    micro_batch_tokens: int | None = None

    @property
    def rollout(self) -> int:
        """Completions per RL step (global)."""
        return self.prompts * self.group_size

    @property
    def minibatches(self) -> int:
        """Optimizer steps per epoch."""
        return self.rollout // self.minibatch_size

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per RL step."""
        return self.epochs * self.minibatches

    @property
    def _micro(self) -> str:
        if self.micro_batch_tokens is None:
            return str(self.micro_batch_size)
        return f"≤ {self.micro_batch_size} completions and ≤ {self.micro_batch_tokens} tokens"

    def describe(self) -> str:
        per = f" ({self.minibatch_size // self.world} per process)" if self.world > 1 else ""
        return (
            f"{self.rollout} completions = {self.prompts} prompts × {self.group_size}; "
            f"{self.epochs} epoch{'s' * (self.epochs > 1)} of {self.minibatches} minibatch"
            f"{'es' * (self.minibatches > 1)} of {self.minibatch_size}{per}; micro-batches of "
            f"{self._micro} per process; {self.optimizer_steps} optimizer step"
            f"{'s' * (self.optimizer_steps > 1)} per RL step"
        )


def check_backend_processes(cfg: RunConfig, world: int) -> None:
    """Refuse, in one line and before any model loads, a generation engine of its own (vllm) on several
    processes: each process would build its own engine on the same GPU, and no data-parallel engine layout is
    wired up (see :class:`rlhf_pg.backends.VLLMBackend`). Also for a launcher to call before it starts N processes."""
    if cfg.rollout.backend != "hf" and world > 1:
        raise UserError(
            f"rollout.backend={cfg.rollout.backend} runs one engine in one process (got {world} processes): "
            "launch one process or use rollout.backend=hf"
        )


def batch_plan(cfg: RunConfig, world: int) -> BatchPlan:
    """Check the batch section against the process count; one-line errors name the key to change."""
    b = cfg.batch
    if b.prompts_per_step % world:
        raise UserError(
            f"batch.prompts_per_step={b.prompts_per_step} is not divisible by the {world} processes: "
            f"choose a multiple of {world}"
        )
    mb = b.minibatch_size or b.prompts_per_step * b.group_size
    if mb % world:
        raise UserError(
            f"batch.minibatch_size={mb} is not divisible by the {world} processes (each process "
            f"takes an equal share of every minibatch): choose a multiple of {world}"
        )
    return BatchPlan(b.prompts_per_step, b.group_size, b.epochs, mb, b.micro_batch_size, world, b.micro_batch_tokens)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every option — the CLI's `config` listing."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, key + ".")
        else:
            default = f.get_default(call_default_factory=True)
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump() for d in default]
            rows.append((key, repr(default), f.description or ""))
    if model is AlgoConfig:
        from .core import REGISTRIES

        for reg in REGISTRIES:
            for name, entry in reg.items():
                if entry.options is not None:
                    rows += describe_fields(entry.options, f"{key.rsplit('.', 1)[0]}.{name}.")
    return rows
