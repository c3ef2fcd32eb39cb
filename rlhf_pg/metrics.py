"""Every logged training metric in one place, reduced over all processes.

:class:`Reducer` sums over processes (identity on one); :class:`MetricSums` accumulates masked
(Σ value·mask, Σ mask) pairs over micro-batches and reduces them once; :func:`rollout_metrics` and
:func:`sample_rows` describe a scored batch; :class:`GradNoise` estimates the gradient noise scale.
The README's metrics table lists what these compute.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import core
from .batch import Batch


class Reducer:
    """Sums and gathers over the accelerator's processes; with one process every method is local."""

    def __init__(self, accelerator):
        self.acc, self.world = accelerator, accelerator.num_processes

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over processes of ``x`` (a detached copy)."""
        return self.acc.reduce(x.detach().clone(), reduction="sum") if self.world > 1 else x

    def mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """Global masked mean Σ x·mask / Σ mask over every process's rows."""
        s = self.sum(torch.stack([core.masked_sum(x, mask), mask.sum()]).float())
        return (s[0] / s[1].clamp(min=1)).item()

    def mean_over_processes(self, xs: list[float]) -> list[float]:
        if self.world == 1:
            return xs
        return (self.sum(torch.tensor(xs, device=self.acc.device)) / self.world).tolist()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(x) if self.world > 1 else x

    def gather_objects(self, rows: list) -> list:
        if self.world == 1:
            return rows
        from accelerate.utils import gather_object

        return gather_object(rows)

    def mean_of_logged(self, logged: dict[str, list[float]]) -> dict[str, float]:
        """name → mean of every value logged under it on any process (names may differ by process)."""
        merged: dict[str, list[float]] = {}
        for part in self.gather_objects([logged]):
            for name, values in part.items():
                merged.setdefault(name, []).extend(values)
        return {name: float(np.mean(values)) for name, values in merged.items() if values}

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        return bool(self.sum(torch.tensor(float(flag), device=self.acc.device)).item() > 0)


class MetricSums:
    """name → [Σ value·mask, Σ mask] over micro-batches; :meth:`means` reduces them over processes."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        v = torch.stack([core.masked_sum(x.detach().float(), mask), mask.sum()])
        self.sums[name] = self.sums[name] + v if name in self.sums else v

    def means(self, reducer: Reducer) -> dict[str, float]:
        out = {}
        for name, v in self.sums.items():
            v = reducer.sum(v)
            out[name] = (v[0] / v[1].clamp(min=1)).item()
        return out


def rollout_metrics(batch: Batch, r: Reducer, eos_id: int | None) -> dict[str, float]:
    """Rewards, lengths, advantages, returns and (with values) explained variance of a scored batch."""
    mask = batch.action_mask
    lengths = mask.sum(-1)  # (B,)
    scores, lens = r.gather(batch.scores), r.gather(lengths)
    g = scores.view(-1, batch.group_size)  # (prompts, G) over all processes
    last = batch.completion_ids.gather(1, core.last_token_index(mask)[:, None]).squeeze(1)  # (B,)
    adv_mean = r.mean(batch.advantages, mask)
    m = {
        "reward": scores.mean().item(),
        "reward_std": scores.std().item() if scores.numel() > 1 else 0.0,
        "frac_zero_std_groups": (g.std(1) < 1e-6).float().mean().item() if batch.group_size > 1 else 0.0,
        "completion_len": lens.mean().item(),
        "completion_len_max": lens.max().item(),
        "eos_frac": r.mean((last == eos_id).float(), torch.ones_like(lengths)),
        "advantage_mean": adv_mean,
        "advantage_std": math.sqrt(max(0.0, r.mean(batch.advantages**2, mask) - adv_mean**2)),
        "return_mean": r.mean(batch.returns, mask),
    }
    if batch.values is not None:
        # explained variance 1 − Var[R − V]/Var[R] with global (all-process) moments
        ret, d = batch.returns, batch.returns - batch.values
        mr, mr2, md, md2 = (r.mean(x, mask) for x in (ret, ret**2, d, d**2))
        m["explained_variance"] = 1.0 - (md2 - md**2) / max(mr2 - mr**2, 1e-8)
        m["value_mean"] = r.mean(batch.values, mask)
    for name, v in batch.reward_per_function.items():
        m[f"reward/{name}"] = r.mean(torch.nan_to_num(v), (~torch.isnan(v)).float())
    if batch.episode_stats:
        m.update(episode_metrics(batch, r))
    return m


def episode_metrics(batch: Batch, r: Reducer) -> dict[str, float]:
    """Multi-turn episodes: per-episode means of the counts (turns, tool calls, ...), the episode's
    length in tokens after the prompt, the share of those tokens the environment wrote, and the
    environment's reward. The keys are the same on every process (Episodes.stat_keys)."""
    one = torch.ones(batch.size, device=batch.action_mask.device)
    length = batch.completion_mask.sum(-1)  # (B,) model + environment tokens
    env_tokens = length - batch.action_mask.sum(-1)
    m = {f"episode/{k}": r.mean(v.float(), one) for k, v in sorted(batch.episode_stats.items())}
    m["episode/len"] = r.mean(length, one)
    total = r.sum(torch.stack([env_tokens.sum(), length.sum()]))
    m["episode/env_token_frac"] = (total[0] / total[1].clamp(min=1)).item()
    if batch.env_rewards is not None:
        m["episode/env_reward"] = r.mean(batch.env_rewards.sum(-1), one)
    return m


def sample_rows(batch: Batch, step: int) -> list[dict[str, Any]]:
    """One ``samples.jsonl`` row per completion of this process's batch."""
    first_adv = batch.advantages.gather(1, core.ActionIndex.of(batch.action_mask).index[:, :1]).squeeze(1).tolist()
    rows = []
    for i in range(batch.size):
        p = batch.prompts[i]
        rows.append(
            {
                "step": step,
                "prompt": p if isinstance(p, str) else p[-1]["content"],
                "completion": batch.completions[i],
                "reward": batch.scores[i].item(),
                **{
                    f"reward/{k}": (None if math.isnan(v[i].item()) else v[i].item())
                    for k, v in batch.reward_per_function.items()
                },
                "advantage": first_adv[i],
                **{k: v[i] for k, v in batch.reward_extra.items()},
            }
        )
        if batch.messages:  # an episode, turn by turn with roles
            rows[-1]["messages"] = batch.messages[i]
            rows[-1].update({f"episode/{k}": float(v[i]) for k, v in batch.episode_stats.items()})
    return rows


def format_eval(metrics: dict[str, Any]) -> str:
    """One line for an eval record: accuracy, reward and length with the number of prompts."""
    keys = [k for k in ("eval/accuracy", "eval/reward", "eval/completion_len") if k in metrics]
    return ", ".join(f"{k.removeprefix('eval/')}={metrics[k]:.3f}" for k in keys) + f" (n={metrics['eval/n']})"


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

    def __init__(self, params, unit: str, n_tok: float, n_seq: float):
        self.params = [p for p in params if p.requires_grad]
        self.by_tokens = unit == "tokens"
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
        b, N, small, big = float(np.mean(self.sizes)), self.N, float(np.mean(self.sq)), full_norm**2
        g2 = (N * big - b * small) / (N - b)
        trace = (small - big) / (1 / b - 1 / N)
        return trace / g2 if g2 else float("nan"), g2 * N / trace if trace else float("nan")


# ------------------------------------------------------------------------------ FLOP accounting
FLOP_FORMULA = {
    "S": "distinct tokens: prompt tokens of the distinct prompts + completion tokens",
    "N": "parameters (tied embedding/LM head counted once); attention term omitted",
    "rollout": "2*N*S",
    "reference": "2*N*S*[beta>0]",
    "train": "6*N*S per epoch (N: the policy and a separate critic)",
    "step": "rollout + reference + train",
}
"""The model FLOPs a step needs — one accounting for the benchmark, the TRL comparison and every run's
``perf/*`` metrics. Each distinct token counts once (a prompt once per group, as the shared-prefix passes
run it); work done beyond that (padding, recomputation, G copies of a prompt) shows as a lower rate."""


def step_flops(
    n_params: int,
    prompt_tokens: float,
    completion_tokens: float,
    reference: bool,
    epochs: int = 1,
    n_trained: int | None = None,
) -> dict[str, float]:
    """FLOPs of one RL step by :data:`FLOP_FORMULA`: ``{"rollout", "reference", "train", "step"}``.
    ``n_params``: the policy's; ``n_trained``: what the training passes run (the policy and a separate
    critic; default ``n_params``)."""
    S = prompt_tokens + completion_tokens
    n_trained = n_params if n_trained is None else n_trained
    fl = {"rollout": 2 * n_params * S, "reference": 2 * n_params * S if reference else 0}
    fl["train"] = 6 * n_trained * S * epochs
    fl["step"] = fl["rollout"] + fl["reference"] + fl["train"]
    return fl


def count_params(*modules) -> int:
    """Parameters of the modules, each counted once (tied weights once; ZeRO-3's partitioned ones whole)."""
    seen, n = set(), 0
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += int(getattr(p, "ds_numel", p.numel()))
    return n
