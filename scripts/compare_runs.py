"""Are two runs' learning curves statistically the same? (e.g. before/after a speed optimisation)

    python scripts/compare_runs.py runs/A runs/B [--png curves.png]

Reads both ``metrics.jsonl`` files and reports
* the training reward per step (each the mean of the step's P·G sampled completions) and the paired
  difference d_s = A_s − B_s over the steps both have: its mean, standard error and a paired t
  statistic with a two-sided p-value (Student t, n−1 degrees of freedom). Pairing by step removes the
  learning trend; the steps' own sampling noise is what the test compares against;
* the held-out evaluation (greedy) at the start and the end: accuracy (or reward) of each run, the
  difference and a two-proportion z test when it is an accuracy over n questions;
* with ``--png``, both reward curves and eval points in one figure (via ``rlhf-pg plot``'s reader).

"Statistically the same" here means: no difference detected at the 5 % level, with the standard
errors printed so the reader sees how large a difference could hide in the noise.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from rlhf_pg.plot import read_metrics, series


def _t_sf(t: float, df: int) -> float:
    """Two-sided p-value of Student's t (regularised incomplete beta via continued fraction)."""
    x = df / (df + t * t)
    return _betainc(df / 2, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        aa = m * (b - m) * x / ((a - 1 + 2 * m) * (a + 2 * m))
        d = 1 / ((1 + aa * d) if abs(1 + aa * d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1 + 2 * m))
        d = 1 / ((1 + aa * d) if abs(1 + aa * d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-12:
            break
    return front * h / a


def _norm_sf2(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def compare(a: Path, b: Path) -> dict:
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    sa, va = series(ra, "reward")
    sb, vb = series(rb, "reward")
    da, db = dict(zip(sa, va)), dict(zip(sb, vb))
    steps = sorted(set(da) & set(db))
    if len(steps) < 3:
        raise SystemExit("compare_runs: the runs share fewer than 3 training steps")
    d = [da[s] - db[s] for s in steps]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    t = mean / se if se > 0 else 0.0
    out = {
        "steps": n,
        "reward_mean_a": sum(da[s] for s in steps) / n,
        "reward_mean_b": sum(db[s] for s in steps) / n,
        "paired_diff": mean,
        "paired_se": se,
        "t": t,
        "p": _t_sf(t, n - 1) if se > 0 else 1.0,
        "evals": [],
    }
    key = "eval/accuracy" if any("eval/accuracy" in r for r in ra) else "eval/reward"
    ea = {r["step"]: r for r in ra if key in r}
    eb = {r["step"]: r for r in rb if key in r}
    for s in sorted(set(ea) & set(eb)):
        x, y = ea[s][key], eb[s][key]
        row = {"step": s, "key": key, "a": x, "b": y, "n_a": ea[s].get("eval/n"), "n_b": eb[s].get("eval/n")}
        if key == "eval/accuracy" and row["n_a"] and row["n_b"]:
            p = (x * row["n_a"] + y * row["n_b"]) / (row["n_a"] + row["n_b"])
            se2 = math.sqrt(max(p * (1 - p) * (1 / row["n_a"] + 1 / row["n_b"]), 1e-12))
            row.update(z=(x - y) / se2, p=_norm_sf2((x - y) / se2), se=se2)
        out["evals"].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--png", default=None, help="also draw both runs' curves (rlhf-pg plot) into this file")
    args = p.parse_args(argv)
    a, b = Path(args.run_a), Path(args.run_b)
    r = compare(a, b)
    print(
        f"training reward over {r['steps']} shared steps: A {r['reward_mean_a']:.4f}, B {r['reward_mean_b']:.4f}; "
        f"paired difference A−B {r['paired_diff']:+.4f} ± {r['paired_se']:.4f} (SE), t = {r['t']:.2f}, "
        f"p = {r['p']:.2f}"
    )
    for e in r["evals"]:
        line = f"eval at step {e['step']}: {e['key']} A {e['a']:.3f} (n={e['n_a']}), B {e['b']:.3f} (n={e['n_b']})"
        if "z" in e:
            line += f"; difference {e['a'] - e['b']:+.3f} ± {e['se']:.3f} (SE), z = {e['z']:.2f}, p = {e['p']:.2f}"
        print(line)
    if args.png:
        from rlhf_pg.plot import plot_runs

        print(f"curves: {plot_runs([str(a), str(b)], args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
