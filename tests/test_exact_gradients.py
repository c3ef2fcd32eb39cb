r"""The policy-gradient estimators of core.py against the EXACT gradient of an enumerable policy.

The toy
-------
Vocabulary {a, b, c, $} ($ = EOS). A completion has at most T = 3 tokens: $ ends it, and it ends
anyway after the third token. That gives 40 completions: "$"; "x$" (3); "xy$" (9); "xyz" (27), with
x, y ∈ {a, b, c}, z ∈ {a, b, c, $}. The state s_t is the prefix a_{<t}: 1 + 3 + 9 = 13 states, and the
policy is a table of logits θ[s] ∈ R^4 (52 parameters, seeded N(0, 0.8²) init, not uniform):
π_θ(y) = Π_t softmax(θ[s_t])[a_t]. Since θ[s] is only used at s, the gradient block of a state of
depth d is the contribution of position t = d alone.

Two reward settings (γ = 1):
  seq    R(y) = #a(y) − 0.5·|y| + 1[y ends with $], on the last token (multiples of ½: few distinct values)
  dense  r_t = w[a_t] + 0.5·1[a_t = a_{t−1}],  w = (a: 1.5, b: 0.5, c: −0.5, $: 1.0)
J(θ) = Σ_y π_θ(y) Σ_t r_t(y), and ∇J, are computed exactly by enumerating the 40 completions (autograd).

The Monte-Carlo protocol (what the trainer does, on the toy)
-----------------------------------------------------------
K = 4000 batches of N = 16 completions of one prompt (4 groups of G = 4), all K·N sampled at once with
core.sample_from_logits. Per batch: token rewards (core.place_scores for seq), advantages
core.ADVANTAGES[·].fn (options model from Spec.adv_opts), per-token loss core.POLICY_LOSSES[·].fn
(Spec.loss_opts; old_logp = logp.detach(), i.e. ratio 1), core.AGGREGATIONS[·].fn with that batch's own
counts (core.Normalisers; Spec.agg_opts), and ĝ_k = −∇_θ loss_k (one backward for all batches: each
batch differentiates its own copy of θ). Tests compare mean_k ĝ_k to a target coordinate by coordinate:
|mean − target| ≤ Z·SE + 1e-6, SE = std_k(ĝ_k)/√K; and along the target t itself, where a rescaling
bias shows most: s_k = ⟨ĝ_k, t⟩/‖t‖² has mean 1 within Z·SE.

Z = 5: a two-sided normal tail of 5.7e-7 per comparison; with (52 coordinates + 1 projection) × ~20
single-turn estimators and (156 + 1) × 16 on the episode toy below (≈ 3600 comparisons), Bonferroni
bounds the chance that correct estimators fail ANY of them by ≈ 2e-3. (Seeds are fixed, so the tests
are deterministic: this is the chance that the chosen seeds are unlucky.) Power: an rloo whose
baseline keeps 10 % of the sample itself (a 3.3 % shrinkage of E[ĝ]) fails; the per-coordinate checks
alone catch ≈ 7 %.
A bias is called significant when max_j |mean_j − ∇J_j| / SE_j > Z, the same family-wise level.

Every biased estimator is also compared to its EXACT expectation, derived in ``expected_gradient``:
enumeration for estimators whose advantage depends on the sample alone (GAE, REINFORCE without a
group baseline); closed forms over the reward / length distribution for the group and length effects.

Measured (``python tests/test_exact_gradients.py``): rel. bias = ‖mean − ∇J‖/‖∇J‖; exact = the same
for the exact expectation (enumeration or closed form; 0 by the independence argument for loo/rloo);
noise = ‖SE‖/‖∇J‖ (what an unbiased estimator's rel. bias should be close to); scale = ⟨mean, ∇J⟩/‖∇J‖²;
trCov = trace of the covariance of ĝ for one batch of N = 16, over ‖∇J‖²:

    estimator                           rel.bias  exact   noise   scale   trCov/|g|^2
    ---------------------------------------------------------------------------------
    reinforce full return                 0.007   0.000   0.011   1.000      0.49
    reinforce full return (dense)         0.018   0.000   0.019   0.993      1.52
    reinforce reward-to-go (dense)        0.017   0.000   0.016   0.993      1.00
    reinforce rtg + loo (dense)           0.013   0.000   0.013   0.999      0.67
    reinforce full + loo                  0.011   0.000   0.013   1.003      0.71
    reinforce full + ema (const)          0.010   0.000   0.016   1.001      1.03
    rloo                                  0.010   0.000   0.013   1.003      0.65
    gae lam=1, arbitrary V (dense)        0.022   0.000   0.022   0.990      1.92
    gae lam=0.5, true V (dense)           0.010   0.000   0.009   0.994      0.30
    ppo clip at ratio 1, rtg+loo (dense)  0.013   0.000   0.013   0.999      0.67
    agg constant (C=T): grad/C            0.667   0.667   0.004   0.333      0.05
    grpo scale=none: (G-1)/G              0.248   0.250   0.010   0.752      0.36
    reinforce rtg + mean (dense)          0.267   0.266   0.009   0.735      0.33
    grpo scale=group                      0.184   0.186   0.011   0.827      0.46
    agg token-mean                        0.562   0.563   0.005   0.438      0.09
    agg seq-mean-token-mean               0.539   0.539   0.004   0.484      0.06
    gae lam=0.5, wrong V (dense)          0.883   0.884   0.022   1.572      1.90

Reading it. Unbiased rows: rel. bias ≈ noise (pure sampling error), scale ≈ 1. Biased rows match
their exact expectation to within noise. ``constant`` is ∇J/C (C = 3). grpo scale=none is exactly
(G−1)/G. baseline=mean is (G−1)/G = 0.75 only at t = 0: it averages over the members alive at t, so
deeper positions shrink more (0.644 at t = 1, 0.593 at t = 2 here). grpo scale=group shrinks (0.83) AND
turns the gradient (its component orthogonal to ∇J is 7.8 % of its norm). token-mean is ≈ ∇J/E|y|
(E|y| = 2.29) at N = 16 (orthogonal component 1.3 %; the length weighting N·E[1/(|y| + L')] fades as N
grows); seq-mean-token-mean is the gradient of Σ π(y) R(y)/|y| (orthogonal component 31 %). GAE with
λ < 1 and a wrong V is badly biased (0.88); with the true V it is unbiased and has the lowest variance.
Variance: full return 1.52 > reward-to-go 1.00 > reward-to-go − loo 0.67 (× ‖∇J‖², dense rewards,
one batch of 16).

Multi-turn episodes: the environment's transitions drop out of ∇log P(τ)
-----------------------------------------------------------------------
The toy. Vocabulary {a, b, $}. An episode is a model turn, the environment's reply, a model turn. A
turn is "$", "x$" or "xy" (x, y ∈ {a, b}: 7 turns of ≤ 2 tokens); the reply is ONE token e ∈ {a, b}
drawn at random from P_env(a | turn 1) = 0.2 + 0.3·#a(turn 1) + 0.1·1[turn 1 ends with $] (0.2 … 0.8:
fixed, θ-independent, history-dependent, non-uniform). 7·2·7 = 98 episodes, laid out as the trainer's
rows (T = 5; e.g. "ab", b, "$" is a b b $ · with action mask 1 1 0 1 0). States are full histories: 3
in turn 1, 7 before the reply (one per turn 1), 42 in turn 2 (one per turn 1, reply and prefix); θ is
a 52 × 3 table of logits (N(0, 0.8²), seed 1). The reply is from the model's vocabulary, so the table
also gives it a probability log π_θ(e|h) at the 7 reply states (what an LM would train on if the
reply were in its loss); J never uses those logits: ∇J is exactly 0 there.
P(τ) = Π_actions π_θ(a|s) · P_env(e|turn 1). Rewards r_k = #a(turn k) − ½·|turn k| (+1 when turn 2
opens with the reply), each on its turn's last token ("per-turn", as an environment's rewards), or
their sum R(τ) on the last action token ("seq", core.place_scores): the same J = Σ_τ P(τ) R(τ), and
∇J by autograd over the enumeration (checked against finite differences). γ = 1 unless stated.

Protocol: as above (K = 4000 batches of N = 16 episodes, groups of G = 4, fixed seeds), episodes drawn
from the process itself (core.sample_from_logits for the model's tokens, P_env for the reply), ĝ
computed as the trainer computes it: rewards (and V) compacted to the action positions by
core.ActionIndex, the registry's estimator on them, Â expanded back; the policy loss (old_logp =
logp.detach()) and the aggregation with the action mask (Normalisers count action tokens).
"env masked": the action mask is 0 on the reply (right). "env as actions" (the mistake): it is 1 on
every real token, so the reply gets a log π_θ(e|h) term and is a time step.
Exact expectations (``episode_reference_weights``, plain loops over each episode's time steps,
independent of core): E[ĝ] = Σ_τ P(τ) Σ_t Ψ̄_t ∇log π_θ(x_t|s_t), Ψ̄ = the estimator's own-sample part
(full return, reward-to-go, GAE) minus the expectation of its group baseline, which is built from the
other G − 1 episodes and so is independent of this one (rloo: J; loo at step k: (1 − (1 − q_k)^{G−1})
·E[G_k | step k exists]; grpo scale=none: Ψ̄ = (G−1)/G·(R − J)). With the env masked (γ = 1) it is ∇J
to float precision for every unbiased estimator. With the env as actions it is not: the reply is drawn
from P_env, not π_θ, so E_e[∇log π_θ(e|h)] ≠ 0 and the reply's term Ψ_e ∇log π_θ(e|h) has a mean.

    estimator                                                       rel.bias  exact   noise   scale   trCov/|g|^2
    -------------------------------------------------------------------------------------------------------------
    episode: reinforce full return (seq), env masked                  0.020   0.000   0.022   1.001      1.89
    episode: reinforce rtg (per-turn), env masked                     0.019   0.000   0.020   1.000      1.61
    episode: reinforce rtg + loo (per-turn), env masked               0.017   0.000   0.023   0.999      2.08
    episode: rloo (seq), env masked                                   0.018   0.000   0.024   0.998      2.24
    episode: gae lam=1, arbitrary V (per-turn), env masked            0.020   0.000   0.027   0.996      2.91
    episode: gae lam=0.5, true V (per-turn), env masked               0.010   0.000   0.013   1.001      0.71
    episode: ppo clip at ratio 1, rtg+loo (per-turn), env masked      0.017   0.000   0.023   0.999      2.08
    episode: grpo scale=none (seq), env masked: (G-1)/G               0.252   0.250   0.018   0.749      1.26
    episode: reinforce rtg gamma=0.5 (per-turn), env masked           0.190   0.192   0.013   0.839      0.73
    episode: reinforce rtg (per-turn), env as actions                 0.287   0.285   0.022   1.000      1.93
    episode: reinforce rtg + loo (per-turn), env as actions           0.256   0.250   0.025   0.998      2.56
    episode: rloo (seq), env as actions                               0.360   0.360   0.027   0.998      2.89
    episode: gae lam=1, arbitrary V (per-turn), env as actions        0.398   0.391   0.029   0.996      3.42
    episode: ppo clip at ratio 1, rtg+loo (per-turn), env as actions  0.256   0.250   0.025   0.998      2.56
    episode: reinforce rtg gamma=0.5 (per-turn), env as actions       0.272   0.273   0.014   0.787      0.73

Reading it. Env masked: the estimators that should be unbiased are (rel. bias ≈ noise, scale ≈ 1); grpo
scale=none is (G−1)/G as in one turn. γ = 0.5 (env masked) matches the expectation of a discount that
counts the model's tokens only (turn 1's last action → turn 2's first is one step): the one that counts
the reply as a step too is 8.5 % of ‖∇J‖ away and rejected (max z = 14); both differ from ∇J because J
is undiscounted. Env as actions (γ = 1): biased by 25–39 % of ‖∇J‖, all of it in the reply states'
logits (scale ≈ 1: the bias is orthogonal to ∇J, which is 0 there). The actions' terms are unchanged
(the reply has no reward; group baselines stay independent of the sample); the reply adds, at each reply
state h (weight P(h)), Σ_e P_env(e|h) E[Ψ_e|h, e] (1_e − π_θ(·|h)) to the gradient of its logits: it
teaches the model to imitate the environment, weighted by Ψ. A tabular policy keeps that in the reply
states' block; an LM shares its parameters, so the same terms move its own turns. With γ = 0.5 the reply
is also a step, and the actions' block is biased too (turn 2's rewards reach turn 1 discounted by γ²
instead of γ). Counting the reply also adds variance (reward-to-go 1.61 → 1.93). Without the compaction
(the holed mask given to the estimator as it is) core.discounted_cumsum restarts at the hole: E[ĝ] is
62 % of ‖∇J‖ off for reward-to-go, 47 % for GAE with the true V.

Sampler/trainer mismatch (rollout.is_correction)
------------------------------------------------
The single-turn toy, sampled from μ = the policy with perturbed logits θ + δ (δ ~ N(0, 0.5²)) while
the trainer differentiates π_θ; rloo advantages, the pg loss, seq-mean-token-sum; the per-token loss
weighted by core.importance_weights as the trainer does. E[ĝ] = Σ_y μ(y) Σ_t w_t(y) (R(y) − E_μ R)
∇log π(a_t|s_t), with the weights written by hand from their definition (``hand_weights``):

    estimator                               rel.bias  exact   noise   scale   trCov/|g|^2
    -------------------------------------------------------------------------------------
    mismatch: no correction                   0.187   0.188   0.012   0.951      0.62
    mismatch: sequence IS, no cap             0.014   0.000   0.014   1.008      0.76
    mismatch: sequence IS, cap 2              0.016   0.010   0.013   1.005      0.72
    mismatch: sequence, mask above 2          0.057   0.054   0.013   0.997      0.66
    mismatch: token IS, no cap                0.120   0.123   0.013   0.982      0.69
    mismatch: token IS, cap 3 (vllm default)  0.120   0.123   0.013   0.982      0.69
    mismatch: token IS, cap 1.2               0.102   0.109   0.012   0.935      0.59

Reading it. Uncorrected, sampling from another policy biases ĝ by 19 % of ‖∇J‖. The sequence weight
π(y)/μ(y) removes it exactly (rel. bias = noise); capped at 2 it leaves 1 %; dropping the samples
whose weight is above 2 leaves 5 %. Per-token weights leave 12 %: they correct each action's
probability but not the μ-distribution of the states it is taken in (no token ratio here exceeds 3, so
the default cap changes nothing; a cap of 1.2 shifts the bias, it does not remove it). The per-token
weight is the usual choice for long completions nevertheless, because the sequence weight is a product
over every token and its variance grows with the length (this toy has 3 tokens).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import pytest
import torch

from rlhf_pg import core

A, B, C, EOS = 0, 1, 2, 3
VOCAB, T, NUM_STATES = 4, 3, 13
G, N, K = 4, 16, 4000  # group size, completions per batch, batches
Z = 5.0  # per-coordinate z threshold (Bonferroni: see the module docstring)
ATOL = 1e-6
SEED = 1234
DENSE_W = torch.tensor([1.5, 0.5, -0.5, 1.0])


# These are thousands of tiny ops: intra-op threads only contend (10-100x slower on a busy CPU).
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ the toy
def states_of(ids: torch.Tensor) -> torch.Tensor:
    """(n, T) token ids → (n, T) index of s_t = a_{<t}: root 0; "x" 1 + x; "xy" 4 + 3x + y.

    Past the end of a completion the index is still a valid (irrelevant) state: those positions are masked.
    """
    x0, x1 = ids[:, 0].clamp(max=2), ids[:, 1].clamp(max=2)
    return torch.stack([torch.zeros_like(x0), 1 + x0, 4 + 3 * x0 + x1], dim=1)


STATE_DEPTH = torch.tensor([0] + [1] * 3 + [2] * 9)


def init_theta() -> torch.Tensor:
    return 0.8 * torch.randn(NUM_STATES, VOCAB, generator=torch.Generator().manual_seed(0))


THETA = init_theta()


def enumerate_completions() -> tuple[torch.Tensor, torch.Tensor]:
    """All 40 completions as (40, T) ids (padded with $) and float mask (1 up to and including $)."""
    seqs = [[EOS]] + [[x, EOS] for x in range(3)]
    seqs += [[x, y, z] for x in range(3) for y in range(3) for z in range(4)]
    ids = torch.full((len(seqs), T), EOS)
    mask = torch.zeros(len(seqs), T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1.0
    return ids, mask


ENUM_IDS, ENUM_MASK = enumerate_completions()


def sample_completions(theta: torch.Tensor, n: int, generator: torch.Generator):
    """n completions from π_θ at once (one vectorised step per position)."""
    ids, mask = torch.full((n, T), EOS), torch.zeros(n, T)
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(T):
        tok, _ = core.sample_from_logits(theta[states_of(ids)[:, t]], 1.0, 1.0, 0, generator)
        ids[:, t] = torch.where(alive, tok, EOS)
        mask[:, t] = alive.float()
        alive = alive & (tok != EOS)
    return ids, mask


def token_logp(theta: torch.Tensor, ids: torch.Tensor, rows_per_copy: int | None = None) -> torch.Tensor:
    """(n, T) log π_θ(a_t|s_t) via core.token_logprobs. With ``rows_per_copy``, ``theta`` is (K, 13, 4)
    and rows k·rows_per_copy … use copy k (so one backward yields K separate per-batch gradients)."""
    st = states_of(ids)
    if rows_per_copy is None:
        logits = theta[st]
    else:
        copy = torch.arange(ids.shape[0]) // rows_per_copy
        logits = theta.reshape(-1, VOCAB)[copy[:, None] * NUM_STATES + st]
    return core.token_logprobs(logits, ids, with_entropy=False, chunk=1 << 30)[0]


def token_rewards(kind: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if kind == "seq":
        n_a = ((ids == A).float() * mask).sum(-1)
        last = ids.gather(1, core.last_token_index(mask)[:, None]).squeeze(1)
        R = n_a - 0.5 * mask.sum(-1) + (last == EOS).float()
        return core.place_scores(R, mask)
    r = DENSE_W[ids].clone()
    r[:, 1:] += 0.5 * ((ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] != EOS)).float()
    return r * mask


def seq_prob(theta, ids=ENUM_IDS, mask=ENUM_MASK):
    return ((token_logp(theta, ids) * mask).sum(-1)).exp()


def objective(theta: torch.Tensor, kind: str) -> torch.Tensor:
    """J(θ) = Σ_y π_θ(y) Σ_t r_t(y), exactly."""
    return (seq_prob(theta) * token_rewards(kind, ENUM_IDS, ENUM_MASK).sum(-1)).sum()


def grad_of(fn, at: torch.Tensor = THETA) -> torch.Tensor:
    theta = at.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(theta), theta)
    return g.reshape(-1)


@functools.cache
def true_gradient(kind: str) -> torch.Tensor:
    return grad_of(lambda th: objective(th, kind))


@functools.cache
def true_state_values(kind: str) -> torch.Tensor:
    """V^π(s) = E[G_t | s_t = s] (γ = 1) for the 13 states, by enumeration."""
    p = seq_prob(THETA)
    rtg = core.discounted_cumsum(token_rewards(kind, ENUM_IDS, ENUM_MASK), ENUM_MASK, 1.0)
    st = states_of(ENUM_IDS)
    w = p[:, None] * ENUM_MASK
    num = torch.zeros(NUM_STATES).index_add_(0, st.reshape(-1), (w * rtg).reshape(-1))
    den = torch.zeros(NUM_STATES).index_add_(0, st.reshape(-1), w.reshape(-1))
    return num / den


WRONG_V = 2.0 * torch.randn(NUM_STATES, generator=torch.Generator().manual_seed(7))  # arbitrary V table


# ------------------------------------------------------------------------------------ the estimators
# Defaults of Spec.cfg (γ goes into core.AdvantageInputs; the rest into the advantage estimator's
# options model, for the fields it has). The policy loss's options (clip) are fixed.
ADV_DEFAULTS = dict(gamma=1.0, lam=1.0, scale="none", reward_to_go=False, baseline="none")
CLIP_DEFAULTS = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0)


def _options(model, values: dict):
    """An instance of the options model ``model`` from the keys of ``values`` it has (None without a model)."""
    return None if model is None else model(**{k: v for k, v in values.items() if k in model.model_fields})


@dataclass(frozen=True)
class Spec:
    advantage: str
    rewards: str  # "seq" | "dense"
    cfg: dict = field(default_factory=dict)  # overrides of ADV_DEFAULTS
    values: str | None = None  # None | "ema" (EmaBaseline at 0.7) | "wrong" (WRONG_V[s_t]) | "true" (V^π(s_t))
    loss: str = "pg"
    agg: str = "seq-mean-token-sum"
    unbiased: bool = True
    per_sample: bool = False  # the advantage depends on the completion alone (expectation by enumeration)

    def __post_init__(self):
        model = core.ADVANTAGES[self.advantage].options
        unknown = set(self.cfg) - {"gamma"} - set(model.model_fields if model else ())
        assert not unknown, f"{self.advantage} has no options {sorted(unknown)}"

    @property
    def gamma(self) -> float:
        return {**ADV_DEFAULTS, **self.cfg}["gamma"]

    def adv_opts(self):
        """The advantage estimator's options model (None for rloo) from ADV_DEFAULTS and ``cfg``."""
        return _options(core.ADVANTAGES[self.advantage].options, {**ADV_DEFAULTS, **self.cfg})

    def loss_opts(self):
        """ClipOptions(eps_low=0.2, eps_high=0.28, dual_clip=3) for clip; None for pg."""
        return _options(core.POLICY_LOSSES[self.loss].options, CLIP_DEFAULTS)

    def agg_opts(self):
        """ConstantOptions(value=T) for constant (C = T); None for the others."""
        return _options(core.AGGREGATIONS[self.agg].options, {"value": float(T)})

    def adv_state(self):
        """A fresh estimator state: an EMA baseline at the constant 0.7 for values="ema", else None."""
        if self.values != "ema":
            return None
        st = core.EmaBaseline()
        st.value = 0.7
        return st


SPECS: dict[str, Spec] = {
    # unbiased
    "reinforce full return": Spec("reinforce", "seq", per_sample=True),
    "reinforce full return (dense)": Spec("reinforce", "dense", per_sample=True),
    "reinforce reward-to-go (dense)": Spec("reinforce", "dense", {"reward_to_go": True}, per_sample=True),
    "reinforce rtg + loo (dense)": Spec("reinforce", "dense", {"reward_to_go": True, "baseline": "loo"}),
    "reinforce full + loo": Spec("reinforce", "seq", {"baseline": "loo"}),
    "reinforce full + ema (const)": Spec("reinforce", "seq", {"baseline": "ema"}, values="ema", per_sample=True),
    "rloo": Spec("rloo", "seq"),
    "gae lam=1, arbitrary V (dense)": Spec("gae", "dense", {"lam": 1.0}, values="wrong", per_sample=True),
    "gae lam=0.5, true V (dense)": Spec("gae", "dense", {"lam": 0.5}, values="true", per_sample=True),
    "ppo clip at ratio 1, rtg+loo (dense)": Spec(
        "reinforce", "dense", {"reward_to_go": True, "baseline": "loo"}, loss="clip"
    ),
    # biased, each with a known expectation (see expected_gradient)
    "agg constant (C=T): grad/C": Spec("reinforce", "seq", agg="constant", per_sample=True, unbiased=False),
    "grpo scale=none: (G-1)/G": Spec("grpo", "seq", {"scale": "none"}, unbiased=False),
    "reinforce rtg + mean (dense)": Spec(
        "reinforce", "dense", {"reward_to_go": True, "baseline": "mean"}, unbiased=False
    ),
    "grpo scale=group": Spec("grpo", "seq", {"scale": "group"}, unbiased=False),
    "agg token-mean": Spec("reinforce", "seq", agg="token-mean", unbiased=False),
    "agg seq-mean-token-mean": Spec("reinforce", "seq", agg="seq-mean-token-mean", unbiased=False),
    "gae lam=0.5, wrong V (dense)": Spec("gae", "dense", {"lam": 0.5}, values="wrong", per_sample=True, unbiased=False),
}
UNBIASED = [k for k, s in SPECS.items() if s.unbiased]
BIASED = [k for k, s in SPECS.items() if not s.unbiased]


def advantages_for(spec: Spec, ids: torch.Tensor, mask: torch.Tensor, group_size: int):
    r = token_rewards(spec.rewards, ids, mask)
    if spec.values == "wrong":
        values = WRONG_V[states_of(ids)] * mask
    elif spec.values == "true":
        values = true_state_values(spec.rewards)[states_of(ids)] * mask
    else:  # None, or "ema": the baseline is the estimator's state (Spec.adv_state), not values
        values = None
    x = core.AdvantageInputs(r, mask, group_size, gamma=spec.gamma, values=values)
    return core.ADVANTAGES[spec.advantage].fn(x, spec.adv_opts(), spec.adv_state()).advantages


@functools.cache
def mc_gradients(name: str, n: int = N, k: int = K, seed: int = SEED) -> torch.Tensor:
    """(k, 52): the gradient estimate ĝ of each of k batches of n completions (n/G groups of G)."""
    spec = SPECS[name]
    ids, mask = sample_completions(THETA, k * n, torch.Generator().manual_seed(seed))
    adv = advantages_for(spec, ids, mask, G)  # groups are adjacent rows, n % G == 0: none straddles batches
    theta_k = THETA.expand(k, NUM_STATES, VOCAB).clone().requires_grad_()
    logp = token_logp(theta_k, ids, rows_per_copy=n)
    per_tok, _ = core.POLICY_LOSSES[spec.loss].fn(logp, logp.detach(), adv, mask, spec.loss_opts())
    aggregate, agg_opts = core.AGGREGATIONS[spec.agg].fn, spec.agg_opts()
    shares = [
        aggregate(l_b, m_b, core.Normalisers(num_tokens=m_b.sum(), num_seqs=n, max_tokens=T), agg_opts)
        for l_b, m_b in zip(per_tok.view(k, n, T).unbind(0), mask.view(k, n, T).unbind(0))
    ]
    torch.stack(shares).sum().backward()
    return -theta_k.grad.reshape(k, -1)


# ------------------------------------------------------------------------ exact expected gradients
def enumerated_expectation(spec: Spec) -> torch.Tensor:
    """E[ĝ] = Σ_y π(y) · (−∇ Σ_t ℓ_t(y)) for an advantage that depends on y alone (then the batch mean
    of N iid completions has the single completion's expectation). Uses core for Â and ℓ."""
    p = seq_prob(THETA).detach()
    adv = advantages_for(spec, ENUM_IDS, ENUM_MASK, group_size=1)

    def surrogate(theta):
        logp = token_logp(theta, ENUM_IDS)
        per_tok, _ = core.POLICY_LOSSES[spec.loss].fn(logp, logp.detach(), adv, ENUM_MASK, spec.loss_opts())
        return -(p * (per_tok * ENUM_MASK).sum(-1)).sum()

    return grad_of(surrogate)


def weighted_score(weight: torch.Tensor) -> torch.Tensor:
    """Σ_y π(y) w(y) ∇log π(y) = Σ_y ∇π(y) w(y) for fixed per-completion weights w (40,)."""
    p = seq_prob(THETA).detach()
    return grad_of(lambda th: (p * weight * (token_logp(th, ENUM_IDS) * ENUM_MASK).sum(-1)).sum())


def reward_distribution(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct values u_m of Σ_t r_t, their probabilities, and each enumerated completion's index m."""
    R = token_rewards(kind, ENUM_IDS, ENUM_MASK).sum(-1)
    u, inv = torch.unique(R, return_inverse=True)
    prob = torch.zeros(len(u)).index_add_(0, inv, seq_prob(THETA).detach())
    return u, prob, inv


def grpo_group_weight(kind: str, eps: float = 1e-4) -> torch.Tensor:
    """w(R) = E[Â_1 | R_1 = R] for Â_1 = (R_1 − mean_g R)/(std_g R + eps) (unbiased std), over the G−1
    other completions of the group, iid from π; written independently of core (enumerates the G−1 others'
    reward values: (#values)^(G−1) tuples). Per completion (40,)."""
    u, prob, inv = reward_distribution(kind)
    others = torch.cartesian_prod(*[torch.arange(len(u))] * (G - 1))  # (M^(G−1), G−1)
    p_others = prob[others].prod(-1)
    mine = u[:, None, None].expand(-1, len(others), 1)
    groups = torch.cat([mine, u[others][None].expand(len(u), -1, -1)], -1)  # (M, M^(G−1), G)
    a1 = (groups[..., 0] - groups.mean(-1)) / (groups.std(-1) + eps)  # (M, M^(G−1))
    return (a1 * p_others).sum(-1)[inv]


def length_distribution() -> torch.Tensor:
    """P(|y| = L) for L = 0..T (index = length)."""
    return torch.zeros(T + 1).index_add_(0, ENUM_MASK.sum(-1).long(), seq_prob(THETA).detach())


@functools.cache
def expected_gradient(name: str) -> torch.Tensor:
    """E[ĝ] of each estimator, exactly (γ = 1, batches of N = 16, groups of G = 4).

    * per-sample advantages (no group baseline): ``enumerated_expectation``; ``constant`` divides by C = T.
    * unbiased group baselines (loo, rloo): ∇J — the baseline uses only the other completions, which are
      independent of a_t, and E[∇log π(a_t|s_t) | s_t] = 0.
    * grpo scale=none: Â_i = R_i − (R_i + Σ_{j≠i} R_j)/G → E = (G−1)/G · ∇J (the others' part vanishes).
    * baseline=mean at position t averages G_t over the n_t group members alive at t (the sample itself
      included): the self term R_i/n_t shrinks position t by 1 − E[1/n_t], n_t − 1 ~ Bin(G−1, P(|y| > t)).
      With the tabular policy, state blocks of depth d get the factor of t = d: exactly (G−1)/G at the
      root (everyone is alive at t = 0), MORE shrinkage deeper down (fewer alive: the self term weighs more).
    * grpo scale=group: E = Σ_y ∇π(y) w(R(y)) with w from ``grpo_group_weight``.
    * token-mean: ĝ = Σ_i R_i ∇log π(y_i) / Σ_j |y_j| → E = Σ_y ∇π(y) R(y) · N·E[1/(|y| + L')],
      L' = total length of the N − 1 other completions of the batch (pmf by convolution).
    * seq-mean-token-mean: E = Σ_y ∇π(y) R(y)/|y| = ∇ of the length-normalised J' = Σ_y π(y) R(y)/|y|.
    """
    spec = SPECS[name]
    g_true = true_gradient(spec.rewards)
    if spec.per_sample and spec.agg in ("seq-mean-token-sum", "constant"):
        g = enumerated_expectation(spec)
        return g / T if spec.agg == "constant" else g
    if spec.advantage == "rloo" or spec.cfg.get("baseline") == "loo":
        return g_true
    if spec.advantage == "grpo" and spec.cfg["scale"] == "none":
        return (G - 1) / G * g_true
    if spec.cfg.get("baseline") == "mean":
        p_len = length_distribution()
        factor = []
        for t in range(T):
            q = p_len[t + 1 :].sum().item()  # P(alive at t)
            e_inv = sum(math.comb(G - 1, j) * q**j * (1 - q) ** (G - 1 - j) / (1 + j) for j in range(G))
            factor.append(1.0 - e_inv)
        return torch.tensor(factor)[STATE_DEPTH][:, None].expand(NUM_STATES, VOCAB).reshape(-1) * g_true
    R = token_rewards(spec.rewards, ENUM_IDS, ENUM_MASK).sum(-1)
    if spec.advantage == "grpo" and spec.cfg["scale"] == "group":
        return weighted_score(grpo_group_weight(spec.rewards))
    L = ENUM_MASK.sum(-1)
    if spec.agg == "seq-mean-token-mean":
        return weighted_score(R / L)
    if spec.agg == "token-mean":
        p_len, rest = length_distribution(), torch.tensor([1.0])
        for _ in range(N - 1):  # pmf of the sum of N − 1 iid lengths
            rest = torch.nn.functional.conv1d(rest[None, None], p_len.flip(0)[None, None], padding=T).reshape(-1)
        total = torch.arange(len(rest))
        e_inv = torch.stack([(rest / (length + total).clamp(min=1)).sum() for length in range(T + 1)])
        return weighted_score(R * N * e_inv[L.long()])
    raise AssertionError(f"no expectation for {name}")


# ----------------------------------------------------------------------------------------- stats
def mean_se(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g.mean(0), g.std(0) / math.sqrt(g.shape[0])


def assert_mean_matches(name: str, g: torch.Tensor, target: torch.Tensor, what: str) -> None:
    """Every coordinate within Z·SE, and (more powerful against a mere rescaling, which is the typical
    bias) the projection s_k = ⟨ĝ_k, t⟩/‖t‖² has mean 1 within Z·SE."""
    mean, se = mean_se(g)
    z = (mean - target).abs() / (se + ATOL / Z)
    bad = (mean - target).abs() > Z * se + ATOL
    assert not bad.any(), (
        f"{name}: mean of {g.shape[0]} batch gradients differs from {what} at "
        f"{bad.nonzero().flatten().tolist()} (max z = {z.max():.1f} > {Z})"
    )
    s_mean, s_se = mean_se(g @ target / (target @ target))
    assert abs(s_mean - 1) <= Z * s_se, f"{name}: projection on {what} is {s_mean:.4f} ± {s_se:.4f}, not 1"


def max_z(g: torch.Tensor, target: torch.Tensor) -> float:
    """max_j |mean_j − target_j| / SE_j (SE floored as in assert_mean_matches: coordinates that every
    batch leaves at 0, e.g. the env states' logits when the environment is masked, have SE = 0)."""
    mean, se = mean_se(g)
    return ((mean - target).abs() / (se + ATOL / Z)).max().item()


def trace_cov(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tr Cov(ĝ) and per-batch squared deviations d_k = ‖ĝ_k − ḡ‖² (tr = mean d · K/(K−1))."""
    d = ((g - g.mean(0)) ** 2).sum(-1) * g.shape[0] / (g.shape[0] - 1)
    return d.mean(), d


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------- tests
def completion_key(ids, mask):
    """A distinct integer per completion: Σ_t (a_t + 1)·5^t over its real tokens."""
    return (((ids + 1) * mask.long()) * torch.tensor([1, 5, 25])).sum(-1)


def test_enumeration_is_the_whole_distribution_and_sampler_matches_it():
    p = seq_prob(THETA)
    assert ENUM_IDS.shape == (40, T) and torch.allclose(p.sum(), torch.tensor(1.0), atol=1e-6)
    assert p.min() > 1e-3  # every completion (and state) is reachable
    # Pearson χ² of 64 000 sampled completions against π: 39 dof (mean 39, sd 8.8); 100 ≈ p < 1e-8.
    ids, mask = sample_completions(THETA, 64_000, torch.Generator().manual_seed(5))
    enum_key, samp_key = completion_key(ENUM_IDS, ENUM_MASK), completion_key(ids, mask)
    assert len(enum_key.unique()) == 40
    counts = (samp_key[:, None] == enum_key[None]).sum(0).float()
    assert counts.sum() == 64_000
    expected = 64_000 * p.detach()
    assert ((counts - expected) ** 2 / expected).sum() < 100


def test_spec_options():
    """Each Spec's options models carry the intended settings (the defaults of ADV_DEFAULTS, not the
    options models' own: those are scale=group, reward_to_go=True, lam=0.95, eps_high=0.2, no dual clip)."""
    assert SPECS["reinforce full return"].adv_opts() == core.ReinforceOptions(reward_to_go=False, baseline="none")
    assert SPECS["reinforce rtg + loo (dense)"].adv_opts() == core.ReinforceOptions(reward_to_go=True, baseline="loo")
    assert SPECS["grpo scale=none: (G-1)/G"].adv_opts() == core.GrpoOptions(scale="none")
    assert SPECS["grpo scale=group"].adv_opts() == core.GrpoOptions(scale="group")
    assert SPECS["gae lam=1, arbitrary V (dense)"].adv_opts() == core.GaeOptions(lam=1.0)
    assert SPECS["gae lam=0.5, true V (dense)"].adv_opts() == core.GaeOptions(lam=0.5)
    assert SPECS["rloo"].adv_opts() is None
    assert all(s.gamma == 1.0 for s in SPECS.values())
    assert SPECS["ppo clip at ratio 1, rtg+loo (dense)"].loss_opts() == core.ClipOptions(
        eps_low=0.2, eps_high=0.28, dual_clip=3.0
    )
    assert SPECS["rloo"].loss_opts() is None
    assert SPECS["agg constant (C=T): grad/C"].agg_opts() == core.ConstantOptions(value=T)
    assert SPECS["agg token-mean"].agg_opts() is None and SPECS["rloo"].agg_opts() is None
    assert SPECS["reinforce full + ema (const)"].adv_state().value == 0.7
    assert all(s.adv_state() is None for s in SPECS.values() if s.values != "ema")


def test_exact_gradient_matches_finite_differences():
    """The reference is right: ∇J (autograd through core.token_logprobs) equals central differences of
    J computed independently of core, in float64 (h = 1e-5: truncation ~1e-10, rounding ~1e-11)."""

    def j64(theta, kind):
        st = states_of(ENUM_IDS)
        logp = torch.log_softmax(theta[st], -1).gather(-1, ENUM_IDS[..., None]).squeeze(-1)
        p = (logp * ENUM_MASK).sum(-1).exp()
        return (p * token_rewards(kind, ENUM_IDS, ENUM_MASK).double().sum(-1)).sum()

    h, theta64 = 1e-5, THETA.double()
    for kind in ("seq", "dense"):
        eye = torch.eye(NUM_STATES * VOCAB, dtype=torch.float64).view(-1, NUM_STATES, VOCAB)
        fd = torch.stack([(j64(theta64 + h * e, kind) - j64(theta64 - h * e, kind)) / (2 * h) for e in eye])
        torch.testing.assert_close(true_gradient(kind).double(), fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", [k for k in UNBIASED if SPECS[k].per_sample])
def test_per_sample_estimator_expectation_equals_exact_gradient(name):
    """No sampling noise: E[ĝ] summed over the 40 completions equals ∇J to float precision."""
    torch.testing.assert_close(expected_gradient(name), true_gradient(SPECS[name].rewards), atol=2e-6, rtol=1e-5)


def test_gae_with_lambda_below_one_is_unbiased_only_with_the_true_values():
    g = true_gradient("dense")
    assert rel(expected_gradient("gae lam=0.5, true V (dense)") - g, g) < 1e-5
    assert rel(expected_gradient("gae lam=0.5, wrong V (dense)") - g, g) > 0.1


@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_estimator_matches_exact_gradient(name):
    """mean_k ĝ_k = ∇J within Z·SE in every coordinate; the test has power: SE ≪ |∇J| (noise < 3 %)."""
    g, target = mc_gradients(name), true_gradient(SPECS[name].rewards)
    assert_mean_matches(name, g, target, "the exact ∇J")
    assert rel(mean_se(g)[1], target) < 0.03


@pytest.mark.parametrize("name", BIASED)
def test_biased_estimator_has_its_derived_expectation(name):
    """The bias is real (beyond Z·SE of ∇J) and equals the derived form (within Z·SE of it)."""
    g, g_true = mc_gradients(name), true_gradient(SPECS[name].rewards)
    assert max_z(g, g_true) > Z, f"{name}: no significant bias"
    assert_mean_matches(name, g, expected_gradient(name), "its derived expectation")


def test_known_bias_factors():
    """The closed forms behind the biased targets, spelled out."""
    g = true_gradient("dense")
    mean_bl = expected_gradient("reinforce rtg + mean (dense)")
    depth = STATE_DEPTH[:, None].expand(NUM_STATES, VOCAB).reshape(-1)
    # root (t = 0, all G alive): exactly (G−1)/G
    torch.testing.assert_close(mean_bl[depth == 0], (G - 1) / G * g[depth == 0])
    # depth 1: n_1 − 1 ~ Bin(G−1, q), q = 1 − π($ | root); E[1/(1 + Bin(G−1, q))] = (1 − (1−q)^G)/(G q)
    q = 1 - torch.softmax(THETA[0], -1)[EOS].item()
    factor1 = 1 - (1 - (1 - q) ** G) / (G * q)
    torch.testing.assert_close(mean_bl[depth == 1], factor1 * g[depth == 1])
    assert factor1 < (G - 1) / G  # fewer alive at t → the sample weighs more in its own baseline
    # the length-normalised objective is a genuinely different direction, not a rescaled ∇J
    gs, sm = true_gradient("seq"), expected_gradient("agg seq-mean-token-mean")
    assert rel(sm - (sm @ gs) / (gs @ gs) * gs, sm) > 0.1
    # std normalisation (grpo scale=group) also changes the direction, not just the scale
    gg = expected_gradient("grpo scale=group")
    assert rel(gg - (gg @ gs) / (gs @ gs) * gs, gg) > 0.05


def test_variance_ordering_full_return_rtg_loo():
    """tr Cov(ĝ): full return ≥ reward-to-go ≥ reward-to-go − loo baseline. Dense rewards make the first
    gap real (with only a final reward, G_t = G_0). The three use the same seed, hence the same
    completions: differences are judged with paired per-batch SEs."""
    _, d_full = trace_cov(mc_gradients("reinforce full return (dense)"))
    _, d_rtg = trace_cov(mc_gradients("reinforce reward-to-go (dense)"))
    _, d_loo = trace_cov(mc_gradients("reinforce rtg + loo (dense)"))
    for hi, lo in ((d_full, d_rtg), (d_rtg, d_loo)):
        diff = hi - lo
        assert diff.mean() > Z * diff.std() / math.sqrt(len(diff))
        assert lo.mean() < 0.9 * hi.mean()  # a real reduction, not a rounding one


def test_variance_scales_as_one_over_batch_size():
    """Batches are n/G independent groups, so tr Cov(ĝ) ∝ 1/n: at n = 16 vs 64 the ratio is 4.
    Each trace is a mean of K iid d_k; its relative SE std(d)/(mean(d)√K) (~2 %) gives the tolerance."""
    name = "reinforce rtg + loo (dense)"
    tr16, d16 = trace_cov(mc_gradients(name, n=16, k=K, seed=11))
    tr64, d64 = trace_cov(mc_gradients(name, n=64, k=K // 2, seed=12))
    rel_se = math.sqrt((d16.std() / tr16) ** 2 / len(d16) + (d64.std() / tr64) ** 2 / len(d64))
    assert rel_se < 0.05
    assert abs((tr16 / tr64).item() / 4 - 1) < Z * rel_se


# =============================================================================== multi-turn episodes
# The episode toy (module docstring, "Multi-turn episodes"): model turn, environment reply, model turn.
EP_A, EP_B, EP_END = 0, 1, 2
EP_VOCAB, EP_T, EP_STATES = 3, 5, 52
TURNS = ((EP_END,), (EP_A, EP_END), (EP_B, EP_END), (EP_A, EP_A), (EP_A, EP_B), (EP_B, EP_A), (EP_B, EP_B))
P_ENV_A = torch.tensor([0.2 + 0.3 * t.count(EP_A) + 0.1 * (t[-1] == EP_END) for t in TURNS])
EP_GAMMA = 0.5  # the discounted variant: large enough that counting the env token as a step shows


def turn_index(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The turn (index into TURNS) that starts with x0, x1 ($ ends it: x1 is then unused)."""
    return torch.where(x0 == EP_END, 0, torch.where(x1 == EP_END, 1 + x0, 3 + 2 * x0 + x1))


def turn2_root(u1, e):
    """State index of the second turn's root after turn u1 and the environment's reply e (42 states from 10)."""
    return 10 + 3 * (2 * u1 + e)


def turn_reward(turn: tuple[int, ...], reply: int | None = None) -> float:
    """#a − ½·|turn|, + 1 when the turn opens with the environment's reply (the second turn only)."""
    return turn.count(EP_A) - 0.5 * len(turn) + float(reply is not None and turn[0] == reply)


def enumerate_episodes() -> dict[str, torch.Tensor]:
    """All 7·2·7 = 98 episodes (turn 1, reply e, turn 2), row j = (2·u1 + e)·7 + u2, laid out as the
    trainer's (B, T) rows: ids (padded with $), state of each position, real (1 on every token), act
    (1 on model tokens, 0 on the reply), turn_r (each turn's reward on its last token), env_logp."""
    cols: dict[str, list] = {k: [] for k in ("ids", "state", "real", "act", "turn_r", "env_logp")}
    for u1, t1 in enumerate(TURNS):
        for e in (EP_A, EP_B):
            for t2 in TURNS:
                root2 = turn2_root(u1, e)
                toks = [*t1, e, *t2]
                pad = [0] * (EP_T - len(toks))
                states = [0, 1 + t1[0]][: len(t1)] + [3 + u1] + [root2, root2 + 1 + t2[0]][: len(t2)]
                rewards = [0.0] * len(toks)
                rewards[len(t1) - 1], rewards[-1] = turn_reward(t1), turn_reward(t2, e)
                cols["ids"].append(toks + [EP_END] * len(pad))
                cols["state"].append(states + pad)
                cols["real"].append([1.0] * len(toks) + pad)
                cols["act"].append([1.0] * len(t1) + [0.0] + [1.0] * len(t2) + pad)
                cols["turn_r"].append(rewards + pad)
                p_a = P_ENV_A[u1].item()
                cols["env_logp"].append(math.log(p_a if e == EP_A else 1 - p_a))
    return {k: torch.tensor(v) for k, v in cols.items()}


EP = enumerate_episodes()
EP_ALL = torch.arange(len(EP["ids"]))
EP_R = EP["turn_r"].sum(-1)  # R(τ) = r_1 + r_2: the sequence reward (its J is the per-turn one's)
ENV_STATES = torch.arange(3, 10)  # the states that precede the environment's reply
THETA_EP = 0.8 * torch.randn(EP_STATES, EP_VOCAB, generator=torch.Generator().manual_seed(1))
WRONG_V_EP = 0.7 * torch.randn(EP_STATES, generator=torch.Generator().manual_seed(8))  # arbitrary V table


def episode_logp(theta: torch.Tensor, j: torch.Tensor, rows_per_copy: int | None = None) -> torch.Tensor:
    """(n, EP_T) log π_θ(x_t|s_t) of EVERY token of episodes j (the reply too: what an LM assigns it),
    via core.token_logprobs; ``rows_per_copy`` as in token_logp (theta (K, 52, 3))."""
    st = EP["state"][j]
    if rows_per_copy is None:
        logits = theta[st]
    else:
        copy = torch.arange(len(j)) // rows_per_copy
        logits = theta.reshape(-1, EP_VOCAB)[copy[:, None] * EP_STATES + st]
    return core.token_logprobs(logits, EP["ids"][j], with_entropy=False, chunk=1 << 30)[0]


def episode_prob(theta: torch.Tensor) -> torch.Tensor:
    """P(τ) = Π_actions π_θ(a|s) · P_env(e|turn 1) for the 98 episodes."""
    return ((episode_logp(theta, EP_ALL) * EP["act"]).sum(-1) + EP["env_logp"]).exp()


@functools.cache
def episode_true_gradient() -> torch.Tensor:
    """∇J, J(θ) = Σ_τ P(τ) R(τ), by autograd over the enumeration (R = Σ of the per-turn rewards)."""
    return grad_of(lambda th: (episode_prob(th) * EP_R).sum(), THETA_EP)


@functools.cache
def episode_true_values() -> torch.Tensor:
    """V^π(s) = E[G_k | s_k = s] (γ = 1, per-turn rewards) at the 45 model states (0 at the 7 env states)."""
    p, act = episode_prob(THETA_EP).detach(), EP["act"]
    rtg = EP["turn_r"].flip(-1).cumsum(-1).flip(-1)  # the reply's position has no reward: same over actions
    w = (p[:, None] * act).reshape(-1)
    st = EP["state"].reshape(-1)
    num = torch.zeros(EP_STATES).index_add_(0, st, w * rtg.reshape(-1))
    den = torch.zeros(EP_STATES).index_add_(0, st, w)
    return num / den.clamp(min=1e-30)


def sample_episodes(theta: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n episodes of the true process: model tokens from π_θ (core.sample_from_logits), the reply from
    P_env(·|turn 1) (torch.multinomial). Returns each episode's row in the enumeration."""

    def turn(root: torch.Tensor) -> torch.Tensor:
        x0 = core.sample_from_logits(theta[root], 1.0, 1.0, 0, generator)[0]
        x1 = core.sample_from_logits(theta[root + 1 + x0.clamp(max=EP_B)], 1.0, 1.0, 0, generator)[0]
        return turn_index(x0, x1)

    u1 = turn(torch.zeros(n, dtype=torch.long))
    p_a = P_ENV_A[u1]
    e = torch.multinomial(torch.stack([p_a, 1 - p_a], -1), 1, generator=generator).squeeze(-1)
    u2 = turn(turn2_root(u1, e))
    return (2 * u1 + e) * len(TURNS) + u2


@dataclass(frozen=True)
class EpisodeSpec(Spec):
    """A Spec on the episode toy (rewards "seq" | "turn"; values None | "wrong" | "true")."""

    env_as_actions: bool = False
    """The mistake: the reply's token in the action mask (it gets a log π_θ term and is a time step)."""

    def step_mask(self, j: torch.Tensor) -> torch.Tensor:
        """The action mask the trainer is given: model tokens, or (the mistake) every real token."""
        return EP["real" if self.env_as_actions else "act"][j]


EPISODE_SPECS: dict[str, EpisodeSpec] = {
    # unbiased: the environment's tokens masked
    "episode: reinforce full return (seq), env masked": EpisodeSpec("reinforce", "seq", per_sample=True),
    "episode: reinforce rtg (per-turn), env masked": EpisodeSpec(
        "reinforce", "turn", {"reward_to_go": True}, per_sample=True
    ),
    "episode: reinforce rtg + loo (per-turn), env masked": EpisodeSpec(
        "reinforce", "turn", {"reward_to_go": True, "baseline": "loo"}
    ),
    "episode: rloo (seq), env masked": EpisodeSpec("rloo", "seq"),
    "episode: gae lam=1, arbitrary V (per-turn), env masked": EpisodeSpec(
        "gae", "turn", {"lam": 1.0}, values="wrong", per_sample=True
    ),
    "episode: gae lam=0.5, true V (per-turn), env masked": EpisodeSpec(
        "gae", "turn", {"lam": 0.5}, values="true", per_sample=True
    ),
    "episode: ppo clip at ratio 1, rtg+loo (per-turn), env masked": EpisodeSpec(
        "reinforce", "turn", {"reward_to_go": True, "baseline": "loo"}, loss="clip"
    ),
    # biased (each compared to its exact expectation, episode_expected_gradient)
    "episode: grpo scale=none (seq), env masked: (G-1)/G": EpisodeSpec(
        "grpo", "seq", {"scale": "none"}, unbiased=False
    ),
    f"episode: reinforce rtg gamma={EP_GAMMA} (per-turn), env masked": EpisodeSpec(
        "reinforce", "turn", {"reward_to_go": True, "gamma": EP_GAMMA}, per_sample=True, unbiased=False
    ),
    "episode: reinforce rtg (per-turn), env as actions": EpisodeSpec(
        "reinforce", "turn", {"reward_to_go": True}, per_sample=True, unbiased=False, env_as_actions=True
    ),
    "episode: reinforce rtg + loo (per-turn), env as actions": EpisodeSpec(
        "reinforce", "turn", {"reward_to_go": True, "baseline": "loo"}, unbiased=False, env_as_actions=True
    ),
    "episode: rloo (seq), env as actions": EpisodeSpec("rloo", "seq", unbiased=False, env_as_actions=True),
    "episode: gae lam=1, arbitrary V (per-turn), env as actions": EpisodeSpec(
        "gae", "turn", {"lam": 1.0}, values="wrong", per_sample=True, unbiased=False, env_as_actions=True
    ),
    "episode: ppo clip at ratio 1, rtg+loo (per-turn), env as actions": EpisodeSpec(
        "reinforce", "turn", {"reward_to_go": True, "baseline": "loo"}, loss="clip", unbiased=False, env_as_actions=True
    ),
    f"episode: reinforce rtg gamma={EP_GAMMA} (per-turn), env as actions": EpisodeSpec(
        "reinforce",
        "turn",
        {"reward_to_go": True, "gamma": EP_GAMMA},
        per_sample=True,
        unbiased=False,
        env_as_actions=True,
    ),
}
EP_UNBIASED = [k for k, s in EPISODE_SPECS.items() if s.unbiased]
EP_BIASED = [k for k, s in EPISODE_SPECS.items() if not s.unbiased]
EP_DISCOUNTED = f"episode: reinforce rtg gamma={EP_GAMMA} (per-turn), env masked"


def episode_advantages(
    spec: EpisodeSpec, j: torch.Tensor, mask: torch.Tensor, group_size: int, compact: bool = True
) -> torch.Tensor:
    """(n, EP_T) Â as the trainer computes it (trainer.compute_advantages): rewards on the (B, T) rows
    (core.place_scores on the last action token; per-turn rewards × the action mask), then the estimator
    on the actions compacted by core.ActionIndex, expanded back. ``compact=False``: the holed mask goes
    to the estimator as it is (what the trainer did before ActionIndex)."""
    r = core.place_scores(EP_R[j], mask) if spec.rewards == "seq" else EP["turn_r"][j] * mask
    values = None
    if spec.values is not None:
        true_v_ok = spec.rewards == "turn" and spec.gamma == 1.0 and not spec.env_as_actions  # what V^π is for
        assert spec.values == "wrong" or true_v_ok
        values = (WRONG_V_EP if spec.values == "wrong" else episode_true_values())[EP["state"][j]] * mask
    est, opts, state = core.ADVANTAGES[spec.advantage], spec.adv_opts(), spec.adv_state()
    if not compact:
        return est.fn(core.AdvantageInputs(r, mask, group_size, spec.gamma, values=values), opts, state).advantages
    acts = core.ActionIndex.of(mask)
    v = acts.compact(values) if values is not None else None
    x = core.AdvantageInputs(acts.compact(r), acts.mask, group_size, spec.gamma, values=v)
    return acts.expand(est.fn(x, opts, state).advantages)


@functools.cache
def episode_mc_gradients(name: str, n: int = N, k: int = K, seed: int = SEED) -> torch.Tensor:
    """(k, 156): ĝ of each of k batches of n episodes (n/G groups of G), computed as the trainer does."""
    spec = EPISODE_SPECS[name]
    j = sample_episodes(THETA_EP, k * n, torch.Generator().manual_seed(seed))
    mask = spec.step_mask(j)
    adv = episode_advantages(spec, j, mask, G)
    theta_k = THETA_EP.expand(k, EP_STATES, EP_VOCAB).clone().requires_grad_()
    logp = episode_logp(theta_k, j, rows_per_copy=n)
    per_tok, _ = core.POLICY_LOSSES[spec.loss].fn(logp, logp.detach(), adv, mask, spec.loss_opts())
    aggregate, agg_opts = core.AGGREGATIONS[spec.agg].fn, spec.agg_opts()
    shares = [
        aggregate(l_b, m_b, core.Normalisers(num_tokens=m_b.sum(), num_seqs=n, max_tokens=EP_T), agg_opts)
        for l_b, m_b in zip(per_tok.view(k, n, EP_T).unbind(0), mask.view(k, n, EP_T).unbind(0))
    ]
    torch.stack(shares).sum().backward()
    return -theta_k.grad.reshape(k, -1)


@functools.cache
def episode_reference_weights(name: str, clock: str = "steps") -> torch.Tensor:
    """(98, EP_T) Ψ̄ with E[ĝ] = Σ_τ P(τ) Σ_t Ψ̄_t(τ) ∇log π_θ(x_t|s_t), written with plain loops over
    each episode's time steps (independent of core).

    The time steps are the model's tokens (or every token: env tokens as actions, or ``clock="tokens"``:
    the reply counts as a step for γ but gets no log π term). Ψ is the estimator's own-sample part
    (full return, reward-to-go G_k = Σ_{l≥k} γ^{l−k} r_l, or GAE), minus the EXPECTATION of a group
    baseline, which is built from the other G − 1 episodes only and so is independent of this one:
    rloo b = E[R] = J; grpo scale=none Â = (G−1)/G·(R − J) (the sample's own 1/G share of the mean
    shrinks it, the rest is an independent baseline); loo at step k b = mean_{j≠i} G_{j,k} over the
    others that reach step k: E[b_k] = (1 − (1 − q_k)^{G−1}) E[G_k | step k exists], q_k = P(step k exists).
    """
    spec = EPISODE_SPECS[name]
    opts = {**ADV_DEFAULTS, **spec.cfg}
    gamma = opts["gamma"]
    terms = EP["real" if spec.env_as_actions else "act"]
    clock_mask = EP["real"] if spec.env_as_actions or clock == "tokens" else EP["act"]
    p = episode_prob(THETA_EP).detach().tolist()
    steps, psi = [], []
    for i in range(len(p)):
        st = [t for t in range(EP_T) if clock_mask[i, t] > 0]
        r = (
            [EP["turn_r"][i, t].item() for t in st]
            if spec.rewards == "turn"
            else [0.0] * (len(st) - 1) + [EP_R[i].item()]
        )
        n = len(st)
        rtg = [sum(gamma ** (m - k) * r[m] for m in range(k, n)) for k in range(n)]
        if spec.advantage == "gae":
            table = WRONG_V_EP if spec.values == "wrong" else episode_true_values()
            v = [table[EP["state"][i, t]].item() for t in st] + [0.0]
            delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(n)]
            own = [sum((gamma * opts["lam"]) ** (m - k) * delta[m] for m in range(k, n)) for k in range(n)]
        elif spec.advantage == "reinforce" and opts["reward_to_go"]:
            own = rtg
        else:  # full return (reinforce), R (rloo, grpo)
            own = [rtg[0]] * n
        steps.append(st)
        psi.append(own)
    J = sum(pi * EP_R[i].item() for i, pi in enumerate(p))
    if spec.advantage == "rloo":
        psi = [[x - J for x in row] for row in psi]
    elif spec.advantage == "grpo":
        assert opts["scale"] == "none"
        psi = [[(G - 1) / G * (x - J) for x in row] for row in psi]
    elif opts.get("baseline") == "loo":
        beta = []
        for k in range(EP_T):
            q = sum(pi for pi, row in zip(p, psi) if len(row) > k)
            m = sum(pi * row[k] for pi, row in zip(p, psi) if len(row) > k) / q if q > 0 else 0.0
            beta.append((1 - (1 - q) ** (G - 1)) * m)
        psi = [[x - beta[k] for k, x in enumerate(row)] for row in psi]
    else:
        assert opts.get("baseline") == "none"
    w = torch.zeros(len(p), EP_T)
    for i, (st, row) in enumerate(zip(steps, psi)):
        for t, x in zip(st, row):
            w[i, t] = x * terms[i, t]
    return w


@functools.cache
def episode_expected_gradient(name: str, clock: str = "steps") -> torch.Tensor:
    """E[ĝ] exactly: Σ_τ P(τ) Σ_t Ψ̄_t ∇log π_θ(x_t|s_t) with Ψ̄ from ``episode_reference_weights``."""
    p, w = episode_prob(THETA_EP).detach(), episode_reference_weights(name, clock)
    return grad_of(lambda th: (p[:, None] * w * episode_logp(th, EP_ALL)).sum(), THETA_EP)


def episode_trainer_expectation(name: str, compact: bool = True) -> torch.Tensor:
    """E[ĝ] of a per-sample estimator through the trainer's code path (episode_advantages, core's policy
    loss) applied to the 98 enumerated episodes, weighted by P(τ): no sampling noise."""
    spec = EPISODE_SPECS[name]
    p, mask = episode_prob(THETA_EP).detach(), spec.step_mask(EP_ALL)
    adv = episode_advantages(spec, EP_ALL, mask, group_size=1, compact=compact)

    def surrogate(theta):
        logp = episode_logp(theta, EP_ALL)
        per_tok, _ = core.POLICY_LOSSES[spec.loss].fn(logp, logp.detach(), adv, mask, spec.loss_opts())
        return -(p * (per_tok * mask).sum(-1)).sum()

    return grad_of(surrogate, THETA_EP)


def state_block(g: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The coordinates of ``g`` (52·3,) that belong to the logits of ``states``."""
    return g.view(EP_STATES, EP_VOCAB)[states].reshape(-1)


MODEL_STATES = torch.tensor([s for s in range(EP_STATES) if s not in set(ENV_STATES.tolist())])


def test_episode_enumeration_and_sampler_match_the_process():
    p = episode_prob(THETA_EP)
    assert len(p) == 98 and torch.allclose(p.sum(), torch.tensor(1.0), atol=1e-6)
    assert p.min() > 1e-4
    # one row spelled out: turn 1 "ab", the reply b, turn 2 "$"
    j = (2 * TURNS.index((EP_A, EP_B)) + EP_B) * len(TURNS) + TURNS.index((EP_END,))
    assert EP["ids"][j].tolist() == [EP_A, EP_B, EP_B, EP_END, EP_END]
    assert EP["act"][j].tolist() == [1, 1, 0, 1, 0] and EP["real"][j].tolist() == [1, 1, 1, 1, 0]
    assert EP["state"][j, :4].tolist() == [0, 1 + EP_A, 3 + 4, turn2_root(4, EP_B)]
    assert EP["turn_r"][j].tolist() == [0.0, 0.0, 0.0, -0.5, 0.0]  # (1 − 1) on "ab"; −½ on "$"
    acts = core.ActionIndex.of(EP["act"][j : j + 1])
    assert acts.index.tolist() == [[0, 1, 3]] and acts.compact(EP["turn_r"][j : j + 1]).tolist() == [[0, 0, -0.5]]
    # Pearson χ² of 64 000 sampled episodes against P(τ): 97 dof (mean 97, sd 13.9); 200 ≈ p < 1e-8.
    samp = sample_episodes(THETA_EP, 64_000, torch.Generator().manual_seed(5))
    counts = torch.bincount(samp, minlength=98).float()
    expected = 64_000 * p.detach()
    assert counts.sum() == 64_000 and ((counts - expected) ** 2 / expected).sum() < 200


def test_episode_exact_gradient_matches_finite_differences_and_not_the_environment():
    """∇J (autograd through core.token_logprobs) equals central differences of J computed independently
    of core (float64). The logits at the 7 states before the reply never enter J (P_env does not depend
    on θ): ∇J is exactly 0 there."""
    ids, st, act = EP["ids"], EP["state"], EP["act"]

    def j64(theta):
        logp = torch.log_softmax(theta[st], -1).gather(-1, ids[..., None]).squeeze(-1)
        return (((logp * act).sum(-1) + EP["env_logp"].double()).exp() * EP_R.double()).sum()

    h, theta64 = 1e-5, THETA_EP.double()
    eye = torch.eye(EP_STATES * EP_VOCAB, dtype=torch.float64).view(-1, EP_STATES, EP_VOCAB)
    fd = torch.stack([(j64(theta64 + h * e) - j64(theta64 - h * e)) / (2 * h) for e in eye])
    g = episode_true_gradient()
    torch.testing.assert_close(g.double(), fd, atol=1e-6, rtol=1e-5)
    assert (state_block(g, ENV_STATES) == 0).all() and state_block(g, MODEL_STATES).abs().min() > 0


def test_episode_unbiased_estimators_have_the_exact_gradient_as_expectation():
    """No sampling noise: the reference expectation (plain loops, expected group baselines) of every
    env-masked unbiased estimator equals ∇J to float precision; the discounted one does not (J is γ = 1)."""
    g = episode_true_gradient()
    for name in EP_UNBIASED:
        torch.testing.assert_close(episode_expected_gradient(name), g, atol=2e-6, rtol=1e-5, msg=name)
    assert rel(episode_expected_gradient(EP_DISCOUNTED) - g, g) > 0.1


@pytest.mark.parametrize("name", [k for k, s in EPISODE_SPECS.items() if s.per_sample])
def test_episode_trainer_path_on_the_enumeration_is_the_reference(name):
    """The trainer's path (ActionIndex compaction, registry estimator and loss) applied to the 98 episodes
    weighted by P(τ) gives the independent reference expectation exactly."""
    torch.testing.assert_close(episode_trainer_expectation(name), episode_expected_gradient(name), atol=2e-6, rtol=1e-5)


def test_episode_advantages_need_the_action_compaction():
    """Without core.ActionIndex the reply's hole in the mask cuts the episode in two: turn 1's reward-to-go
    loses turn 2's reward (discounted_cumsum restarts at a 0 of the mask), and GAE's V(s_{k+1}) after
    turn 1 is the hole's 0. Both are then biased for ∇J, by a lot."""
    g = episode_true_gradient()
    for name in (
        "episode: reinforce rtg (per-turn), env masked",
        "episode: gae lam=0.5, true V (per-turn), env masked",
    ):
        assert rel(episode_trainer_expectation(name, compact=False) - g, g) > 0.1, name


@pytest.mark.parametrize("name", EP_UNBIASED)
def test_episode_unbiased_estimator_matches_exact_gradient(name):
    """Environment tokens masked: mean_k ĝ_k = ∇J within Z·SE in every coordinate (the env states' block
    included, where both are 0), with power: noise < 3 %."""
    g, target = episode_mc_gradients(name), episode_true_gradient()
    assert_mean_matches(name, g, target, "the exact ∇J")
    assert rel(mean_se(g)[1], target) < 0.03


@pytest.mark.parametrize("name", EP_BIASED)
def test_episode_biased_estimator_has_its_exact_expectation(name):
    """The bias is real (beyond Z·SE of ∇J) and equals its exact expectation (within Z·SE of it)."""
    g = episode_mc_gradients(name)
    assert max_z(g, episode_true_gradient()) > Z, f"{name}: no significant bias"
    assert_mean_matches(name, g, episode_expected_gradient(name), "its exact expectation")


def test_episode_env_as_actions_biases_only_the_reply_states_at_gamma_one():
    """With γ = 1 treating the reply as an action leaves every action's Ψ as it was (the reply has no
    reward; the group baselines stay independent of the sample) and adds Ψ_e ∇log π_θ(e|h), whose
    mean is not 0 because e ~ P_env, not π_θ: the bias sits in the env states' logits, which a tabular
    policy keeps apart (an LM shares them with everything). With γ < 1 the reply also counts as a step
    and the actions' block is biased too."""
    g = episode_true_gradient()
    for name in EP_BIASED:
        spec, bias = EPISODE_SPECS[name], episode_expected_gradient(name) - g
        if spec.env_as_actions and spec.gamma == 1.0:
            assert state_block(bias, MODEL_STATES).abs().max() < 2e-6, name
            assert rel(state_block(bias, ENV_STATES), g) > 0.1, name
    discounted = episode_expected_gradient(f"episode: reinforce rtg gamma={EP_GAMMA} (per-turn), env as actions")
    masked = episode_expected_gradient(EP_DISCOUNTED)
    assert rel(state_block(discounted - masked, MODEL_STATES), g) > 0.05


def test_episode_discount_counts_actions_only():
    """γ = 0.5, env masked: the trainer's ĝ has the expectation of a discount over the model's tokens
    (turn 1's last action → turn 2's first is ONE step), not over all tokens (the reply a step too)."""
    g = episode_mc_gradients(EP_DISCOUNTED)
    assert_mean_matches(EP_DISCOUNTED, g, episode_expected_gradient(EP_DISCOUNTED), "its exact expectation")
    assert max_z(g, episode_expected_gradient(EP_DISCOUNTED, clock="tokens")) > Z


# ------------------------------------------------------------- sampler/trainer mismatch (IS correction)
# The sampler μ is the toy policy with perturbed logits θ + δ (δ ~ N(0, 0.5²), fixed seed): an engine
# whose distribution is not the trainer's (kernels, precision, an engine a step behind), exaggerated so
# each estimator's bias shows. Estimator: rloo advantages (unbiased when sampling from π), the pg loss,
# seq-mean-token-sum; the per-token loss weighted by core.importance_weights(log π − log μ), as the
# trainer does with rollout.is_correction. Exact expectations: the rloo baseline is built from the other
# samples (independent of y_i, mean m = E_μ[R]), so for weights w_t(y)
#     E[ĝ] = Σ_y μ(y) Σ_t w_t(y) (R(y) − m) ∇log π(a_t|s_t),
# enumerated over the 40 completions with weights written here independently of core. With the
# sequence weight W = π(y)/μ(y) (no cap, no mask) that is ∇J − m·Σ_y ∇π(y) = ∇J: unbiased. Per-token
# weights correct each action but not the distribution of the states it is taken in; a cap or a mask
# trades bias for bounded weights.
THETA_MU = THETA + 0.5 * torch.randn(NUM_STATES, VOCAB, generator=torch.Generator().manual_seed(1))
IS_SPECS: dict[str, core.ISCorrection | None] = {
    "mismatch: no correction": None,
    "mismatch: sequence IS, no cap": core.ISCorrection("sequence", cap=None),
    "mismatch: sequence IS, cap 2": core.ISCorrection("sequence", cap=2.0),
    "mismatch: sequence, mask above 2": core.ISCorrection("sequence", cap=None, mask_above=2.0),
    "mismatch: token IS, no cap": core.ISCorrection("token", cap=None),
    "mismatch: token IS, cap 3 (vllm default)": core.ISCorrection("token", cap=3.0),
    "mismatch: token IS, cap 1.2": core.ISCorrection("token", cap=1.2),
}
IS_UNBIASED = ["mismatch: sequence IS, no cap"]
IS_BIASED = [k for k in IS_SPECS if k not in IS_UNBIASED]


def rloo_advantages_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = core.AdvantageInputs(token_rewards("seq", ids, mask), mask, G, gamma=1.0)
    return core.ADVANTAGES["rloo"].fn(x, None, None).advantages


@functools.cache
def is_mc_gradients(name: str, n: int = N, k: int = K, seed: int = SEED) -> torch.Tensor:
    """(k, 52): ĝ of k batches of n completions sampled from μ, corrected by IS_SPECS[name]."""
    c = IS_SPECS[name]
    ids, mask = sample_completions(THETA_MU, k * n, torch.Generator().manual_seed(seed))
    adv = rloo_advantages_of(ids, mask)
    theta_k = THETA.expand(k, NUM_STATES, VOCAB).clone().requires_grad_()
    logp = token_logp(theta_k, ids, rows_per_copy=n)
    per_tok, _ = core.POLICY_LOSSES["pg"].fn(logp, logp.detach(), adv, mask)
    if c is not None:
        w, _ = core.importance_weights(logp.detach() - token_logp(THETA_MU, ids), mask, c)
        per_tok = per_tok * w
    agg = core.AGGREGATIONS["seq-mean-token-sum"].fn
    shares = [
        agg(l_b, m_b, core.Normalisers(num_tokens=m_b.sum(), num_seqs=n, max_tokens=T), None)
        for l_b, m_b in zip(per_tok.view(k, n, T).unbind(0), mask.view(k, n, T).unbind(0))
    ]
    torch.stack(shares).sum().backward()
    return -theta_k.grad.reshape(k, -1)


def hand_weights(c: core.ISCorrection | None) -> torch.Tensor:
    """(40, T) weights of each enumerated completion, written from the definition (not core)."""
    if c is None:
        return torch.ones(len(ENUM_IDS), T)
    r_tok = ((token_logp(THETA, ENUM_IDS) - token_logp(THETA_MU, ENUM_IDS)) * ENUM_MASK).exp()
    ratio = r_tok.prod(-1, keepdim=True).expand(-1, T) if c.level == "sequence" else r_tok
    w = ratio.clamp(max=c.cap) if c.cap is not None else ratio.clone()
    if c.mask_above is not None:
        w[ratio > c.mask_above] = 0.0
    return w * ENUM_MASK


@functools.cache
def is_expected_gradient(name: str) -> torch.Tensor:
    """E[ĝ] = Σ_y μ(y) Σ_t w_t(y) (R(y) − E_μ[R]) ∇log π(a_t|s_t), exactly."""
    mu = seq_prob(THETA_MU).detach()
    R = token_rewards("seq", ENUM_IDS, ENUM_MASK).sum(-1)
    w, m = hand_weights(IS_SPECS[name]).detach(), (mu * R).sum()
    return grad_of(lambda th: (mu[:, None] * w * (R - m)[:, None] * token_logp(th, ENUM_IDS) * ENUM_MASK).sum())


def test_full_sequence_importance_sampling_is_unbiased_under_another_sampler():
    """Samples from μ ≠ π: uncorrected, ĝ is biased for ∇J (beyond Z·SE); weighted by π(y)/μ(y) it is
    not (every coordinate within Z·SE), and its exact expectation is ∇J to float precision."""
    g_true = true_gradient("seq")
    assert max_z(is_mc_gradients("mismatch: no correction"), g_true) > Z
    torch.testing.assert_close(is_expected_gradient("mismatch: sequence IS, no cap"), g_true, atol=2e-6, rtol=1e-5)
    assert_mean_matches("sequence IS", is_mc_gradients("mismatch: sequence IS, no cap"), g_true, "the exact ∇J")


@pytest.mark.parametrize("name", IS_BIASED)
def test_each_mismatch_correction_has_its_exact_expectation(name):
    """The trainer's weighting (core.importance_weights) gives, on average, the expectation derived by
    hand; for the biased ones that expectation is measurably not ∇J."""
    g = is_mc_gradients(name)
    assert_mean_matches(name, g, is_expected_gradient(name), "its exact expectation")
    assert max_z(g, true_gradient("seq")) > Z, f"{name}: no significant bias"


def test_corrections_order_by_bias():
    """Exact relative biases on this toy: full sequence IS 0; sequence IS capped at 2 close to 0 (a
    little bias for bounded weights); per-token IS removes only part of the uncorrected bias (the state
    distribution stays μ's), whatever its cap."""
    g = true_gradient("seq")
    b = {k: rel(is_expected_gradient(k) - g, g) for k in IS_SPECS}
    token = [k for k in IS_SPECS if k.startswith("mismatch: token")]
    assert b["mismatch: sequence IS, no cap"] < 1e-5 < b["mismatch: sequence IS, cap 2"]
    assert b["mismatch: sequence IS, cap 2"] < min(b[k] for k in token), b
    assert max(b[k] for k in token) < b["mismatch: no correction"], b


def test_importance_weights_are_exactly_one_when_the_sampler_is_the_policy():
    """μ = π (the HF backend samples with the trainer's model): every weight is exactly 1, so the corrected
    batch gradient is bit-identical to the uncorrected one."""
    ids, mask = sample_completions(THETA, 64, torch.Generator().manual_seed(3))
    lp = token_logp(THETA, ids)
    for c in IS_SPECS.values():
        if c is not None:
            w, _ = core.importance_weights(lp - lp, mask, c)
            assert torch.equal(w, mask), c


# ---------------------------------------------------------------------------------- the bias table
def table_row(name: str, g: torch.Tensor, g_true: torch.Tensor, expected: torch.Tensor, width: int) -> str:
    mean, se = mean_se(g)
    tr, _ = trace_cov(g)
    scale = (mean @ g_true / (g_true @ g_true)).item()
    return (
        f"{name:<{width}}{rel(mean - g_true, g_true):>7.3f} {rel(expected - g_true, g_true):>7.3f}"
        f" {rel(se, g_true):>7.3f} {scale:>7.3f} {tr.item() / (g_true @ g_true).item():>9.2f}"
    )


def bias_table() -> str:
    """The measured tables of the module docstring: the single-turn toy's estimators against its ∇J, then
    the episode toy's against the episode's ∇J (the same columns)."""
    blocks = []
    for specs, true, mc, expected in (
        (SPECS, lambda s: true_gradient(s.rewards), mc_gradients, expected_gradient),
        (EPISODE_SPECS, lambda s: episode_true_gradient(), episode_mc_gradients, episode_expected_gradient),
        (IS_SPECS, lambda s: true_gradient("seq"), is_mc_gradients, is_expected_gradient),
    ):
        width = max(36, *map(len, specs))
        header = f"{'estimator':<{width}}rel.bias  exact   noise   scale   trCov/|g|^2"
        rows = [header, "-" * len(header)]
        for name, spec in specs.items():
            rows.append(table_row(name, mc(name), true(spec), expected(name), width))
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(bias_table())
