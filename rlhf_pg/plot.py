"""PNG dashboards from runs' ``metrics.jsonl`` (matplotlib, Agg backend: no display needed).

Every record of ``metrics.jsonl`` has a ``step``; training records and evaluation records
(``eval/*`` keys) are read alike: a curve is the (step, value) pairs of every record that holds its
key. A panel is drawn when at least one run has at least one of its keys, so runs without a value
head simply have no value-loss panel. Runs share a colour across panels (legend at the top, labelled
by run directory name); within a panel, line styles tell its keys apart (legend in the panel).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...] = ()
    pattern: str | None = None
    """Regex: every key matching it is also drawn (e.g. the per-function rewards)."""
    ylabel: str = ""


PANELS: tuple[Panel, ...] = (
    Panel("reward", ("reward",), ylabel="mean sequence reward"),
    Panel("reward per function", pattern=r"^reward/.+"),
    Panel("eval accuracy", ("eval/accuracy", "eval/sampled/accuracy"), pattern=r"^eval/pass@\d+$"),
    Panel("eval reward", ("eval/reward", "eval/sampled/reward"), pattern=r"^eval/reward/.+"),
    Panel("KL to reference", ("kl", "kl_ref"), ylabel="nats"),
    Panel("KL coefficient β", ("kl_coef",)),
    Panel("entropy", ("entropy",), ylabel="nats / token"),
    Panel("completion length", ("completion_len", "completion_len_max", "eval/completion_len"), ylabel="tokens"),
    Panel("clip fractions", ("clip_low", "clip_high"), ylabel="fraction of tokens"),
    Panel("value loss", ("value_loss",)),
    Panel("explained variance", ("explained_variance",)),
    Panel("gradient norm", ("grad_norm",), ylabel="before clipping"),
)
_STYLES = ("-", "--", ":", "-.")


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a run directory's ``metrics.jsonl`` (or of that file itself).

    A line that is not JSON (e.g. the half-written last line of a run in progress) is skipped.
    """
    p = Path(path)
    f = p / "metrics.jsonl" if p.is_dir() else p
    if not f.is_file():
        where = f"'{p}' has no metrics.jsonl" if p.is_dir() else f"'{p}' not found"
        raise UserError(f"{where}: pass a run directory written by 'rlhf-pg train' (or its metrics.jsonl)")
    records = []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if not records:
        raise UserError(f"'{f}' holds no metrics records yet: plot a run that has logged at least one step")
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records that have a finite number for it."""
    xs, ys = [], []
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r.get("step", i)))
            ys.append(float(v))
    return xs, ys


def _labels(paths: list[Path]) -> list[str]:
    """Run directory names, with parents added until they are distinct."""
    parts = [(p.parent if p.name == "metrics.jsonl" else p).resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        labels = ["/".join(x[-depth:]) for x in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _panel_keys(panel: Panel, runs: list[list[dict]]) -> list[str]:
    present = {k for recs in runs for r in recs for k in r}
    keys = [k for k in panel.keys if k in present]
    if panel.pattern:
        rx = re.compile(panel.pattern)
        keys += sorted(k for k in present if rx.search(k) and k not in keys)
    return [k for k in keys if any(series(recs, k)[0] for recs in runs)]


def plot_runs(run_dirs: list[str], out: str | None = None) -> Path:
    """Draw the dashboard of ``run_dirs`` (overlaid) into ``out`` (default FIRST_RUN/dashboard.png)."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    paths = [Path(r) for r in run_dirs]
    runs = [read_metrics(p) for p in paths]
    labels = _labels(paths)
    first = paths[0] if paths[0].is_dir() else paths[0].parent
    out_path = Path(out) if out else first / "dashboard.png"
    if out_path.suffix.lower() != ".png":
        raise UserError(f"--out '{out_path}' must end in .png")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [(p, keys) for p in PANELS if (keys := _panel_keys(p, runs))]
    if not panels:
        raise UserError(f"no known metrics in {', '.join(map(str, paths))}: nothing to plot")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.3 * nrows + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, keys) in zip(axes.flat, panels):
        for ri, recs in enumerate(runs):
            color = colors[ri % len(colors)]
            for ki, key in enumerate(keys):
                xs, ys = series(recs, key)
                if not xs:
                    continue
                is_eval = key.startswith("eval/")
                ax.plot(
                    xs,
                    ys,
                    _STYLES[ki % len(_STYLES)],
                    color=color,
                    lw=1.5,
                    marker="o" if is_eval or len(xs) == 1 else None,
                    ms=3.5,
                )
                if key == "reward":  # ± one std of the step's rewards
                    sx, sd = series(recs, "reward_std")
                    if sx == xs:
                        ax.fill_between(
                            xs,
                            [y - s for y, s in zip(ys, sd)],
                            [y + s for y, s in zip(ys, sd)],
                            color=color,
                            alpha=0.12,
                            lw=0,
                        )
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            handles = [Line2D([], [], color="0.3", ls=_STYLES[i % len(_STYLES)]) for i in range(len(keys))]
            ax.legend(handles, keys, fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2.5) for i in range(len(runs))]
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(runs)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
