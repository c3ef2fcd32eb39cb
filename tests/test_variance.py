"""Gradient-variance lab: estimator weights on hand numbers; the sketch is unbiased and agrees with
exact gradients; on the tiny model, baselines cut the variance and the variance follows 1/N
(asserted on K independent batches); the command writes variance.json/.txt and a PNG."""

import json
import math

import numpy as np
import pytest
import torch

from rlhf_pg.cli import main
from rlhf_pg.errors import UserError
from rlhf_pg.labs.variance import (
    ESTIMATORS,
    CountSketch,
    Exact,
    _lab_config,
    collect,
    estimator_weights,
    gradient_stats,
    loglog_slope,
    run_variance,
)
from rlhf_pg.trainer import Trainer

REWARDS = '''
def parity(prompts, completions, completion_ids, **kwargs):
    """1 + fraction of odd token ids: a spread of rewards around a large mean (baselines matter)."""
    return [1.0 + sum(i % 2 for i in ids) / len(ids) for ids in completion_ids]


def constant(prompts, completions, **kwargs):
    """The same reward for everything: no estimator has anything to compare."""
    return [0.0] * len(completions)


def dense_parity(prompts, completions, completion_ids, **kwargs):
    """Per-token reward 1 + (id odd): reward-to-go differs from the full return."""
    return [[1.0 + i % 2 for i in ids] for ids in completion_ids]
'''


pytestmark = pytest.mark.usefixtures("one_thread")


def _lab(tmp_path, fn="parity", **batch) -> dict:
    """Sections over the shared tiny run (conftest's ``tiny_config``/``tiny_recipe``: the tiny model,
    2 prompts × G = 4) that the assertions depend on: seed 0, at most 4 new tokens and the reward
    ``fn`` of REWARDS (parity: rewards ≈ 1.5 ± 0.25, so baselines matter). ``batch`` replaces keys of
    the batch section. The rewards get a file of their own (the shared run's is rw.py)."""
    (tmp_path / "lab_rewards.py").write_text(REWARDS)
    return {
        "seed": 0,
        "rollout": {"max_new_tokens": 4},
        "batch": batch,
        "rewards": {"functions": [{"name": f"{tmp_path / 'lab_rewards.py'}:{fn}"}]},
    }


def test_estimator_weights_hand_numbers():
    R = torch.tensor([1.0, 0.0, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # two prompts, G = 3
    sq = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    w = estimator_weights(R, sq, 3)
    assert set(w) == set(ESTIMATORS)
    assert w["reinforce"][1].tolist() == R.tolist() and w["reinforce"][0].abs().sum() == 0
    assert w["reward_to_go"][0].tolist() == [1.0] * 6 and w["reward_to_go"][1].abs().sum() == 0
    assert w["rtg_batch_mean"][1].tolist() == pytest.approx([-7 / 6] * 6)
    # RLOO: R_i − mean of the other two of its prompt
    assert w["rloo"][1].tolist() == pytest.approx([1 - 1.5, 0 - 2.0, 3 - 0.5, 0, 0, 0])
    # b*_i = Σ_{j≠i} ‖u_j‖² R_j / Σ_{j≠i} ‖u_j‖²  (first prompt: norms 1, 2, 1)
    b = [(2 * 0 + 1 * 3) / 3, (1 * 1 + 1 * 3) / 2, (1 * 1 + 2 * 0) / 3]
    assert w["optimal_baseline"][1][:3].tolist() == pytest.approx([1 - b[0], 0 - b[1], 3 - b[2]])
    assert w["optimal_baseline"][1][3:].tolist() == pytest.approx([0, 0, 0])  # equal rewards: b* = R
    g = w["grpo"][1][:3]
    assert g.tolist() == pytest.approx(((R[:3] - R[:3].mean()) / (R[:3].std() + 1e-4)).tolist())


def test_count_sketch_is_unbiased_for_inner_products():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(300, generator=g), torch.randn(7, 11, generator=g)]
    y = [a + 0.5 * torch.randn(a.shape, generator=g) for a in x]
    exact_xy = sum(float((a * b).sum()) for a, b in zip(x, y))
    exact_xx = sum(float((a * a).sum()) for a in x)
    est_xy, est_xx = [], []
    for seed in range(300):
        S = CountSketch([a.numel() for a in x], 32, seed=seed)
        sx, sy = S(x), S(y)
        est_xy.append(float(sx @ sy))
        est_xx.append(float(sx @ sx))
    # mean of 300 sketches within 4 standard errors of the exact value
    for est, exact in ((est_xy, exact_xy), (est_xx, exact_xx)):
        assert abs(np.mean(est) - exact) < 4 * np.std(est) / math.sqrt(len(est))
        assert np.std(est) / exact < 0.5  # one sketch with D = 32 is already within ~√(2/D)
    assert torch.equal(Exact([3, 2])([torch.arange(3.0), torch.ones(2)]), torch.tensor([0.0, 1, 2, 1, 1]))


def test_loglog_slope():
    assert loglog_slope([2, 4, 8], [8.0, 4.0, 2.0]) == pytest.approx(-1.0)
    assert loglog_slope([2], [1.0]) is None
    s = gradient_stats(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert s["variance"] == pytest.approx(2.0) and s["norm_of_mean"] == pytest.approx(2.0)
    assert s["snr"] == pytest.approx((4.0 - 2.0 / 2) / 2.0)


class _Both:
    """Exact gradient and a CountSketch side by side, to compare them on the same samples."""

    def __init__(self, numels, dim):
        self.exact, self.sketch = Exact(numels), CountSketch(numels, dim, seed=1)
        self.dim = self.exact.dim + dim

    def __call__(self, tensors):
        return torch.cat([self.exact(tensors), self.sketch(tensors)])


def test_sketch_matches_exact_and_rtg_path(tmp_path, tiny_config):
    """On a parameter subset: sketched variances/cosines ≈ exact ones; the per-token (reward-to-go)
    backward pass reproduces v = R·u for a sequence-level reward; dense rewards make rtg ≠ full return."""
    cfg = tiny_config(tmp_path, **_lab(tmp_path))
    tr = Trainer(_lab_config(cfg))
    model = tr.acc.unwrap_model(tr.model)
    params = [p for n, p in model.named_parameters() if "layers.1." in n]
    proj = _Both([p.numel() for p in params], 2048)
    pool = collect(tr, model, params, proj, 6, 2, np.random.default_rng(0), always_backprop_rtg=True)
    assert pool.sequence_level
    torch.testing.assert_close(pool.v, pool.R.float()[..., None] * pool.u, rtol=1e-3, atol=1e-5)
    m = proj.exact.dim
    exact_sq = (pool.u[..., :m].double() ** 2).sum(-1)
    torch.testing.assert_close(exact_sq, pool.sqnorm, rtol=1e-4, atol=1e-6)
    from rlhf_pg.labs.variance import batch_gradients

    for e, g in batch_gradients(pool, 8, 4).items():
        ex, sk = gradient_stats(g[:, :m]), gradient_stats(g[:, m:])
        assert sk["variance"] == pytest.approx(ex["variance"], rel=0.25), e
        assert sk["norm_of_mean"] == pytest.approx(ex["norm_of_mean"], rel=0.25), e

    dense = tiny_config(tmp_path, **_lab(tmp_path, fn="dense_parity"))
    rep = run_variance(dense, batch_sizes=[4], repeats=3, proj_dim=64, params=r"layers\.1\.", progress=False)
    v = {r["estimator"]: r["variance"] for r in rep["results"]}
    assert v["reward_to_go"] != pytest.approx(v["reinforce"], rel=1e-3)
    assert not any("reward-to-go equals" in n for n in rep["notes"])


def test_baselines_cut_variance_and_variance_follows_one_over_n(tmp_path, capsys, tiny_recipe):
    """K = 12 independent batches per N ∈ {4, 8, 16} (G = 4) on the tiny model."""
    recipe = tiny_recipe(tmp_path, **_lab(tmp_path))
    out = tmp_path / "lab"
    assert (
        main(
            [
                "variance",
                str(recipe),
                f"output_dir={tmp_path / 'run'}",
                "--batch-sizes",
                "4,8,16",
                "--repeats",
                "12",
                "--proj-dim",
                "256",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "reinforce" in printed and "1/N law" in printed and "reward-to-go equals the full return" in printed
    rep = json.loads((out / "variance.json").read_text())
    assert (out / "variance.txt").read_text().strip() in printed
    png = (out / "variance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    var = {(r["estimator"], r["N"]): r["variance"] for r in rep["results"]}
    for N in (4, 8, 16):
        # with-baseline ≤ without: by a wide margin (rewards ≈ 1.5 ± 0.25, so R² ≫ Var R)
        for e in ("rtg_batch_mean", "rloo", "grpo", "optimal_baseline"):
            assert var[(e, N)] < 0.5 * var[("reinforce", N)], (e, N)
        assert var[("reward_to_go", N)] == pytest.approx(var[("reinforce", N)])  # sequence-level reward
    s = rep["slopes"]
    # 1/N law: sums of independent per-prompt terms. reinforce's noise has many comparable directions
    # (tight); the baselined ones are noisier estimates of a smaller variance (looser).
    assert s["reinforce"] == pytest.approx(-1.0, abs=0.15)
    for e in ("rloo", "grpo", "optimal_baseline"):
        assert s[e] == pytest.approx(-1.0, abs=0.35), e
    for r in rep["results"]:
        assert r["variance"] > 0
        if r["estimator"] == r["best"]:
            assert r["cos_to_best"] == pytest.approx(1.0)  # the best row is compared with itself


def test_equal_rewards_are_one_line_not_a_table_of_nan(tmp_path, tiny_config):
    """The new user's case (a random model on a task it never solves: every reward 0) says so."""
    cfg = tiny_config(tmp_path, **_lab(tmp_path, fn="constant"))
    with pytest.raises(UserError) as e:
        run_variance(cfg, batch_sizes=[4], repeats=2, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "got return 0" in msg and "nothing to compare" in msg


def test_user_errors(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, **_lab(tmp_path))
    with pytest.raises(UserError, match="multiples"):
        run_variance(cfg, batch_sizes=[6], repeats=2, progress=False)
    with pytest.raises(UserError, match="matches no trainable"):
        run_variance(cfg, batch_sizes=[4], repeats=2, params="nope", progress=False)
    with pytest.raises(UserError, match=r"batch\.group_size >= 2"):
        run_variance(
            tiny_config(tmp_path, **_lab(tmp_path, group_size=1), algo={"name": "reinforce"}), repeats=2, progress=False
        )
