"""The training loop. One step = rollout → rewards → (reference) → advantages → optimise → log.

    for step in range(max_steps):
        batch = rollout(policy, prompts)                        # G samples per prompt, log π_old
        batch.scores = Σ_k w_k · reward_k(prompts, completions)  # rewards.py
        batch.ref_logprobs = log π_ref(completions)              # only when β > 0
        r_t = scores on last token  (− β·KL_t if kl_in = reward)
        Â, R = ADVANTAGE_ESTIMATORS[algo.advantage](r, mask, values, G, algo)
        for epoch, minibatch:                                    # optimizer step per minibatch
            for micro-batch:                                     # gradient accumulation
                ℓ = POLICY_LOSSES[algo.policy_loss] (+ β·KL if kl_in = loss) − c_H·H
                backward(aggregate(ℓ) · world_size)              # normalised by GLOBAL counts
            clip grad norm, optimizer.step(), scheduler.step()

All the math lives in core.py; this file only moves tensors between the pieces. Accelerate owns the
devices, data parallelism and mixed precision even for one CPU process.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from contextlib import ExitStack
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import checkpoint, core
from .backends import HFBackend, make_backend, rollout_rows_with
from .batch import Batch
from .config import RunConfig, dump_config
from .data import load_prompt_dataset
from .distributed import describe_distributed, gathered_for_generation, sharding_kind
from .errors import UserError
from .models import PolicyWithValue, ValueModel, apply_lora, bitsandbytes_config, load_model, load_tokenizer
from .rewards import RewardSet, RewardSpec
from .rollout import SamplingParams, position_ids



def release_memory() -> None:
    """Hand freed heap memory back to the OS between phases (glibc ``malloc_trim``).

    On CPU, glibc keeps the freed activations of a phase (many medium-sized tensors, below its mmap
    threshold) in its heap; the next phase then peaks on top of them. Trimming at phase boundaries
    lowered the peak RSS of the benchmark step by ~1.3 GB at no measurable cost. A no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """Accelerator for this run. ``cpu=True`` when no GPU is present: without it, processes launched
    with ``accelerate launch``/``torchrun`` on a CPU machine never synchronise (each trains alone).
    ``train.mixed_precision`` unset (null) leaves the precision to the accelerate config / launch flags."""
    # explicit, also when unset: accelerate's state is a per-process singleton that would otherwise
    # keep the precision of an earlier Accelerator in this process
    precision = cfg.train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState._shared_state.get("num_processes", 1) == 1 \
            and AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # a second Trainer in one (non-distributed) process with another precision: accelerate
        # refuses to change its singleton state, so start it afresh (harmless with one process)
        AcceleratorState._reset_state()
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # no dataloader goes through prepare(): DeepSpeed cannot infer its "auto" sizes
        conf = ds.deepspeed_config
        conf["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        conf["gradient_accumulation_steps"] = 1  # the trainer accumulates micro-batches itself (no_sync)
        if cfg.train.max_grad_norm is not None:
            conf["gradient_clipping"] = cfg.train.max_grad_norm
    return acc


class Trainer:
    def __init__(self, cfg: RunConfig, accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        r = cfg.rollout
        if r.prompts_per_step % self.world:
            raise UserError(f"rollout.prompts_per_step={r.prompts_per_step} is not divisible by the "
                            f"{self.world} processes: choose a multiple of {self.world}")
        set_seed(cfg.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.out = Path(cfg.output_dir)

        dev, mc = self.acc.device, cfg.model
        with self.acc.main_process_first():  # one process converts/caches models and data, then the rest read
            self.tokenizer = load_tokenizer(mc.name)
            policy = load_model(mc.name, mc.dtype, dev, mc.trust_remote_code, mc.revision,
                                quantization_config=bitsandbytes_config(mc.lora))
        if mc.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
        if mc.lora is not None:
            policy = apply_lora(policy, mc.lora, mc.gradient_checkpointing)
        # The reference policy (β > 0 only): under LoRA the same weights with the adapter disabled,
        # otherwise a frozen copy of the initial (or ref_name) model.
        self.ref = None
        self.use_ref = cfg.algo.kl_coef > 0
        if self.use_ref and mc.lora is None:
            self.ref = load_model(mc.ref_name or mc.name, mc.dtype, dev, mc.trust_remote_code,
                                  mc.revision).eval().requires_grad_(False)

        d = cfg.data
        common = dict(tokenizer=self.tokenizer, prompt_column=d.prompt_column, system_prompt=d.system_prompt,
                      max_prompt_tokens=d.max_prompt_tokens, too_long=d.too_long, task_kwargs=d.task_kwargs,
                      seed=cfg.seed)
        self.train_data = load_prompt_dataset(d.train, d.train_split, **common)
        self.eval_data = load_prompt_dataset(d.eval or d.train, d.eval_split, limit=d.eval_limit, **common)

        self.rewards = RewardSet([RewardSpec(f.name, f.weight, dict(f.kwargs)) for f in cfg.rewards.functions],
                                 on_error=cfg.rewards.on_error, on_nonfinite=cfg.rewards.on_nonfinite,
                                 on_all_none=cfg.rewards.on_all_none, tokenizer=self.tokenizer)

        a, t = cfg.algo, cfg.train
        # Values V(s_t) for GAE: a head on the policy's backbone (shared) or a separate critic model.
        self.has_values = a.advantage == "gae"
        self.has_value_head = self.has_values and mc.critic == "shared"
        module = PolicyWithValue(policy) if self.has_value_head else policy
        critic = None
        if self.has_values and mc.critic == "separate":
            with self.acc.main_process_first():
                critic = ValueModel(load_model(mc.critic_name or mc.name, mc.dtype, dev, mc.trust_remote_code,
                                               mc.revision if mc.critic_name is None else None))
            if mc.gradient_checkpointing:
                critic.backbone.gradient_checkpointing_enable()
        self.opt_steps_per_rl_step = a.epochs * a.minibatches
        params = [p for m in (module, critic) if m is not None for p in m.parameters() if p.requires_grad]
        # fused: one kernel per step, and no temporaries the size of the model (a lower memory peak)
        fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay,
                                      fused=fused or None)
        sched_name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
        scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=t.warmup_steps,
                                  num_training_steps=max(1, t.max_steps * self.opt_steps_per_rl_step))
        self.critic = None
        if critic is None:
            self.model, self.optimizer, self.scheduler = self.acc.prepare(module, optimizer, scheduler)
        else:
            self.model, self.critic, self.optimizer, self.scheduler = self.acc.prepare(module, critic, optimizer,
                                                                                       scheduler)

        self.kl_ctl = core.AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target else None
        self.ema_baseline: float | None = None
        self.step_idx = 0
        self.nonfinite_streak = 0
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + self.rank)
        self.sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, list(r.stop))
        if r.backend != "hf" and self.world > 1:
            raise UserError(f"rollout.backend={r.backend} runs one engine in one process: launch one process "
                            "or use rollout.backend=hf")
        self.backend = make_backend(r.backend, self.policy, self.tokenizer, **r.backend_options)
        self._backend_stale = True  # an engine of its own needs the policy's weights before the first rollout

    # ------------------------------------------------------------------------------------ outputs
    def _prepare_output_dir(self) -> None:
        """Fresh run: refuse to clobber a previous one. Resume: load the latest complete checkpoint
        and cut metrics/samples back to what they held when it was written."""
        ckpt = checkpoint.latest_checkpoint(self.out) if self.cfg.train.resume else None
        if ckpt is not None and (ckpt / "engine").is_dir():  # written under FSDP / ZeRO-3
            self.acc.load_state(str(ckpt / "engine"))
            state = checkpoint.load_trainer_state(ckpt, self.rank, self.gen)
        elif ckpt is not None:
            state = checkpoint.load(ckpt, self._checkpointed_module(), self.optimizer, self.scheduler,
                                    self.rank, self.gen, trainable_only=self.cfg.model.lora is not None)
        if ckpt is not None:
            self.step_idx = state["step"]
            self.ema_baseline = state["ema_baseline"]
            if self.kl_ctl is not None:
                self.kl_ctl.load_state_dict(state["kl_ctl"])
            if self.acc.is_main_process:
                checkpoint.truncate_lines(self.out / "metrics.jsonl", state["metrics_lines"])
                checkpoint.truncate_lines(self.out / "samples.jsonl", state["samples_lines"])
            self._print(f"resumed from {ckpt} (step {self.step_idx})")
        elif (self.out / "metrics.jsonl").exists() and not (self.cfg.overwrite or self.cfg.train.resume):
            # checked on every process, so that none is left waiting for the others
            raise UserError(f"output_dir '{self.out}' already holds a run: resume it with --resume, "
                            "replace it with overwrite=true, or choose another output_dir")
        elif self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "samples.jsonl"):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(checkpoint.checkpoint_root(self.out), ignore_errors=True)
        if self.acc.is_main_process:
            (self.out / "config.yaml").write_text(dump_config(self.cfg))
        self.acc.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        """Atomically write everything needed to resume exactly at this step (see checkpoint.py)."""
        tmp = checkpoint.tmp_dir_for(self.out, self.step_idx)
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        checkpoint.save_process_rng(tmp, self.rank, self.gen)
        sharded = sharding_kind(self.model) != "none"
        if sharded:  # every rank writes its shards of model, optimizer and scheduler
            self.acc.save_state(str(tmp / "engine"))
        if self.acc.is_main_process:
            state = {"step": self.step_idx, "ema_baseline": self.ema_baseline,
                     "kl_ctl": self.kl_ctl.state_dict() if self.kl_ctl else None,
                     "metrics_lines": checkpoint.count_lines(self.out / "metrics.jsonl"),
                     "samples_lines": checkpoint.count_lines(self.out / "samples.jsonl")}
            if sharded:
                (tmp / "trainer.json").write_text(json.dumps(state))
            else:
                checkpoint.write_main(tmp, self._checkpointed_module(), self.optimizer, self.scheduler, state,
                                      trainable_only=self.cfg.model.lora is not None)
        self.acc.wait_for_everyone()
        final = checkpoint.checkpoint_root(self.out) / f"step_{self.step_idx:06d}"
        if self.acc.is_main_process:
            final = checkpoint.commit(self.out, self.step_idx, self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def _write_jsonl(self, name: str, rows: list[dict]) -> None:
        if self.acc.is_main_process and rows:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / name, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")

    def _checkpointed_module(self) -> torch.nn.Module:
        """What a checkpoint's model.safetensors holds: the trained module (and the critic)."""
        model = self.acc.unwrap_model(self.model)
        if self.critic is None:
            return model
        return torch.nn.ModuleDict({"policy": model, "critic": self.acc.unwrap_model(self.critic)})

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.model, self.critic) if m is not None for p in m.parameters() if p.requires_grad]

    @property
    def policy(self):
        """The bare Hugging Face model being trained (without DDP or the value head)."""
        m = self.acc.unwrap_model(self.model)
        return m.policy if isinstance(m, PolicyWithValue) else m

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value if self.kl_ctl else self.cfg.algo.kl_coef

    # ------------------------------------------------------------------------------------- data
    def _step_rows(self, step: int) -> list[int]:
        """Dataset rows for this process at RL step ``step``: a seeded permutation per epoch, the
        global step's prompts split contiguously across processes (a prompt's G samples stay here)."""
        n, P = len(self.train_data), self.cfg.rollout.prompts_per_step
        per_rank = P // self.world
        rows = []
        for g in range(step * P + self.rank * per_rank, step * P + (self.rank + 1) * per_rank):
            epoch, pos = divmod(g, n)
            perm = np.random.default_rng(self.cfg.seed + epoch).permutation(n)
            rows.append(int(perm[pos]))
        return rows

    # ---------------------------------------------------------------------------------- rollout
    def _rollout_uniforms(self, step: int) -> torch.Tensor:
        """This process's rows of the step's (P·G, max_new_tokens) sampling uniforms.

        They come from one generator seeded by (seed, step) and are sliced by global row, so a
        completion's random draws do not depend on the number of processes: N processes sample
        exactly what one process with the same global batch samples (the invariance test)."""
        r = self.cfg.rollout
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1_000_003 + step)
        u = torch.rand(r.prompts_per_step * r.group_size, r.max_new_tokens, generator=g)
        per_rank = r.prompts_per_step // self.world * r.group_size
        return u[self.rank * per_rank:(self.rank + 1) * per_rank].to(self.acc.device)

    def _rollout(self, data, rows: list[int], group_size: int, params: SamplingParams,
                 uniforms: torch.Tensor | None = None) -> Batch:
        """Sample; with ``uniforms`` (the training step's) by inverse CDF, else from ``self.gen``.
        Under ZeRO-3/FSDP the weights are gathered once for the whole rollout (not per token)."""
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if isinstance(self.backend, HFBackend):  # samples with the training module itself
                stack.enter_context(gathered_for_generation(self.acc, self.model))
                stack.enter_context(self.acc.autocast())
            return rollout_rows_with(self.backend, self.tokenizer, data, rows, group_size, params, uniforms, self.gen)

    def _score(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.rewards(batch.prompts, batch.completions, batch.completion_lists(), batch.columns,
                           prompt_text=batch.prompt_texts)
        dev = batch.completion_mask.device
        batch.scores = out.scores.to(dev)
        if out.token_rewards is not None:
            tr = out.token_rewards.to(dev)
            T = batch.completion_mask.shape[1]
            tr = torch.nn.functional.pad(tr, (0, max(0, T - tr.shape[1])))[:, :T]
            batch.token_rewards = tr * batch.completion_mask
        else:
            batch.token_rewards = core.place_scores(batch.scores, batch.completion_mask)
        return {k: v.to(dev) for k, v in out.per_function.items()}

    # -------------------------------------------------------------------------------- forward
    def _forward(self, model, mb: Batch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """log π(a_t|s_t), entropy (or None) and V(s_t) (or None without a value head), each (B, T).

        Padding is trimmed per micro-batch (leading prompt columns that are all padding, trailing
        completion columns past the longest completion) and logits are computed only over the
        completion positions (``logits_to_keep``). V(s_t) is read at the same positions as the
        logits that predict a_t.
        """
        T = mb.completion_ids.shape[1]
        p0 = int(mb.prompt_mask.any(0).float().argmax())
        t1 = int(mb.completion_mask.sum(-1).max().item())
        pids, pmask = mb.prompt_ids[:, p0:], mb.prompt_mask[:, p0:]
        cids, cmask = mb.completion_ids[:, :t1], mb.completion_mask[:, :t1].long()
        with self.acc.autocast():
            if self.cfg.train.shared_prefix and not self.cfg.model.gradient_checkpointing:
                logits, values = self._shared_prefix_forward(model, pids, pmask, cids, cmask)
            else:
                ids, attn = torch.cat([pids, cids], 1), torch.cat([pmask, cmask], 1)
                out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn),
                            logits_to_keep=t1 + 1, use_cache=False)
                logits = out.logits[:, :-1] if out.logits is not None else None  # None: a critic
                values = out["value_preds"][:, -(t1 + 1):-1] if "value_preds" in out else None
        logp = ent = None
        if logits is not None:
            logp, ent = core.token_logprobs(logits, cids, self.cfg.rollout.temperature, with_entropy,
                                            entropy_grad=self.cfg.algo.entropy_coef > 0)
        pad = lambda x: torch.nn.functional.pad(x.float(), (0, T - t1)) if x is not None else None  # noqa: E731
        return pad(logp), pad(ent), pad(values)

    @staticmethod
    def _shared_prefix_forward(model, pids, pmask, cids, cmask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, V) logits predicting each completion token (and (B, T) values), running each
        distinct prompt once.

        The G completions of a prompt attend to ONE copy of its keys/values: the prompt is run once
        (with gradients), its KV cache is indexed out to the rows (an index_select, differentiable),
        and the completions run on top of it. The gradient of all G completions flows back through
        the shared prompt pass; the result equals the padded full-sequence forward
        (tests/test_trainer.py checks logits and gradients) with (G−1)·P fewer token passes.
        """
        uniq, inv = torch.unique(pids, dim=0, return_inverse=True)  # (U, P), (B,)
        first = torch.empty(uniq.shape[0], dtype=torch.long, device=pids.device).scatter_(
            0, inv, torch.arange(pids.shape[0], device=pids.device))
        umask = pmask[first]  # identical prompts have identical masks
        pre = model(input_ids=uniq, attention_mask=umask, position_ids=position_ids(umask),
                    use_cache=True, logits_to_keep=1)
        has_logits = pre.logits is not None  # a separate critic has no LM head
        logits = pre.logits[:, -1][inv][:, None] if has_logits else None  # (B, 1, V): predicts token 0
        has_v = "value_preds" in pre
        values = pre["value_preds"][:, -1][inv][:, None] if has_v else None  # V(s_0)
        if cids.shape[1] == 1:
            return logits, values
        cache = pre.past_key_values
        cache.batch_select_indices(inv)  # (U, ...) → (B, ...)
        prompt_len = pmask.sum(-1, keepdim=True)  # (B, 1)
        steps = cids.shape[1] - 1
        pos = prompt_len + torch.arange(steps, device=cids.device)[None, :]  # (B, T−1)
        out = model(input_ids=cids[:, :steps], attention_mask=torch.cat([pmask, cmask[:, :steps]], 1),
                    position_ids=pos, past_key_values=cache, use_cache=True)
        if has_logits:
            logits = torch.cat([logits, out.logits], 1)
        if has_v:
            values = torch.cat([values, out["value_preds"]], 1)
        return logits, values

    @torch.no_grad()
    def _no_grad_pass(self, model, batch: Batch, what: int) -> torch.Tensor:
        """Log-probs (``what=0``) or values (``what=2``) of the whole batch, micro-batched, no grad."""
        mbs = self.cfg.train.micro_batch_size
        parts = [self._forward(model, batch.select(torch.arange(i, min(i + mbs, batch.size))), False)[what]
                 for i in range(0, batch.size, mbs)]
        return torch.cat(parts)

    def _reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """log π_ref of the batch: the reference model, or under LoRA the policy with its adapter off."""
        if self.ref is not None:
            with gathered_for_generation(self.acc, self.ref) as ref:  # a no-op unless ZeRO-3-partitioned
                return self._no_grad_pass(ref, batch, 0)
        with self.policy.disable_adapter():
            return self._no_grad_pass(self.policy, batch, 0)

    def _sum_global(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x.detach().clone(), reduction="sum") if self.world > 1 else x

    # ------------------------------------------------------------------------------------ step
    def step(self) -> dict[str, Any]:
        cfg, a = self.cfg, self.cfg.algo
        times: dict[str, float] = {}
        if self._backend_stale:  # a separate engine (vLLM) gets the weights of the last update
            with gathered_for_generation(self.acc, self.model) as m:
                self.backend.sync_weights(m.policy if isinstance(m, PolicyWithValue) else m)
            self._backend_stale = False
        t0 = time.perf_counter()
        batch = self._rollout(self.train_data, self._step_rows(self.step_idx), cfg.rollout.group_size, self.sampling,
                              self._rollout_uniforms(self.step_idx))
        mask = batch.completion_mask
        release_memory()
        if not self.backend.exact_logprobs:  # the engine's log-probs are not this model's: recompute
            batch.old_logprobs = self._no_grad_pass(self.acc.unwrap_model(self.model), batch, 0) * mask
        times["rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        per_fn = self._score(batch)
        times["rewards"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.use_ref:
            batch.ref_logprobs = self._reference_logprobs(batch)
            release_memory()
        times["reference"] = time.perf_counter() - t0

        metrics: dict[str, float] = {}
        if self.use_ref and a.kl_in == "reward":
            kl_tok = core.KL_ESTIMATORS[a.kl_estimator](batch.old_logprobs, batch.ref_logprobs) * mask
            batch.token_rewards = batch.token_rewards - self.kl_coef * kl_tok
            metrics["kl_ref"] = self._global_mean(kl_tok.sum(-1), torch.ones_like(batch.scores))
        if self.has_values:
            batch.values = self._no_grad_pass(self.acc.unwrap_model(self.critic or self.model), batch, 2) * mask
        if a.baseline == "ema" and a.advantage == "reinforce":
            ret0 = core.discounted_cumsum(batch.token_rewards, mask, a.gamma)[:, 0]
            b = self.ema_baseline if self.ema_baseline is not None else 0.0
            batch.values = torch.full_like(mask, b)
            mean_ret = self._global_mean(ret0, torch.ones_like(ret0))
            self.ema_baseline = mean_ret if self.ema_baseline is None else (
                a.ema_decay * self.ema_baseline + (1 - a.ema_decay) * mean_ret)
        adv, ret = core.ADVANTAGE_ESTIMATORS[a.advantage](batch.token_rewards, mask, batch.values,
                                                          batch.group_size, a)
        if a.whiten_advantages:
            adv = core.masked_whiten(adv, mask, reduce=self._sum_global)
        batch.advantages, batch.returns = adv, ret

        t0 = time.perf_counter()
        metrics.update(self._optimise(batch))
        release_memory()
        times["train"] = time.perf_counter() - t0
        if self.kl_ctl is not None and "kl_ref" in metrics:
            self.kl_ctl.update(metrics["kl_ref"], cfg.rollout.prompts_per_step * cfg.rollout.group_size)

        metrics.update(self._rollout_metrics(batch, per_fn))
        total = sum(times.values())
        metrics.update({f"time/{k}": v for k, v in times.items()})
        metrics["time/step"] = total
        n_tok = self._sum_global(mask.sum()).item()
        metrics["tokens_per_s"] = n_tok / max(times["rollout"], 1e-9)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["kl_coef"] = self.kl_coef
        self.step_idx += 1
        metrics["step"] = self.step_idx
        if cfg.train.samples_every and self.step_idx % cfg.train.samples_every == 0:
            self._write_samples(batch, per_fn)
        return metrics

    def _global_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        s = self._sum_global(torch.stack([core.masked_sum(x, mask), mask.sum()]).float())
        return (s[0] / s[1].clamp(min=1)).item()

    def _optimise(self, batch: Batch) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.algo
        on_policy = a.epochs == 1 and a.minibatches == 1
        mbs = cfg.train.micro_batch_size
        # Sums over every micro-batch (and process) for metrics: name -> [Σ value·mask, Σ mask].
        sums: dict[str, torch.Tensor] = {}

        def acc(name: str, x: torch.Tensor, m: torch.Tensor) -> None:
            v = torch.stack([core.masked_sum(x.detach().float(), m), m.sum()])
            sums[name] = sums[name] + v if name in sums else v

        grad_norms, losses, noise_stats = [], [], []
        for _ in range(a.epochs):
            order = torch.randperm(batch.size, generator=self.gen).to(batch.completion_mask.device)
            for mb_rows in order.chunk(a.minibatches):
                minibatch = batch.select(mb_rows)
                m_all = minibatch.completion_mask
                n_tok = self._sum_global(m_all.sum()).item()
                n_seq = self._sum_global(torch.tensor(float(minibatch.size), device=m_all.device)).item()
                chunks = list(range(0, minibatch.size, mbs))
                loss_total = 0.0
                noise = GradNoise(self._trainable_params(), a.loss_agg, n_tok, n_seq) \
                    if cfg.train.grad_noise_scale and len(chunks) > 1 and self.world == 1 else None
                for ci, start in enumerate(chunks):
                    mb = minibatch.select(torch.arange(start, min(start + mbs, minibatch.size)))
                    m = mb.completion_mask
                    sync = ci == len(chunks) - 1
                    with self._maybe_no_sync(sync):
                        logp, ent, values = self._forward(self.model, mb, with_entropy=True)
                        if self.critic is not None:
                            values = self._forward(self.critic, mb, with_entropy=False)[2]
                        old = logp.detach() if on_policy else mb.old_logprobs
                        pl, st = core.POLICY_LOSSES[a.policy_loss](logp, old, mb.advantages, m, a)
                        per_tok = pl if self.step_idx >= a.critic_warmup_steps else torch.zeros_like(pl)
                        if values is not None:
                            vl, vclip = core.value_loss(values, mb.values, mb.returns, a.value_clip)
                            per_tok = per_tok + a.vf_coef * vl
                            acc("value_loss", vl, m)
                            acc("value_clip_frac", vclip, m)
                        if self.use_ref:
                            kl = core.KL_ESTIMATORS[a.kl_estimator](logp, mb.ref_logprobs)
                            if a.kl_in == "loss":
                                per_tok = per_tok + self.kl_coef * kl
                            acc("kl", kl, m)
                        if a.entropy_coef > 0:
                            per_tok = per_tok - a.entropy_coef * ent
                        loss = core.aggregate(per_tok, m, a.loss_agg, num_tokens=n_tok, num_seqs=n_seq,
                                              constant=a.loss_agg_constant)
                        # DDP averages gradients over processes; the global normaliser already
                        # accounts for them, so undo the average.
                        self.acc.backward(loss * self.world)
                    if noise is not None:
                        noise.after_micro_batch(m)
                    loss_total += loss.item()
                    acc("entropy", ent, m)
                    acc("policy_loss", pl, m)
                    for k, v in st.items():
                        acc(k, v, m)
                release_memory()  # the activations are gone; the optimizer's peak should not sit on them
                if cfg.train.max_grad_norm is not None:
                    params = self.model.parameters() if self.critic is None else self._trainable_params()
                    gn = self.acc.clip_grad_norm_(params, cfg.train.max_grad_norm)
                else:
                    gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self._trainable_params()
                                        if p.grad is not None))
                grad_norms.append(float(gn))
                losses.append(loss_total)
                if noise is not None:
                    noise_stats.append(noise.estimate(float(gn)))
                if math.isfinite(float(gn)) and math.isfinite(self._mean_over_processes([loss_total])[0]):
                    self.optimizer.step()
                    self.scheduler.step()
                    self._backend_stale = True
                    self.nonfinite_streak = 0
                else:
                    self._skip_nonfinite_update(float(gn), loss_total)
                self.optimizer.zero_grad(set_to_none=True)

        out = {}
        for name, v in sums.items():
            v = self._sum_global(v)
            out[name] = (v[0] / v[1].clamp(min=1)).item()
        out["loss"] = float(np.mean(self._mean_over_processes(losses)))
        out["grad_norm"] = float(np.mean(grad_norms))
        if noise_stats:
            out["grad_noise_scale"] = float(np.mean([b for b, _ in noise_stats]))
            out["grad_snr"] = float(np.mean([r for _, r in noise_stats]))
        return out

    def _maybe_no_sync(self, sync: bool):
        """Inside gradient accumulation (not the last micro-batch): skip DDP's all-reduce, and tell
        DeepSpeed (whose engine steps inside ``backward`` at a sync boundary) this is no boundary."""
        stack = ExitStack()
        if not sync:
            for m in (self.model, self.critic):
                if m is not None:
                    stack.enter_context(self.acc.no_sync(m))
            self.acc.sync_gradients = False
            stack.callback(setattr, self.acc, "sync_gradients", True)
        return stack

    def _skip_nonfinite_update(self, grad_norm: float, loss: float) -> None:
        self.nonfinite_streak += 1
        limit = self.cfg.train.max_nonfinite_steps
        self._print(f"warning: step {self.step_idx + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                    f"update skipped ({self.nonfinite_streak}/{limit} in a row)")
        if self.nonfinite_streak >= limit:
            path = self.save_checkpoint()
            raise UserError(f"training diverged: {limit} consecutive updates with non-finite loss or gradients; "
                            f"the last good state is saved in {path} — lower train.lr or set train.max_grad_norm, "
                            "then continue with --resume")

    def _mean_over_processes(self, xs: list[float]) -> list[float]:
        if self.world == 1:
            return xs
        t = self._sum_global(torch.tensor(xs, device=self.acc.device)) / self.world
        return t.tolist()

    def _rollout_metrics(self, batch: Batch, per_fn: dict[str, torch.Tensor]) -> dict[str, float]:
        mask = batch.completion_mask
        lengths = mask.sum(-1)
        scores = self.acc.gather(batch.scores) if self.world > 1 else batch.scores
        lens = self.acc.gather(lengths) if self.world > 1 else lengths
        g = scores.view(-1, batch.group_size)
        m = {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if scores.numel() > 1 else 0.0,
            "frac_zero_std_groups": (g.std(1) < 1e-6).float().mean().item() if batch.group_size > 1 else 0.0,
            "completion_len": lens.mean().item(),
            "completion_len_max": lens.max().item(),
            "eos_frac": self._global_mean((batch.completion_ids.gather(1, core.last_token_index(mask)[:, None])
                                           .squeeze(1) == self.tokenizer.eos_token_id).float(), torch.ones_like(lengths)),
            "advantage_mean": self._global_mean(batch.advantages, mask),
            "advantage_std": math.sqrt(max(0.0, self._global_mean(batch.advantages ** 2, mask)
                                           - self._global_mean(batch.advantages, mask) ** 2)),
            "return_mean": self._global_mean(batch.returns, mask),
        }
        if batch.values is not None and self.has_values:
            # explained variance 1 − Var[R − V]/Var[R] with global (all-process) moments
            moments = [self._global_mean(x, mask) for x in
                       (batch.returns, batch.returns ** 2, batch.returns - batch.values, (batch.returns - batch.values) ** 2)]
            var_r, var_d = moments[1] - moments[0] ** 2, moments[3] - moments[2] ** 2
            m["explained_variance"] = 1.0 - var_d / max(var_r, 1e-8)
            m["value_mean"] = self._global_mean(batch.values, mask)
        for name, v in per_fn.items():
            ok = ~torch.isnan(v)
            m[f"reward/{name}"] = self._global_mean(torch.nan_to_num(v), ok.float())
        return m

    def _write_samples(self, batch: Batch, per_fn: dict[str, torch.Tensor]) -> None:
        rows = []
        first_adv = batch.advantages[:, 0].tolist()
        for i in range(batch.size):
            p = batch.prompts[i]
            rows.append({
                "step": self.step_idx,
                "prompt": p if isinstance(p, str) else p[-1]["content"],
                "completion": batch.completions[i],
                "reward": batch.scores[i].item(),
                **{f"reward/{k}": (None if math.isnan(v[i].item()) else v[i].item()) for k, v in per_fn.items()},
                "advantage": first_adv[i],
            })
        rows = self._gather_objects(rows)
        self._write_jsonl("samples.jsonl", rows)

    def _gather_objects(self, rows: list) -> list:
        if self.world == 1:
            return rows
        from accelerate.utils import gather_object

        return gather_object(rows)

    # ---------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy decoding on the held-out split, sharded across processes (see rlhf_pg/evaluate.py):
        mean reward, reward per function, and accuracy when the data has an `answer` column."""
        from .evaluate import evaluate_policy

        r = self.cfg.rollout
        with gathered_for_generation(self.acc, self.model) as m, self.acc.autocast():
            res = evaluate_policy(m.policy if isinstance(m, PolicyWithValue) else m, self.tokenizer, self.eval_data, self.rewards,
                                  max_new_tokens=r.max_new_tokens, batch_size=r.eval_batch_size,
                                  stop=list(r.stop), shard=(self.rank, self.world), reduce=self._sum_global)
        return {**res.metrics, "step": self.step_idx}

    # ---------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self._prepare_output_dir()
        a = cfg.algo
        self._print(f"algorithm {a.name}: " + ", ".join(f"{k}={v}" for k, v in a.model_dump().items() if k != "name")
                    + f" | G={cfg.rollout.group_size}, prompts/step={cfg.rollout.prompts_per_step}, "
                    f"{describe_distributed(self.acc)}, values={self._values_desc()}, reference={self._ref_desc()}"
                    + (f", LoRA r={cfg.model.lora.r} ({self._n_trainable()} trainable parameters)"
                       if cfg.model.lora else ""))
        history: dict[str, Any] = {}
        if self.step_idx == 0 and cfg.train.eval_at_start:
            history["eval_start"] = ev = self.evaluate()
            self._write_jsonl("metrics.jsonl", [ev])
            self._print("eval at step 0: " + _fmt(ev))
        elif self.step_idx > 0:
            history["eval_start"] = self._logged_eval(step=0)
        stop = self._install_signal_handlers()
        bar = tqdm(total=cfg.train.max_steps, initial=self.step_idx, desc="train",
                   disable=not self.acc.is_main_process, dynamic_ncols=True)
        try:
            while self.step_idx < cfg.train.max_steps:
                m = self.step()
                self._write_jsonl("metrics.jsonl", [m])
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m.get('kl', 0.0):.4f}",
                                len=f"{m['completion_len']:.0f}")
                if cfg.train.eval_every and self.step_idx % cfg.train.eval_every == 0 \
                        and self.step_idx < cfg.train.max_steps:
                    self._write_jsonl("metrics.jsonl", [self.evaluate()])
                if self._any_process(stop):
                    path = self.save_checkpoint()
                    raise Interrupted(self.step_idx, path, stop[0])
                if cfg.train.save_every and self.step_idx % cfg.train.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            self._restore_signal_handlers()
        if self.step_idx > 0 and (not cfg.train.save_every or self.step_idx % cfg.train.save_every):
            self.save_checkpoint()  # the final state, before the (repeatable) end-of-run eval
        history["eval_end"] = ev = self.evaluate()
        self._write_jsonl("metrics.jsonl", [ev])
        self._print(f"eval at step {self.step_idx}: " + _fmt(ev))
        if cfg.train.save_model:
            self.save(self.out / "model")
        return history

    # ------------------------------------------------------------------------- stops and signals
    def _install_signal_handlers(self) -> list[int]:
        """SIGINT/SIGTERM finish the current step, write a checkpoint and stop. A second signal
        stops at once (the latest checkpoint is still there)."""
        stop: list[int] = []
        self._old_handlers = {}

        def handler(signum, frame):
            if stop:
                raise KeyboardInterrupt
            stop.append(signum)
            self._print(f"\nreceived {signal.Signals(signum).name}: finishing step {self.step_idx + 1}, "
                        "then writing a checkpoint (send again to stop at once)")

        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, handler)
        return stop

    def _restore_signal_handlers(self) -> None:
        for sig, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, h)

    def _any_process(self, stop: list[int]) -> bool:
        flag = torch.tensor(float(bool(stop)), device=self.acc.device)
        return bool(self._sum_global(flag).item() > 0)

    def _logged_eval(self, step: int) -> dict | None:
        path = self.out / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            rec = json.loads(line)
            if "eval/n" in rec and rec["step"] == step:
                return rec
        return None

    def save(self, path: Path) -> None:
        """The policy with save_pretrained (under LoRA: the adapter, loadable with peft, and with
        ``model.lora.save_merged`` the merged model in ``path/merged``), its tokenizer, the value
        head (``value_head.safetensors``) or the separate critic (``path/critic``)."""
        self.acc.wait_for_everyone()
        model = self.policy
        # Under FSDP/ZeRO-3 each rank holds a shard: gather one full state dict (all ranks take part).
        sharded = sharding_kind(self.model) != "none"
        full = self.acc.get_state_dict(self.model) if sharded else None
        critic_full = self.acc.get_state_dict(self.critic) if sharded and self.critic is not None else None
        if self.acc.is_main_process:
            model.config.use_cache = True
            # the policy, or the policy + value_head.safetensors (PolicyWithValue.save_pretrained)
            self.acc.unwrap_model(self.model).save_pretrained(path, state_dict=full)
            self.tokenizer.save_pretrained(path)
            lora = self.cfg.model.lora
            if lora is not None and lora.save_merged:
                import copy

                merged = copy.deepcopy(model).merge_and_unload()  # a copy: the trainer's model keeps its adapter
                merged.save_pretrained(path / "merged", safe_serialization=True)
                self.tokenizer.save_pretrained(path / "merged")
                del merged
            model.config.use_cache = False
            if self.critic is not None:
                self.acc.unwrap_model(self.critic).save_pretrained(path / "critic", state_dict=critic_full)
        self.acc.wait_for_everyone()

    def _values_desc(self) -> str:
        return "separate critic" if self.critic is not None else "head on the policy" if self.has_value_head else "none"

    def _ref_desc(self) -> str:
        return "none" if not self.use_ref else "policy with the LoRA adapter disabled" if self.ref is None else "frozen model"

    def _n_trainable(self) -> str:
        n = sum(p.numel() for p in self._trainable_params())
        return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n}"

    def _print(self, msg: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(msg)


class GradNoise:
    """Gradient noise scale from the micro-batches of one minibatch (McCandlish et al. 2018, App. A).

    Each micro-batch i adds Δ_i to the accumulated gradient; Δ_i·N/n_i is that micro-batch's own
    gradient estimate g_i (n_i its tokens or sequences — the aggregation's unit — N the minibatch's).
    With b = mean n_i and G the minibatch gradient (size N):
        |𝒢|² ≈ (N|G|² − b·mean|g_i|²)/(N − b),   tr Σ ≈ (mean|g_i|² − |G|²)/(1/b − 1/N)
    B_simple = tr Σ / |𝒢|² (in the aggregation's unit) and the minibatch SNR = |𝒢|² / (tr Σ / N).
    Both are unbiased-ish estimates from few micro-batches: when noise dominates, the |𝒢|² estimate
    (and so both numbers) can come out negative. Costs one copy of the gradients per micro-batch;
    single process only.
    """

    def __init__(self, params, loss_agg: str, n_tok: float, n_seq: float):
        self.params = [p for p in params if p.requires_grad]
        self.by_tokens = loss_agg == "token-mean"
        self.N = n_tok if self.by_tokens else n_seq
        self.prev = [torch.zeros_like(p) for p in self.params]
        self.sq, self.sizes = [], []

    def after_micro_batch(self, mask: torch.Tensor) -> None:
        n = float(mask.sum()) if self.by_tokens else float(mask.shape[0])
        sq = 0.0
        for p, prev in zip(self.params, self.prev):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            sq += float(((g - prev).float() ** 2).sum())
            prev.copy_(g)
        self.sq.append(sq * (self.N / n) ** 2)
        self.sizes.append(n)

    def estimate(self, full_norm: float) -> tuple[float, float]:
        b, N, small, big = float(np.mean(self.sizes)), self.N, float(np.mean(self.sq)), full_norm ** 2
        g2 = (N * big - b * small) / (N - b)
        trace = (small - big) / (1 / b - 1 / N)
        return trace / g2 if g2 else float("nan"), g2 * N / trace if trace else float("nan")


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a step; a checkpoint was written."""

    def __init__(self, step: int, path: Path, signum: int):
        super().__init__(f"stopped after step {step}; checkpoint {path}")
        self.step, self.path, self.signum = step, path, signum


def _fmt(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("eval/accuracy", "eval/reward", "eval/completion_len") if k in metrics]
    return ", ".join(f"{k.removeprefix('eval/')}={metrics[k]:.3f}" for k in keys) + f" (n={metrics['eval/n']})"
