r"""All the math of rlhf-pg: pure functions of tensors (torch only).

Notation. A completion y = (a_0, ..., a_{T-1}) is sampled from π_θ(·|x); s_t = (x, a_{<t}). Every tensor
below is (B, T): B completions (G adjacent rows per prompt), T completion positions, `mask` 1 on real
tokens (up to and including EOS). Per-token rewards r_t hold the sequence reward R on the last real
token unless a reward function returns dense rewards.

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

from typing import Any, Callable

import torch

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
    """(B,) index of the last real token of each row (0 for an empty row)."""
    length = mask.sum(-1).long()
    return (length - 1).clamp(min=0)


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


# ------------------------------------------------------------------------------------- KL estimators
# Schulman (2020), "Approximating KL Divergence". With log r = log π_ref − log π, under samples from π:
#   k1 = −log r                (unbiased for KL(π‖π_ref), high variance, can be negative)
#   k2 = ½ (log r)²            (biased, low variance; its gradient is the true KL gradient's to 1st order)
#   k3 = (r − 1) − log r       (unbiased, always ≥ 0, low variance)
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_r = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


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
AdvantageFn = Callable[[Tensor, Tensor, "Tensor | None", int, Any], "tuple[Tensor, Tensor]"]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register ``fn(token_rewards, mask, values|None, group_size, cfg) -> (advantages, returns)``."""

    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def _groups(x: Tensor, group_size: int) -> Tensor:
    """(B, ...) → (B/G, G, ...): rows i·G … i·G+G−1 share a prompt."""
    return x.view(-1, group_size, *x.shape[1:])


@register_advantage("grpo")
def grpo_advantages(token_rewards, mask, values, group_size, cfg):
    """Â_i = (R_i − mean_g R) / std (Shao et al. 2024, DeepSeekMath §4.1), the same for every token.

    std: the group's (``scale=group``), the whole batch's (``batch``) or 1 (``none``, Dr. GRPO).
    Returns are R broadcast over the tokens.
    """
    R = masked_sum(token_rewards, mask, dim=-1)  # (B,)
    Rg = _groups(R, group_size)  # (B/G, G)
    centred = (Rg - Rg.mean(1, keepdim=True)).reshape(-1)  # (B,)
    if cfg.scale == "group":
        centred = centred / (Rg.std(1).repeat_interleave(group_size) + 1e-4)
    elif cfg.scale == "batch":
        centred = centred / (R.std() + 1e-4)
    return centred[:, None] * mask, R[:, None] * mask


@register_advantage("rloo")
def rloo_advantages(token_rewards, mask, values, group_size, cfg):
    """Â_i = R_i − mean_{j≠i} R_j over the prompt's group (Kool et al. 2019; Ahmadian et al. 2024).

    Unbiased: the baseline uses only the other G−1 samples. Equals G/(G−1) · (R_i − mean_g R).
    """
    R = masked_sum(token_rewards, mask, dim=-1)  # (B,)
    Rg = _groups(R, group_size)
    loo = (Rg.sum(1, keepdim=True) - Rg) / (group_size - 1)
    return (Rg - loo).reshape(-1)[:, None] * mask, R[:, None] * mask


@register_advantage("reinforce")
def reinforce_advantages(token_rewards, mask, values, group_size, cfg):
    """Monte-Carlo REINFORCE (Williams 1992): Ψ_t = G_t − b_t.

    G_t is the reward-to-go Σ_{k≥t} γ^{k−t} r_k (``reward_to_go=True``) or the full return G_0 for
    every t. Baselines, per position t within the prompt's group of G samples:
    ``mean`` b_t = mean_j G_{j,t} over the n_t samples alive at t (includes the sample: shrinks position
    t's gradient by 1 − E[1/n_t], i.e. (G−1)/G when all lengths are equal);
    ``loo`` b_t = mean_{j≠i} G_{j,t} (unbiased); ``ema`` b = ``values`` (the trainer passes a running
    mean of past returns, a constant within the batch: unbiased); ``none`` b = 0.
    """
    rtg = discounted_cumsum(token_rewards, mask, cfg.gamma)  # (B,T)  G_t
    G = rtg if cfg.reward_to_go else rtg[:, :1].expand_as(rtg) * mask
    if cfg.baseline == "none":
        b = torch.zeros_like(G)
    elif cfg.baseline == "ema":
        if values is None:
            raise ValueError("baseline=ema needs the running baseline passed as `values`")
        b = values
    else:
        Gg, mg = _groups(G, group_size), _groups(mask, group_size)  # (B/G, G, T)
        tot, cnt = (Gg * mg).sum(1, keepdim=True), mg.sum(1, keepdim=True)
        if cfg.baseline == "mean":
            b = (tot / cnt.clamp(min=1)).expand_as(Gg)
        elif cfg.baseline == "loo":
            b = (tot - Gg * mg) / (cnt - mg).clamp(min=1)
        else:
            raise ValueError(f"unknown baseline {cfg.baseline!r}")
        b = b.reshape_as(G)
    return (G - b) * mask, G


@register_advantage("gae")
def gae_advantages(token_rewards, mask, values, group_size, cfg):
    """GAE(γ, λ) (Schulman et al. 2016): δ_t = r_t + γV(s_{t+1}) − V(s_t), Â_t = Σ_l (γλ)^l δ_{t+l}.

    V after the last real token is 0 (the episode ends). Returns Â + V are the value targets.
    λ = 1 gives G_t − V(s_t) (unbiased for any V); λ = 0 gives the one-step TD error.
    """
    if values is None:
        raise ValueError("advantage=gae needs values (a value head)")
    v = values * mask
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # V(s_{t+1}); 0 past the end
    delta = token_rewards + cfg.gamma * v_next - v
    adv = discounted_cumsum(delta, mask, cfg.gamma * cfg.lam)
    return adv, (adv + v) * mask


# ------------------------------------------------------------------------------------ policy losses
PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, Any], "tuple[Tensor, dict[str, Tensor]]"]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register ``fn(logp, old_logp, advantages, mask, cfg) -> (per_token_loss, per_token_stats)``."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return deco


@register_policy_loss("pg")
def pg_loss(logp, old_logp, advantages, mask, cfg):
    """Vanilla policy gradient: ℓ_t = −Â_t · log π_θ(a_t|s_t). On-policy only (no ratio)."""
    return -advantages * logp, {}


@register_policy_loss("clip")
def clip_loss(logp, old_logp, advantages, mask, cfg):
    """PPO clipped surrogate (Schulman et al. 2017) with asymmetric ε and optional dual clip.

    ρ = π_θ/π_old; ℓ = −min(ρÂ, clip(ρ, 1−ε_low, 1+ε_high)Â); with dual clip c (Ye et al. 2020) and
    Â < 0: ℓ = min(ℓ, −cÂ). At ρ = 1 the gradient is −Â∇log π, the vanilla policy gradient.
    Stats (per token, detached): clip_low (ρ < 1−ε_low with Â < 0: pushed down, clipped),
    clip_high (ρ > 1+ε_high with Â > 0), approx_kl = k3 estimate of KL(π_old‖π_θ).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high) * advantages
    loss = -torch.minimum(surr1, surr2)
    if cfg.dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -cfg.dual_clip * advantages), loss)
    with torch.no_grad():
        stats = {
            "clip_low": ((ratio < 1.0 - cfg.clip_eps_low) & (advantages < 0)).float(),
            "clip_high": ((ratio > 1.0 + cfg.clip_eps_high) & (advantages > 0)).float(),
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
def aggregate(per_token: Tensor, mask: Tensor, mode: str, *, num_tokens: float, num_seqs: float,
              constant: float | None = None) -> Tensor:
    """Turn (B, T) losses into this micro-batch's share of the minibatch loss.

    ``num_tokens``/``num_seqs`` are the counts of the WHOLE minibatch (all micro-batches, all
    processes), so summing the shares of every micro-batch gives exactly the loss of the unsplit
    batch — gradient accumulation and data parallelism do not change the objective.

    token-mean           Σ_{i,t} ℓ / N_tokens                      (biased: length-weighted)
    seq-mean-token-mean  Σ_i (Σ_t ℓ / |y_i|) / N_seqs              (biased: short answers weigh more)
    seq-mean-token-sum   Σ_{i,t} ℓ / N_seqs                        (unbiased for J)
    constant             Σ_{i,t} ℓ / (N_seqs · C)                  (Dr. GRPO; unbiased up to 1/C)
    """
    s = per_token * mask
    if mode == "token-mean":
        return s.sum() / num_tokens
    if mode == "seq-mean-token-mean":
        return (s.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_seqs
    if mode == "seq-mean-token-sum":
        return s.sum() / num_seqs
    if mode == "constant":
        if constant is None:
            raise ValueError("loss_agg=constant needs a constant")
        return s.sum() / (num_seqs * constant)
    raise ValueError(f"unknown loss aggregation {mode!r}")


# ------------------------------------------------------------------------------ log-probs, entropy
def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0, with_entropy: bool = True,
                   chunk: int = 4096, entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits/τ)[ids] and the entropy of softmax(logits/τ), for (B, T, V) logits.

    Computed as gathered logit − logsumexp, chunked over rows so no full-vocabulary fp32
    log-softmax of the whole batch is ever materialised. ``entropy_grad=False``: the entropy is a
    metric only (no entropy bonus), computed without autograd, so its full-vocabulary softmax is
    not kept alive for the backward pass.
    """
    B, T, V = logits.shape
    flat, flat_ids = logits.reshape(-1, V), ids.reshape(-1)
    lps, ents = [], []
    for s in range(0, flat.shape[0], chunk):
        lg = flat[s:s + chunk].float()
        if temperature != 1.0:
            lg = lg / temperature
        lse = torch.logsumexp(lg, dim=-1)
        lps.append(lg.gather(-1, flat_ids[s:s + chunk, None]).squeeze(-1) - lse)
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                p = torch.softmax(lg, dim=-1)
                ents.append(lse - (p * lg).sum(-1))
    logp = torch.cat(lps).view(B, T)
    return logp, (torch.cat(ents).view(B, T) if with_entropy else None)


def sample_from_logits(logits: Tensor, temperature: float, top_p: float, top_k: int,
                       generator: torch.Generator | None, uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
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

