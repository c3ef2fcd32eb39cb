"""Measure the performance levers of issue 14 one at a time, on one sampled batch of the benchmark's
workload (SmolLM2-135M-Instruct, 8 prompts x 4, <= 64 new tokens, beta 0.04), in one process.

    .venv/bin/python scripts/measure_levers.py                 # bf16 autocast (the recipes' setting)
    .venv/bin/python scripts/measure_levers.py --precision no  # fp32

Each line is the best of ``--repeats`` timings of one phase with one lever changed, on the same batch:

* pass layout of the reference and training passes: packed (default) / shared prefix / padded;
* micro-batch size of those passes (8, 16, 32);
* a bf16 working copy of the policy for sampling instead of autocast over fp32 weights;
* a bf16 frozen reference instead of autocast over fp32 weights: its time, and what it changes — the
  mean |delta log p| of the reference log-probs and the KL to the policy it reports at step 0 (0 by
  construction with the fp32 reference: the policy and reference are the same weights).

It times pieces of a step (``Trainer.optimise``, ``forward_no_grad``, ``rollout.generate``), not whole
runs: the benchmark (``rlhf-pg bench``) measures what a user gets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from contextlib import nullcontext

import torch

from rlhf_pg.config import build_config
from rlhf_pg.forward import forward_no_grad
from rlhf_pg.rewards import score_batch
from rlhf_pg.rollout import SamplingParams, generate, sampling_mode
from rlhf_pg.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--micro-batches", default="8,16,32")
    args = ap.parse_args()
    cfg = build_config(
        {
            "output_dir": tempfile.mkdtemp(prefix="rlhf_pg_levers_"),
            "model": {"name": args.model},
            "data": {"eval_limit": 1},
            "batch": {"prompts_per_step": 8, "group_size": 4, "micro_batch_size": 8},
            "rollout": {"max_new_tokens": 64},
            "algo": {"name": "grpo", "kl_coef": 0.04},
            "train": {"max_steps": 2, "lr": 1e-5, "mixed_precision": args.precision, "save_every": 0},
        }
    )
    tr = Trainer(cfg)
    tr.run.prepare(tr.gen)

    def timed(label: str, fn):
        ts, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        print(f"{label:52s} {min(ts):7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in ts)})", flush=True)
        return out

    batch = tr.rollout()
    m = batch.completion_mask
    print(
        f"batch: {batch.size} completions, {m.sum().item():.0f} completion tokens of {m.numel()} slots "
        f"(longest {m.shape[1]}); precision {args.precision}; passes: packed={tr.passes.packed}"
    )
    base = tr.passes
    layouts = {
        "packed": dataclasses.replace(base, packed=True),
        "shared prefix": dataclasses.replace(base, packed=False, shared_prefix=True),
        "padded": dataclasses.replace(base, packed=False, shared_prefix=False),
    }
    sizes = [int(x) for x in args.micro_batches.split(",")]

    # ---- reference pass: layouts x micro-batch sizes
    ref_lp = None
    for name, ps in layouts.items():
        for mbs in sizes if name == "packed" else sizes[:1]:
            label = f"reference pass, {name}, micro-batch {mbs}"
            lp = timed(label, lambda ps=ps, mbs=mbs: forward_no_grad(tr.ref, batch, ps, mbs))
            ref_lp = lp.logprobs if ref_lp is None else ref_lp

    # ---- bf16 frozen reference (weights cast once) against autocast over fp32 weights
    if args.precision == "bf16":
        ref16 = copy.deepcopy(tr.ref).to(torch.bfloat16)
        plain = dataclasses.replace(base, autocast=nullcontext)
        lp16 = timed("reference pass, packed, mb 8, bf16 weights", lambda: forward_no_grad(ref16, batch, plain, 8))
        d = (lp16.logprobs - ref_lp) * m
        pol = forward_no_grad(tr.model, batch, base, 8).logprobs
        kl = tr.algo.kl.fn(pol, lp16.logprobs) * m
        kl0 = tr.algo.kl.fn(pol, ref_lp) * m
        print(
            f"  bf16 reference: mean |delta log p| {d.abs().sum().item() / m.sum().item():.4f} (max "
            f"{d.abs().max().item():.3f}); KL to the policy at step 0 {kl.sum().item() / m.sum().item():.2e} "
            f"per token (fp32 reference: {kl0.sum().item() / m.sum().item():.2e})"
        )
        del ref16

    # ---- training: layouts x micro-batch sizes (forward, backward, AdamW on a copy of the batch)
    batch.ref_logprobs = ref_lp
    score_batch(tr.rewards, batch, tr.trainer_state())
    tr.compute_advantages(batch)
    tr.optimise(batch)  # first AdamW step creates the moments: not a lever, keep it out of the timings
    for name, ps in layouts.items():
        for mbs in sizes if name == "packed" else sizes[:1]:
            tr.passes, tr.cfg.batch.micro_batch_size = ps, mbs
            timed(f"train (fwd+bwd+AdamW), {name}, micro-batch {mbs}", lambda: tr.optimise(batch))
    tr.passes, tr.cfg.batch.micro_batch_size = base, 8

    # ---- sampling: autocast over fp32 weights vs a bf16 working copy
    if args.precision == "bf16":
        prompts = [batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist() for i in range(0, batch.size, 4)]
        u = torch.rand(batch.size, 64, generator=torch.Generator().manual_seed(0))
        sp = SamplingParams(64)

        def gen(model, ctx):
            with sampling_mode(model), ctx():
                return generate(model, tr.tokenizer, prompts, 4, sp, uniforms=u)

        a = timed("sampling, autocast over fp32 weights", lambda: gen(tr.policy, tr.acc.autocast))
        pol16 = copy.deepcopy(tr.policy).to(torch.bfloat16)
        t0 = time.perf_counter()
        with torch.no_grad():
            for p16, p32 in zip(pol16.parameters(), tr.policy.parameters()):
                p16.copy_(p32)
        refresh = time.perf_counter() - t0
        b = timed("sampling, bf16 working copy", lambda: gen(pol16, nullcontext))
        print(
            f"  completion tokens: {a.completion_mask.sum().item():.0f} / {b.completion_mask.sum().item():.0f} "
            f"(same uniforms); refreshing the copy after an update: {refresh:.2f} s"
        )
    tr.run.release()


if __name__ == "__main__":
    main()
