"""Profile one RL step of the benchmark's workload with torch.profiler: the phases' times and achieved
GFLOP/s (the run's own perf/* metrics), then the ops by self CPU time.

    .venv/bin/python scripts/profile_step.py                       # SmolLM2, 8 prompts x 4, 64 tokens, bf16
    .venv/bin/python scripts/profile_step.py --precision no --rows 40

Unprofiled warm-up steps first (``--warmup``, default 3: the first two steps of a run fault in most of
its memory, 1.5k huge pages and seconds of kernel time here, which would swamp the profile); then one
profiled step. The process starts with the C heap
that `rlhf-pg train` gives a run (mimalloc where installed), so the profile shows the allocator users get.
For finding where a step's time goes before changing anything (issue 14); the benchmark (`rlhf-pg bench`)
is what measures speed-ups.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from rlhf_pg.config import build_config
from rlhf_pg.memory import exec_with_allocator
from rlhf_pg.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--rows", type=int, default=25, help="ops to list")
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled steps first")
    args = ap.parse_args()
    exec_with_allocator("auto", keep=True)  # as `rlhf-pg train` starts (the process starts over once)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(
        {
            "output_dir": tempfile.mkdtemp(prefix="rlhf_pg_profile_"),
            "model": {"name": args.model},
            "data": {"eval_limit": 1},
            "batch": {"prompts_per_step": args.prompts, "group_size": args.group, "micro_batch_size": args.micro_batch},
            "rollout": {"max_new_tokens": args.max_new_tokens},
            "algo": {"name": "grpo", "kl_coef": args.beta},
            "train": {"max_steps": args.warmup + 1, "lr": 1e-5, "mixed_precision": args.precision, "save_every": 0},
        }
    )
    tr = Trainer(cfg)
    tr.run.prepare(tr.gen)

    def show(m: dict) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k.startswith(("time/", "perf/")))

    for _ in range(args.warmup):
        print("warm-up step:", show(tr.step()))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m = tr.step()
    print("profiled step:", show(m))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    tr.run.release()


if __name__ == "__main__":
    main()
