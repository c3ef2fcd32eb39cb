"""Dashboard: a PNG for two synthetic runs (one with a value head, one without), panels chosen from
the keys present, and one-line errors for missing or empty metrics."""

import json

import pytest

from rlhf_pg.cli import main
from rlhf_pg.errors import UserError
from rlhf_pg.plot import PANELS, _labels, _panel_keys, plot_runs, read_metrics, series


def _write_run(path, steps=6, value_head=False, seed=0.0):
    path.mkdir(parents=True)
    recs = [
        {
            "step": 0,
            "eval/accuracy": 0.1 + seed,
            "eval/reward": 0.1,
            "eval/reward/accuracy": 0.1,
            "eval/completion_len": 9.0,
            "eval/n": 8,
        }
    ]
    for s in range(1, steps + 1):
        r = {
            "step": s,
            "reward": 0.1 * s + seed,
            "reward_std": 0.2,
            "reward/accuracy": 0.1 * s,
            "reward/format": 0.5,
            "kl": 0.001 * s,
            "kl_coef": 0.05,
            "entropy": 2.0 - 0.1 * s,
            "completion_len": 10 + s,
            "completion_len_max": 20 + s,
            "clip_low": 0.01,
            "clip_high": 0.02,
            "grad_norm": 1.0,
            "loss": 0.1,
        }
        if value_head:
            r.update(value_loss=1.0 / s, explained_variance=1 - 1.0 / s, kl_ref=0.01 * s)
        recs.append(r)
    recs.append(
        {
            "step": steps,
            "eval/accuracy": 0.5 + seed,
            "eval/reward": 0.5,
            "eval/n": 8,
            "eval/reward/accuracy": 0.5,
            "eval/completion_len": 7.0,
        }
    )
    text = "\n".join(json.dumps(r) for r in recs) + '\n{"step": 7, "rew'  # a half-written last line
    (path / "metrics.jsonl").write_text(text)
    return path


def test_dashboard_png_for_two_runs(tmp_path):
    a = _write_run(tmp_path / "exp1" / "run", value_head=True)
    b = _write_run(tmp_path / "exp2" / "run", seed=0.05)
    out = plot_runs([str(a), str(b)])
    assert out == a / "dashboard.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # same directory names → parents disambiguate the legend
    assert _labels([a, b]) == ["exp1/run", "exp2/run"]


def test_panels_follow_the_keys_present(tmp_path):
    runs = [read_metrics(_write_run(tmp_path / "a"))]
    drawn = {p.title: _panel_keys(p, runs) for p in PANELS}
    assert drawn["value loss"] == [] and drawn["explained variance"] == []  # no value head: skipped
    assert drawn["reward per function"] == ["reward/accuracy", "reward/format"]
    assert drawn["eval accuracy"] == ["eval/accuracy"]
    assert drawn["eval reward"] == ["eval/reward", "eval/reward/accuracy"]
    assert drawn["KL to reference"] == ["kl"]
    xs, ys = series(runs[0], "eval/accuracy")
    assert xs == [0.0, 6.0] and ys == pytest.approx([0.1, 0.5])
    assert len(series(runs[0], "reward")[0]) == 6  # the broken last line was skipped


def test_nonfinite_values_are_skipped(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1, "reward": NaN}\n{"step": 2, "reward": 1.0}\n')
    assert series(read_metrics(tmp_path / "r"), "reward") == ([2.0], [1.0])


def test_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_runs([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no metrics records"):
        plot_runs([str(tmp_path)])
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_writes_to_out(tmp_path, capsys):
    a = _write_run(tmp_path / "a")
    assert main(["plot", str(a), "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").stat().st_size > 10_000 and "d.png" in capsys.readouterr().out
