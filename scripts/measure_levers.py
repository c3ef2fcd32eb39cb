"""Measure the performance levers of issue 14 one at a time, on one sampled batch of the benchmark's
workload (SmolLM2-135M-Instruct, 8 prompts x 4, <= 64 new tokens, beta 0.04), in one process.

    .venv/bin/python scripts/measure_levers.py                 # bf16 autocast (the recipes' setting)
    .venv/bin/python scripts/measure_levers.py --precision no  # fp32
    .venv/bin/python scripts/measure_levers.py --matmul        # also: linear-layer shapes, plain vs prepacked
    .venv/bin/python scripts/measure_levers.py --compile-sampling   # also: torch.compile'd decoding (minutes)
    .venv/bin/python scripts/measure_levers.py --logprobs      # only: the log-prob pass over the LM head's logits
    .venv/bin/python scripts/measure_levers.py --prepacked     # only: a decoding step's products, plain vs prepacked

Each line is the best of ``--repeats`` timings of one phase with one lever changed, on the same batch:

* pass layout of the reference and training passes: packed (default) / shared prefix / padded;
* micro-batch size of those passes (8, 16, 32);
* a bf16 working copy of the policy for sampling instead of autocast over fp32 weights;
* a bf16 frozen reference instead of autocast over fp32 weights: its time, and what it changes — the
  mean |delta log p| of the reference log-probs and the KL to the policy it reports at step 0 (0 by
  construction with the fp32 reference: the policy and reference are the same weights);
* ``--matmul``: the model's linear-layer shapes at decode-sized (8, 32) and training-sized (256) rows,
  ``F.linear`` against weights prepacked for oneDNN (bf16, ``torch.utils.mkldnn``) and MKL (fp32);
* ``--compile-layers``: the training and reference passes with every decoder layer compiled
  (``layer.compile(dynamic=True)``, regional compilation: one graph serves all layers) against eager,
  on the same batch: the first calls (compilation) and the compiled ones, and how far the log-probs move;
* ``--logprobs`` (alone, no model): forward + backward of the token log-probs and entropy metric from
  (600, 49152) logits in the precision's dtype — plain autograd over fp32 chunks of 4096 rows (what the
  passes ran before ``core.gathered_logprobs``) against ``gathered_logprobs`` at several chunk sizes,
  runs alternating, median of 5, in the C heap a run has (mimalloc where installed);
* ``--prepacked`` (alone, no model weights): the products of one decoding step (every linear of the model,
  model-sized random bf16 weights, ``bench.decode_matmul_rates``), plain ``F.linear`` against oneDNN-prepacked
  weights as the lean decoding step runs them, at 32, 9 and 240 rows; and, per thread count, the row counts at
  which the two products of one of the model's shapes are not bit-equal (``decode.prepacks_weights``);
* ``--compile-sampling``: decoding with ``torch.compile(forward, dynamic=True)`` on a bf16 copy: the first
  call (compilation) and the later ones, against eager.

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
from rlhf_pg.forward import LAYOUTS, forward_no_grad, with_layout
from rlhf_pg.rewards import score_batch
from rlhf_pg.rollout import SamplingParams, generate, sampling_mode
from rlhf_pg.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--micro-batches", default="8,16,32")
    ap.add_argument("--matmul", action="store_true", help="also time linear-layer shapes, plain vs prepacked")
    ap.add_argument("--compile-sampling", action="store_true", help="also time torch.compile'd decoding")
    ap.add_argument("--compile-layers", action="store_true", help="also time the passes with compiled layers")
    ap.add_argument("--only-compile-layers", action="store_true", help="skip the other levers (implies the above)")
    ap.add_argument("--logprobs", action="store_true", help="only time the log-prob pass (no model)")
    ap.add_argument("--prepacked", action="store_true", help="only: decoding products, plain vs prepacked")
    args = ap.parse_args()
    if args.prepacked:
        prepacked_products(args.model)
        return
    if args.logprobs:
        from rlhf_pg.memory import exec_with_allocator

        exec_with_allocator("auto", keep=True)  # the C heap a run has (the process starts over once)
        logprob_pass(torch.bfloat16 if args.precision == "bf16" else torch.float32)
        return
    args.compile_layers |= args.only_compile_layers
    if args.matmul:
        matmul_shapes()
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

    last = [0.0]  # the best time of the latest timed() call

    def timed(label: str, fn):
        ts, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        print(f"{label:52s} {min(ts):7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in ts)})", flush=True)
        last[0] = min(ts)
        return out

    batch = tr.rollout()
    m = batch.completion_mask
    print(
        f"batch: {batch.size} completions, {m.sum().item():.0f} completion tokens of {m.numel()} slots "
        f"(longest {m.shape[1]}); precision {args.precision}; passes: packed={tr.passes.packed}"
    )
    base = tr.passes
    if args.only_compile_layers:
        compile_layers(tr, batch, timed, last)
        tr.run.release()
        return
    layouts = {name: with_layout(base, name) for name in LAYOUTS}
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
    if args.compile_layers:
        compile_layers(tr, batch, timed, last)

    # ---- sampling: autocast over fp32 weights vs a bf16 working copy
    if args.precision == "bf16":
        prompts = [batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist() for i in range(0, batch.size, 4)]
        u = torch.rand(batch.size, 64, generator=torch.Generator().manual_seed(0))
        sp = SamplingParams(64)

        def gen(model, ctx):
            with sampling_mode(model), ctx():
                return generate(model, tr.tokenizer, prompts, 4, sp, uniforms=u)

        a = timed("sampling, autocast over fp32 weights", lambda: gen(tr.policy, tr.acc.autocast))
        t_a = last[0]
        pol16 = copy.deepcopy(tr.policy).to(torch.bfloat16)
        t0 = time.perf_counter()
        with torch.no_grad():
            for p16, p32 in zip(pol16.parameters(), tr.policy.parameters()):
                p16.copy_(p32)
        refresh = time.perf_counter() - t0
        b = timed("sampling, bf16 working copy", lambda: gen(pol16, nullcontext))
        t_b = last[0]
        print(
            f"  completion tokens: {a.completion_mask.sum().item():.0f} / {b.completion_mask.sum().item():.0f} "
            f"(same uniforms); refreshing the copy after an update: {refresh:.2f} s"
        )
        if args.compile_sampling:
            pol16.eval()
            pol16.forward = torch.compile(pol16.forward, dynamic=True)
            with torch.inference_mode():
                t0 = time.perf_counter()
                gen(pol16, nullcontext)
                first = time.perf_counter() - t0
                print(f"{'sampling, bf16 copy, torch.compile: first call':52s} {first:7.2f} s   (compiles)")
                c = timed("sampling, bf16 copy, torch.compile: compiled", lambda: gen(pol16, nullcontext))
            n = [x.completion_mask.sum().item() for x in (a, b, c)]
            print(
                f"  completion tokens: {n[2]:.0f} compiled; ms per completion token: autocast "
                f"{1e3 * t_a / n[0]:.1f}, bf16 copy {1e3 * t_b / n[1]:.1f}, compiled {1e3 * last[0] / n[2]:.1f}"
            )
    tr.run.release()


def compile_layers(tr: Trainer, batch, timed, last) -> None:
    """The reference and training passes (packed, micro-batches of 8) eager, then with each decoder layer of
    the policy and the reference compiled (``layer.compile(dynamic=True)``); the first compiled calls pay
    the compilation. Prints the times and the largest change of the log-probs."""
    if batch.ref_logprobs is None:
        batch.ref_logprobs = forward_no_grad(tr.ref, batch, tr.passes, 8).logprobs
        score_batch(tr.rewards, batch, tr.trainer_state())
        tr.compute_advantages(batch)
        tr.optimise(batch)  # AdamW's moments exist before anything is timed
    m = batch.completion_mask
    ref_eager = timed("reference pass, eager layers", lambda: forward_no_grad(tr.ref, batch, tr.passes, 8))
    t_ref = last[0]
    timed("train (fwd+bwd+AdamW), eager layers", lambda: tr.optimise(batch))
    t_train = last[0]
    for model in (tr.policy, tr.ref):
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    t0 = time.perf_counter()
    first = forward_no_grad(tr.ref, batch, tr.passes, 8)
    print(f"{'reference pass, compiled layers: first call':52s} {time.perf_counter() - t0:7.2f} s   (compiles)")
    t0 = time.perf_counter()
    tr.optimise(batch)
    print(f"{'train, compiled layers: first call':52s} {time.perf_counter() - t0:7.2f} s   (compiles)")
    comp = timed("reference pass, compiled layers", lambda: forward_no_grad(tr.ref, batch, tr.passes, 8))
    c_ref = last[0]
    timed("train (fwd+bwd+AdamW), compiled layers", lambda: tr.optimise(batch))
    d = ((comp.logprobs - ref_eager.logprobs) * m).abs()
    print(
        f"  compiled / eager: reference {c_ref / t_ref:.2f}, train {last[0] / t_train:.2f}; reference log-probs "
        f"move by {d.sum().item() / m.sum().item():.1e} on average (max {d.max().item():.1e}); first-call "
        f"log-probs equal the later ones: {torch.equal(first.logprobs, comp.logprobs)}"
    )


def logprob_pass(dtype: torch.dtype, rows: int = 600, vocab: int = 49152, repeats: int = 5) -> None:
    """ms for forward + backward of log π(a) and the entropy metric from (rows, vocab) logits."""
    import statistics

    from rlhf_pg import core

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(dtype)
    idx, targets = torch.arange(rows), torch.randint(0, vocab, (rows,), generator=g)

    def autograd_chunks():  # the passes' arithmetic before gathered_logprobs, differentiated by autograd
        lg = logits.clone().requires_grad_(True)
        lse, _ = core.logsumexp_entropy(lg, 1.0, True, 4096, entropy_grad=False)
        (0.01 * (lg[idx, targets].float() - lse[idx])).sum().backward()

    def closed_form(chunk: int):
        def run():
            lg = logits.clone().requires_grad_(True)
            lp, _ = core.gathered_logprobs(lg, idx, targets, 1.0, True, chunk, entropy_grad=False)
            (0.01 * lp).sum().backward()

        return run

    default = max(1, core.LOGPROB_CHUNK_ELEMENTS // vocab)
    variants = {"autograd, fp32 chunks of 4096 rows": autograd_chunks}
    for chunk in sorted({1, default, 16, 64, 256, 4096}):
        note = " (default)" if chunk == default else ""
        variants[f"gathered_logprobs, chunks of {chunk} rows{note}"] = closed_form(chunk)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats + 1):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    print(f"log-prob pass, forward + backward, ({rows}, {vocab}) {dtype} logits, 2 threads (ms, median of {repeats}):")
    for k, ts in times.items():
        print(f"  {k:50s} {1e3 * statistics.median(ts[1:]):7.1f}")


@torch.no_grad()
def prepacked_products(model: str, seconds: float = 3.0) -> None:
    """ms of one decoding step's products, plain against prepacked, and where the two differ in the bit."""
    import torch.nn.functional as F

    from rlhf_pg.decode import packed_linear
    from rlhf_pg.labs.bench import decode_matmul_rates, decode_shapes

    shapes = decode_shapes(model)
    flops = 2 * sum(n * k for n, k in shapes)
    print(f"one decoding step's products ({len(shapes)} linears of {model} bf16, 2 threads; ms, best of {seconds:g} s)")
    for rows in (32, 9, 240):
        rates = decode_matmul_rates(model, rows, seconds, 2, "bf16", prepacked=True)
        print(f"  {rows:4d} rows: " + ", ".join(f"{way} {1e3 * rows * flops / r:6.1f}" for way, r in rates.items()))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).to(torch.bfloat16) for n, k in shapes]
    t0 = time.perf_counter()
    for w in weights:
        torch.ops.mkldnn._reorder_linear_weight(w, 32)
    print(f"  reordering all {len(weights)} weights (once per rollout): {1e3 * (time.perf_counter() - t0):.0f} ms")
    del weights
    counts = [*range(1, 129), *range(136, 513, 8)]
    for threads in (1, 2, 16):
        torch.set_num_threads(threads)
        differ = {}
        for n, k in sorted(set(shapes)):
            w = torch.randn(n, k, generator=g).to(torch.bfloat16)
            p = torch.ops.mkldnn._reorder_linear_weight(w, 32)
            xs = (torch.randn(m, k, generator=g).to(torch.bfloat16) for m in counts)
            bad = [x.shape[0] for x in xs if not torch.equal(F.linear(x, w), packed_linear(x, p, None))]
            if bad:
                differ[f"{k}->{n}"] = bad[0]
        first = differ or "none"
        print(f"  {threads:2d} threads, rows 1-128 and 136-512 by 8, first row count that differs per shape: {first}")
    torch.set_num_threads(2)


def _ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


@torch.no_grad()
def _shape_times(rows: int, k: int, n: int, repeats: int) -> tuple[float, ...]:
    import torch.utils.mkldnn as mkldnn

    x = torch.randn(rows, k)
    w = torch.nn.Linear(k, n, bias=False).weight.detach()
    w16, x16 = w.to(torch.bfloat16), x.to(torch.bfloat16)
    packed16 = mkldnn.to_mkldnn(torch.nn.Linear(k, n, bias=False), torch.bfloat16)
    packed32 = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return (
        _ms(lambda: torch.nn.functional.linear(x16, w16), repeats),
        _ms(lambda: packed16(x16), repeats),
        _ms(lambda: torch.nn.functional.linear(x, w), repeats),
        _ms(lambda: torch.ops.mkl._mkl_linear(x, packed32, w, None, rows), repeats),
    )


def matmul_shapes(repeats: int = 100) -> None:
    """ms per call of the model's linear shapes: F.linear (bf16, fp32) and prepacked weights."""
    print("linear shapes (ms per call): F.linear bf16 | oneDNN-prepacked bf16 | F.linear fp32 | MKL-prepacked fp32")
    for rows in (8, 32, 256):
        for k, n in ((576, 1536), (1536, 576), (576, 49152)):
            vals = _shape_times(rows, k, n, repeats)
            print(f"  {rows:4d} x {k} -> {n:6d}: " + " | ".join(f"{v:7.3f}" for v in vals), flush=True)


if __name__ == "__main__":
    main()
