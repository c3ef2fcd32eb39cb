"""The training loop. One RL step = rollout → rewards → reference → values → advantages → optimise → log.

    for step in range(max_steps):
        batch = sample(backend, prompts(step))               # G completions per prompt, log π_old
        batch.scores, r_t = rewards(batch)                   # rewards.score_batch: r_t on the last token
        batch.ref_logprobs = log π_ref(batch)                # only when β > 0
        r_t −= β·KL_t                                        # when algo.kl_in = reward
        batch.values = V(s_t)                                # only for estimators that need values
        Â, R, b = ADVANTAGES[algo.advantage](r, mask, V, G)  # core.py
        for epoch, minibatch:                                # one optimizer step per minibatch
            for micro-batch:                                 # gradient accumulation
                ℓ = POLICY_LOSSES[·] + c_V·ℓ_V (+ β·KL_t if kl_in = loss) − c_H·H
                backward(AGGREGATIONS[·](ℓ) · world_size)    # normalised by GLOBAL counts
            clip grad norm, optimizer.step(), scheduler.step()

All the math lives in core.py; this file only moves tensors between its pieces. What the loop is
handed — models, optimizer, data, rewards, backend — is built by setup.py; the passes over a batch
are forward.py; logging is metrics.py; the run directory (resume, checkpoints, final save) is
run_dir.py; which rows and random numbers a step uses is order.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import TrainerState

from . import core, memory, order, setup
from . import metrics as metrics_mod
from .batch import Batch
from .config import RunConfig
from .distributed import accumulation_boundary, gathered_for_generation
from .errors import UserError
from .faults import fault
from .forward import forward, forward_no_grad, weight_casts_kept
from .memory import release_memory
from .metrics import GradNoise, MetricSums, Reducer, format_eval, rollout_metrics, sample_rows
from .rewards import score_batch
from .rollout import SamplingParams, sample
from .run_dir import Interrupted, RunDir, StopSignals


class Trainer:
    def __init__(self, cfg: RunConfig, accelerator: Accelerator | None = None):
        self.cfg = cfg
        set_seed(cfg.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.heap = memory.configure(cfg.train.allocator, cfg.train.reuse_freed_memory)
        c = self.components = setup.build(cfg, accelerator)
        self.acc: Accelerator = c.acc
        self.model, self.critic, self.ref = c.model, c.critic, c.ref
        self.optimizer, self.scheduler = c.optimizer, c.scheduler
        self.tokenizer, self.rewards, self.backend = c.tokenizer, c.rewards, c.backend
        self.train_data, self.eval_data = c.train_data, c.eval_data
        self.plan, self.algo, self.passes = c.plan, c.algo, c.passes
        self.is_correction = cfg.rollout.is_correction_for(self.backend.exact_logprobs)
        self.n_params = metrics_mod.count_params(self.acc.unwrap_model(self.model))  # the FLOP accounting's N
        self.n_trained = self.n_params + metrics_mod.count_params(self.critic)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.reduce = Reducer(self.acc)
        self.run = RunDir(cfg, c)
        self.use_ref = cfg.algo.kl_coef > 0
        self.step_idx = 0
        self.nonfinite_streak = 0
        self.no_signal_steps = 0  # steps (since this process started) whose advantages were all 0
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + self.rank)
        r = cfg.rollout
        self.episodes = c.episodes
        self.sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, setup.stop_strings(cfg))
        self.draws_per_row = r.max_episode_tokens if c.episodes is not None else r.max_new_tokens
        self._backend_stale = True  # an engine of its own needs the policy's weights before the first rollout

    @property
    def policy(self) -> torch.nn.Module:
        """The bare Hugging Face model being trained (without DDP or the value head)."""
        return setup.bare_policy(self.acc, self.model)

    @property
    def kl_coef(self) -> float:
        return self.algo.kl_ctl.value if self.algo.kl_ctl else self.cfg.algo.kl_coef

    def trainer_state(self) -> TrainerState:
        """What reward functions get as ``trainer_state`` (TRL's keyword): RL steps done and planned."""
        return TrainerState(global_step=self.step_idx, max_steps=self.cfg.train.max_steps)

    def _due(self, every: int) -> bool:
        """Whether a job done every ``every`` steps (0 = never) is due after the current step."""
        return bool(every) and self.step_idx % every == 0

    # ---------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        try:
            state = self.run.prepare(self.gen)
            if state is not None:
                self.load_state_dict(state)
            self.run.start_trackers()
            try:
                return self._train()
            finally:
                self.run.end_trackers()
        finally:
            self.run.release()  # the output_dir lock

    def _train(self) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        run.print(setup.describe(cfg, self.components) + f"\nC heap: {self.heap}")
        history: dict[str, Any] = {}
        if self.step_idx == 0 and cfg.train.eval_at_start:
            history["eval_start"] = ev = self.evaluate()
            run.log(ev)
            run.print("eval at step 0: " + format_eval(ev))
        elif self.step_idx > 0:
            history["eval_start"] = run.logged_eval(step=0)
        with StopSignals(run.print) as stop, run.progress(cfg.train.max_steps, self.step_idx) as bar:
            while self.step_idx < cfg.train.max_steps:
                stop.step = self.step_idx
                m = self.step()
                run.log(m)
                bar.show(m)
                if self._due(cfg.train.eval_every) and self.step_idx < cfg.train.max_steps:
                    run.log(self.evaluate())
                if self.reduce.any(bool(stop.received)):
                    raise Interrupted(self.step_idx, self.save_checkpoint(), stop.received[0])
                if self._due(cfg.train.save_every):
                    self.save_checkpoint()
        if self.no_signal_steps:
            n = self.no_signal_steps
            run.print(
                f"warning: {n} step(s) ({n / max(cfg.train.max_steps, 1):.0%} of max_steps) had no learning signal "
                "(all advantages 0): the rewards do not separate the samples — a reward with more spread, a larger "
                "batch.group_size or a higher rollout.temperature helps"
            )
        if self.step_idx > 0 and not self._due(cfg.train.save_every):
            self.save_checkpoint()  # the final state, before the (repeatable) end-of-run eval
        history["eval_end"] = ev = self.evaluate()
        run.log(ev)
        run.print(f"eval at step {self.step_idx}: " + format_eval(ev))
        if cfg.train.save_model:
            run.save_model(run.out / "model", history, self.step_idx)
        return history

    # ----------------------------------------------------------------------------------- step
    def step(self) -> dict[str, Any]:
        cfg, a = self.cfg, self.cfg.algo
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        batch = self.rollout()
        mask = batch.action_mask  # (B, T) 1 on actions (model tokens)
        if not self.backend.exact_logprobs:  # the engine's log-probs are not this model's: recompute
            batch.sampler_logprobs = batch.old_logprobs  # kept: the IS correction weighs π_old against them
            batch.old_logprobs = self.logprobs(self.acc.unwrap_model(self.model), batch) * mask
        times["rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        out = score_batch(self.rewards, batch, self.trainer_state())  # scores, (B, T) token rewards, per function
        batch.reward_extra = out.extra_columns  # what the functions logged with log_extra(...)
        times["rewards"] = time.perf_counter() - t0

        metrics: dict[str, float] = {}
        times["reference"] = 0.0  # exactly 0 when no reference pass runs (β = 0)
        if self.use_ref:
            t0 = time.perf_counter()
            batch.ref_logprobs = self.reference_logprobs(batch)
            release_memory()
            times["reference"] = time.perf_counter() - t0
        if self.use_ref and a.kl_in == "reward":
            kl_tok = self.algo.kl.fn(batch.old_logprobs, batch.ref_logprobs) * mask  # (B, T)
            batch.token_rewards = batch.token_rewards - self.kl_coef * kl_tok
            metrics["kl_ref"] = self.reduce.mean(kl_tok.sum(-1), torch.ones_like(batch.scores))
        if self.is_correction is not None:
            metrics.update(self._importance_weights(batch))
        if self.algo.advantage.needs_values:
            batch.values = self.values(batch) * mask
        self.compute_advantages(batch)
        metrics["no_signal"] = float(not self.reduce.any(bool((batch.advantages * mask).abs().max() > 0)))
        self._warn_no_signal(metrics["no_signal"])

        t0 = time.perf_counter()
        metrics.update(self.optimise(batch))
        fault("step-after-update", self.step_idx + 1)  # weights updated, the step not yet logged
        release_memory()
        times["train"] = time.perf_counter() - t0
        if self.algo.kl_ctl is not None and "kl_ref" in metrics:
            self.algo.kl_ctl.update(metrics["kl_ref"], self.plan.rollout)

        metrics.update(rollout_metrics(batch, self.reduce, self.tokenizer.eos_token_id))
        metrics.update({f"time/{k}": v for k, v in times.items()}, **{"time/step": sum(times.values())})
        metrics["tokens_per_s"] = self.reduce.sum(mask.sum()).item() / max(times["rollout"], 1e-9)
        metrics.update(self._perf(batch, times))
        metrics.update(lr=self.scheduler.get_last_lr()[0], kl_coef=self.kl_coef, step=self.step_idx + 1)
        logged = self.reduce.mean_of_logged(out.logged_metrics)  # the functions' log_metric(name, value)
        metrics.update({k if k not in metrics else f"user/{k}": v for k, v in logged.items()})
        self.step_idx += 1
        if self._due(cfg.train.samples_every):
            self.run.log_samples(self.reduce.gather_objects(sample_rows(batch, self.step_idx)), self.step_idx)
        return metrics

    def _perf(self, batch: Batch, times: dict[str, float]) -> dict[str, float]:
        """Achieved GFLOP/s of each phase (and the step) by the FLOPs it needs (metrics.step_flops: the
        accounting of the benchmark), and the distinct tokens they were counted on: the run's utilisation,
        without running the benchmark (divide by the machine's matmul peak for an MFU)."""
        prompt = batch.prompt_mask[:: batch.group_size].sum()  # each distinct prompt once per group
        counts = self.reduce.sum(torch.stack([prompt, batch.completion_mask.sum()]).float()).tolist()
        fl = metrics_mod.step_flops(
            self.n_params, *counts, reference=self.use_ref, epochs=self.plan.epochs, n_trained=self.n_trained
        )
        phases = {"rollout": times["rollout"], "reference": times["reference"], "train": times["train"]}
        phases["step"] = sum(times.values())  # the whole step, reward functions included
        out = {"perf/tokens": counts[0] + counts[1]}
        for k, t in phases.items():
            if fl[k]:
                out[f"perf/{k}_gflops"] = fl[k] / max(t, 1e-9) / 1e9
        return out

    def _importance_weights(self, batch: Batch) -> dict[str, float]:
        """``batch.is_weights`` = π_old/μ of the sampled tokens (rollout.is_correction) and the ratio's
        metrics: mean, max, and the shares truncated (above is_cap) and masked (dropped)."""
        mask = batch.action_mask
        sampler = batch.sampler_logprobs if batch.sampler_logprobs is not None else batch.old_logprobs
        batch.is_weights, stats = core.importance_weights(batch.old_logprobs - sampler, mask, self.is_correction)
        out = {f"is/{k}" + ("_mean" if k == "ratio" else ""): self.reduce.mean(v, m) for k, (v, m) in stats.items()}
        ratio, units = stats["ratio"]
        top = ratio.masked_fill(units == 0, float("-inf")).max().reshape(1)
        out["is/ratio_max"] = self.reduce.gather(top).max().item()
        return out

    def rollout(self, step: int | None = None) -> Batch:
        """The rollout of RL step ``step`` (default: the next one): this process's prompts, each
        sampled G times with the step's uniforms (so N processes sample what one process samples)."""
        step = self.step_idx if step is None else step
        if self._backend_stale:  # a separate engine (vLLM) gets the weights of the last update
            with gathered_for_generation(self.acc, self.model) as m:
                self.backend.sync_weights(setup.bare_policy(self.acc, m))
            self._backend_stale = False
        b = self.cfg.batch
        rows = order.step_rows(len(self.train_data), b.prompts_per_step, self.cfg.seed, step, self.rank, self.world)
        u = order.rollout_uniforms(
            self.cfg.seed, step, self.plan.rollout, self.draws_per_row, self.rank, self.world, self.acc.device
        )
        batch = sample(
            self.backend, self.tokenizer, self.train_data, rows, b.group_size, self.sampling, u, episodes=self.episodes
        )
        release_memory()
        return batch

    def micro_batches(self, batch: Batch) -> list[torch.Tensor]:
        """Row indices of each micro-batch of ``batch`` (a minibatch, or a whole batch for the passes without
        gradients): ``batch.micro_batch_size`` completions, within ``batch.micro_batch_tokens`` tokens when set,
        as many on every process (order.micro_batches)."""
        b = self.cfg.batch
        count_max = None
        if self.world > 1 and b.micro_batch_tokens is not None:

            def count_max(n: int) -> int:
                return int(self.reduce.gather(torch.tensor([n], device=self.acc.device)).max().item())

        return order.micro_batches(
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_mask,
            b.micro_batch_size,
            b.micro_batch_tokens,
            count_max,
        )

    def _no_grad_pass(self, model, batch: Batch):
        """:func:`forward_no_grad` of ``model`` over ``batch``, in this run's micro-batches."""
        return forward_no_grad(model, batch, self.passes, self.micro_batches(batch))

    def logprobs(self, model, batch: Batch) -> torch.Tensor:
        """(B, T) log π(a_t|s_t) of ``model`` (no gradients, micro-batched)."""
        return self._no_grad_pass(model, batch).logprobs

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """(B, T) log π_ref: the reference model, or under LoRA the policy with its adapter off."""
        if self.ref is not None:
            with gathered_for_generation(self.acc, self.ref) as ref:  # a no-op unless ZeRO-3-partitioned
                return self.logprobs(ref, batch)
        with self.policy.disable_adapter():
            return self.logprobs(self.policy, batch)

    def values(self, batch: Batch) -> torch.Tensor:
        """(B, T) V(s_t) from the value head or the separate critic (no gradients)."""
        model = self.acc.unwrap_model(self.critic or self.model)
        return self._no_grad_pass(model, batch).values

    def compute_advantages(self, batch: Batch) -> None:
        """Fill ``advantages``, ``returns`` and ``baseline`` with the configured estimator (+ whitening).

        The estimator sees each row's action tokens only, as consecutive steps (core.ActionIndex):
        in an episode the environment's tokens between turns are not time steps."""
        a, est = self.cfg.algo, self.algo.advantage
        acts = core.ActionIndex.of(batch.action_mask)
        x = core.AdvantageInputs(
            acts.compact(batch.token_rewards),
            acts.mask,
            batch.group_size,
            a.gamma,
            values=acts.compact(batch.values) if batch.values is not None else None,
            reduce=self.reduce.sum,
        )
        out = est.fn(x, self.algo.advantage_opts, self.algo.advantage_state)
        adv = out.advantages
        if a.whiten_advantages:
            adv = core.masked_whiten(adv, acts.mask, reduce=self.reduce.sum)
        batch.advantages, batch.returns = acts.expand(adv), acts.expand(out.returns)
        batch.baseline = acts.expand(out.baseline) if out.baseline is not None else None

    # ---------------------------------------------------------------------------- optimisation
    def optimise(self, batch: Batch) -> dict[str, float]:
        """``epochs`` passes of minibatches over the batch; one optimizer step per minibatch."""
        p = self.plan
        sums = MetricSums()
        grad_norms, losses, noise_stats = [], [], []
        for epoch in range(p.epochs):
            parts = order.minibatch_partition(
                self.cfg.seed, self.step_idx, epoch, p.rollout, p.minibatches, self.rank, self.world
            )
            for rows in parts:
                gn, loss, noise = self.optimizer_step(batch.select(rows.to(batch.completion_mask.device)), sums)
                grad_norms.append(gn)
                losses.append(loss)
                if noise is not None:
                    noise_stats.append(noise)
        out = sums.means(self.reduce)
        # each process's loss is its share of the globally normalised minibatch loss: the loss is their sum
        out["loss"] = float(np.mean(self.reduce.sum(torch.tensor(losses, device=self.acc.device)).tolist()))
        out["grad_norm"] = float(np.mean(grad_norms))
        if noise_stats:
            out["grad_noise_scale"] = float(np.mean([b for b, _ in noise_stats]))
            out["grad_snr"] = float(np.mean([r for _, r in noise_stats]))
        return out

    def optimizer_step(self, minibatch: Batch, sums: MetricSums) -> tuple[float, float, tuple | None]:
        """Accumulate the minibatch's gradient over micro-batches, clip, step. Returns (grad norm,
        loss, gradient-noise estimate or None)."""
        cfg = self.cfg
        m_all = minibatch.action_mask
        n = core.Normalisers(
            num_tokens=self.reduce.sum(m_all.sum()).item(),
            num_seqs=self.reduce.sum(torch.tensor(float(minibatch.size), device=m_all.device)).item(),
            max_tokens=cfg.rollout.max_new_tokens,
        )
        parts = self.micro_batches(minibatch)
        noise = (
            GradNoise(self._trainable_params(), self.algo.aggregation.unit, n.num_tokens, n.num_seqs)
            if cfg.train.grad_noise_scale and len(parts) > 1 and self.world == 1
            else None
        )
        loss_total = 0.0
        with weight_casts_kept(self.model, self.critic):  # autocast casts each weight once per update
            for i, rows in enumerate(parts):
                mb = minibatch.select(rows.to(m_all.device))
                with accumulation_boundary(self.acc, (self.model, self.critic), sync=i == len(parts) - 1):
                    loss = self.micro_batch_loss(mb, n, sums)
                    # DDP averages gradients over processes; the global normaliser already accounts for
                    # them, so undo the average.
                    self.acc.backward(loss * self.world)
                if noise is not None:
                    noise.after_micro_batch(mb.action_mask)
                loss_total += loss.item()
        release_memory()  # the activations are gone; the optimizer's peak should not sit on them
        params = self._trainable_params()
        if cfg.train.max_grad_norm is not None:
            gn = float(
                self.acc.clip_grad_norm_(
                    self.model.parameters() if self.critic is None else params, cfg.train.max_grad_norm
                )
            )
        else:
            gn = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
        if math.isfinite(gn) and math.isfinite(self.reduce.mean_over_processes([loss_total])[0]):
            self.optimizer.step()
            self.scheduler.step()
            self._backend_stale = True
            self.nonfinite_streak = 0
        else:
            self._skip_nonfinite_update(gn, loss_total)
        self.optimizer.zero_grad(set_to_none=True)
        return gn, loss_total, noise.estimate(gn) if noise is not None else None

    def micro_batch_loss(self, mb: Batch, n: core.Normalisers, sums: MetricSums) -> torch.Tensor:
        """This micro-batch's share of the minibatch loss (policy loss + value loss + KL − entropy)."""
        a, algo, m = self.cfg.algo, self.algo, mb.action_mask
        res = forward(self.model, mb, self.passes, with_entropy=True)
        values = res.values if self.critic is None else forward(self.critic, mb, self.passes).values
        on_policy = self.plan.optimizer_steps == 1
        old = res.logprobs.detach() if on_policy else mb.old_logprobs
        pl, stats = algo.policy_loss.fn(res.logprobs, old, mb.advantages, m, algo.policy_loss_opts)
        policy_terms = pl
        if self.use_ref:
            kl = algo.kl.fn(res.logprobs, mb.ref_logprobs)
            if a.kl_in == "loss":
                policy_terms = policy_terms + self.kl_coef * kl
            sums.add("kl", kl, m)
        if a.entropy_coef > 0:
            policy_terms = policy_terms - a.entropy_coef * res.entropy
        if mb.is_weights is not None:  # sampled by another engine: weigh by π_old/μ (rollout.is_correction)
            policy_terms = policy_terms * mb.is_weights
        if self.step_idx < a.critic_warmup_steps:
            # critic warm-up: only the value loss trains. ×0 rather than dropping the terms keeps every
            # parameter in the graph (DDP expects a gradient for each); the policy's gradient is exactly 0.
            policy_terms = policy_terms * 0.0
        per_tok = policy_terms
        if values is not None:
            vl, vclip = core.value_loss(values, mb.values, mb.returns, a.value_clip)
            per_tok = per_tok + a.vf_coef * vl
            sums.add("value_loss", vl, m)
            sums.add("value_clip_frac", vclip, m)
        sums.add("entropy", res.entropy, m)
        sums.add("policy_loss", pl, m)
        for k, v in stats.items():
            sums.add(k, v, m)
        return algo.aggregation.fn(per_tok, m, n, algo.aggregation_opts)

    def _warn_no_signal(self, no_signal: float) -> None:
        """Say once, in words, when a step's advantages are all 0 (e.g. every group's rewards equal): its
        policy-gradient term is exactly 0. The metric ``no_signal`` marks every such step; the run's
        share is printed at the end (:meth:`_train`)."""
        self.no_signal_steps += int(no_signal)
        if no_signal and self.no_signal_steps == 1:
            self.run.print(
                f"warning: step {self.step_idx + 1}: every advantage is 0 (e.g. all G samples of every prompt got "
                "the same reward), so the policy-gradient term of this step is 0; such steps are marked "
                "no_signal=1 in metrics.jsonl"
            )

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.model, self.critic) if m is not None for p in m.parameters() if p.requires_grad]

    def _skip_nonfinite_update(self, grad_norm: float, loss: float) -> None:
        self.nonfinite_streak += 1
        limit = self.cfg.train.max_nonfinite_steps
        self.run.print(
            f"warning: step {self.step_idx + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
            f"update skipped ({self.nonfinite_streak}/{limit} in a row)"
        )
        if self.nonfinite_streak >= limit:
            path = self.save_checkpoint()
            raise UserError(
                f"training diverged: {limit} consecutive updates with non-finite loss or gradients; "
                f"the last good state is saved in {path} — lower train.lr or set train.max_grad_norm, "
                "then continue with --resume"
            )

    # ------------------------------------------------------------------------ eval, state, save
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy decoding on the held-out split, sharded across processes (see rlhf_pg/evaluate.py):
        mean reward, reward per function, and accuracy when the data has an `answer` column."""
        from .evaluate import evaluate_policy

        r = self.cfg.rollout
        with gathered_for_generation(self.acc, self.model) as m, self.acc.autocast():
            res = evaluate_policy(
                setup.bare_policy(self.acc, m),
                self.tokenizer,
                self.eval_data,
                self.rewards,
                max_new_tokens=r.max_new_tokens,
                batch_size=self.cfg.batch.eval_batch_size,
                stop=self.sampling.stop,
                shard=(self.rank, self.world),
                reduce=self.reduce.sum,
                trainer_state=self.trainer_state(),
                episodes=self.episodes,
            )
        return {**res.metrics, "step": self.step_idx}

    def state_dict(self) -> dict[str, Any]:
        """The loop's own state (the run directory adds the step and log line counts)."""
        st = self.algo.advantage_state
        return {
            "advantage_state": st.state_dict() if st is not None else None,
            "kl_ctl": self.algo.kl_ctl.state_dict() if self.algo.kl_ctl else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_idx = state["step"]
        if self.algo.advantage_state is not None and state.get("advantage_state") is not None:
            self.algo.advantage_state.load_state_dict(state["advantage_state"])
        if self.algo.kl_ctl is not None:
            self.algo.kl_ctl.load_state_dict(state["kl_ctl"])

    def save_checkpoint(self) -> Path:
        """Atomically write everything needed to resume exactly at this step (see run_dir.py)."""
        return self.run.save_checkpoint(self.step_idx, self.state_dict(), self.gen)

    def save(self, path: Path) -> None:
        """Save the trained policy (and value head / critic) with save_pretrained (see run_dir.py)."""
        self.run.save_model(Path(path))
