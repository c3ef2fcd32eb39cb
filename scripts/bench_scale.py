"""Scale-out benchmark: full fine-tune vs LoRA, and 2 processes vs 1, on the same GRPO step.

    python scripts/bench_scale.py                       # SmolLM2-135M-Instruct, the table on stdout
    python scripts/bench_scale.py --json scale.json     # also the raw numbers

Workload (every number is a flag): the built-in `arithmetic` task, 8 prompts × G = 4 samples, at most
32 new tokens, reward `accuracy`, GRPO with β = 0.04 (k3 KL in the loss, so a reference is needed),
micro-batches of 8, bf16 autocast where the CPU supports it. Each configuration runs the real
``Trainer`` in its own process: 1 warm-up step, then ``--steps`` measured steps (median).

* full vs LoRA (1 process, all cores): step time and peak RSS (VmHWM, the process's own high-water
  mark). Full fine-tuning holds the policy, a frozen reference copy, gradients and AdamW moments for
  every weight; LoRA holds one copy of the weights (the reference is the same model with the adapter
  disabled) and gradients/moments only for the adapter.
* 2 processes vs 1 (full fine-tune, the same global batch of 8 prompts): throughput = completion
  tokens of the global batch ÷ step wall time. 1 process uses all cores; 2 processes one core each
  (``accelerate launch``, gloo), so both use the whole machine and the ratio shows what data
  parallelism costs or gains at equal hardware. Peak RSS is per process.

Ratios are taken within this one run; machine noise moves both sides alike. Results differ from
machine to machine: run it where you train.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _recipe(args, lora: bool, out: str) -> dict:
    tree = {
        "output_dir": out,
        "overwrite": True,
        "seed": 0,
        "model": {"name": args.model},
        "data": {"train": "arithmetic", "eval_limit": 1, "task_kwargs": {"n_train": 512}},
        "batch": {
            "prompts_per_step": args.prompts,
            "group_size": args.group_size,
            "micro_batch_size": args.micro_batch_size,
        },
        "rollout": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0},
        "rewards": {"functions": [{"name": "accuracy"}]},
        "algo": {"name": "grpo", "kl_coef": 0.04},
        "train": {
            "max_steps": 10_000,
            "lr": 1e-4 if lora else 1e-5,
            "mixed_precision": args.mixed_precision,
            "samples_every": 0,
            "save_every": 0,
            "eval_at_start": False,
            "save_model": False,
        },
    }
    if lora:
        tree["model"]["lora"] = {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": "all-linear"}
    return tree


def _trainable_count(tr) -> int:
    """Parameters the optimizer updates: those of the policy (and a separate critic) that require grad."""
    return sum(p.numel() for m in (tr.model, tr.critic) if m is not None for p in m.parameters() if p.requires_grad)


def child(args) -> None:
    """One configuration: warm-up + measured steps of the real Trainer; prints one result line per rank."""
    import torch

    from rlhf_pg.config import build_config
    from rlhf_pg.labs.bench import peak_rss_mb
    from rlhf_pg.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(build_config(_recipe(args, args.lora, tmp)))
        trainable = _trainable_count(tr)
        steps = []
        for i in range(1 + args.steps):
            m = tr.step()
            if i:
                steps.append(m)
    tokens = [m["completion_len"] * args.prompts * args.group_size for m in steps]
    wall = [m["time/step"] for m in steps]
    res = {
        "rank": tr.rank,
        "world": tr.world,
        "lora": args.lora,
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "peak_rss_mb": peak_rss_mb(),
        "step_s": statistics.median(wall),
        "tokens_per_s": statistics.median(t / w for t, w in zip(tokens, wall)),
        **{f"{k}_s": statistics.median(m[f"time/{k}"] for m in steps) for k in ("rollout", "reference", "train")},
    }
    Path(args.result_dir, f"rank{tr.rank}.json").write_text(json.dumps(res))  # ranks share stdout


def _run(args, extra: list[str], processes: int, threads: int) -> list[dict]:
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("json", "child", "lora", "threads", "result_dir") and v is not None
    ]
    out = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    script = [str(Path(__file__).resolve()), "--child", f"--threads={threads}", f"--result-dir={out}", *flags, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        from rlhf_pg.cli import accelerate_launch

        cmd = accelerate_launch(processes, script)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    if proc.returncode or len(rows) != processes:
        raise SystemExit(f"bench_scale: child failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--mixed-precision", default=None, help="no | bf16 (default: bf16 if the CPU has AVX512-BF16/AMX)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="measured steps per configuration, after 1 warm-up")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from rlhf_pg.labs.bench import default_precision, usable_cores
    from rlhf_pg.models import resolve_model

    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if default_precision() == "bf16" else "no"
    resolve_model(args.model)  # convert/cache once, outside the measured children
    cores = usable_cores()
    full = _run(args, [], 1, cores)[0]
    print(f"[bench_scale] full fine-tune: {full}", file=sys.stderr, flush=True)
    lora = _run(args, ["--lora"], 1, cores)[0]
    print(f"[bench_scale] LoRA: {lora}", file=sys.stderr, flush=True)
    two = _run(args, [], 2, max(1, cores // 2))
    tput_two = statistics.mean(r["tokens_per_s"] for r in two)  # each rank reports the global batch's tokens/s
    report = {
        "workload": {k: v for k, v in vars(args).items() if k not in ("json", "child", "lora", "threads")},
        "cores": cores,
        "full": full,
        "lora": lora,
        "two_processes": two,
        "ratios": {
            "lora_vs_full_step_time": lora["step_s"] / full["step_s"],
            "lora_vs_full_peak_rss": lora["peak_rss_mb"] / full["peak_rss_mb"],
            "two_vs_one_process_throughput": tput_two / full["tokens_per_s"],
        },
    }
    w = report["workload"]
    print(
        f"workload: {w['model']}, {w['prompts']} prompts x {w['group_size']} samples, <= {w['max_new_tokens']} new "
        f"tokens, GRPO beta=0.04, micro-batch {w['micro_batch_size']}, mixed precision {w['mixed_precision']}, "
        f"{args.steps} measured steps (median), {cores} cores"
    )
    print(
        "| configuration | trainable params | step (s) | rollout / reference / train (s) | peak RSS (MB) "
        "| completion tokens/s |"
    )
    print("|---|---:|---:|---|---:|---:|")
    for name, r in (
        ("full fine-tune, 1 process", full),
        (f"LoRA r={args.lora_r}, 1 process", lora),
        *((f"full fine-tune, rank {x['rank']} of 2", x) for x in two),
    ):
        print(
            f"| {name} | {r['trainable_params'] / 1e6:.2f}M | {r['step_s']:.1f} | {r['rollout_s']:.1f} / "
            f"{r['reference_s']:.1f} / {r['train_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['tokens_per_s']:.1f} |"
        )
    rt = report["ratios"]
    print(
        f"LoRA / full: step time x{rt['lora_vs_full_step_time']:.2f}, peak RSS x{rt['lora_vs_full_peak_rss']:.2f}; "
        f"2 processes / 1: throughput x{rt['two_vs_one_process_throughput']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
