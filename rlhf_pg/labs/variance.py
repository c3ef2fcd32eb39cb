r"""The gradient-variance lab: how noisy is each policy-gradient estimator at a given policy?

At the recipe's policy (``model.name``: the base model or a checkpoint), on its prompts, rewards and
sampling settings, every estimator below is formed from the SAME sampled completions (common random
numbers), on K independent batches of N completions for each N; then, per estimator and N:

    variance  tr Σ̂ = 1/(K−1) Σ_k ‖ĝ_k − ḡ‖²        (trace of the covariance of one batch's gradient)
    ‖mean‖    ‖ḡ‖,  ḡ = 1/K Σ_k ĝ_k;   mean‖ĝ‖ = 1/K Σ_k ‖ĝ_k‖
    SNR       max(‖ḡ‖² − tr Σ̂ / K, 0) / tr Σ̂
              (‖ḡ‖² − tr Σ̂/K is unbiased for ‖E ĝ‖², since E‖ḡ‖² = ‖Eĝ‖² + tr Σ / K; so SNR estimates
              ‖E ĝ‖² / E‖ĝ − E ĝ‖²: signal energy over the noise energy of ONE batch. It grows like N.)
    cos       cos(ḡ_e, ḡ_best), best = the estimator with the lowest tr Σ̂ at this N
    slope     least-squares slope of log tr Σ̂ against log N (the 1/N law predicts −1)

Estimators. Completion i of prompt x has the sequence score u_i = ∇ Σ_t log π(a_{i,t}|s_{i,t}) and
the reward-to-go-weighted score v_i = ∇ Σ_t G_{i,t} log π(a_{i,t}|s_{i,t}) with G_{i,t} = Σ_{k≥t}
γ^{k−t} r_{i,k} (the recipe's per-token rewards: the sequence reward on the last token, or dense
rewards) and R_i = G_{i,0}. A batch estimate is ĝ = 1/N Σ_i ĝ_i (the ``seq-mean-token-sum`` objective):

    reinforce          ĝ_i = R_i u_i                                   (full return, Williams 1992)
    reward_to_go       ĝ_i = v_i                                       (= Σ_t G_t ∇log π_t)
    rtg_batch_mean     ĝ_i = v_i − R̄ u_i,  R̄ = mean of R over the N completions of the batch
                       (the sample is in its own baseline: E ĝ shrinks by (N−1)/N)
    rloo               ĝ_i = (R_i − mean_{j≠i} R_j) u_i, j over the G samples of the prompt (Kool 2019)
    grpo               ĝ_i = (R_i − mean_g R) / (std_g R + 1e-4) u_i   (core.grpo_advantages, scale=group;
                       not ∇J: each prompt is reweighted by 1/std — compare its SNR, not its variance)
    optimal_baseline   ĝ_i = (R_i − b*_i) u_i,  b*_i = Σ_{j≠i} ‖u_j‖² R_j / Σ_{j≠i} ‖u_j‖²
                       the variance-minimising constant baseline b* = E[‖∇log π(y)‖² R] / E[‖∇log π(y)‖²]
                       (Greensmith, Bartlett & Baxter 2004; Weaver & Tao 2001), estimated per prompt from
                       the other G−1 samples' exact squared gradient norms, so it stays unbiased.
    ppo/gae            skipped: it needs a value function fitted at this policy (none here).

With a sequence-level reward and γ = 1, G_{i,t} = R_i for every t, so ``reward_to_go`` is exactly
``reinforce`` (the lab says so and computes v_i = R_i u_i without a second backward pass); dense
rewards (or γ < 1) make them differ. KL and entropy terms of the recipe are left out: this measures
the gradient of E[R] alone.

How the gradients are computed. Every estimator is ĝ_i = α_i v_i + β_i u_i with scalar weights
that depend on the batch's rewards and norms only, so each completion costs ONE forward and one
backward (two for dense rewards) whatever the number of estimators: its u_i (and v_i) is computed
once, sketched to D numbers, and every estimator, batch size and repeat is then a few dot products on
the sketches. Batches are nested: the batch of N completions in repeat k is the first N/G prompt
groups of repeat k's pool (batches of one size are independent; the sizes share samples), so the
whole lab samples K · max(N) completions.

The sketch (``proj_dim`` = D > 0) is a CountSketch (Charikar, Chen & Farach-Colton 2002): every
parameter coordinate j gets a fixed random bucket h(j) ∈ {1..D} and sign s(j) = ±1 and
(Sx)_d = Σ_{h(j)=d} s(j) x_j. It is linear, E[⟨Sx, Sy⟩] = ⟨x, y⟩ for every x, y (so squared norms,
traces and cosines are unbiased, with relative error about √(2/D) for gradients that are not
dominated by a few coordinates), costs O(#params) per gradient (one ``index_add_``) and stores one
int32 per parameter — unlike a dense Gaussian D × #params matrix, which would not fit in memory
even for the tiny test model. ``proj_dim=0`` keeps the exact flattened gradient (small parameter
subsets only). The parameters are all trainable ones (LoRA adapters when a model has them), or those
whose name matches ``params`` (e.g. ``'layers\.(28|29)\.'`` for the last two blocks of SmolLM2,
which also makes the backward pass stop there). Tied embeddings are named ``model.embed_tokens``.
The model runs in eval mode (no dropout), so sampling is the only noise, and in the recipe's
precision (``train.mixed_precision``: the forward and backward passes run under the same autocast as
training; weights and gradients stay float32).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import core
from ..errors import UserError
from ..forward import forward
from ..rewards import score_batch
from ..rollout import sample

ESTIMATORS = ("reinforce", "reward_to_go", "rtg_batch_mean", "rloo", "grpo", "optimal_baseline")
_MAX_EXACT_FLOATS = 200_000_000  # proj_dim=0: at most this many stored gradient floats (~800 MB)


# ------------------------------------------------------------------------------------ projection
class CountSketch:
    """Fixed linear map S: R^m → R^D over a list of parameter-shaped tensors (see the module docstring).

    Buckets and signs are folded into one int32 index per coordinate, c(j) ∈ [0, 2D): bucket
    c mod D, sign + for c < D and − otherwise; S x = z[:D] − z[D:] with z = index_add(c, x).
    """

    def __init__(self, numels: list[int], dim: int, seed: int = 0):
        if dim < 1:
            raise ValueError("CountSketch needs dim >= 1")
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        self.index = [torch.randint(0, 2 * dim, (n,), generator=g, dtype=torch.int32) for n in numels]

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        z = torch.zeros(2 * self.dim, dtype=torch.float32)
        for idx, t in zip(self.index, tensors):
            z.index_add_(0, idx, t.detach().reshape(-1).float().cpu())
        return z[: self.dim] - z[self.dim :]


class Exact:
    """The identity "sketch": the flattened, concatenated gradient."""

    def __init__(self, numels: list[int]):
        self.dim = sum(numels)

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


# ----------------------------------------------------------------------------------- estimators
def estimator_weights(
    R: torch.Tensor, sqnorm: torch.Tensor, group_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(α, β) per estimator for one batch: ĝ_i = α_i v_i + β_i u_i (see the module docstring).

    R: (N,) returns G_{i,0}; sqnorm: (N,) exact ‖u_i‖²; rows i·G … i·G+G−1 share a prompt.
    """
    N, G = R.shape[0], group_size
    ones, zeros = torch.ones(N, dtype=R.dtype), torch.zeros(N, dtype=R.dtype)
    tok, m = R[:, None], torch.ones(N, 1, dtype=R.dtype)  # (N, 1): one "token" carrying R
    x = core.AdvantageInputs(tok, m, G)
    rloo = core.rloo_advantages(x).advantages[:, 0]
    grpo = core.grpo_advantages(x, core.GrpoOptions(scale="group")).advantages[:, 0]
    w, wR = sqnorm.view(-1, G), (sqnorm * R).view(-1, G)  # (N/G, G)
    b_star = ((wR.sum(1, keepdim=True) - wR) / (w.sum(1, keepdim=True) - w).clamp(min=1e-30)).reshape(-1)
    return {
        "reinforce": (zeros, R),
        "reward_to_go": (ones, zeros),
        "rtg_batch_mean": (ones, -R.mean() * ones),
        "rloo": (zeros, rloo),
        "grpo": (zeros, grpo),
        "optimal_baseline": (zeros, R - b_star),
    }


@dataclass
class Pool:
    """Per-completion quantities of K pools of B completions (B = max batch size)."""

    u: torch.Tensor  # (K, B, D) sketched u_i
    v: torch.Tensor  # (K, B, D) sketched v_i
    R: torch.Tensor  # (K, B) returns G_{i,0}
    sqnorm: torch.Tensor  # (K, B) exact ‖u_i‖² over the chosen parameters
    lengths: torch.Tensor  # (K, B) completion lengths
    sequence_level: bool  # G_{i,t} = R_i on every token of every sample


def collect(
    tr,
    model,
    params: list[torch.nn.Parameter],
    sketch,
    repeats: int,
    prompts: int,
    rng: np.random.Generator,
    bar=None,
    always_backprop_rtg: bool = False,
) -> Pool:
    """Sample ``repeats`` pools of ``prompts`` × G completions (prompts drawn i.i.d. from the train
    split) with the trainer's rollout and rewards, and sketch every completion's u_i and v_i."""
    G, gamma = tr.cfg.batch.group_size, tr.cfg.algo.gamma
    U, V, Rs, sq, lens = [], [], [], [], []
    seq_level = True
    for _ in range(repeats):
        rows = rng.integers(0, len(tr.train_data), prompts).tolist()
        batch = sample(tr.backend, tr.tokenizer, tr.train_data, rows, G, tr.sampling, generator=tr.gen)
        score_batch(tr.rewards, batch)
        mask = batch.action_mask
        acts = core.ActionIndex.of(mask)  # G_t over actions only (an episode's env tokens are not steps)
        rtg = acts.expand(core.discounted_cumsum(acts.compact(batch.token_rewards.float()), acts.mask, gamma))
        R = rtg.gather(1, acts.index[:, :1]).squeeze(1)  # (B,) G_0 at the first action
        dense = bool(((rtg - R[:, None]) * mask).abs().max() > 1e-6 * (1.0 + R.abs().max()))
        seq_level &= not dense
        need_v = dense or always_backprop_rtg
        model.eval()
        for i in range(batch.size):
            mb = batch.select(torch.tensor([i]))
            logp = forward(model, mb, tr.passes).logprobs[0]  # (T,) log π(a_t|s_t)
            m = mb.action_mask[0]
            gu = torch.autograd.grad((logp * m).sum(), params, retain_graph=need_v, allow_unused=True)
            gu = [torch.zeros_like(p) if g is None else g for g, p in zip(gu, params)]
            sq.append(sum(float(torch.dot(g.reshape(-1).float(), g.reshape(-1).float())) for g in gu))
            U.append(sketch(gu))
            if need_v:
                gv = torch.autograd.grad((logp * rtg[i] * m).sum(), params, allow_unused=True)
                V.append(sketch([torch.zeros_like(p) if g is None else g for g, p in zip(gv, params)]))
            else:
                V.append(U[-1] * R[i])  # G_t = R for every t: v_i = R_i u_i exactly
            if bar is not None:
                bar.update(1)
        Rs.append(R.cpu())
        lens.append(mask.sum(-1).cpu())
    K, B = repeats, prompts * G
    return Pool(
        torch.stack(U).view(K, B, -1),
        torch.stack(V).view(K, B, -1),
        torch.stack(Rs).double(),
        torch.tensor(sq, dtype=torch.float64).view(K, B),
        torch.stack(lens),
        seq_level,
    )


def check_reward_spread(R: torch.Tensor) -> None:
    """Stop with one line when every sampled return is the same: then every baselined estimator is
    exactly 0 and the table would hold only 0, nan and inf (nothing to compare)."""
    if R.numel() and float(R.max() - R.min()) == 0.0:
        raise UserError(
            f"every one of the {R.numel()} sampled completions got return {float(R.flatten()[0]):g}: with equal "
            "rewards the estimators have nothing to compare (the baselined ones are exactly 0) — use a model or "
            "reward whose values vary on these prompts (e.g. the recipe's own model instead of a random one)"
        )


def batch_gradients(pool: Pool, N: int, group_size: int) -> dict[str, torch.Tensor]:
    """name → (K, D) sketched batch gradients ĝ_k from the first N completions of each pool."""
    out: dict[str, list[torch.Tensor]] = {e: [] for e in ESTIMATORS}
    for k in range(pool.u.shape[0]):
        u, v = pool.u[k, :N].double(), pool.v[k, :N].double()  # (N, D)
        for name, (a, b) in estimator_weights(pool.R[k, :N], pool.sqnorm[k, :N], group_size).items():
            out[name].append((a @ v + b @ u) / N)
    return {e: torch.stack(gs) for e, gs in out.items()}


def gradient_stats(g: torch.Tensor) -> dict[str, float]:
    """Variance (trace), norms and SNR of K batch gradients g (K, D), as defined in the module docstring."""
    K = g.shape[0]
    mean = g.mean(0)
    var = float(((g - mean) ** 2).sum() / (K - 1))
    sq_mean = float(mean @ mean)
    signal = max(sq_mean - var / K, 0.0)
    return {
        "variance": var,
        "norm_of_mean": math.sqrt(sq_mean),
        "mean_norm": float(g.norm(dim=1).mean()),
        "signal": signal,
        "snr": signal / var if var > 0 else math.inf,
    }


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float(a.norm() * b.norm())
    return float(a @ b) / d if d > 0 else math.nan


def loglog_slope(ns: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log N (None with fewer than two usable points)."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if y > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


# ------------------------------------------------------------------------------------------ lab
def _lab_config(cfg):
    """The recipe with the KL term (and so the reference model) off and no value head."""
    lab = cfg.model_copy(deep=True)
    lab.algo.kl_target = None
    lab.algo.kl_coef = 0.0
    if core.ADVANTAGES[lab.algo.advantage].needs_values:  # the lab forms its own estimators from R
        lab.algo.advantage = "rloo"
    return lab


def select_params(model, pattern: str | None) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise UserError(f"--params {pattern!r} is not a valid regex: {e}") from None
        chosen = [(n, p) for n, p in named if rx.search(n)]
        if not chosen:
            some = ", ".join(n for n, _ in named[:4])
            raise UserError(f"--params {pattern!r} matches no trainable parameter (names look like: {some}, ...)")
        return chosen
    return named


def _batch_sizes(G: int, batch_sizes: list[int] | None, repeats: int, proj_dim: int) -> list[int]:
    """The sorted distinct batch sizes N (default G, 2G, 4G), after checking the lab's arguments."""
    if G < 2:
        raise UserError(
            "the variance lab compares samples of the same prompt (RLOO, GRPO, b*): set batch.group_size >= 2"
        )
    sizes = sorted(set(batch_sizes or [G, 2 * G, 4 * G]))
    bad = [n for n in sizes if n < G or n % G]
    if bad:
        raise UserError(f"--batch-sizes {bad} must be multiples of batch.group_size={G} (N completions = prompts × G)")
    if repeats < 2:
        raise UserError("--repeats must be >= 2 to estimate a variance")
    if proj_dim < 0:
        raise UserError("--proj-dim must be >= 0 (0 = exact gradients)")
    return sizes


def _make_sketch(numels: list[int], proj_dim: int, sketch_seed: int, completions: int):
    """The gradient sketch: a CountSketch of ``proj_dim`` buckets, or (``proj_dim=0``) the exact
    flattened gradient if ``completions`` × 2 of them fit in :data:`_MAX_EXACT_FLOATS`."""
    if proj_dim == 0:
        n_floats = 2 * completions * sum(numels)
        if n_floats > _MAX_EXACT_FLOATS:
            raise UserError(
                f"--proj-dim 0 would store {n_floats:,} floats: use a sketch "
                "(--proj-dim 512) or fewer parameters (--params REGEX)"
            )
        return Exact(numels)
    return CountSketch(numels, proj_dim, seed=sketch_seed)


def _collect_chosen(
    tr,
    model,
    chosen: list[tuple[str, torch.nn.Parameter]],
    sketch,
    repeats: int,
    prompts: int,
    rng: np.random.Generator,
    progress: bool,
    always_backprop_rtg: bool,
) -> tuple[Pool, float]:
    """:func:`collect` with only the ``chosen`` parameters requiring grad (so the backward pass stops
    below them; restored afterwards) and an optional progress bar. Returns (pool, seconds)."""
    chosen_ids = {id(p) for _, p in chosen}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for _, p in model.named_parameters():
        p.requires_grad_(id(p) in chosen_ids)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=repeats * prompts * tr.cfg.batch.group_size,
            desc="variance lab",
            unit="completion",
            dynamic_ncols=True,
        )
    try:
        t1 = time.perf_counter()
        pool = collect(
            tr,
            model,
            [p for _, p in chosen],
            sketch,
            repeats,
            prompts,
            rng,
            bar,
            always_backprop_rtg=always_backprop_rtg,
        )
        return pool, time.perf_counter() - t1
    finally:
        if bar is not None:
            bar.close()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def _estimator_results(pool: Pool, sizes: list[int], G: int) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """Per N and estimator: :func:`gradient_stats`, variance relative to reinforce and the cosine to the
    lowest-variance estimator at that N; then each estimator's log-log slope of variance against N."""
    results = []
    for N in sizes:
        grads = batch_gradients(pool, N, G)
        stats = {e: gradient_stats(g) for e, g in grads.items()}
        best = min(ESTIMATORS, key=lambda e: stats[e]["variance"])
        ref = stats["reinforce"]["variance"]
        for e in ESTIMATORS:
            results.append(
                {
                    "estimator": e,
                    "N": N,
                    "prompts": N // G,
                    **stats[e],
                    "var_vs_reinforce": stats[e]["variance"] / ref if ref > 0 else math.nan,
                    "cos_to_best": _cos(grads[e].mean(0), grads[best].mean(0)),
                    "best": best,
                }
            )
    slopes = {e: loglog_slope(sizes, [r["variance"] for r in results if r["estimator"] == e]) for e in ESTIMATORS}
    return results, slopes


def _notes(pool: Pool, gamma: float) -> list[str]:
    """The report's caveats (first: reward-to-go equals the full return, for a sequence-level reward and γ = 1)."""
    notes = [
        "the lab measures the gradient of E[R] only (KL and entropy terms off, no reference model)",
        "ppo/gae: skipped (needs a value function fitted at this policy)",
        "grpo divides by each group's reward std: a different scale and a biased direction (Dr. GRPO); "
        "compare SNR and cosine rather than variance",
        "rtg_batch_mean includes the sample in its own baseline: its mean is shrunk by (N-1)/N",
    ]
    if pool.sequence_level and gamma == 1.0:
        notes.insert(
            0,
            "sequence-level reward with gamma=1: reward-to-go equals the full return, so "
            "reward_to_go is identical to reinforce; the baselines show their effect",
        )
    return notes


def _reward_summary(pool: Pool, repeats: int, G: int) -> dict[str, float]:
    """Mean and std of the sampled returns, the fraction of prompt groups with no reward spread and
    the mean completion length."""
    R, zero_std = pool.R, (pool.R.view(repeats, -1, G).std(-1) < 1e-8).double().mean()
    return {
        "mean": float(R.mean()),
        "std": float(R.std()),
        "frac_zero_std_groups": float(zero_std),
        "completion_len": float(pool.lengths.float().mean()),
    }


def run_variance(
    cfg,
    *,
    batch_sizes: list[int] | None = None,
    repeats: int = 8,
    proj_dim: int = 512,
    params: str | None = None,
    sketch_seed: int = 0,
    progress: bool = True,
    always_backprop_rtg: bool = False,
) -> dict[str, Any]:
    """Run the lab for a :class:`~rlhf_pg.config.RunConfig`; returns the report (``variance.json``)."""
    from ..trainer import Trainer

    G = cfg.batch.group_size
    sizes = _batch_sizes(G, batch_sizes, repeats, proj_dim)
    t0 = time.perf_counter()
    tr = Trainer(_lab_config(cfg))
    model = tr.acc.unwrap_model(tr.model)
    chosen = select_params(model, params)
    numels = [p.numel() for _, p in chosen]
    prompts = sizes[-1] // G
    sketch = _make_sketch(numels, proj_dim, sketch_seed, repeats * prompts * G)
    pool, t_collect = _collect_chosen(
        tr, model, chosen, sketch, repeats, prompts, np.random.default_rng(cfg.seed), progress, always_backprop_rtg
    )
    check_reward_spread(pool.R)
    results, slopes = _estimator_results(pool, sizes, G)
    settings = {
        "model": cfg.model.name,
        "data": cfg.data.train,
        "rewards": [f.name for f in cfg.rewards.functions],
        "group_size": G,
        "batch_sizes": sizes,
        "repeats": repeats,
        "completions_sampled": repeats * prompts * G,
        "temperature": cfg.rollout.temperature,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "gamma": cfg.algo.gamma,
        "mixed_precision": cfg.train.mixed_precision,
        "params": params or "all trainable",
        "n_params": sum(numels),
        "projection": "exact" if proj_dim == 0 else f"CountSketch D={proj_dim} (seed {sketch_seed})",
        "seed": cfg.seed,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_sampling_and_gradients": round(t_collect, 1),
    }
    return {
        "settings": settings,
        "reward": _reward_summary(pool, repeats, G),
        "notes": _notes(pool, cfg.algo.gamma),
        "results": results,
        "slopes": slopes,
    }


# -------------------------------------------------------------------------------------- output
def format_table(report: dict[str, Any]) -> str:
    """The report as plain aligned text (what the CLI prints and docs/ keeps)."""
    s, rw = report["settings"], report["reward"]
    lines = [
        f"gradient-variance lab: {s['model']} on {s['data']} (rewards: {', '.join(s['rewards'])})",
        f"  G={s['group_size']}, K={s['repeats']} batches per N, {s['completions_sampled']} completions, "
        f"T={s['temperature']}, max_new_tokens={s['max_new_tokens']}, gamma={s['gamma']}",
        f"  parameters: {s['params']} ({s['n_params']:,}); gradient sketch: {s['projection']}; "
        f"{s['seconds']} s on {s['threads']} thread(s)",
        f"  reward mean {rw['mean']:.3f}, std {rw['std']:.3f}; groups with zero reward spread "
        f"{rw['frac_zero_std_groups']:.0%}; mean completion length {rw['completion_len']:.1f} tokens",
        "",
        f"{'estimator':<17} {'N':>4} {'var (tr Σ)':>11} {'/reinforce':>10} {'‖mean ĝ‖':>10} {'mean ‖ĝ‖':>10} "
        f"{'SNR':>8} {'cos(best)':>9}",
    ]
    prev = None
    for r in report["results"]:
        if prev is not None and r["N"] != prev:
            lines.append("")
        prev = r["N"]
        star = "*" if r["estimator"] == r["best"] else " "
        lines.append(
            f"{r['estimator']:<17} {r['N']:>4} {r['variance']:>11.4g} {r['var_vs_reinforce']:>10.3f} "
            f"{r['norm_of_mean']:>10.4g} {r['mean_norm']:>10.4g} {r['snr']:>8.3f} {r['cos_to_best']:>8.3f}{star}"
        )
    lines += [
        "",
        "1/N law — slope of log variance vs log N (expect -1): "
        + ", ".join(f"{e} {v:+.2f}" if v is not None else f"{e} n/a" for e, v in report["slopes"].items()),
    ]
    lines += ["", "* lowest variance at that N (the cosine reference)."]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def plot_variance(report: dict[str, Any], path: str | Path) -> Path:
    """Log-log PNG: variance vs N per estimator (with a 1/N guide) and SNR vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator, ScalarFormatter

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    styles = {"reward_to_go": "--"}
    for e in ESTIMATORS:
        rows = [r for r in report["results"] if r["estimator"] == e]
        ns = [r["N"] for r in rows]
        var = [r["variance"] for r in rows]
        slope = report["slopes"].get(e)
        label = f"{e} (slope {slope:+.2f})" if slope is not None else e
        ax1.plot(ns, var, styles.get(e, "-"), marker="o", ms=4, label=label)
        pts = [(n, r["snr"]) for n, r in zip(ns, rows) if r["snr"] is not None and 0 < r["snr"] < math.inf]
        if pts:
            ax2.plot(*zip(*pts), styles.get(e, "-"), marker="o", ms=4, label=e)
    ref = [r for r in report["results"] if r["estimator"] == "reinforce"]
    if ref and ref[0]["variance"] > 0:
        n0, v0 = ref[0]["N"], ref[0]["variance"]
        ns = [r["N"] for r in ref]
        ax1.plot(ns, [v0 * n0 / n for n in ns], ":", color="0.5", label="∝ 1/N")
    for ax, title, ylabel in (
        (ax1, "variance of the batch gradient", "tr Cov[ĝ]  (sketched)"),
        (ax2, "signal-to-noise ratio (points with SNR ≤ 0 omitted)", "(‖ḡ‖² − tr Σ̂/K) / tr Σ̂"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(report["settings"]["batch_sizes"])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("N (completions per batch)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    s = report["settings"]
    fig.suptitle(f"{s['model']}: G={s['group_size']}, K={s['repeats']}, {s['projection']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(x: Any) -> Any:
    """The report with NaN/inf replaced by None (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def run_variance_cli(
    recipe: str,
    overrides: list[str],
    *,
    batch_sizes: str | None,
    repeats: int,
    proj_dim: int,
    params: str | None,
    threads: int | None,
    out: str | None,
) -> dict[str, Any]:
    """``rlhf-pg variance``: run the lab, print the table, write variance.json/.txt/.png into ``out``."""
    from ..config import load_config

    if threads is not None:
        torch.set_num_threads(max(1, threads))
    sizes = None
    if batch_sizes:
        try:
            sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--batch-sizes {batch_sizes!r}: give comma-separated integers, e.g. 8,16,32") from None
    cfg = load_config(recipe, list(overrides))
    report = run_variance(cfg, batch_sizes=sizes, repeats=repeats, proj_dim=proj_dim, params=params)
    report["settings"]["command"] = " ".join(
        ["rlhf-pg", "variance", recipe, *overrides]
        + ([f"--batch-sizes {batch_sizes}"] if batch_sizes else [])
        + [f"--repeats {repeats}", f"--proj-dim {proj_dim}"]
        + ([f"--params '{params}'"] if params else [])
        + ([f"--threads {threads}"] if threads else [])
    )
    out_dir = Path(out) if out else Path(cfg.output_dir) / "variance"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(report)
    (out_dir / "variance.json").write_text(json.dumps(_finite(report), indent=2) + "\n")
    (out_dir / "variance.txt").write_text(table + "\n")
    png = plot_variance(report, out_dir / "variance.png")
    print(table)
    print(f"\nwrote {out_dir / 'variance.json'}, {out_dir / 'variance.txt'} and {png}")
    return report
