"""How a GRPO step's cost grows with the group size G and the completion length, rlhf-pg against TRL.

    rlhf-pg bench --against trl --scaling                         # G in 4,8,16 x length in 64,128,256
    rlhf-pg bench --against trl --scaling --scale-groups 4,8 --scale-lengths 64,128 --prompts 2

Every cell of the grid is the TRL comparison of :mod:`rlhf_pg.labs.trl_bench` (each side in its own
process, alternating, the matmul peak around each run) at that G and ``--max-new-tokens``, in the
first ``--precision``, β > 0 only. Reported per cell and side: the step time, the completion tokens the
step sampled (sampled lengths differ between the sides, so times are also given per 1k completion
tokens) and the ratio of completion tokens per second. The growth columns divide each side's step time
by its time at the smallest G of the same length: rlhf-pg runs each prompt once per group (sampling and
every training pass) and packs completions without padding, so its cost should grow more slowly in G
than a trainer that repeats the prompt G times and pads to the longest completion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from . import bench


def parse_ints(text: str, what: str) -> list[int]:
    """``"4,8,16"`` → [4, 8, 16]; a one-line UserError for anything else."""
    from rlhf_pg.errors import UserError

    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"bench {what} takes comma-separated positive integers, e.g. 4,8,16 (got {text!r})")
    return sorted(set(vals))


def run_scaling(
    spec: bench.BenchSpec, groups: list[int], lengths: list[int], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The grid: one TRL comparison per (G, length); the report is :func:`format_table`'s input."""
    from rlhf_pg.errors import UserError

    from .trl_bench import run_trl_comparison

    if spec.against != "trl":
        raise UserError("bench --scaling compares rlhf-pg with TRL: add --against trl (needs the `bench` extra)")
    prec = spec.precisions[0]
    base = replace(spec, precisions=[prec], betas=["pos"], quality=False)
    cells = []
    for g in groups:
        for n in lengths:
            s = replace(base, group_size=g, max_new_tokens=n)
            bench._check_spec(s)
            log(f"[bench] scaling: G={g}, <= {n} new tokens")
            rep = run_trl_comparison(s, log)
            key = next(iter(rep["results"]))
            res, ratio = rep["results"][key], rep["ratio"][key][prec]
            cell: dict[str, Any] = {"group_size": g, "max_new_tokens": n}
            for side in ("rlhf-pg", "trl"):
                med = res[f"{side}-{prec}"]["median"]
                cell[side] = {
                    "step": med["step"],
                    "completion_tokens": med["completion_tokens"],
                    "s_per_1k_completion_tokens": med["s_per_1k_completion_tokens"],
                    "peak_rss_mb": res[f"{side}-{prec}"]["peak_rss_mb"],
                }
            cell["ratio_completion_tokens_per_s"] = ratio["completion_tokens_per_s"]
            cell["ratio_step"] = ratio["step"]
            cells.append(cell)
            machine, trl = rep["machine"], rep["machine"].get("trl")
    for c in cells:  # growth in G: step time over the same side's time at the smallest G, same length
        first = next(x for x in cells if x["max_new_tokens"] == c["max_new_tokens"])
        for side in ("rlhf-pg", "trl"):
            c[side]["step_vs_smallest_g"] = c[side]["step"] / first[side]["step"]
    return {
        "scaling": True,
        "workload": {k: v for k, v in asdict(base).items() if k not in ("in_process",)},
        "groups": groups,
        "lengths": lengths,
        "precision": prec,
        "machine": machine,
        "trl": trl,
        "cells": cells,
    }


def format_table(report: dict) -> str:
    w, m, p = report["workload"], report["machine"], report["precision"]
    g0 = report["groups"][0]
    lines = [
        f"scaling: {w['model']}, {w['prompts']} prompts x G samples, <= L new tokens, {p}, beta {w['kl_coef']:g}, "
        f"micro-batch {w['micro_batch_size']}; {w['repeats']} repetition(s) x {w['steps']} step(s) after "
        f"{w['warmup']} warm-up per cell; medians",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; trl {report['trl']}",
        "",
        f"{'G':>3} {'L':>4} | {'step s':>8} {'tok':>6} {'s/1k tok':>9} {f'x G={g0}':>7} | "
        f"{'TRL step s':>10} {'tok':>6} {'s/1k tok':>9} {f'x G={g0}':>7} | {'tok/s ratio':>11}",
    ]
    for c in report["cells"]:
        o, t = c["rlhf-pg"], c["trl"]
        r = c["ratio_completion_tokens_per_s"]
        lines.append(
            f"{c['group_size']:>3} {c['max_new_tokens']:>4} | {o['step']:>8.2f} {o['completion_tokens']:>6.0f} "
            f"{o['s_per_1k_completion_tokens']:>9.2f} {o['step_vs_smallest_g']:>7.2f} | {t['step']:>10.2f} "
            f"{t['completion_tokens']:>6.0f} {t['s_per_1k_completion_tokens']:>9.2f} {t['step_vs_smallest_g']:>7.2f} | "
            + (f"{r:>10.2f}x" if r is not None else f"{'-':>11}")
        )
    lines.append(
        f"  (x G={g0}: the side's step time over its own at G={g0}, same L; tok/s ratio: rlhf-pg / TRL completion "
        "tokens per second, above 1 = rlhf-pg faster)"
    )
    return "\n".join(lines)
