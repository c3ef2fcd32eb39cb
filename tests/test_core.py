"""Tests of rlhf_pg.core: every function on hand-derived values (arithmetic in the comments), plus
invariants and reference implementations written as plain loops.

Registry entries are called as the trainer calls them: ``core.ADVANTAGES[name].fn(AdvantageInputs, opts,
state)``, ``core.POLICY_LOSSES[name].fn(..., opts)``, ``core.KL_ESTIMATORS[name].fn``,
``core.AGGREGATIONS[name].fn(per_tok, mask, Normalisers, opts)``; ``opts`` is the entry's options model.

The statistical checks (KL estimators, sampling frequencies) use fixed seeds and tolerances of
≥ 4.5 standard errors, so a correct implementation fails them with probability < 1e-5.
"""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from rlhf_pg import core
from rlhf_pg.registry import UnknownEntry

# The options these tests assume unless a call says otherwise (NOT the options models' own defaults,
# which are scale=group, reward_to_go=True, lam=0.95).
ADV_DEFAULTS = dict(scale="none", reward_to_go=False, baseline="none", lam=1.0)


def adv_opts(name, **kw):
    """The options model of advantage estimator ``name`` from ADV_DEFAULTS (those it has) and ``kw``
    (all of which must be its fields); None for an estimator without options."""
    model = core.ADVANTAGES[name].options
    if model is None:
        assert not kw, f"{name} has no options, got {kw}"
        return None
    return model(**{k: v for k, v in ADV_DEFAULTS.items() if k in model.model_fields} | kw)


def adv(name, r, m, G=1, values=None, state=None, gamma=1.0, **opts) -> core.AdvantageOutput:
    """core.ADVANTAGES[name].fn on inputs built from (r, m, G, γ, values), options from ``opts``."""
    x = core.AdvantageInputs(r, m, G, gamma=gamma, values=values)
    return core.ADVANTAGES[name].fn(x, adv_opts(name, **opts), state)


def ema_state(value):
    st = core.EmaBaseline()
    st.value = value
    return st


def agg(per_tok, m, mode, *, num_tokens, num_seqs, max_tokens=3, constant=None):
    """core.AGGREGATIONS[mode].fn with the given counts; ``constant`` → ConstantOptions(value=…)."""
    opts = core.ConstantOptions(value=constant) if mode == "constant" else None
    n = core.Normalisers(num_tokens=num_tokens, num_seqs=num_seqs, max_tokens=max_tokens)
    return core.AGGREGATIONS[mode].fn(per_tok, m, n, opts)


def right_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def close(a, b, **kw):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32),
        torch.as_tensor(b, dtype=torch.float32),
        **({"atol": 1e-5, "rtol": 1e-5} | kw),
    )


# -------------------------------------------------------------------------------------- masked ops
def test_masked_sum_mean_and_empty_mask():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    m = right_mask([2, 1], 3)
    close(core.masked_sum(x, m), 7.0)  # 1 + 2 + 4
    close(core.masked_mean(x, m), 7.0 / 3)
    close(core.masked_mean(x, m, dim=-1), [1.5, 4.0])  # (1+2)/2, 4/1
    close(core.masked_mean(x, torch.zeros_like(m)), 0.0)  # empty mask: 0, not nan


def test_masked_whiten_zero_mean_unit_var_zero_padding():
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(6, 9, generator=g)
    m = right_mask([9, 1, 4, 7, 0, 5], 9)
    w = core.masked_whiten(x, m)
    n = m.sum()
    close((w * m).sum() / n, 0.0, atol=1e-5)
    close(((w * m) ** 2).sum() / n, 1.0, atol=1e-4)  # population variance (÷ n), as implemented
    assert (w[m == 0] == 0).all()
    # hand case: [1, 3] (padding 50 ignored): mean 2, var 1 → [−1, 1]
    close(core.masked_whiten(torch.tensor([[1.0, 3.0, 50.0]]), right_mask([2], 3)), [[-1.0, 1.0, 0.0]], atol=1e-6)


def test_last_token_index_and_place_scores():
    m = right_mask([3, 1, 0, 2], 3)
    assert core.last_token_index(m).tolist() == [2, 0, 0, 1]
    r = core.place_scores(torch.tensor([1.0, 2.0, 3.0, -4.0]), m)
    # R on the last real token; an empty row gets nothing (it is masked out)
    close(r, [[0, 0, 1.0], [2.0, 0, 0], [0, 0, 0], [0, -4.0, 0]])


# -------------------------------------------------------------------------------- discounted cumsum
def _discounted_cumsum_loop(x, mask, factor):
    """The plain per-row loop: y_t = Σ_{k=t}^{L−1} factor^(k−t) x_k for the L real (right-padded) tokens."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        L = int(mask[i].sum())
        for t in range(L):
            out[i, t] = sum(factor ** (k - t) * x[i, k] for k in range(t, L))
    return out


@pytest.mark.parametrize("factor", [1.0, 0.9, 0.5, 0.0])
def test_discounted_cumsum_equals_loop(factor):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, generator=g)
    m = right_mask(torch.randint(0, 7, (7,), generator=g), 6)
    x_padded = x + 100.0 * (1 - m)  # garbage in padding must not leak
    close(core.discounted_cumsum(x_padded, m, factor), _discounted_cumsum_loop(x, m, factor))


# ---------------------------------------------------------------------------------- KL estimators
def test_kl_estimators_hand_values():
    half, quarter = math.log(0.5), math.log(0.25)
    lp, ref = torch.tensor([half, quarter]), torch.tensor([quarter, half])
    ln2 = math.log(2)
    # row 0: logp − ref = log 2;  row 1: −log 2
    close(core.kl_k1(lp, ref), [ln2, -ln2])
    # ½ (ref − logp)² = ½ (log 2)² = 0.2402 for both
    close(core.kl_k2(lp, ref), [0.5 * ln2**2] * 2)
    # k3 = e^{ref−logp} − 1 − (ref − logp):  row 0: 0.5 − 1 + log 2 = 0.1931;  row 1: 2 − 1 − log 2 = 0.3069
    close(core.kl_k3(lp, ref), [0.5 - 1 + ln2, 2 - 1 - ln2])
    assert set(core.KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_kl_estimators_zero_when_equal_and_k3_nonnegative():
    g = torch.Generator().manual_seed(2)
    a, b = 5 * torch.randn(1000, generator=g), 5 * torch.randn(1000, generator=g)
    for fn in [e.fn for _, e in core.KL_ESTIMATORS.items()]:
        assert (fn(a, a) == 0).all()
    assert (core.kl_k3(a, b) >= 0).all() and torch.isfinite(core.kl_k3(a, b)).all()
    assert (core.kl_k2(a, b) >= 0).all()


def test_kl_estimators_monte_carlo():
    """Under samples x ~ p: E[k1] = E[k3] = KL(p‖q) (unbiased); E[k2] ≠ KL for far-apart p, q."""
    p = torch.softmax(torch.tensor([2.0, 0.0, -1.0, 1.0, -2.0]), -1)
    q = torch.softmax(torch.tensor([-1.0, 1.0, 2.0, 0.0, 0.5]), -1)
    kl = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(3))
    lp, lq = p.log()[x], q.log()[x]
    for name in ("k1", "k3"):
        k = core.KL_ESTIMATORS[name].fn(lp, lq)
        se = k.std() / math.sqrt(len(k))
        assert abs(k.mean() - kl) < 4.5 * se, name
        assert core.KL_ESTIMATORS[name].unbiased, name
    k2 = core.kl_k2(lp, lq)
    assert abs(k2.mean() - kl) > 10 * k2.std() / math.sqrt(len(k2))  # biased, far beyond noise
    assert core.KL_ESTIMATORS["k2"].unbiased is False
    # exact expectations (Σ_x p(x)·k(x)) agree with the above
    close((p * core.kl_k3(p.log(), q.log())).sum(), kl)
    close((p * core.kl_k1(p.log(), q.log())).sum(), kl)


def test_adaptive_kl_controller():
    c = core.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 9: error = 9/6 − 1 = 0.5 → clipped to 0.2; β = 0.1·(1 + 0.2·1000/10000) = 0.102
    close(c.update(9.0, 1000), 0.102)
    c = core.AdaptiveKLController(0.1, 6.0, 10_000)
    # KL 3: error −0.5 → −0.2; β = 0.1·(1 − 0.02) = 0.098
    close(c.update(3.0, 1000), 0.098)
    c = core.AdaptiveKLController(0.1, 6.0, 10_000)
    # KL 6.6: error 0.1 (not clipped); β = 0.1·1.01
    close(c.update(6.6, 1000), 0.101)
    # a huge KL still only moves β by the clipped 20 %·n/horizon
    c = core.AdaptiveKLController(1.0, 1.0, 100)
    close(c.update(1e6, 100), 1.2)
    close(c.update(0.0, 100), 1.2 * 0.8)
    c2 = core.AdaptiveKLController(0.5, 1.0, 100)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value


# ------------------------------------------------------------------------------------------- GRPO
# Two groups of G = 3; T = 3; lengths [3, 1, 2 | 3, 2, 1]; the rewards of row 0 are split over tokens
# (grpo uses R = Σ_t r_t).  Group 1: R = [1, 2, 6]; group 2: R = [0, 0, 3].
GRPO_MASK = right_mask([3, 1, 2, 3, 2, 1], 3)
GRPO_R = torch.tensor([[0.5, 0.0, 0.5], [2.0, 0, 0], [0, 6.0, 0], [0, 0, 0], [0, 0, 0], [3.0, 0, 0]])


def test_grpo_scales():
    # group 1: mean 3 → centred [−2, −1, 3]; unbiased var (4+1+9)/2 = 7
    # group 2: mean 1 → centred [−1, −1, 2]; unbiased var (1+1+4)/2 = 3
    centred = torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0])
    # whole batch R = [1,2,6,0,0,3]: mean 2, squared deviations 1+0+16+4+4+1 = 26, unbiased var 26/5
    expected = {
        "none": centred,
        "group": centred / (torch.tensor([7.0] * 3 + [3.0] * 3).sqrt() + 1e-4),
        "batch": centred / (math.sqrt(26 / 5) + 1e-4),
    }
    for scale, per_seq in expected.items():
        out = core.grpo_advantages(core.AdvantageInputs(GRPO_R, GRPO_MASK, 3), core.GrpoOptions(scale=scale))
        adv, ret = out.advantages, out.returns
        close(adv, per_seq[:, None] * GRPO_MASK)  # the same on every real token, 0 on padding
        close(ret, torch.tensor([1.0, 2, 6, 0, 0, 3])[:, None] * GRPO_MASK)
        if scale != "batch":
            close(adv[:, 0].view(2, 3).sum(1), [0.0, 0.0], atol=1e-5)  # each group's advantages sum to 0


def test_grpo_group_with_equal_rewards_gives_zero_not_nan():
    a = adv("grpo", torch.ones(4, 2), torch.ones(4, 2), 4, scale="group").advantages
    assert (a == 0).all()


def test_rloo():
    out = core.rloo_advantages(core.AdvantageInputs(GRPO_R, GRPO_MASK, 3))
    adv = out.advantages
    close(adv, core.ADVANTAGES["rloo"].fn(core.AdvantageInputs(GRPO_R, GRPO_MASK, 3), None, None).advantages)
    # R_i − mean of the other two: group 1: 1 − 4 = −3, 2 − 3.5 = −1.5, 6 − 1.5 = 4.5; group 2: −1.5, −1.5, 3
    per_seq = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    close(adv, per_seq[:, None] * GRPO_MASK)
    # = G/(G−1)·(R − mean) = 1.5 · centred
    close(adv[:, 0], 1.5 * torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]))


def test_grpo_and_rloo_baselines():
    # grpo: the group mean (group 1: (1+2+6)/3 = 3; group 2: (0+0+3)/3 = 1) on every action token,
    # whatever the scale (the scale divides the centred reward, not the baseline)
    for scale in ("none", "group", "batch"):
        out = adv("grpo", GRPO_R, GRPO_MASK, 3, scale=scale)
        close(out.baseline, torch.tensor([3.0, 3, 3, 1, 1, 1])[:, None] * GRPO_MASK)
    out = adv("grpo", GRPO_R, GRPO_MASK, 3, scale="none")
    close(out.advantages, (out.returns - out.baseline) * GRPO_MASK)
    # rloo: the mean of the other two: group 1: (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5;
    # group 2: (0+3)/2 = 1.5, 1.5, (0+0)/2 = 0
    out = adv("rloo", GRPO_R, GRPO_MASK, 3)
    close(out.baseline, torch.tensor([4.0, 3.5, 1.5, 1.5, 1.5, 0.0])[:, None] * GRPO_MASK)
    close(out.advantages, (out.returns - out.baseline) * GRPO_MASK)


# -------------------------------------------------------------------------------------- REINFORCE
def test_reinforce_reward_to_go_vs_full_return_discounted():
    # r = [1, 2, 4], γ = 0.5:  G_2 = 4;  G_1 = 2 + 0.5·4 = 4;  G_0 = 1 + 0.5·4 = 3
    # row 2 = [1, 2, pad]:     G_1 = 2;  G_0 = 1 + 0.5·2 = 2
    r = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 0.0]])
    m = right_mask([3, 2], 3)
    x = core.AdvantageInputs(r, m, 1, gamma=0.5)
    out = core.reinforce_advantages(x, core.ReinforceOptions(reward_to_go=True))
    adv, ret = out.advantages, out.returns
    close(adv, [[3.0, 4.0, 4.0], [2.0, 2.0, 0.0]])
    close(ret, adv)
    adv = core.reinforce_advantages(x, core.ReinforceOptions(reward_to_go=False)).advantages
    close(adv, [[3.0, 3.0, 3.0], [2.0, 2.0, 0.0]])  # G_0 on every real token


# One group of G = 3, γ = 1, dense rewards; reward-to-go G_t:
#   a: r = [1, 0, 2]   → [3, 2, 2]
#   b: r = [0, 1, 1]   → [2, 2, 1]
#   c: r = [2, 1, pad] → [3, 1, 0]
BL_R = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
BL_M = right_mask([3, 3, 2], 3)


@pytest.mark.parametrize(
    "baseline,expected",
    [
        ("none", [[3, 2, 2], [2, 2, 1], [3, 1, 0]]),
        # per position over the members alive there: t0 (3+2+3)/3 = 8/3; t1 (2+2+1)/3 = 5/3; t2 (2+1)/2 = 3/2
        ("mean", [[1 / 3, 1 / 3, 0.5], [-2 / 3, 1 / 3, -0.5], [1 / 3, -2 / 3, 0]]),
        # the others alive at t: a: t0 (2+3)/2, t1 (2+1)/2, t2 (b) 1;  b: t0 (3+3)/2, t1 1.5, t2 (a) 2;
        #                        c: t0 (3+2)/2, t1 (2+2)/2
        ("loo", [[0.5, 0.5, 1.0], [-1.0, 0.5, -1.0], [0.5, -1.0, 0]]),
        # b = the EMA state's value = 1.5 everywhere
        ("ema", [[1.5, 0.5, 0.5], [0.5, 0.5, -0.5], [1.5, -0.5, 0]]),
    ],
)
def test_reinforce_baselines(baseline, expected):
    state = ema_state(1.5) if baseline == "ema" else None
    out = adv("reinforce", BL_R, BL_M, 3, state=state, reward_to_go=True, baseline=baseline)
    close(out.advantages, expected)
    close(out.returns, [[3, 2, 2], [2, 2, 1], [3, 1, 0]])


@pytest.mark.parametrize(
    "baseline,expected",
    [
        ("none", [[0, 0, 0], [0, 0, 0], [0, 0, 0]]),
        # the same per-position means as above: t0 8/3, t1 5/3, t2 3/2 (c is padding at t2)
        ("mean", [[8 / 3, 5 / 3, 1.5], [8 / 3, 5 / 3, 1.5], [8 / 3, 5 / 3, 0]]),
        # leave-one-out: a: t0 (2+3)/2, t1 (2+1)/2, t2 1;  b: t0 (3+3)/2, t1 (2+1)/2, t2 2;  c: t0 (3+2)/2, t1 (2+2)/2
        ("loo", [[2.5, 1.5, 1.0], [3.0, 1.5, 2.0], [2.5, 2.0, 0]]),
        ("ema", [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5], [1.5, 1.5, 0]]),
    ],
)
def test_reinforce_baseline_output(baseline, expected):
    state = ema_state(1.5) if baseline == "ema" else None
    out = adv("reinforce", BL_R, BL_M, 3, state=state, reward_to_go=True, baseline=baseline)
    close(out.baseline, expected)  # 0 on padding
    close(out.advantages, (out.returns - out.baseline) * BL_M)


def test_reinforce_loo_without_other_samples_uses_no_baseline():
    # c alone is alive at t = 2 (G_2 = 5): no other sample → baseline 0, advantage 5
    r, m = torch.tensor([[1.0, 0, 0], [0, 2.0, 5.0]]), right_mask([1, 3], 3)
    a = adv("reinforce", r, m, 2, reward_to_go=True, baseline="loo").advantages
    # t0: 1 − 7, 7 − 1; t1: b alone: 7; t2: 5
    close(a, [[-6.0, 0, 0], [6.0, 7.0, 5.0]])


def test_reinforce_errors():
    with pytest.raises(ValueError, match="ema"):
        adv("reinforce", BL_R, BL_M, 3, baseline="ema")  # no EmaBaseline state
    # an unknown baseline is rejected by the options model, before any estimator runs
    with pytest.raises(pydantic.ValidationError, match="baseline"):
        core.ReinforceOptions(baseline="median")


def test_reinforce_ema_state_update():
    """b is the state's value before the batch (0 when None); afterwards the state moves towards this
    batch's mean full return G_0 = mean(3, 2, 3) = 8/3 (for reward-to-go too)."""
    st = core.EmaBaseline()
    assert st.value is None
    out = adv("reinforce", BL_R, BL_M, 3, state=st, reward_to_go=True, baseline="ema", ema_decay=0.5)
    close(out.advantages, [[3, 2, 2], [2, 2, 1], [3, 1, 0]])  # b = 0 on the first batch
    close(st.value, 8 / 3)  # the first batch's mean is taken as is
    st.value = 1.5
    out = adv("reinforce", BL_R, BL_M, 3, state=st, reward_to_go=True, baseline="ema", ema_decay=0.5)
    close(out.advantages, [[1.5, 0.5, 0.5], [0.5, 0.5, -0.5], [1.5, -0.5, 0]])  # b = 1.5, not the update
    close(st.value, 0.5 * 1.5 + 0.5 * 8 / 3)  # d·b + (1 − d)·mean
    st2 = core.EmaBaseline()
    st2.load_state_dict(st.state_dict())
    assert st2.value == st.value


def test_registries():
    assert set(core.ADVANTAGES) >= {"grpo", "rloo", "reinforce", "gae"}
    assert set(core.POLICY_LOSSES) >= {"pg", "clip"}
    assert set(core.AGGREGATIONS) >= {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant"}
    assert core.ADVANTAGES["gae"].needs_values is True
    assert not any(core.ADVANTAGES[n].needs_values for n in ("grpo", "rloo", "reinforce"))
    assert core.ADVANTAGES["grpo"].group_size_needed(core.GrpoOptions()) == 2
    assert core.ADVANTAGES["rloo"].group_size_needed(None) == 2
    reinforce = core.ADVANTAGES["reinforce"]
    assert reinforce.group_size_needed(core.ReinforceOptions(baseline="loo")) == 2
    assert reinforce.group_size_needed(core.ReinforceOptions(baseline="mean")) == 2
    assert reinforce.group_size_needed(core.ReinforceOptions(baseline="none")) == 1
    assert reinforce.group_size_needed(core.ReinforceOptions(baseline="ema")) == 1
    assert reinforce.state is core.EmaBaseline
    assert core.AGGREGATIONS["token-mean"].unit == "tokens"
    assert core.AGGREGATIONS["seq-mean-token-sum"].unit == "sequences"
    # the registered functions are the module's direct functions
    assert core.ADVANTAGES["grpo"].fn is core.grpo_advantages
    assert core.ADVANTAGES["rloo"].fn is core.rloo_advantages
    assert core.ADVANTAGES["reinforce"].fn is core.reinforce_advantages
    assert core.ADVANTAGES["gae"].fn is core.gae_advantages
    assert core.POLICY_LOSSES["clip"].fn is core.clip_loss and core.POLICY_LOSSES["clip"].options is core.ClipOptions
    assert core.POLICY_LOSSES["pg"].fn is core.pg_loss and core.POLICY_LOSSES["pg"].options is None


def test_unknown_registry_name_lists_known_ones():
    with pytest.raises(UnknownEntry, match="grpo, reinforce, rloo") as e:
        core.ADVANTAGES["gpro"]
    assert isinstance(e.value, KeyError) and "did you mean 'grpo'" in str(e.value)


def test_user_registered_advantage():
    @core.ADVANTAGES.register("test_tmp", min_group_size=3)
    def test_tmp(x, opts, state):
        return core.AdvantageOutput(2 * x.token_rewards, x.token_rewards)

    try:
        assert "test_tmp" in core.ADVANTAGES and "test_tmp" in set(core.ADVANTAGES)
        entry = core.ADVANTAGES["test_tmp"]
        assert entry.fn is test_tmp and entry.group_size_needed(None) == 3
        assert entry.needs_values is False and entry.options is None and entry.state is None
        assert core.ADVANTAGES.metadata("test_tmp")["min_group_size"] == 3
        out = adv("test_tmp", BL_R, BL_M, 3)
        close(out.advantages, 2 * BL_R)
        assert out.baseline is None
        with pytest.raises(ValueError, match="already registered"):
            core.ADVANTAGES.register("test_tmp")(test_tmp)
        with pytest.raises(ValueError, match="already registered"):
            core.ADVANTAGES.add("test_tmp", entry)
    finally:
        core.ADVANTAGES.unregister("test_tmp")
    assert "test_tmp" not in core.ADVANTAGES


# -------------------------------------------------------------------------------------------- GAE
def _gae_loop(r, v, mask, gamma, lam):
    """δ_t = r_t + γ V_{t+1} − V_t (V = 0 after the last real token); Â_t = Σ_l (γλ)^l δ_{t+l}."""
    adv = torch.zeros_like(r)
    for i in range(r.shape[0]):
        L = int(mask[i].sum())
        delta = [r[i, t] + gamma * (v[i, t + 1] if t + 1 < L else 0.0) - v[i, t] for t in range(L)]
        for t in range(L):
            adv[i, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.7, 0.0), (1.0, 0.5)])
def test_gae_equals_loop(gamma, lam):
    g = torch.Generator().manual_seed(4)
    r, v = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    m = right_mask([5, 1, 3, 0, 4, 2], 5)
    out = adv("gae", r * m, m, values=v, gamma=gamma, lam=lam)
    expected = _gae_loop(r, v, m, gamma, lam)
    close(out.advantages, expected)
    close(out.returns, (expected + v) * m)  # returns = Â + V


def test_gae_lambda_one_zero_values_is_reward_to_go():
    g = torch.Generator().manual_seed(5)
    m = right_mask([4, 2, 3], 4)
    r = torch.randn(3, 4, generator=g) * m
    a = adv("gae", r, m, values=torch.zeros(3, 4), gamma=1.0, lam=1.0).advantages
    rtg = adv("reinforce", r, m, gamma=1.0, reward_to_go=True).advantages
    close(a, rtg)
    # λ = 1 with any V: Â_t = G_t − V(s_t)  (the V terms telescope)
    v = torch.randn(3, 4, generator=g)
    a = adv("gae", r, m, values=v, gamma=1.0, lam=1.0).advantages
    close(a, (rtg - v) * m)


def test_gae_hand_example():
    # r = [0, 0, 1], V = [0.5, 0.2, 0.8], γ = 0.9, λ = 0.5 (γλ = 0.45):
    # δ_2 = 1 + 0 − 0.8 = 0.2;  δ_1 = 0.9·0.8 − 0.2 = 0.52;  δ_0 = 0.9·0.2 − 0.5 = −0.32
    # Â_2 = 0.2;  Â_1 = 0.52 + 0.45·0.2 = 0.61;  Â_0 = −0.32 + 0.45·0.61 = −0.0455
    # returns = Â + V = [0.4545, 0.81, 1.0]
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.8]]), torch.ones(1, 3)
    out = core.gae_advantages(core.AdvantageInputs(r, m, 1, gamma=0.9, values=v), core.GaeOptions(lam=0.5))
    close(out.advantages, [[-0.0455, 0.61, 0.2]])
    close(out.returns, [[0.4545, 0.81, 1.0]])
    with pytest.raises(ValueError, match="values"):
        adv("gae", r, m)


def test_gae_baseline_is_the_masked_values():
    # the baseline is V(s_t) on action tokens, 0 on padding; Â = returns − V there
    r = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    v = torch.tensor([[0.5, 0.2, 0.8], [0.3, 9.0, 9.0]])
    m = right_mask([3, 1], 3)
    out = adv("gae", r, m, values=v, gamma=0.9, lam=0.5)
    close(out.baseline, [[0.5, 0.2, 0.8], [0.3, 0.0, 0.0]])
    close(out.advantages[:1], [[-0.0455, 0.61, 0.2]])  # row 0 is test_gae_hand_example
    close(out.advantages[1], [2.0 - 0.3, 0, 0])  # one token: δ_0 = r_0 − V_0
    close(out.advantages, (out.returns - out.baseline) * m)


# ----------------------------------------------------------------------------------- policy losses
def _loss_and_grad(name, ratio, adv, c):
    """Per-token loss and d loss / d logp at log π_old = 0, logp = log ratio."""
    logp = torch.tensor(ratio, dtype=torch.float64).log().requires_grad_()
    old = torch.zeros_like(logp)
    a = torch.tensor(adv, dtype=torch.float64)
    loss, stats = core.POLICY_LOSSES[name].fn(logp, old, a, torch.ones_like(a), c)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return loss.detach(), grad, stats


def test_clip_at_ratio_one_equals_pg():
    g = torch.Generator().manual_seed(6)
    logp = torch.randn(4, 5, generator=g).requires_grad_()
    adv, m = torch.randn(4, 5, generator=g), torch.ones(4, 5)
    c = core.ClipOptions(eps_low=0.2, eps_high=0.3, dual_clip=3.0)
    clip, stats = core.clip_loss(logp, logp.detach(), adv, m, c)
    pg, _ = core.pg_loss(logp, logp.detach(), adv, m, None)
    close(clip, -adv)  # ρ = 1: −min(Â, Â) = −Â
    close(pg, -adv * logp)
    (g_clip,) = torch.autograd.grad(clip.sum(), logp)
    (g_pg,) = torch.autograd.grad(pg.sum(), logp)
    close(g_clip, g_pg)
    close(g_clip, -adv)  # −Â·∇logp
    assert (stats["clip_low"] == 0).all() and (stats["clip_high"] == 0).all()
    close(stats["approx_kl"], torch.zeros(4, 5))


@pytest.mark.parametrize(
    "ratio,adv,loss,grad,low,high",
    [
        # ε_low = 0.2, ε_high = 0.28; loss = −min(ρÂ, clip(ρ, 0.8, 1.28)Â); d loss/d logp = −ρÂ when unclipped
        (1.10, 1.0, -1.10, -1.10, 0, 0),  # inside the band
        (1.25, 1.0, -1.25, -1.25, 0, 0),  # inside thanks to ε_high = 0.28 (a symmetric 0.2 would clip)
        (1.50, 1.0, -1.28, 0.0, 0, 1),  # Â > 0 and ρ > 1 + ε_high: clipped, no gradient
        (0.70, 1.0, -0.70, -0.70, 0, 0),  # Â > 0, ρ < 1 − ε_low: min picks ρÂ = 0.7 < 0.8 — not clipped
        (0.70, -1.0, 0.80, 0.0, 1, 0),  # Â < 0, ρ < 1 − ε_low: −min(−0.7, −0.8) = 0.8, clipped
        (0.78, -1.0, 0.80, 0.0, 1, 0),  # asymmetric: 0.78 < 0.8 is clipped on the low side
        (0.90, -1.0, 0.90, 0.90, 0, 0),  # inside
        (1.50, -1.0, 1.50, 1.50, 0, 0),  # Â < 0, ρ > 1 + ε_high: min picks ρÂ = −1.5 — not clipped
        (2.90, -1.0, 2.90, 2.90, 0, 0),  # below the dual clip c = 3
        (4.00, -1.0, 3.00, 0.0, 0, 0),  # dual clip: min(4, −cÂ = 3) = 3, no gradient
        (5.00, -2.0, 6.00, 0.0, 0, 0),  # dual clip: −min(−10, −2.56) = 10 → min(10, −3·(−2) = 6)
        (5.00, 2.0, -2.56, 0.0, 0, 1),  # dual clip never applies to Â > 0: −1.28·2
    ],
)
def test_clip_branches(ratio, adv, loss, grad, low, high):
    c = core.ClipOptions(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    l, g, stats = _loss_and_grad("clip", [ratio], [adv], c)
    close(l, [loss])
    close(g, [grad])
    assert stats["clip_low"].item() == low and stats["clip_high"].item() == high


def test_clip_continuous_at_band_edges_and_without_dual_clip():
    c = core.ClipOptions(eps_low=0.2, eps_high=0.28, dual_clip=None)
    for ratio, adv in ((1.28, 1.0), (0.8, -1.0)):
        for d in (-1e-6, 1e-6):
            l, _, _ = _loss_and_grad("clip", [ratio + d], [adv], c)
            close(l, [-ratio * adv], atol=2e-6)
    l, g, _ = _loss_and_grad("clip", [4.0], [-1.0], c)  # no dual clip: −min(−4, −1.28) = 4, gradient ρ|Â| = 4
    close(l, [4.0])
    close(g, [4.0])


def test_clip_approx_kl_estimates_kl_old_to_new():
    """approx_kl is k3 of KL(π_old‖π_θ) under tokens sampled from π_old: its exact expectation
    Σ_x π_old(x)·approx_kl(x) equals KL(π_old‖π_θ)."""
    old = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 2.0]), -1)
    new = torch.log_softmax(torch.tensor([0.0, 1.0, 0.5, 0.0]), -1)
    _, stats = core.clip_loss(new, old, torch.ones(4), torch.ones(4), core.ClipOptions(eps_low=0.2, eps_high=0.2))
    kl_old_new = (old.exp() * (old - new)).sum()
    close((old.exp() * stats["approx_kl"]).sum(), kl_old_new)
    assert (stats["approx_kl"] >= 0).all()


# ------------------------------------------------------------------------------------ value / EV
def test_value_loss_branches():
    v = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    old, ret = torch.tensor([0.5, 0.5, 1.2]), torch.tensor([2.0, 0.0, 1.0])
    loss, used = core.value_loss(v, old, ret, clip=0.2)
    # 0: V_clip = 0.5 + clip(0.5, ±0.2) = 0.7; (1−2)² = 1 < (0.7−2)² = 1.69 → ½·1.69 = 0.845, clipped branch
    # 1: V_clip = 0.7; (1−0)² = 1 > 0.49 → 0.5, unclipped
    # 2: V − V_old = −0.2 (inside): V_clip = V → 0
    close(loss, [0.845, 0.5, 0.0])
    close(used, [1.0, 0.0, 0.0])
    (g,) = torch.autograd.grad(loss.sum(), v)
    close(g, [0.0, 1.0, 0.0])  # clipped branch is flat in V; unclipped: V − R = 1
    loss, used = core.value_loss(v, old, ret, clip=None)
    close(loss, [0.5, 0.5, 0.0])  # ½(V − R)²
    assert (used == 0).all()


def test_explained_variance():
    g = torch.Generator().manual_seed(7)
    target = torch.randn(4, 6, generator=g)
    m = right_mask([6, 2, 4, 5], 6)
    garbage = target + 1000 * (1 - m)  # padding must be ignored
    close(core.explained_variance(target, garbage, m), 1.0)
    close(core.explained_variance(torch.full_like(target, 3.7), target, m), 0.0, atol=1e-5)
    # hand case: target [0, 2] (var 1), pred [0, 0]: diff [0, 2] (var 1) → 1 − 1/1 = 0;
    # pred [1, 1]: diff [−1, 1], var 1 → 0;  pred [0, 1]: diff [0, 1], var 0.25 → 0.75
    t, m1 = torch.tensor([[0.0, 2.0]]), torch.ones(1, 2)
    close(core.explained_variance(torch.tensor([[0.0, 1.0]]), t, m1), 0.75)


# -------------------------------------------------------------------------------------- aggregate
def test_aggregate_modes_hand_values():
    per_tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    m = right_mask([3, 2], 3)
    kw = dict(num_tokens=5, num_seqs=2)
    close(agg(per_tok, m, "token-mean", **kw), 3.0)  # 15/5
    close(agg(per_tok, m, "seq-mean-token-mean", **kw), 3.25)  # (6/3 + 9/2)/2
    close(agg(per_tok, m, "seq-mean-token-sum", **kw), 7.5)  # 15/2
    close(agg(per_tok, m, "constant", constant=4.0, **kw), 1.875)  # 15/(2·4)
    # no constant: C = max_tokens (rollout.max_new_tokens), here 3 → 15/(2·3); likewise with opts None
    n = core.Normalisers(num_tokens=5, num_seqs=2, max_tokens=3)
    close(core.AGGREGATIONS["constant"].fn(per_tok, m, n, core.ConstantOptions()), 2.5)
    close(core.AGGREGATIONS["constant"].fn(per_tok, m, n, None), 2.5)
    with pytest.raises(UnknownEntry, match="constant, seq-mean-token-mean, seq-mean-token-sum, token-mean"):
        core.AGGREGATIONS["median"]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant"])
def test_aggregate_invariant_to_micro_batching(mode):
    """Σ over micro-batches of their shares (with the WHOLE batch's counts) = the whole batch's loss,
    in value and in gradient."""
    g = torch.Generator().manual_seed(8)
    B, T = 11, 7
    w = torch.randn(T, generator=g).requires_grad_()
    feats = torch.randn(B, T, generator=g)
    m = right_mask(torch.randint(1, T + 1, (B,), generator=g), T)
    counts = dict(num_tokens=m.sum().item(), num_seqs=B, max_tokens=T, constant=5.0)

    def losses(parts):
        return sum(agg(feats[p] * w, m[p], mode, **counts) for p in parts)

    whole = losses([torch.arange(B)])
    (g_whole,) = torch.autograd.grad(whole, w)
    perm = torch.randperm(B, generator=g)
    parts = [perm[:3], perm[3:4], perm[4:9], perm[9:]]
    split = losses(parts)
    (g_split,) = torch.autograd.grad(split, w)
    close(split, whole)
    close(g_split, g_whole)


# --------------------------------------------------------------------------------- log-probs etc.
@pytest.mark.parametrize("temperature,chunk", [(1.0, 4096), (0.7, 4), (1.3, 1), (0.5, 7)])
def test_token_logprobs_and_entropy(temperature, chunk):
    g = torch.Generator().manual_seed(9)
    logits = 3 * torch.randn(3, 5, 11, generator=g)  # 15 rows: chunks of 4/1/7 cut across sequence rows
    ids = torch.randint(0, 11, (3, 5), generator=g)
    logp, ent = core.token_logprobs(logits, ids, temperature, chunk=chunk)
    ref = torch.log_softmax(logits / temperature, -1)
    close(logp, ref.gather(-1, ids[..., None]).squeeze(-1))
    close(ent, -(ref.exp() * ref).sum(-1))  # −Σ p log p
    logp2, none = core.token_logprobs(logits, ids, temperature, with_entropy=False, chunk=chunk)
    assert none is None and torch.equal(logp2, logp)
    logp_bf16, _ = core.token_logprobs(logits.bfloat16(), ids, temperature, chunk=chunk)
    assert logp_bf16.dtype == torch.float32  # computed in fp32


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_gathered_logprobs_closed_form_backward_matches_autograd(temperature, chunk):
    check_gathered_logprobs(temperature, chunk, "cpu")


def check_gathered_logprobs(temperature: float, chunk: int, device: str) -> None:
    """The log-prob pass's own backward ((onehot − softmax)/τ, chunk by chunk) against autograd of a
    float64 log-softmax: rows read by several pairs (a packed prompt's last column), a pair read twice,
    rows read by none; fp32 logits stay untouched; bf16 logits get the float64 gradient rounded once.
    On ``device`` (tests/test_gpu.py runs it on CUDA)."""
    g = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(7, 13, generator=g)).to(device)
    rows = torch.tensor([0, 0, 0, 2, 3, 3, 5, 6, 6], device=device)  # rows 1 and 4 read by no pair
    targets = torch.tensor([4, 9, 4, 0, 12, 1, 7, 3, 2], device=device)  # (0, 4) read twice
    upstream = torch.randn(rows.shape[0], generator=g, dtype=torch.float64).to(device)

    def exact(x):
        x = x.detach().double().requires_grad_(True)
        lp = torch.log_softmax(x / temperature, -1)[rows, targets]
        (lp * upstream).sum().backward()
        ent = -(torch.softmax(x / temperature, -1) * torch.log_softmax(x / temperature, -1)).sum(-1)
        return lp.detach(), x.grad, ent.detach()

    lp_ref, grad_ref, ent_ref = exact(logits)
    x = logits.clone().requires_grad_(True)
    lp, ent = core.gathered_logprobs(x, rows, targets, temperature, with_entropy=True, chunk=chunk, entropy_grad=False)
    (lp * upstream.float()).sum().backward()
    assert lp.dtype == ent.dtype == torch.float32 and not ent.requires_grad
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=1e-5)  # lse − Σ p·z cancels in fp32
    torch.testing.assert_close(x.grad.double(), grad_ref, rtol=0, atol=2e-6)
    assert torch.equal(x.detach(), logits)  # the saved fp32 logits were not overwritten by the backward
    assert x.grad[1].abs().max() == 0 and x.grad[4].abs().max() == 0

    xb = logits.bfloat16().requires_grad_(True)
    lp_b, _ = core.gathered_logprobs(xb, rows, targets, temperature, with_entropy=False, chunk=chunk)
    (lp_b * upstream.float()).sum().backward()
    lp_ref_b, grad_ref_b, _ = exact(xb)  # the float64 answer for the rounded logits
    torch.testing.assert_close(lp_b.double(), lp_ref_b, rtol=0, atol=2e-6)
    assert xb.grad.dtype == torch.bfloat16
    # one rounding of the exact gradient: within half a bf16 ulp (2^-8 relative) of it
    err = (xb.grad.double() - grad_ref_b).abs()
    assert bool((err <= grad_ref_b.abs() * 2.0**-8 + 1e-30).all()), err.max()


def test_gathered_logprobs_trains_the_entropy_only_when_asked():
    """entropy_grad: the entropy is differentiable (an entropy bonus) and equals the metric-only value;
    without it the entropy carries no graph."""
    g = torch.Generator().manual_seed(12)
    logits = (2 * torch.randn(4, 9, generator=g)).requires_grad_(True)
    rows, targets = torch.arange(4), torch.tensor([1, 2, 3, 4])
    lp1, e1 = core.gathered_logprobs(logits, rows, targets, 0.8, True, entropy_grad=True)
    lp0, e0 = core.gathered_logprobs(logits, rows, targets, 0.8, True, entropy_grad=False)
    assert e1.requires_grad and not e0.requires_grad
    torch.testing.assert_close(e1.detach(), e0)
    torch.testing.assert_close(lp1.detach(), lp0.detach())
    (gx,) = torch.autograd.grad(e1.sum(), logits)
    p = torch.softmax(logits.detach() / 0.8, -1)
    logp = torch.log_softmax(logits.detach() / 0.8, -1)
    ent = -(p * logp).sum(-1, keepdim=True)
    torch.testing.assert_close(gx, -p * (logp + ent) / 0.8)  # ∂H/∂z = −p (log p + H) / τ


def test_sample_greedy_topk1_and_tiny_top_p_are_argmax():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(500, 9, generator=g)
    amax = logits.argmax(-1)
    tok, _ = core.sample_from_logits(logits, 0.0, 1.0, 0, g)
    assert torch.equal(tok, amax)
    tok, _ = core.sample_from_logits(logits, 1.5, 1.0, 1, g)
    assert torch.equal(tok, amax)
    tok, _ = core.sample_from_logits(logits, 1.5, 1e-6, 0, g)
    assert torch.equal(tok, amax)


def test_sample_returns_untruncated_tempered_logprob():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(300, 9, generator=g)
    for tau, top_p, top_k in ((0.7, 1.0, 0), (1.3, 0.8, 0), (1.0, 1.0, 3), (0.9, 0.5, 4)):
        tok, lp = core.sample_from_logits(logits, tau, top_p, top_k, g)
        close(lp, torch.log_softmax(logits / tau, -1).gather(-1, tok[:, None]).squeeze(-1))


def _chi2(counts, probs):
    expected = counts.sum() * probs
    return ((counts - expected) ** 2 / expected).sum().item()


def test_sample_frequencies_match_softmax_and_truncation():
    """40 000 draws of one row; Pearson χ² with V − 1 dof. Thresholds sit at p ≈ 1e-6 (dof 4: 33;
    dof 1: 24), so a correct sampler fails with probability ~1e-6 while a wrong temperature or support
    gives χ² in the hundreds."""
    g = torch.Generator().manual_seed(12)
    logits = torch.tensor([1.0, 0.2, -0.5, 0.6, -1.5])
    n, tau = 40_000, 0.8
    tok, _ = core.sample_from_logits(logits.expand(n, -1), tau, 1.0, 0, g)
    counts = torch.bincount(tok, minlength=5).float()
    assert _chi2(counts, torch.softmax(logits / tau, -1)) < 33
    # top-k = 2: only tokens 0 and 3 (the two largest), renormalised
    tok, _ = core.sample_from_logits(logits.expand(n, -1), tau, 1.0, 2, g)
    counts = torch.bincount(tok, minlength=5).float()
    assert counts[[1, 2, 4]].sum() == 0
    assert _chi2(counts[[0, 3]], torch.softmax(logits[[0, 3]] / tau, -1)) < 24
    # top-p: at τ = 1 the sorted probabilities are 0.412, 0.277, 0.185, 0.092, 0.034 (cumulative 0.412,
    # 0.689, …); top_p = 0.6 keeps the smallest prefix with mass ≥ 0.6: tokens 0 and 3
    tok, _ = core.sample_from_logits(logits.expand(n, -1), 1.0, 0.6, 0, g)
    counts = torch.bincount(tok, minlength=5).float()
    assert counts[[1, 2, 4]].sum() == 0
    assert _chi2(counts[[0, 3]], torch.softmax(logits[[0, 3]], -1)) < 24


def test_last_token_index_with_holes():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1.0]])
    assert core.last_token_index(mask).tolist() == [4, 0, 0, 5]


def test_action_index_compacts_actions_in_order_and_expands_back():
    # row 0: actions at 0, 1, 4 (2, 3 are environment tokens); row 1: a single-turn prefix; row 2: none
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0.0]])
    x = torch.arange(18, dtype=torch.float).view(3, 6) + 1
    acts = core.ActionIndex.of(mask)
    assert acts.compact(x).tolist() == [[1, 2, 5], [7, 8, 9], [0, 0, 0]]
    assert acts.mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert torch.equal(acts.expand(acts.compact(x)), x * mask)
    # the plain loop it replaces: walk each row and keep the masked entries
    for b in range(3):
        kept = [x[b, t].item() for t in range(6) if mask[b, t]]
        assert acts.compact(x)[b, : len(kept)].tolist() == kept


def test_reward_to_go_over_an_episode_skips_environment_tokens():
    # actions at 0, 1, 4; a turn reward of 1 on token 1 and a final score of 2 on token 4, γ = 0.5
    mask = torch.tensor([[1, 1, 0, 0, 1.0]])
    r = torch.tensor([[0, 1, 0, 0, 2.0]])
    acts = core.ActionIndex.of(mask)
    g = acts.expand(core.discounted_cumsum(acts.compact(r), acts.mask, 0.5))
    # G_4 = 2, G_1 = 1 + 0.5·2 = 2, G_0 = 0 + 0.5·2 = 1: environment tokens are not steps
    assert g.tolist() == [[1.0, 2.0, 0.0, 0.0, 2.0]]
