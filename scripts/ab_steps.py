"""A/B of config settings on the benchmark's workload: Trainer.step() phase times, runs alternating.

    .venv/bin/python scripts/ab_steps.py train.reuse_freed_memory=false          # A = defaults, B = the override
    .venv/bin/python scripts/ab_steps.py train.packing=false --precision no --rounds 3 --steps 8
    .venv/bin/python scripts/ab_steps.py train.allocator=glibc --b-env MALLOC_ARENA_MAX=1   # an override and an env
    git worktree add /tmp/before HEAD~1 && .venv/bin/python scripts/ab_steps.py --b-env PYTHONPATH=/tmp/before

The last form compares code: B's processes import the package from the other checkout (``PYTHONPATH`` comes
before the editable install on ``sys.path``, and the script's own directory, not the repository root, is
``sys.path[0]``), A's from this one.

The workload is `rlhf-pg bench --against trl`'s rlhf-pg side (rlhf_pg/labs/bench.py: SmolLM2-135M-Instruct,
8 prompts x 4, <= 64 new tokens, beta 0.04, micro-batches of 8, lr 1e-5). Each run is a fresh process (A, B,
A, B, ...), so one setting's process-wide state (threads, allocator) cannot leak into the other; each starts
with its config's ``train.allocator``, as ``rlhf-pg train`` does. A run
prints the median of each phase over its steps after the first (the first pays one-off costs), the completion
tokens per step, the training pass's and the step's seconds per 1k of them (all measured steps' time over
all their tokens: two settings sample different completions after the first update, so compare per token),
and its peak RSS; the last lines are the medians over the rounds. For
a lever's effect on a phase, before building the whole benchmark's comparison; the machine must be
otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

PHASES = ("rollout", "reference", "train", "step")


def child(overrides: list[str], precision: str, steps: int) -> dict:
    from rlhf_pg.config import build_config, parse_overrides
    from rlhf_pg.labs.bench import BenchSpec, _config, peak_rss_mb
    from rlhf_pg.memory import exec_with_allocator

    spec = BenchSpec(lr=1e-5)

    def config(out: str):
        cfg = _config(spec, spec.kl_coef, precision, out)
        return build_config(cfg.model_dump(mode="json"), parse_overrides(overrides)) if overrides else cfg

    # as `rlhf-pg train` starts: with the config's allocator (this process starts over, before torch)
    train = config("unused").train
    exec_with_allocator(train.allocator, train.reuse_freed_memory)
    import torch

    from rlhf_pg.trainer import Trainer

    torch.set_num_threads(spec.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(config(tmp))
        times: dict[str, list[float]] = {p: [] for p in PHASES}
        tokens: list[float] = []
        for i in range(steps + 1):
            if i == 1:
                before = resource.getrusage(resource.RUSAGE_SELF)
            m = tr.step()
            if i:
                for p in PHASES:
                    times[p].append(m[f"time/{p}"])
                tokens.append(m["completion_len"] * tr.plan.rollout)
        after = resource.getrusage(resource.RUSAGE_SELF)
        tr.run.release()
    per_step = {  # page faults and kernel CPU time: what a memory policy changes
        "minor_faults": (after.ru_minflt - before.ru_minflt) / steps,
        "sys_s": (after.ru_stime - before.ru_stime) / steps,
    }
    median = {p: statistics.median(v) for p, v in times.items()}
    # the settings compared change what is sampled after the first update (float rounding): time per token
    median["tokens"] = statistics.median(tokens)
    for p in ("train", "step"):  # over all measured steps: Σ time / Σ tokens
        median[f"{p}_per_1k"] = 1e3 * sum(times[p]) / sum(tokens)
    return {"median": median, "steps": times, "per_step": per_step, "peak_rss_mb": peak_rss_mb(), "heap": tr.heap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="B's dotted key=value overrides (A: the benchmark's config)")
    ap.add_argument(
        "--b-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for B's processes only",
    )
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per run (after one unmeasured)")
    ap.add_argument("--child", choices=["A", "B"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    b_env = dict(kv.split("=", 1) for kv in args.b_env)
    if args.child:
        out = child(args.overrides if args.child == "B" else [], args.precision, args.steps)
        print("RESULT " + json.dumps(out), flush=True)
        return
    if not args.overrides and not b_env:
        ap.error("give B an override or a --b-env")
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for side in ("A", "B"):
            cmd = [sys.executable, __file__, *args.overrides, "--precision", args.precision]
            cmd += ["--steps", str(args.steps), "--child", side]
            env = {**os.environ, **b_env} if side == "B" else None
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"run {side} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            res = json.loads(line[len("RESULT ") :])
            results[side].append(res)
            label = "defaults" if side == "A" else " ".join(args.overrides + args.b_env)
            phases = "  ".join(f"{p} {res['median'][p]:6.2f} s" for p in PHASES) + _per_token(res["median"])
            print(f"round {r + 1} {side}: C heap {res['heap']}", flush=True)
            kernel = f"faults/step {res['per_step']['minor_faults']:.0f}  sys {res['per_step']['sys_s']:.2f} s/step"
            print(
                f"round {r + 1} {side} ({label}): {phases}  peak RSS {res['peak_rss_mb']:.0f} MB  {kernel}", flush=True
            )
    for side in ("A", "B"):
        med = {p: statistics.median(x["median"][p] for x in results[side]) for p in (*PHASES, *PER_TOKEN)}
        rss = statistics.median(x["peak_rss_mb"] for x in results[side])
        phases = "  ".join(f"{p} {med[p]:6.2f} s" for p in PHASES) + _per_token(med)
        print(f"median {side}: {phases}  peak RSS {rss:.0f} MB")


PER_TOKEN = ("tokens", "train_per_1k", "step_per_1k")


def _per_token(median: dict) -> str:
    """Completion tokens per step (median) and the train and step seconds per 1k of them, where the run has them."""
    if "tokens" not in median:
        return ""
    per = "  ".join(f"{p}/1k tok {median[f'{p}_per_1k']:5.2f} s" for p in ("train", "step"))
    return f"  tokens {median['tokens']:.0f}  {per}"


if __name__ == "__main__":
    main()
