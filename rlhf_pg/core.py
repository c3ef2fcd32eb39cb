r"""All the math of rlhf-pg: pure functions of tensors (torch only).

Notation. A completion y = (a_0, ..., a_{T-1}) is sampled from π_θ(·|x); s_t = (x, a_{<t}). Every tensor
below is (B, T): B completions (G adjacent rows per prompt), T completion positions, `mask` 1 on the
actions (up to and including EOS). In a multi-turn episode s_t also holds the environment's tokens so
far; the estimators see only the actions, as consecutive steps (ActionIndex), and the environment's
tokens get no log-prob term (their probabilities do not depend on θ). Per-token rewards r_t hold the
sequence reward R on the last action unless a reward function returns dense rewards.

The policy gradient (log-derivative trick; the environment's dynamics cancel):

    ∇J(θ) = E_y [ Σ_t Ψ_t ∇ log π_θ(a_t | s_t) ]

with Ψ_t one of: the full return G_0 = Σ_k γ^k r_k; the reward-to-go G_t = Σ_{k≥t} γ^{k-t} r_k (drops
rewards earned before a_t, which are independent of it: same mean, lower variance); either minus a
baseline b that does not depend on a_t (unbiased: E[b ∇log π] = b ∇Σπ = 0); or a GAE advantage.

Known biases (each measured numerically in tests/test_exact_gradients.py on an enumerable policy):

* ``grpo`` with ``scale=group``/``batch``: dividing by the std of the *sampled* rewards changes the
  weight of each prompt (prompts with low reward spread get amplified) and couples samples; it is not
  an unbiased estimate of ∇J (Liu et al. 2025, "Dr. GRPO"). ``scale=none`` with the group mean as
  baseline is biased only by the factor (G−1)/G (the sample is in its own baseline); ``rloo`` removes that.
* ``baseline=mean``: the sample is in its own per-position baseline, which averages the n_t group
  members still alive at t: position t's gradient shrinks by 1 − E[1/n_t] ((G−1)/G when all lengths are
  equal, more where fewer are alive); ``loo`` and ``ema`` (built from other samples / past batches) are unbiased.
* ``loss_agg=token-mean``/``seq-mean-token-mean`` divide by lengths that depend on the sample, so the
  gradient is that of a length-reweighted objective; ``seq-mean-token-sum`` and ``constant`` are
  unbiased for J (``constant`` up to the known factor 1/C).
* ``gae`` with λ<1 is unbiased only when V is the true value function; with λ=1 it equals the
  reward-to-go minus the state baseline V(s_t): unbiased for any fixed V.
* With γ<1, weighting ∇log π(a_t) by G_t without the γ^t factor is the usual practice and is biased
  for the discounted objective (Thomas 2014); the default γ=1 has no such bias.

Deviations from the papers: log-probs use softmax(logits/τ) (the sampled policy) rather than τ = 1;
top-p/top-k truncation is ignored in log-probs (as in TRL, verl, OpenRLHF); GRPO uses the unbiased
(n−1) std, as TRL does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from .registry import Registry

Tensor = torch.Tensor
Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over processes (identity on one process); lets whitening use global statistics."""


# ----------------------------------------------------------------------------------------- masked ops
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask = 1 (0 when the mask is empty)."""
    return masked_sum(x, mask, dim) / mask.sum(dim if dim is not None else None).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, reduce: Reduce | None = None, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over masked entries; with ``reduce`` the moments are global across processes."""
    r = reduce or (lambda t: t)
    n = r(mask.sum()).clamp(min=1)
    mean = r(masked_sum(x, mask)) / n
    var = r(masked_sum((x - mean) ** 2, mask)) / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last position where ``mask`` is 1 (0 for an empty row). The mask may have
    holes (an episode's action mask is 0 on environment tokens between model turns)."""
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask > 0, pos, torch.zeros_like(pos)).amax(-1)


@dataclass(frozen=True)
class ActionIndex:
    """Where each row's action tokens sit, so per-row sequences can be squeezed to actions only.

    An episode interleaves model tokens (actions) with environment tokens (context). The advantage
    estimators are written for a row of consecutive actions; :meth:`compact` gives them that view
    (action k of row b at column k: environment tokens are not time steps, so γ and λ count actions)
    and :meth:`expand` puts their output back. For a single-turn batch the actions are already a
    prefix of the row and both maps are the identity on the masked entries."""

    index: Tensor
    """(B, A) long: column of the row's k-th action (k < its action count; arbitrary beyond)."""
    mask: Tensor
    """(B, A) float: 1 for k < the row's action count."""
    width: int
    """T of the full rows."""

    @classmethod
    def of(cls, mask: Tensor) -> ActionIndex:
        B, T = mask.shape
        pos = torch.arange(T, device=mask.device).expand(B, T)
        key = torch.where(mask > 0, pos, pos + T)  # actions first, each group in column order
        A = max(int(mask.sum(-1).max().item()) if B else 0, 1)
        index = key.argsort(dim=-1)[:, :A]  # (B, A)
        counts = mask.sum(-1, keepdim=True)  # (B, 1)
        amask = (torch.arange(A, device=mask.device)[None, :] < counts).to(mask.dtype)  # (B, A)
        return cls(index, amask, T)

    def compact(self, x: Tensor) -> Tensor:
        """(B, T) → (B, A): the values at the action positions, 0 beyond each row's actions."""
        return torch.where(self.mask > 0, x.gather(1, self.index), torch.zeros((), dtype=x.dtype, device=x.device))

    def expand(self, y: Tensor) -> Tensor:
        """(B, A) → (B, T): the inverse of :meth:`compact` (0 off the action positions)."""
        out = torch.zeros(y.shape[0], self.width, dtype=y.dtype, device=y.device)
        return out.scatter(
            1, self.index, torch.where(self.mask > 0, y, torch.zeros((), dtype=y.dtype, device=y.device))
        )


def place_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """(B,) sequence rewards → (B, T) token rewards with R on the last real token."""
    r = torch.zeros_like(mask, dtype=scores.dtype)
    r.scatter_(1, last_token_index(mask)[:, None], scores[:, None])
    return r * mask


def discounted_cumsum(x: Tensor, mask: Tensor, factor: float) -> Tensor:
    """y_t = Σ_{k≥t} factor^{k−t} x_k over each row's real tokens (right padding contributes 0).

    Vectorised over rows; a reverse scan over T. The plain per-row loop it replaces lives in
    tests/test_core.py (``_discounted_cumsum_loop``) and the two are checked equal.
    """
    x = x * mask
    out = torch.zeros_like(x)
    acc = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        acc = x[:, t] + factor * acc * mask[:, t]
        out[:, t] = acc
    return out * mask


# ------------------------------------------------------------------------------- registry entries
class Options(BaseModel):
    """An entry's own config section (``algo.<entry name>``): unknown keys and bad values are errors."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


@dataclass
class AdvantageInputs:
    """What an advantage estimator receives. Tensors are (B, A): each row's ACTIONS as consecutive
    steps (:class:`ActionIndex`; the trainer compacts an episode's rows, whose environment tokens sit
    between turns, and expands the output back). Rows [i·G, (i+1)·G) share a prompt. The estimators
    assume a mask without holes: ``discounted_cumsum`` restarts at a 0, and GAE's V(s_{t+1}) would be
    read at an environment token."""

    token_rewards: Tensor
    """(B, A) r_t: scores on the last action, dense rewards, an episode's turn rewards on each turn's last
    action, − β·KL_t when the KL is in the reward."""
    mask: Tensor
    """(B, A) 1 for the row's actions (a prefix of each row), 0 after."""
    group_size: int
    """G, completions per prompt."""
    gamma: float = 1.0
    """Discount γ."""
    values: Tensor | None = None
    """(B, A) V(s_t) from the value model; given only to estimators that declare ``needs_values``."""
    reduce: Reduce | None = None
    """Sums a tensor over processes (identity on one): for statistics that must be global."""


@dataclass
class AdvantageOutput:
    advantages: Tensor
    """(B, A) Â_t."""
    returns: Tensor
    """(B, A) return targets (the value targets for estimators with ``needs_values``)."""
    baseline: Tensor | None = None
    """(B, A) b_t subtracted from the return, where the estimator has one (for inspection and logging)."""


class EstimatorState(Protocol):
    """State an estimator keeps across RL steps (checkpointed with the run)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class AdvantageEstimator:
    """``fn(x: AdvantageInputs, opts, state) -> AdvantageOutput`` and what it needs."""

    fn: Callable[[AdvantageInputs, Any, Any], AdvantageOutput]
    needs_values: bool = False
    """Needs V(s_t): the trainer builds a value head (or critic) and passes ``values``."""
    min_group_size: int | Callable[[Any], int] = 1
    """Smallest G it works with (a function of its options when that depends on them)."""
    options: type[Options] | None = None
    """Its config section ``algo.<name>``; ``opts`` is an instance (None without a section)."""
    state: Callable[[], EstimatorState] | None = None
    """Factory of the state it keeps across steps (e.g. an EMA baseline); ``state`` is None without."""

    def group_size_needed(self, opts: Any) -> int:
        return self.min_group_size(opts) if callable(self.min_group_size) else self.min_group_size


@dataclass(frozen=True)
class PolicyLoss:
    """``fn(logp, old_logp, advantages, mask, opts) -> (per-token loss, per-token stats)``, all (B, T)."""

    fn: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    options: type[Options] | None = None


@dataclass(frozen=True)
class KLEstimator:
    """``fn(logp, ref_logp) -> (B, T)`` per-token estimate of KL(π‖π_ref) from samples of π."""

    fn: Callable[[Tensor, Tensor], Tensor]
    unbiased: bool = True
    options: type[Options] | None = None


@dataclass(frozen=True)
class Normalisers:
    """Counts of the WHOLE minibatch (all micro-batches, all processes) that aggregations divide by."""

    num_tokens: float
    num_seqs: float
    max_tokens: int
    """rollout.max_new_tokens (Dr. GRPO's default constant)."""


@dataclass(frozen=True)
class LossAggregation:
    """``fn(per_token (B, T), mask (B, T), n: Normalisers, opts) -> scalar``: this micro-batch's share."""

    fn: Callable[[Tensor, Tensor, Normalisers, Any], Tensor]
    unit: Literal["tokens", "sequences"] = "tokens"
    """What one 'sample' of the objective is (the gradient-noise estimate counts in this unit)."""
    options: type[Options] | None = None


ADVANTAGES: Registry[AdvantageEstimator] = Registry("advantage estimator", "algo.advantage", AdvantageEstimator)
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss", "algo.policy_loss", PolicyLoss)
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator", "algo.kl_estimator", KLEstimator)
AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation", "algo.loss_agg", LossAggregation)
REGISTRIES = (ADVANTAGES, POLICY_LOSSES, KL_ESTIMATORS, AGGREGATIONS)
"""Every registry whose entries may have an options section ``algo.<entry name>``."""


# ------------------------------------------------------------------------------------- KL estimators
# Schulman (2020), "Approximating KL Divergence". With log r = log π_ref − log π, under samples from π:
#   k1 = −log r                (unbiased for KL(π‖π_ref), high variance, can be negative)
#   k2 = ½ (log r)²            (biased, low variance; its gradient is the true KL gradient's to 1st order)
#   k3 = (r − 1) − log r       (unbiased, always ≥ 0, low variance)
@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2", unbiased=False)
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (ref_logp - logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_r = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.expm1(log_r) - log_r


class AdaptiveKLController:
    """β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n/horizon)  (Ziegler et al. 2019, §2.2)."""

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# ------------------------------------------------------------------------------ advantage estimators
def _groups(x: Tensor, group_size: int) -> Tensor:
    """(B, ...) → (B/G, G, ...): rows i·G … i·G+G−1 share a prompt."""
    return x.view(-1, group_size, *x.shape[1:])


class GrpoOptions(Options):
    scale: Literal["group", "batch", "none"] = "group"
    """Divide centred group rewards by the group's std, the batch's std, or nothing (Dr. GRPO)."""


@ADVANTAGES.register("grpo", min_group_size=2, options=GrpoOptions)
def grpo_advantages(x: AdvantageInputs, opts: GrpoOptions, state=None) -> AdvantageOutput:
    """Â_i = (R_i − mean_g R) / std (Shao et al. 2024, DeepSeekMath §4.1), the same for every token.

    std: the group's (``scale=group``), the whole batch's (``batch``) or 1 (``none``, Dr. GRPO).
    Returns are R broadcast over the tokens; the baseline is the group mean.
    """
    mask, G = x.mask, x.group_size
    R = masked_sum(x.token_rewards, mask, dim=-1)  # (B,)
    Rg = _groups(R, G)  # (B/G, G)
    mean = Rg.mean(1, keepdim=True).expand_as(Rg).reshape(-1)  # (B,)
    centred = R - mean
    if opts.scale == "group":
        centred = centred / (Rg.std(1).repeat_interleave(G) + 1e-4)
    elif opts.scale == "batch":
        centred = centred / (R.std() + 1e-4)
    return AdvantageOutput(centred[:, None] * mask, R[:, None] * mask, mean[:, None] * mask)


@ADVANTAGES.register("rloo", min_group_size=2)
def rloo_advantages(x: AdvantageInputs, opts=None, state=None) -> AdvantageOutput:
    """Â_i = R_i − mean_{j≠i} R_j over the prompt's group (Kool et al. 2019; Ahmadian et al. 2024).

    Unbiased: the baseline uses only the other G−1 samples. Equals G/(G−1) · (R_i − mean_g R).
    """
    mask, G = x.mask, x.group_size
    R = masked_sum(x.token_rewards, mask, dim=-1)  # (B,)
    Rg = _groups(R, G)
    loo = ((Rg.sum(1, keepdim=True) - Rg) / (G - 1)).reshape(-1)  # (B,)
    return AdvantageOutput((R - loo)[:, None] * mask, R[:, None] * mask, loo[:, None] * mask)


class ReinforceOptions(Options):
    reward_to_go: bool = True
    """Weight log π(a_t) by the return from t (true) or by the full return (false)."""
    baseline: Literal["none", "mean", "ema", "loo"] = "none"
    """none, group mean (includes the sample itself), EMA of past batches' returns, leave-one-out."""
    ema_decay: float = Field(0.9, ge=0, lt=1)
    """Decay of the `ema` baseline."""


class EmaBaseline:
    """b ← d·b + (1 − d)·mean_batch G_0 after each batch (mean over all processes); 0 before the first.

    The batch's own returns enter only the NEXT batch's baseline, so b never depends on the actions it
    is subtracted from (unbiased)."""

    def __init__(self) -> None:
        self.value: float | None = None

    def update(self, batch_mean: float, decay: float) -> None:
        self.value = batch_mean if self.value is None else decay * self.value + (1 - decay) * batch_mean

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _reinforce_min_group(opts: ReinforceOptions) -> int:
    return 2 if opts.baseline in ("mean", "loo") else 1


@ADVANTAGES.register("reinforce", min_group_size=_reinforce_min_group, options=ReinforceOptions, state=EmaBaseline)
def reinforce_advantages(
    x: AdvantageInputs, opts: ReinforceOptions, state: EmaBaseline | None = None
) -> AdvantageOutput:
    """Monte-Carlo REINFORCE (Williams 1992): Ψ_t = G_t − b_t.

    G_t is the reward-to-go Σ_{k≥t} γ^{k−t} r_k (``reward_to_go=True``) or the full return G_0 for
    every t. Baselines, per position t within the prompt's group of G samples:
    ``mean`` b_t = mean_j G_{j,t} over the n_t samples alive at t (includes the sample: shrinks position
    t's gradient by 1 − E[1/n_t], i.e. (G−1)/G when all lengths are equal);
    ``loo`` b_t = mean_{j≠i} G_{j,t} (unbiased); ``ema`` b = the running mean of past batches' G_0
    (``state``, an :class:`EmaBaseline`; a constant within the batch: unbiased), updated with this
    batch's mean afterwards; ``none`` b = 0.
    """
    mask, G = x.mask, x.group_size
    rtg = discounted_cumsum(x.token_rewards, mask, x.gamma)  # (B,T)  G_t
    ret = rtg if opts.reward_to_go else rtg[:, :1].expand_as(rtg) * mask
    if opts.baseline == "none":
        b = torch.zeros_like(ret)
    elif opts.baseline == "ema":
        if state is None:
            raise ValueError("baseline=ema needs its EmaBaseline state")
        b = torch.full_like(ret, state.value if state.value is not None else 0.0)
        r = x.reduce or (lambda t: t)
        tot = r(torch.stack([rtg[:, 0].sum(), torch.tensor(float(rtg.shape[0]), device=rtg.device)]).float())
        state.update((tot[0] / tot[1].clamp(min=1)).item(), opts.ema_decay)
    else:
        Gg, mg = _groups(ret, G), _groups(mask, G)  # (B/G, G, T)
        tot, cnt = (Gg * mg).sum(1, keepdim=True), mg.sum(1, keepdim=True)
        if opts.baseline == "mean":
            b = (tot / cnt.clamp(min=1)).expand_as(Gg)
        else:  # loo
            b = (tot - Gg * mg) / (cnt - mg).clamp(min=1)
        b = b.reshape_as(ret)
    return AdvantageOutput((ret - b) * mask, ret, b * mask)


class GaeOptions(Options):
    lam: float = Field(0.95, ge=0, le=1)
    """GAE λ: 1 = Monte-Carlo return minus V (unbiased for any V), 0 = one-step TD error."""


@ADVANTAGES.register("gae", needs_values=True, options=GaeOptions)
def gae_advantages(x: AdvantageInputs, opts: GaeOptions, state=None) -> AdvantageOutput:
    """GAE(γ, λ) (Schulman et al. 2016): δ_t = r_t + γV(s_{t+1}) − V(s_t), Â_t = Σ_l (γλ)^l δ_{t+l}.

    V after the last real token is 0 (the episode ends). Returns Â + V are the value targets.
    λ = 1 gives G_t − V(s_t) (unbiased for any V); λ = 0 gives the one-step TD error.
    """
    if x.values is None:
        raise ValueError("advantage=gae needs values (a value head)")
    mask = x.mask
    v = x.values * mask
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # V(s_{t+1}); 0 past the end
    delta = x.token_rewards + x.gamma * v_next - v
    adv = discounted_cumsum(delta, mask, x.gamma * opts.lam)
    return AdvantageOutput(adv, (adv + v) * mask, v)


# ------------------------------------------------------------------------------------ policy losses
@POLICY_LOSSES.register("pg")
def pg_loss(logp, old_logp, advantages, mask, opts=None):
    """Vanilla policy gradient: ℓ_t = −Â_t · log π_θ(a_t|s_t). On-policy only (no ratio)."""
    return -advantages * logp, {}


class ClipOptions(Options):
    eps_low: float = Field(0.2, ge=0)
    """ε_low: the ratio is clipped below at 1 − ε_low."""
    eps_high: float = Field(0.2, ge=0)
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip bound c > 1 for negative advantages (Ye et al. 2020); null = off."""


@POLICY_LOSSES.register("clip", options=ClipOptions)
def clip_loss(logp, old_logp, advantages, mask, opts: ClipOptions):
    """PPO clipped surrogate (Schulman et al. 2017) with asymmetric ε and optional dual clip.

    ρ = π_θ/π_old; ℓ = −min(ρÂ, clip(ρ, 1−ε_low, 1+ε_high)Â); with dual clip c (Ye et al. 2020) and
    Â < 0: ℓ = min(ℓ, −cÂ). At ρ = 1 the gradient is −Â∇log π, the vanilla policy gradient.
    Stats (per token, detached): clip_low (ρ < 1−ε_low with Â < 0: pushed down, clipped),
    clip_high (ρ > 1+ε_high with Â > 0), approx_kl = k3 estimate of KL(π_old‖π_θ).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - opts.eps_low, 1.0 + opts.eps_high) * advantages
    loss = -torch.minimum(surr1, surr2)
    if opts.dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -opts.dual_clip * advantages), loss)
    with torch.no_grad():
        stats = {
            "clip_low": ((ratio < 1.0 - opts.eps_low) & (advantages < 0)).float(),
            "clip_high": ((ratio > 1.0 + opts.eps_high) & (advantages > 0)).float(),
            "approx_kl": kl_k3(old_logp, logp),  # samples come from π_old: log r = log π_θ − log π_old
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> tuple[Tensor, Tensor]:
    """ℓ_V = ½ max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, −c, c) (PPO2's value clip).

    Returns the per-token loss and a per-token indicator of where the clipped branch was used.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(values)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float().detach()


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """1 − Var[target − pred] / Var[target] over masked entries (1 = perfect, ≤ 0 = useless)."""
    var_t = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    diff = target - pred
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1.0 - var_d / var_t.clamp(min=1e-8)


# ------------------------------------------------------------------------------------- aggregation
# Each turns (B, T) losses into this micro-batch's share of the minibatch loss. The counts in
# Normalisers are the WHOLE minibatch's (all micro-batches, all processes), so summing the shares of
# every micro-batch gives exactly the loss of the unsplit batch — gradient accumulation and data
# parallelism do not change the objective.
@AGGREGATIONS.register("token-mean", unit="tokens")
def agg_token_mean(per_token: Tensor, mask: Tensor, n: Normalisers, opts=None) -> Tensor:
    """Σ_{i,t} ℓ / N_tokens (biased: a length-weighted objective)."""
    return (per_token * mask).sum() / n.num_tokens


@AGGREGATIONS.register("seq-mean-token-mean", unit="sequences")
def agg_seq_mean_token_mean(per_token: Tensor, mask: Tensor, n: Normalisers, opts=None) -> Tensor:
    """Σ_i (Σ_t ℓ / |y_i|) / N_seqs (biased: short answers weigh more)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n.num_seqs


@AGGREGATIONS.register("seq-mean-token-sum", unit="sequences")
def agg_seq_mean_token_sum(per_token: Tensor, mask: Tensor, n: Normalisers, opts=None) -> Tensor:
    """Σ_{i,t} ℓ / N_seqs (unbiased for J)."""
    return (per_token * mask).sum() / n.num_seqs


class ConstantOptions(Options):
    value: float | None = Field(None, gt=0)
    """The constant C per sequence; null = rollout.max_new_tokens."""


@AGGREGATIONS.register("constant", unit="sequences", options=ConstantOptions)
def agg_constant(per_token: Tensor, mask: Tensor, n: Normalisers, opts: ConstantOptions) -> Tensor:
    """Σ_{i,t} ℓ / (N_seqs · C) (Dr. GRPO, Liu et al. 2025; unbiased up to the known factor 1/C)."""
    c = opts.value if opts is not None and opts.value is not None else float(n.max_tokens)
    return (per_token * mask).sum() / (n.num_seqs * c)


# ------------------------------------------------------------- sampler/trainer mismatch (IS correction)
@dataclass(frozen=True)
class ISCorrection:
    """Importance weights for samples drawn from a sampler μ (an inference engine) instead of the trainer's
    π_old. ``level``: ``token`` (w_t = π_old(a_t|s_t)/μ(a_t|s_t)) or ``sequence`` (one w = Π_t of those,
    on every action of the row). ``cap``: w truncated at cap (None: untruncated). ``mask_above`` /
    ``mask_below``: a token (``token``) or a whole row (``sequence``) whose ratio is outside the bounds
    gets weight 0 (dropped). Biases (tests/test_exact_gradients.py, sampler-mismatch section):
    ``sequence`` with no cap and no mask is unbiased for ∇J under π; ``token`` is not (it corrects each
    action but not the state distribution it was reached under), and a cap or a mask adds bias in
    exchange for bounded variance."""

    level: Literal["token", "sequence"]
    cap: float | None = 3.0
    mask_above: float | None = None
    mask_below: float | None = None


def importance_weights(log_ratio: Tensor, mask: Tensor, c: ISCorrection) -> tuple[Tensor, dict[str, Tensor]]:
    """(B, T) detached weights w for the policy loss, and per-unit stats (ratio, truncated, masked: per
    action for ``token``, per row for ``sequence``, each with the mask it is averaged over).

    ``log_ratio`` = log π_old − log μ of the sampled tokens (0 off the actions). A weight of exactly 1
    where π_old = μ (the trainer sampled with its own model), so the correction then changes nothing."""
    with torch.no_grad():
        lr = (log_ratio * mask).float()
        if c.level == "sequence":
            unit = lr.sum(-1, keepdim=True)  # (B, 1): log Π_t ratio
            unit_mask = (mask.sum(-1, keepdim=True) > 0).float()
        else:
            unit, unit_mask = lr, mask.float()
        ratio = torch.exp(unit)
        w = ratio if c.cap is None else ratio.clamp(max=c.cap)
        truncated = (ratio > c.cap).float() if c.cap is not None else torch.zeros_like(ratio)
        drop = torch.zeros_like(ratio, dtype=torch.bool)
        if c.mask_above is not None:
            drop |= ratio > c.mask_above
        if c.mask_below is not None:
            drop |= ratio < c.mask_below
        w = w.masked_fill(drop, 0.0)
        weights = torch.where(mask > 0, w, 0.0).to(log_ratio.dtype)  # where, not ×: an untruncated w may be inf
        stats = {"ratio": ratio, "truncated": truncated * (~drop), "masked": drop.float()}
        return weights, {k: (v, unit_mask) for k, v in stats.items()}


# ------------------------------------------------------------------------------ log-probs, entropy
LOGPROB_CHUNK_ELEMENTS = 1 << 18
"""Logits turned to fp32 at a time by the log-prob passes: 1 MB, so that a chunk's fp32 copy, its exp and
the gradient written from it stay in a core's L2 cache (5 rows of a 49k vocabulary). On the 2-core Xeon
(2 MB L2 per core) forward + backward over 600 × 49k bf16 logits took 55–66 ms in chunks of 5 rows against
96 ms in chunks of 256, and 129–132 ms by plain autograd (scripts/measure_levers.py --logprobs)."""


def token_logprobs(
    logits: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk: int | None = None,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits/τ)[ids] and the entropy of softmax(logits/τ), for (B, T, V) logits
    (:func:`gathered_logprobs` with every position reading its own token)."""
    B, T, V = logits.shape
    rows = torch.arange(B * T, device=logits.device)
    flat, flat_ids = logits.reshape(-1, V), ids.reshape(-1)
    logp, ent = gathered_logprobs(flat, rows, flat_ids, temperature, with_entropy, chunk, entropy_grad)
    return logp.view(B, T), (ent.view(B, T) if ent is not None else None)


def gathered_logprobs(
    logits: Tensor,
    rows: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk: int | None = None,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits[rows]/τ)[targets] (M,) from (N, V) ``logits``, in fp32, and the entropy of
    softmax(logits/τ) per row of ``logits`` (N,) with ``with_entropy``. A row may be read by several
    (row, target) pairs (a packed prompt's last column predicts the first token of each completion).

    Computed as logit[target]/τ − logsumexp(logits/τ), in fp32 chunks of ``chunk`` rows (default:
    :data:`LOGPROB_CHUNK_ELEMENTS` logits). Its backward
    (:class:`_GatheredLogProbs`) is the closed form ∂ log π(a)/∂ logits = (onehot(a) − softmax)/τ,
    recomputed chunk by chunk from the logits in their own dtype: no fp32 copy of the logits is kept
    for the backward, and autograd's three full-vocabulary temporaries (logits − lse, its exp, the
    zero-filled gradient of the gather) are never made. Only an entropy *bonus* (``entropy_grad`` while
    gradients are on) differentiates the entropy; that falls back to plain autograd over fp32 chunks."""
    chunk = chunk or max(1, LOGPROB_CHUNK_ELEMENTS // logits.shape[-1])
    if with_entropy and entropy_grad and torch.is_grad_enabled() and logits.requires_grad:
        lse, ent = logsumexp_entropy(logits, temperature, True, chunk, True)
        picked = logits[rows, targets].float() / temperature
        return picked - lse[rows], ent
    logp, ent = _GatheredLogProbs.apply(logits, rows, targets, temperature, with_entropy, chunk)
    return logp, (ent if with_entropy else None)


def logsumexp_entropy(
    logits: Tensor, temperature: float = 1.0, with_entropy: bool = True, chunk: int = 4096, entropy_grad: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Per row of (N, V) ``logits``: logsumexp(logits/τ) and the entropy of softmax(logits/τ), in
    fp32 chunks, differentiable by plain autograd (which keeps each fp32 chunk for the backward):
    :func:`gathered_logprobs` uses it when the entropy itself is trained."""
    lses, ents = [], []
    for s in range(0, logits.shape[0], chunk):
        lg = logits[s : s + chunk].float()
        if temperature != 1.0:
            lg = lg / temperature
        lse = torch.logsumexp(lg, dim=-1)
        lses.append(lse)
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                p = torch.softmax(lg, dim=-1)
                ents.append(lse - (p * lg).sum(-1))
    return torch.cat(lses), (torch.cat(ents) if with_entropy else None)


class _GatheredLogProbs(torch.autograd.Function):
    """:func:`gathered_logprobs` with a closed-form backward (the entropy is a metric: no gradient)."""

    @staticmethod
    def forward(ctx, logits, rows, targets, temperature, with_entropy, chunk):
        lse, ent = logsumexp_entropy(logits, temperature, with_entropy, chunk, entropy_grad=False)
        if ent is None:
            ent = lse.new_empty(0)
        logp = logits[rows, targets].float() / temperature - lse[rows]
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        logits, rows, targets, lse = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk
        N, V = logits.shape
        g = grad_logp.float() / tau  # ∂L/∂(logits/τ) · 1/τ, per (row, target) pair
        w = torch.zeros(N, dtype=torch.float32, device=logits.device).index_add_(0, rows, g)  # Σ g per row
        grad = torch.empty_like(logits)
        for s in range(0, N, chunk):
            lg = logits[s : s + chunk]
            # a fresh fp32 tensor, never the saved logits themselves (bf16 − fp32 computes in fp32)
            z = torch.sub(lg.float() / tau if tau != 1.0 else lg, lse[s : s + chunk, None])
            grad[s : s + chunk] = z.exp_().mul_(-w[s : s + chunk, None])  # −Σg · softmax
        # + g at each distinct (row, target), added to the fp32 −Σg·softmax there before one rounding
        key, inv = torch.unique(rows * V + targets, return_inverse=True)
        r, t = key // V, key % V
        at = torch.zeros(key.shape[0], dtype=torch.float32, device=logits.device).index_add_(0, inv, g)
        soft = (logits[r, t].float() / tau - lse[r]).exp() * -w[r]
        grad[r, t] = (soft + at).to(grad.dtype)
        return grad, None, None, None, None, None


def sample_from_logits(
    logits: Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row from softmax(logits/τ) truncated by top-k/top-p.

    Returns (tokens (B,), log softmax(logits/τ)[tokens] (B,)) — the log-prob of the UNtruncated
    tempered policy, which is what the training pass recomputes. ``temperature == 0`` is greedy.

    With ``uniforms`` (B,) in [0, 1) the draw is by inverse CDF, token = min{i : F_i > u·F_V}, so
    a row's token depends only on its own logits and u — not on which other rows share the batch
    or which process holds it (the trainer derives u from (seed, step, global row)). Otherwise
    ``torch.multinomial`` with ``generator``.
    """
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)
    lg = logits.float() / temperature
    logp_all = torch.log_softmax(lg, dim=-1)
    filt = lg
    if top_k > 0 and top_k < lg.shape[-1]:
        kth = torch.topk(lg, top_k, dim=-1).values[:, -1:]
        filt = filt.masked_fill(filt < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lg, order = torch.sort(filt, descending=True, dim=-1)
        cum = torch.softmax(sorted_lg, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_lg, -1) > top_p  # keep the smallest prefix with mass ≥ p
        sorted_lg = sorted_lg.masked_fill(drop, float("-inf"))
        filt = torch.full_like(filt, float("-inf")).scatter(-1, order, sorted_lg)
    probs = torch.softmax(filt, dim=-1)
    if uniforms is not None:
        cdf = probs.cumsum(-1)  # (B, V); flat over zero-probability tokens, so they are never chosen
        tok = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1])[:, None], right=True).squeeze(-1)
        tok = tok.clamp(max=probs.shape[-1] - 1)
    else:
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp_all.gather(-1, tok[:, None]).squeeze(-1)
