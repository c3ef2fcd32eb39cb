"""Time one training pass (forward + backward of the policy loss) under the trainer's switches.

Compares, on the same rollout batch and interleaved per repetition (so machine noise hits every
variant alike): the shared-prefix pass vs the padded full-sequence pass, and bf16 autocast vs fp32.
Prints the median seconds per variant and the speed-up ratios.

    python scripts/profile_train_pass.py --model smollm2-135m-instruct --prompts 2 --group 8 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from rlhf_pg.config import build_config
from rlhf_pg.forward import forward
from rlhf_pg.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=2, help="prompts in the micro-batch")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = build_config(
        {
            "output_dir": "/tmp/rlhf_pg_profile",
            "model": {"name": args.model},
            "data": {"eval_limit": 1},
            "batch": {
                "prompts_per_step": args.prompts,
                "group_size": args.group,
                "micro_batch_size": args.prompts * args.group,
            },
            "rollout": {"max_new_tokens": args.max_new_tokens, "temperature": 0.7},
            "train": {"max_steps": 0, "mixed_precision": "bf16"},
        }
    )
    tr = Trainer(cfg)
    batch = tr.rollout(0)  # the prompts of RL step 0, each sampled G times
    print(
        f"micro-batch: {batch.size} completions, prompt width {batch.prompt_ids.shape[1]}, "
        f"completion tokens {int(batch.completion_mask.sum())} (max {batch.completion_ids.shape[1]})"
    )

    variants = {(shared, prec): [] for shared in (True, False) for prec in ("bf16", "no")}
    for _ in range(args.reps):
        for (shared, prec), times in variants.items():
            passes = dataclasses.replace(tr.passes, shared_prefix=shared)
            tr.acc.native_amp = prec == "bf16"  # the Accelerator was built with bf16: this toggles autocast
            tr.model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            logp = forward(tr.model, batch, passes, with_entropy=True).logprobs
            (-(logp * batch.completion_mask).sum()).backward()
            times.append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in variants.items()}
    for (shared, prec), t in med.items():
        print(f"shared_prefix={str(shared):5}  precision={prec:4}  {t:7.2f} s")
    base = med[(False, "no")]
    for key, t in med.items():
        print(f"speed-up of shared_prefix={key[0]}, precision={key[1]} over padded fp32: {base / t:.2f}x")


if __name__ == "__main__":
    main()
