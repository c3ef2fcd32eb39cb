"""Benchmark: one GRPO step of rlhf-pg against the same step done the plain `transformers` way.

    rlhf-pg bench                                  # the documented workload (below), table on stdout
    rlhf-pg bench --json bench.json                # the same, and the full report as JSON
    rlhf-pg bench --against trl --precision both   # rlhf-pg against TRL's GRPOTrainer (labs/trl_bench.py)
    python -m rlhf_pg.labs.bench ...               # the same (also: python scripts/benchmark.py ...)

Workload (fixed; every number is a flag):
    SmolLM2-135M-Instruct; the built-in `arithmetic` task (its first 512 training questions);
    8 prompts × G = 4 samples, at most 64 new tokens, temperature 1, top-p 1, top-k off;
    reward `accuracy`; GRPO (group-normalised advantage, clipped surrogate, token-mean); one optimizer
    step per RL step over all 32 completions; AdamW, grad-norm clip 1.0. Ours accumulates gradients
    over micro-batches of 8 (``--micro-batch-size``); the baseline runs each pass over the whole batch
    at once, as a plain loop does (``--baseline-micro-batch-size 8`` gives it our micro-batching).
    Done twice: β = 0.04 (k3 KL in the loss, so a reference model is loaded and run) and β = 0.

"ours" is the real code path: ``Trainer(build_config(...)).step()``, timed by the trainer's own
``time/*`` metrics, in the precision of ``--precision`` (bf16 = Accelerate's bf16 autocast, the
recipes' setting, default where the CPU has AVX512-BF16/AMX; fp32). "baseline" is what a user of
`transformers` writes by hand (``_Baseline`` below), in fp32: ``model.generate(num_return_sequences=G)``
(every prompt prefilled G times, finished rows decoded until the longest is done), an "old log-probs"
forward and a separate reference forward of the full prompt+completion sequences with ``log_softmax``
over the whole vocabulary at every position, then the training forward+backward the same way
(whole batch, or ``--baseline-micro-batch-size``), AdamW. Prompts (the trainer's own per-step selection), data,
reward and optimizer settings come from the same config; the loss math is the same (core.py's GRPO advantage,
clip loss, k3 KL, token-mean).

Phases: rollout (sampling + decoding the texts), rewards, reference (baseline: old log-probs +
reference, both passes also at β = 0 for the old log-probs; ours: reference only, none at β = 0 — the
sampling log-probs are recorded while sampling and a single on-policy pass needs no other), train
(forward, backward, optimizer step). "step" is the wall time of the whole step (ours: around
``Trainer.step()``); "step CPU time" is the process CPU time of the step, which other jobs on a
shared machine disturb less than the wall clock.

Threads: ``torch.set_num_threads(--threads)``, default the number of usable cores. On a machine whose
cores are busy with other jobs, N threads on N cores wait for each other at every parallel region
(OpenMP spin-waits, then sleeps) and the wall clock measures the scheduler more than the code; use
``--threads 1`` there (or ``OMP_WAIT_POLICY=PASSIVE``) and say so next to the numbers.

Measurement: the model is resolved (an alias converted into the cache) once in the parent, then every
run is a separate child process (``python -m rlhf_pg.labs.bench --child JOB``): ``--warmup`` unmeasured
steps, then ``--steps`` measured steps. Peak RSS is the child's own high-water mark, ``VmHWM`` of
/proc/self/status (not ``getrusage().ru_maxrss``: on Linux that survives fork + exec, so a child would
report at least the parent's peak). Repetitions interleave ours and the baseline (order alternating
per repetition) so machine noise hits both alike; speed-ups are the median over repetitions of
baseline_time / ours_time within the repetition. Sampled completion lengths differ between the two
paths (different random streams), so token counts are reported too; more ``--steps`` average that out.

FLOPs, the same for both paths (so MFU ratios equal speed ratios): the model FLOPs the step needs,
counting each distinct token once — S = prompt tokens of the distinct prompts + completion tokens.
N = parameters, each counted once (SmolLM2 ties its embedding to the LM head, so N counts the LM-head
matmul and the embedding lookup costs nothing). Left out: attention's 2·n_layer·ctx·d per token
(~1 % at these lengths); counted although not needed: the LM head at prompt positions.
    rollout     2·N·S            (prefill each prompt once, one forward per completion token)
    reference   2·N·S·[β>0]      (the old-log-prob pass is not needed on-policy)
    train       6·N·S            (forward + backward)
    step        rollout + reference + train
The baseline executes more than this (G prefills per prompt, G copies of each prompt in every pass,
the old-log-prob pass, padding); that waste shows as a lower MFU. MFU = FLOPs / phase time ÷ this
machine's measured matmul peak (2048² ``torch.matmul``, best of ~``--peak-seconds``, same thread
count) in the precision the path computes in (bf16 autocast → bf16 peak; fp32 → fp32 peak); per
measured step, then the median.

Against TRL (``--against trl``, needs the `bench` extra): the same workload run by rlhf-pg and by TRL's
``GRPOTrainer`` (a child kind ``trl``), alternating per repetition, in each precision (TRL's bf16 =
``GRPOConfig(bf16=True)``, its autocast); the matmul peak is measured around each run; ratios are rlhf-pg / TRL.
Defaults there: β = 0.04 only, lr 1e-5, 7 measured steps after 1 warm-up, no quality child. See
:mod:`rlhf_pg.labs.trl_bench`.

Quality: a separate child samples one batch with the real trainer, then compares, on exactly those
sequences, ours' log-probs (rollout-recorded, and the training/reference forward) and ours' policy
gradient with the exact fp32 full-log-softmax values of the baseline: |Δ log p| and gradient cosine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("rollout", "rewards", "reference", "train", "step", "step_cpu")
"""Timed phases (s, wall clock) and the step's process CPU time (less sensitive to other jobs)."""
_MARK = "RLHF_PG_BENCH_RESULT "


@dataclass
class BenchSpec:
    """The workload and how it is measured (defaults: the documented workload)."""

    model: str = "smollm2-135m-instruct"
    prompts: int = 8
    group_size: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.04
    """β of the β > 0 run (k3 estimator, in the loss); the β = 0 run loads no reference model."""
    micro_batch_size: int = 8
    """Ours: completions per forward/backward (gradient accumulation over the batch)."""
    baseline_micro_batch_size: int = 0
    """Baseline: completions per forward/backward; 0 = the whole batch in one pass (the plain loop)."""
    lr: float = 1e-6
    n_train: int = 512
    """Training questions of the arithmetic task (prompts are drawn from them; 512 keeps set-up short)."""
    seed: int = 0
    precisions: list[str] = field(default_factory=lambda: [default_precision()])
    """Precisions of ours (`bf16` = Accelerate bf16 autocast, the recipe default; `fp32`). Baseline: fp32."""
    betas: list[str] = field(default_factory=lambda: ["pos", "zero"])
    """Which runs: `pos` (β = kl_coef) and/or `zero` (β = 0)."""
    repeats: int = 3
    """Repetitions (each: one child per path and β, interleaved)."""
    steps: int = 1
    """Measured steps per child (after the warm-up steps)."""
    warmup: int = 1
    """Unmeasured steps per child (first-call costs: thread pools, allocator, kernel selection)."""
    threads: int = field(default_factory=lambda: usable_cores())
    quality: bool = True
    peak_seconds: float = 2.0
    """Seconds per precision for the matmul-peak measurement (0 = skip MFU)."""
    in_process: bool = False
    """Run the children in this process (fast; peak RSS is then the process's, not per path). Tests only."""
    against: str = "baseline"
    """What ours is compared with: `baseline` (the plain transformers step) or `trl` (TRL's GRPOTrainer)."""
    peer_heap: str = "default"
    """The C heap of the other side's children (TRL, the baseline): `default` = the C library's malloc with
    glibc's defaults, as a user runs them; `same` = rlhf-pg's (``train.allocator: auto`` with
    ``train.reuse_freed_memory``, :func:`rlhf_pg.memory.allocator_env`) through their environment, for a
    comparison of the code alone. Subprocess children only."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_precision() -> str:
    """bf16 (the recipe default) where the CPU computes bf16 natively (avx512_bf16 / AMX), else fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


# ----------------------------------------------------------------------------------- children
def _proc_status_mb(field_name: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MB; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss_mb() -> float:
    """Current resident set size (MB); 0 where unavailable."""
    return _proc_status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """This process's peak resident set size (MB): ``VmHWM``, the high-water mark of its own address space.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss`` where VmHWM exists: Linux carries ru_maxrss over fork and
    exec, so a freshly started child reports at least its parent's peak. Elsewhere (macOS) ru_maxrss is
    the fallback, with that caveat.
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def _beta(spec: BenchSpec, which: str) -> float:
    return spec.kl_coef if which == "pos" else 0.0


def _config(spec: BenchSpec, beta: float, precision: str, out_dir: str):
    from rlhf_pg.config import build_config

    return build_config(
        {
            "output_dir": out_dir,
            "overwrite": True,
            "seed": spec.seed,
            "model": {"name": spec.model},
            "data": {"train": "arithmetic", "eval_limit": 1, "task_kwargs": {"n_train": spec.n_train, "n_eval": 8}},
            "batch": {
                "prompts_per_step": spec.prompts,
                "group_size": spec.group_size,
                "epochs": 1,
                "micro_batch_size": spec.micro_batch_size,
            },
            "rollout": {
                "max_new_tokens": spec.max_new_tokens,
                "temperature": spec.temperature,
                "top_p": 1.0,
                "top_k": 0,
            },
            "rewards": {"functions": [{"name": "accuracy"}]},
            "algo": {"name": "grpo", "kl_coef": beta, "kl_estimator": "k3", "kl_in": "loss", "loss_agg": "token-mean"},
            "train": {
                "max_steps": 10_000,
                "lr": spec.lr,
                "mixed_precision": "bf16" if precision == "bf16" else "no",
                "max_grad_norm": 1.0,
                "samples_every": 0,
                "save_every": 0,
                "eval_at_start": False,
                "save_model": False,
            },
        }
    )


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _child_ours(spec: BenchSpec, which: str, precision: str) -> dict:
    """The real path: Trainer.step(), phase times from its metrics."""
    import torch

    from rlhf_pg.order import step_rows
    from rlhf_pg.trainer import Trainer

    torch.set_num_threads(spec.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_config(spec, _beta(spec, which), precision, tmp))
        rss_load = _rss_mb()
        G, B = spec.group_size, spec.prompts * spec.group_size
        steps = []
        for i in range(spec.warmup + spec.steps):
            rows = step_rows(len(trainer.train_data), spec.prompts, spec.seed, trainer.step_idx)  # step()'s prompts
            prompt_tokens = sum(len(trainer.train_data[r]["prompt_ids"]) for r in rows)
            t0, c0 = time.perf_counter(), time.process_time()
            m = trainer.step()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if i < spec.warmup:
                continue
            gen = round(m["completion_len"] * B)
            steps.append(
                {
                    "rollout": m["time/rollout"],
                    "rewards": m["time/rewards"],
                    "reference": m["time/reference"],
                    "train": m["time/train"],
                    "step": wall,
                    "step_cpu": cpu,
                    "completion_tokens": gen,
                    "completion_len_max": m["completion_len_max"],
                    "prompt_tokens": prompt_tokens,
                    "seq_tokens": G * prompt_tokens + gen,
                    "reward": m["reward"],
                }
            )
        return {"steps": steps, "n_params": _n_params(trainer.policy), "rss_after_load_mb": rss_load}


class _Baseline:
    """The same GRPO step written the plain way with `transformers` (no reuse, full log-softmax)."""

    def __init__(self, spec: BenchSpec, beta: float):
        import torch

        from rlhf_pg.models import load_model, load_tokenizer
        from rlhf_pg.setup import build_datasets, build_rewards

        torch.manual_seed(spec.seed)
        self.spec, self.beta = spec, beta
        self.cfg = cfg = _config(spec, beta, "fp32", "unused")  # ours' config: the same data, reward, optimizer
        t = cfg.train
        self.tok = load_tokenizer(cfg.model.name)
        self.policy = load_model(cfg.model.name, "float32", "cpu")
        self.ref = load_model(cfg.model.name, "float32", "cpu").eval().requires_grad_(False) if beta > 0 else None
        self.data, _ = build_datasets(cfg, self.tok)
        self.rewards = build_rewards(cfg, self.tok)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
        self.step_idx = 0

    def rows(self, step: int) -> list[int]:
        """The same prompts as ours at this step (one process)."""
        from rlhf_pg.order import step_rows

        return step_rows(len(self.data), self.spec.prompts, self.cfg.seed, step)

    def logprobs(self, model, seqs, attn, P: int):
        """log π(a_t|s_t) of every completion token: full-vocabulary log_softmax at all positions."""
        import torch

        logits = model(
            input_ids=seqs, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0), use_cache=False
        ).logits  # (b, P+T, V)
        logp_all = torch.log_softmax(logits[:, :-1].float() / self.spec.temperature, dim=-1)  # (b, P+T−1, V)
        return logp_all.gather(-1, seqs[:, 1:, None]).squeeze(-1)[:, P - 1 :]  # (b, T)

    def step(self) -> dict:
        """One GRPO step, timed per phase: rollout, rewards, old + reference log-probs, train."""
        import torch

        from rlhf_pg import core

        G = self.spec.group_size
        sub = self.data.select(self.rows(self.step_idx))
        times: dict[str, float] = {}
        c_step, t_step, t0 = time.process_time(), time.perf_counter(), time.perf_counter()
        # ---- rollout: generate with num_return_sequences, fp32, no autocast
        seqs, pmask, cmask, comp_lists, texts = self._rollout(sub)
        P = pmask.shape[1]
        times["rollout"] = time.perf_counter() - t0

        # ---- rewards
        t0 = time.perf_counter()
        rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731
        columns = {c: rep(sub[c]) for c in sub.column_names if c not in ("prompt", "prompt_ids", "prompt_text")}
        out = self.rewards(rep(sub["prompt"]), texts, comp_lists, columns, prompt_text=rep(sub["prompt_text"]))
        token_rewards = core.place_scores(out.scores, cmask)
        times["rewards"] = time.perf_counter() - t0

        # ---- old log-probs and reference log-probs: two separate no-grad passes
        t0 = time.perf_counter()
        attn = torch.cat([pmask.repeat_interleave(G, 0), cmask.long()], 1)
        B = seqs.shape[0]
        mbs = self.spec.baseline_micro_batch_size or B
        chunks = [slice(i, min(i + mbs, B)) for i in range(0, B, mbs)]
        old, ref = self._old_and_ref_logprobs(seqs, attn, P, chunks)
        times["reference"] = time.perf_counter() - t0

        a = self.cfg.algo  # grpo advantage, clip loss, k3 KL in the loss, token-mean (see _config)
        adv = (
            core.ADVANTAGES[a.advantage]
            .fn(core.AdvantageInputs(token_rewards, cmask, G), a.options(a.advantage), None)
            .advantages
        )

        # ---- train: forward + backward per micro-batch on the full padded sequences, AdamW
        t0 = time.perf_counter()
        self._train(seqs, attn, P, chunks, old, ref, adv, cmask)
        times["train"] = time.perf_counter() - t0
        times["step"] = time.perf_counter() - t_step
        times["step_cpu"] = time.process_time() - c_step
        self.step_idx += 1
        gen, prompt_tokens = int(cmask.sum().item()), int(pmask.sum().item())
        return {
            **times,
            "completion_tokens": gen,
            "completion_len_max": int(cmask.sum(-1).max().item()),
            "prompt_tokens": prompt_tokens,
            "seq_tokens": G * prompt_tokens + gen,
            "reward": out.scores.mean().item(),
        }

    def _rollout(self, sub):
        """Sample G completions per prompt with ``generate``; return the sequences, the prompt mask,
        the completion mask (up to and including the first EOS), the completion token lists and texts."""
        import torch

        from rlhf_pg.rollout import left_pad

        s, tok = self.spec, self.tok
        pad, eos = tok.pad_token_id, tok.eos_token_id
        ids, pmask = left_pad(list(sub["prompt_ids"]), pad)
        P = ids.shape[1]
        self.policy.eval()
        with torch.no_grad():
            seqs = self.policy.generate(
                input_ids=ids,
                attention_mask=pmask,
                do_sample=True,
                num_return_sequences=s.group_size,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=1.0,
                top_k=0,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        comp = seqs[:, P:]  # (B, T)
        is_eos = (comp == eos).long()
        cmask = ((is_eos.cumsum(1) - is_eos) == 0).float()  # 1 up to and including the first EOS
        comp_lists = [row[m.bool()].tolist() for row, m in zip(comp, cmask)]
        texts = tok.batch_decode(comp_lists, skip_special_tokens=True)
        return seqs, pmask, cmask, comp_lists, texts

    def _old_and_ref_logprobs(self, seqs, attn, P: int, chunks):
        """The "old" policy log-probs and the reference log-probs (None at β = 0): two no-grad passes."""
        import torch

        with torch.no_grad():
            old = torch.cat([self.logprobs(self.policy, seqs[c], attn[c], P) for c in chunks])
            ref = (
                torch.cat([self.logprobs(self.ref, seqs[c], attn[c], P) for c in chunks])
                if self.ref is not None
                else None
            )
        return old, ref

    def _train(self, seqs, attn, P: int, chunks, old, ref, adv, cmask) -> None:
        """Forward + backward of the clipped GRPO loss (+ β·k3 KL) per micro-batch, then clip and AdamW."""
        import torch

        from rlhf_pg import core

        a = self.cfg.algo
        self.policy.train()
        n = core.Normalisers(num_tokens=cmask.sum().item(), num_seqs=seqs.shape[0], max_tokens=self.spec.max_new_tokens)
        for c in chunks:
            logp = self.logprobs(self.policy, seqs[c], attn[c], P)
            per_tok, _ = core.POLICY_LOSSES[a.policy_loss].fn(logp, old[c], adv[c], cmask[c], a.options(a.policy_loss))
            if ref is not None:
                per_tok = per_tok + self.beta * core.KL_ESTIMATORS[a.kl_estimator].fn(logp, ref[c])
            loss = core.AGGREGATIONS[a.loss_agg].fn(per_tok, cmask[c], n, a.options(a.loss_agg))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.train.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _child_baseline(spec: BenchSpec, which: str) -> dict:
    import torch

    torch.set_num_threads(spec.threads)
    b = _Baseline(spec, _beta(spec, which))
    rss_load = _rss_mb()
    steps = [b.step() for _ in range(spec.warmup + spec.steps)][spec.warmup :]
    return {"steps": steps, "n_params": _n_params(b.policy), "rss_after_load_mb": rss_load}


def _abs_diff(x, exact, mask) -> dict:
    """Mean and max of |x − exact| over the completion tokens (``mask``)."""
    d = (x - exact).abs()[mask.bool()]
    return {"mean_abs": d.mean().item(), "max_abs": d.max().item()}


def _child_quality(spec: BenchSpec, precision: str) -> dict:
    """On one batch sampled by the real trainer: ours' log-probs and policy gradient vs exact fp32."""
    import torch

    from rlhf_pg import core
    from rlhf_pg.forward import forward
    from rlhf_pg.trainer import Trainer

    torch.set_num_threads(spec.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(_config(spec, spec.kl_coef, precision, tmp))
        batch = tr.rollout(0)
        mask = batch.action_mask
        P = batch.prompt_ids.shape[1]
        seqs = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
        attn = torch.cat([batch.prompt_mask, mask.long()], 1)
        plain = _Baseline.__new__(_Baseline)
        plain.spec = spec
        model, mbs = tr.model, spec.micro_batch_size
        chunks = [torch.arange(i, min(i + mbs, batch.size)) for i in range(0, batch.size, mbs)]
        g = torch.Generator().manual_seed(1)
        adv = torch.randn(batch.size, 1, generator=g) * mask  # any fixed advantages: same for both
        n_tok = mask.sum().item()
        norm = core.Normalisers(num_tokens=n_tok, num_seqs=batch.size, max_tokens=spec.max_new_tokens)

        def grad_of(logp_fn) -> tuple[torch.Tensor, torch.Tensor]:
            model.zero_grad(set_to_none=True)
            lps = []
            for c in chunks:
                lp = logp_fn(c)
                per_tok, _ = core.pg_loss(lp, lp.detach(), adv[c], mask[c], None)
                core.agg_token_mean(per_tok, mask[c], norm).backward()
                lps.append(lp.detach())
            grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
            model.zero_grad(set_to_none=True)
            return torch.cat(lps), grad

        lp_ours, g_ours = grad_of(lambda c: forward(model, batch.select(c), tr.passes).logprobs)
        # Accelerate's mixed precision patches model.forward with autocast; the exact pass must not use it.
        patched = model.__dict__.pop("forward", None) if hasattr(model, "_original_forward") else None
        try:
            lp_exact, g_exact = grad_of(lambda c: plain.logprobs(model, seqs[c], attn[c], P))
        finally:
            if patched is not None:
                model.forward = patched
        with torch.no_grad():  # the reference pass (same weights as the policy before any update)
            lp_ref_path = tr.logprobs(tr.ref, batch) if tr.ref is not None else None

        return {
            "precision": precision,
            "tokens": int(n_tok),
            "logp_rollout_vs_exact": _abs_diff(batch.old_logprobs, lp_exact, mask),
            "logp_train_vs_exact": _abs_diff(lp_ours, lp_exact, mask),
            "logp_reference_vs_exact": _abs_diff(lp_ref_path, lp_exact, mask) if lp_ref_path is not None else None,
            "grad_cosine": torch.nn.functional.cosine_similarity(g_ours.double(), g_exact.double(), dim=0).item(),
            "grad_rel_err": ((g_ours.double() - g_exact.double()).norm() / g_exact.double().norm()).item(),
        }


def heap_env(kind: str, peer_heap: str) -> dict[str, str]:
    """The environment a child of ``kind`` gets for its C heap: ours (and, under ``--peer-heap same``, TRL's
    and the baseline's) rlhf-pg's default allocator and policy, as ``rlhf-pg train`` starts with; the peers
    otherwise none (glibc's defaults, as a user runs them)."""
    from rlhf_pg.memory import allocator_env

    if kind in ("trl", "baseline") and peer_heap != "same":
        return {}
    return allocator_env("auto", keep=True)


def heaps(spec: BenchSpec) -> dict[str, str]:
    """Each side's C heap, for the report: ``{"rlhf-pg": ..., "peer": ...}``."""
    from rlhf_pg.memory import resolve_allocator

    ours = f"{resolve_allocator('auto')}, freed memory kept"
    return {"rlhf-pg": ours, "peer": ours + " (--peer-heap same)" if spec.peer_heap == "same" else "glibc's default"}


def run_child(job: dict) -> dict:
    """Run one measurement job (``kind``: ours | baseline | quality | trl) and add its peak RSS."""
    spec = BenchSpec(**job["spec"])
    kind = job["kind"]
    if kind == "ours":
        res = _child_ours(spec, job["beta"], job["precision"])
    elif kind == "baseline":
        res = _child_baseline(spec, job["beta"])
    elif kind == "quality":
        res = _child_quality(spec, job["precision"])
    elif kind == "trl":
        from rlhf_pg.labs.trl_bench import child_trl

        res = child_trl(spec, job["beta"], job["precision"])
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    from rlhf_pg.memory import active_allocator

    res["peak_rss_mb"] = peak_rss_mb()
    res["allocator"] = active_allocator()
    return res


def _launch(job: dict, in_process: bool) -> dict:
    if in_process:
        import torch
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # a new precision needs a fresh state
        threads = torch.get_num_threads()
        try:
            return run_child(job)
        finally:
            torch.set_num_threads(threads)  # the child's thread count must not leak into this process
    # A fresh interpreter running this very package: a source checkout's root goes first on the path
    # (an installed package is found by the child as by the parent).
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.update(heap_env(job["kind"], job["spec"].get("peer_heap", "default")))
    root = Path(__file__).resolve().parents[2]  # rlhf_pg/labs/bench.py → the tree holding rlhf_pg
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(root), os.environ.get("PYTHONPATH")) if x)
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_pg.labs.bench", "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    raise RuntimeError(f"benchmark child {job['kind']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------------ parent
def _best_seconds(fn, seconds: float) -> float:
    """The fastest of the calls of ``fn`` made over ~``seconds`` (after one warm-up call)."""
    fn()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(seconds: float, threads: int, precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, float]:
    """FLOP/s of a 2048×2048 @ 2048×2048 ``torch.matmul`` (fp32 and/or bf16), best of ~``seconds`` each."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    n, out = 2048, {}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    try:
        for name, dt in ((p, dtypes[p]) for p in precisions):
            a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
            out[name] = 2 * n**3 / _best_seconds(lambda a=a, b=b: a @ b, seconds)
    finally:
        torch.set_num_threads(old)
    return out


def decode_shapes(model: str) -> list[tuple[int, int]]:
    """(out, in) of every ``nn.Linear`` of ``model`` (its LM head included), from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_pg.models import resolve_model

    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)))
    return [tuple(m.weight.shape) for m in built.modules() if type(m) is torch.nn.Linear]


def decode_matmul_rates(
    model: str, rows: int, seconds: float, threads: int, precision: str, prepacked: bool | None = None
) -> dict[str, float]:
    """FLOP/s of the products of one decoding step alone, per way of running them: ``rows`` rows through every
    ``nn.Linear`` of ``model`` (its LM head included), with weights of the model's shapes (random,
    ``precision``), best of ~``seconds`` of such passes per way. The weights are the model's size, so they
    stream from memory as in decoding; nothing else of the step runs (attention, norms, sampling). Ways:
    ``plain`` (``F.linear``) and, in bf16, ``prepacked`` (oneDNN's layout, as the lean decoding step runs
    them) where :func:`rlhf_pg.decode.prepacks_weights` says so, or as ``prepacked`` asks. Empty for a model
    without ``nn.Linear`` layers."""
    import torch
    import torch.nn.functional as F

    from rlhf_pg.decode import packed_linear, prepacks_weights

    shapes = decode_shapes(model)
    if not shapes:
        return {}
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if prepacked is None:
        prepacked = prepacks_weights(torch.device("cpu"), dt)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weights = [torch.randn(n, k).to(dt) for n, k in shapes]
        xs = {k: torch.randn(rows, k).to(dt) for k in {k for _, k in shapes}}
        ways = {"plain": lambda: [F.linear(xs[w.shape[1]], w) for w in weights]}
        if prepacked and dt == torch.bfloat16:
            packed = [(w.shape[1], torch.ops.mkldnn._reorder_linear_weight(w, rows)) for w in weights]
            ways["prepacked"] = lambda: [packed_linear(xs[k], p, None) for k, p in packed]
        flops = 2 * rows * sum(n * k for n, k in shapes)
        return {way: flops / _best_seconds(run, seconds / len(ways)) for way, run in ways.items()}
    finally:
        torch.set_num_threads(old)


def decode_matmul_peak(model: str, rows: int, seconds: float, threads: int, precision: str) -> float | None:
    """The decode-shaped peak: the faster way of :func:`decode_matmul_rates` (the prepacked products where the
    lean decoding step uses them). None for a model without ``nn.Linear`` layers."""
    return max(decode_matmul_rates(model, rows, seconds, threads, precision).values(), default=None)


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _machine(spec: BenchSpec) -> dict:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": spec.threads,
        "loadavg_at_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bf16_native": default_precision() == "bf16",
    }


def step_flops(step: dict, n_params: int, beta: float) -> dict[str, float]:
    """FLOPs of one measured step (:data:`rlhf_pg.metrics.FLOP_FORMULA`) from its token counts."""
    from rlhf_pg.metrics import step_flops as flops

    return flops(n_params, step["prompt_tokens"], step["completion_tokens"], reference=beta > 0)


def _check_spec(spec: BenchSpec) -> None:
    """Reject a spec the benchmark cannot measure (a :class:`~rlhf_pg.errors.UserError`)."""
    from rlhf_pg.errors import UserError

    if spec.repeats < 1 or spec.steps < 1 or spec.warmup < 0 or spec.threads < 1:
        raise UserError(
            f"bench needs --repeats >= 1, --steps >= 1, --warmup >= 0 and --threads >= 1 "
            f"(got {spec.repeats}, {spec.steps}, {spec.warmup}, {spec.threads})"
        )
    if not spec.precisions or not spec.betas:
        raise UserError("bench needs at least one precision and one beta run")
    if spec.against not in ("baseline", "trl"):
        raise UserError(f"bench --against is baseline or trl (got {spec.against!r})")
    if spec.against == "trl":
        from rlhf_pg.labs.trl_bench import check_available

        check_available()
        B = spec.prompts * spec.group_size
        if spec.group_size < 2 or spec.micro_batch_size < 1 or B % spec.micro_batch_size:
            raise UserError(
                f"bench --against trl needs --group-size >= 2 (TRL's GRPO) and a --micro-batch-size dividing "
                f"prompts x group size = {B} (TRL's gradient accumulation); got {spec.group_size} and "
                f"{spec.micro_batch_size}"
            )


def _measure(spec: BenchSpec, paths: list[str], log: Callable[[str], None]) -> dict[str, dict[str, list[dict]]]:
    """All repetitions: per β run and path, one child each, the paths' order alternating per
    repetition. Returns β run → path → the children's results (in repetition order)."""
    runs: dict[str, dict[str, list[dict]]] = {b: {p: [] for p in paths} for b in spec.betas}
    for rep in range(spec.repeats):
        for which in spec.betas:
            order = paths if rep % 2 == 0 else paths[::-1]
            for path in order:
                job = {
                    "kind": "baseline" if path == "baseline" else "ours",
                    "beta": which,
                    "precision": path.removeprefix("ours-"),
                    "spec": asdict(spec),
                }
                t0 = time.perf_counter()
                res = _launch(job, spec.in_process)
                res["repetition"] = rep
                runs[which][path].append(res)
                log(
                    f"[bench] rep {rep + 1}/{spec.repeats} β={_beta(spec, which):g} {path:>10}: step "
                    f"{_median([s['step'] for s in res['steps']]):.2f} s, peak RSS {res['peak_rss_mb']:.0f} MB "
                    f"(child {time.perf_counter() - t0:.0f} s)"
                )
    return runs


def _path_result(children: list[dict], path: str, beta: float, peak: dict[str, float]) -> dict[str, Any]:
    """One path's summary at one β over all its children's measured steps: phase medians, rollout
    tokens/s, RSS, FLOPs and FLOP/s (per step, then the median) and, with a matmul peak, MFU."""
    steps = [s for c in children for s in c["steps"]]
    n_params = children[0]["n_params"]
    prec = "fp32" if path == "baseline" else path.removeprefix("ours-")
    flops = [step_flops(s, n_params, beta) for s in steps]
    r = {
        "median": {k: _median([s[k] for s in steps]) for k in steps[0]},
        "tokens_per_s": _median([s["completion_tokens"] / s["rollout"] for s in steps]),
        "peak_rss_mb": _median([c["peak_rss_mb"] for c in children]),
        "rss_after_load_mb": _median([c["rss_after_load_mb"] for c in children]),
        "n_params": n_params,
        "flops": {k: _median([f[k] for f in flops]) for k in flops[0]},
        # per step, then the median (None: a phase with no FLOPs, e.g. the reference at β = 0)
        "flop_per_s": {
            k: _median([f[k] / s[k] if f[k] > 0 and s[k] > 0 else None for f, s in zip(flops, steps)]) for k in flops[0]
        },
        "precision": prec,
        "steps": steps,
    }
    if peak:
        r["mfu"] = {k: (v / peak[prec] if v is not None else None) for k, v in r["flop_per_s"].items()}
    return r


def _speedups(ours: list[dict], base: list[dict], res_ours: dict, res_base: dict) -> dict[str, float | None]:
    """Baseline / ours per phase: the ratio of the two paths' medians within each repetition, then
    the median over repetitions (None where ours skips the phase); rollout tokens/s ours / baseline;
    peak RSS ours / baseline."""
    per_rep: dict[str, list[float]] = {k: [] for k in PHASES}
    for c_ours, c_base in zip(ours, base):
        for k in PHASES:
            o = _median([s[k] for s in c_ours["steps"]])
            b = _median([s[k] for s in c_base["steps"]])
            per_rep[k].append(b / o if o > 1e-3 else None)  # ours skips the phase (β = 0 reference)
    rr = {k: _median(v) for k, v in per_rep.items()}
    rr["rollout_tokens_per_s"] = res_ours["tokens_per_s"] / res_base["tokens_per_s"]
    rr["peak_rss"] = res_ours["peak_rss_mb"] / res_base["peak_rss_mb"]
    return rr


def _quality_runs(spec: BenchSpec, log: Callable[[str], None]) -> dict[str, dict]:
    """The quality child of every precision of ours (empty with ``quality`` off)."""
    quality = {}
    if spec.quality:
        for p in spec.precisions:
            quality[f"ours-{p}"] = _launch({"kind": "quality", "precision": p, "spec": asdict(spec)}, spec.in_process)
            q = quality[f"ours-{p}"]
            log(
                f"[bench] quality ours-{p}: grad cosine {q['grad_cosine']:.5f}, "
                f"mean |Δlogp| train {q['logp_train_vs_exact']['mean_abs']:.2e}"
            )
    return quality


def run_benchmark(spec: BenchSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark and return the report (see :func:`format_table`)."""
    from rlhf_pg import metrics

    _check_spec(spec)
    if spec.against == "trl":
        from rlhf_pg.labs.trl_bench import run_trl_comparison

        return run_trl_comparison(spec, log)
    paths = [f"ours-{p}" for p in spec.precisions] + ["baseline"]
    started = time.perf_counter()
    machine = _machine(spec)
    from rlhf_pg.models import resolve_model

    # An alias is converted into the cache here, once, not inside the first child (its RSS and time).
    log(f"[bench] model {spec.model}: {resolve_model(spec.model)}")
    runs = _measure(spec, paths, log)
    peak = matmul_peak(spec.peak_seconds, spec.threads) if spec.peak_seconds > 0 else {}
    if peak:
        log("[bench] matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()))

    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for which in spec.betas:
        beta = _beta(spec, which)
        key = f"beta={beta:g}"
        results[key] = {path: _path_result(runs[which][path], path, beta, peak) for path in paths}
        ratios[key] = {
            path: _speedups(runs[which][path], runs[which]["baseline"], results[key][path], results[key]["baseline"])
            for path in paths[:-1]
        }

    quality = _quality_runs(spec, log)
    return {
        "workload": {k: v for k, v in asdict(spec).items() if k not in ("in_process",)},
        "machine": machine,
        "c_heap": heaps(spec),
        "matmul_peak_flop_per_s": peak,
        "flop_formula": metrics.FLOP_FORMULA,
        "peak_rss": "VmHWM (own high-water mark) of each child process, median over repetitions",
        "results": results,
        "speedup": ratios,
        "quality": quality,
        "wall_s": time.perf_counter() - started,
    }


def format_table(report: dict) -> str:
    """Plain-text tables: per β, phase medians (s) of each path and the speed-up baseline / ours."""
    if report.get("against") == "trl":
        from rlhf_pg.labs.trl_bench import format_table as trl_table

        return trl_table(report)
    lines = _table_header(report)
    for key, res in report["results"].items():
        lines.append("")
        lines.append(f"== GRPO step, {key} ==")
        lines.extend(_table_rows(res, report["speedup"][key]))
    if report["quality"]:
        lines.append("")
        lines.append("== quality: ours vs exact fp32 full log-softmax, same sampled batch ==")
        lines.extend(_quality_lines(report["quality"]))
    return "\n".join(lines)


def _table_header(report: dict) -> list[str]:
    """The lines above the tables: workload, machine and, with a matmul peak, the peak and FLOP formula."""
    lines = []
    w = report["workload"]
    m = report["machine"]
    lines.append(
        f"workload: {w['model']}, {w['prompts']} prompts x {w['group_size']} samples, "
        f"<= {w['max_new_tokens']} new tokens, T={w['temperature']:g}, micro-batch {w['micro_batch_size']}; "
        f"{w['repeats']} repetitions x {w['steps']} step(s) after {w['warmup']} warm-up; medians"
    )
    load = m["loadavg_at_start"]
    load = "/".join(f"{x:.2f}" for x in load) if load else "?"
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, load average at start {load}")
    if "c_heap" in report:
        lines.append(f"C heap: rlhf-pg {report['c_heap']['rlhf-pg']}; baseline {report['c_heap']['peer']}")
    peak = report["matmul_peak_flop_per_s"]
    if peak:
        lines.append("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()))
        f = report["flop_formula"]
        lines.append(
            f"FLOPs (both paths alike): rollout {f['rollout']}, reference {f['reference']}, train {f['train']}; "
            f"S = {f['S']}; N = {f['N']}"
        )
    return lines


def _table_row(label: str, vals: list, ratios: list | None = None, fmt: str = "{:.2f}") -> str:
    """One table row: the label, a value per path ('-' for None) and, optionally, the speed-up columns."""
    s = f"{label:<22}" + "".join(f"{(fmt.format(v) if v is not None else '-'):>14}" for v in vals)
    if ratios is not None:
        s += "".join(f"{(f'{r:.2f}x' if r is not None else '-'):>16}" for r in ratios)
    return s


def _table_rows(res: dict, sp: dict) -> list[str]:
    """One β's table: the column heads, a row per phase and per size (tokens, RSS, MFU), the footnote."""
    paths = list(res)
    ours = paths[:-1]  # the last path is the baseline
    row = _table_row
    lines = [f"{'':<22}" + "".join(f"{p:>14}" for p in paths) + "".join(f"{'x ' + p:>16}" for p in ours)]
    lines.append(f"{'precision':<22}" + "".join(f"{res[p]['precision']:>14}" for p in paths))
    labels = {"reference": "ref + old logp (s)", "step_cpu": "step CPU time (s)"}
    for ph in PHASES:
        lines.append(
            row(labels.get(ph, f"{ph} (s)"), [res[p]["median"][ph] for p in paths], [sp[p][ph] for p in ours], "{:.3f}")
        )
    lines.append(
        row(
            "rollout tokens/s",
            [res[p]["tokens_per_s"] for p in paths],
            [sp[p]["rollout_tokens_per_s"] for p in ours],
            "{:.1f}",
        )
    )
    lines.append(row("completion tokens", [res[p]["median"]["completion_tokens"] for p in paths], fmt="{:.0f}"))
    lines.append(
        row("peak RSS (MB)", [res[p]["peak_rss_mb"] for p in paths], [sp[p]["peak_rss"] for p in ours], "{:.0f}")
    )
    lines.append(row("RSS after load (MB)", [res[p]["rss_after_load_mb"] for p in paths], fmt="{:.0f}"))
    if "mfu" in res[paths[0]]:
        for ph in ("rollout", "reference", "train", "step"):
            vals = [res[p]["mfu"][ph] for p in paths]
            if any(v is not None for v in vals):
                lines.append(row(f"MFU {ph}", [100 * v if v is not None else None for v in vals], fmt="{:.1f}%"))
    lines.append(
        "  (x columns: baseline / ours, median over repetitions, for times and tokens/s; for peak RSS "
        "ours / baseline. 'ref + old logp': ours runs the reference only (none at beta=0), the "
        "baseline an old-log-prob pass and the reference)"
    )
    return lines


def _quality_lines(quality: dict) -> list[str]:
    """A line per precision of ours: gradient cosine and relative error, mean/max |Δ log p| per pass."""
    lines = []
    for p, q in quality.items():
        diffs = ", ".join(
            f"{name} {q[k]['mean_abs']:.1e}/{q[k]['max_abs']:.1e}"
            for name, k in (
                ("train", "logp_train_vs_exact"),
                ("reference", "logp_reference_vs_exact"),
                ("rollout", "logp_rollout_vs_exact"),
            )
            if q[k] is not None
        )
        lines.append(
            f"{p}: grad cosine {q['grad_cosine']:.5f}, grad rel. err {q['grad_rel_err']:.2e}; "
            f"|Δ log p| mean/max: {diffs}"
        )
    return lines


TRL_DEFAULTS = {"lr": 1e-5, "steps": 7, "betas": ["pos"]}
"""``--against trl`` defaults that differ (the issue's workload: lr 1e-5, 8 steps with the first a warm-up, β > 0)."""


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of the benchmark (shared by this script and ``rlhf-pg bench``)."""
    d = BenchSpec()
    p = p or argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, help=f"model alias, path or hub id (default {d.model})")
    p.add_argument("--prompts", type=int, default=d.prompts, help=f"prompts per step (default {d.prompts})")
    p.add_argument("--group-size", type=int, default=d.group_size, help=f"samples per prompt (default {d.group_size})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"(default {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"(default {d.temperature:g})")
    p.add_argument("--kl-coef", type=float, default=d.kl_coef, help=f"β of the β>0 run (default {d.kl_coef:g})")
    p.add_argument(
        "--micro-batch-size", type=int, default=d.micro_batch_size, help=f"ours (default {d.micro_batch_size})"
    )
    p.add_argument(
        "--baseline-micro-batch-size",
        type=int,
        default=d.baseline_micro_batch_size,
        help="baseline; 0 = the whole batch in one forward/backward, the plain loop (default 0)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"AdamW learning rate (default {d.lr:g}; {TRL_DEFAULTS['lr']:g} against trl)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=d.n_train,
        help=f"arithmetic training questions the prompts are drawn from (default {d.n_train})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32", "both"],
        default=None,
        help=f"precision of ours (default on this CPU: {default_precision()}); the baseline is fp32",
    )
    p.add_argument(
        "--beta",
        choices=["pos", "zero", "both"],
        default=None,
        help="which runs: pos = beta > 0, zero = beta 0 (default both; pos against trl)",
    )
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"repetitions (default {d.repeats})")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"measured steps per child, after the warm-up (default {d.steps}; {TRL_DEFAULTS['steps']} against trl)",
    )
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"unmeasured steps per child (default {d.warmup})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads (default: cores = {d.threads})")
    p.add_argument(
        "--no-quality", action="store_true", help="skip the log-prob / gradient comparison (never run against trl)"
    )
    p.add_argument(
        "--against",
        choices=["baseline", "trl"],
        default=d.against,
        help="compare with the plain transformers step (baseline, default) or TRL's GRPOTrainer (trl; needs the "
        "`bench` extra: pip install -e '.[bench]')",
    )
    p.add_argument(
        "--peak-seconds", type=float, default=d.peak_seconds, help="matmul-peak measurement time (0 = no MFU)"
    )
    p.add_argument(
        "--peer-heap",
        choices=["default", "same"],
        default=d.peer_heap,
        help="the C heap of TRL's / the baseline's children: glibc's default (as users run them) or rlhf-pg's "
        "allocator and policy, for a comparison of the code alone (default: default)",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="step cost vs group size and completion length, against TRL (labs/scaling.py; with --against trl)",
    )
    p.add_argument("--scale-groups", default="4,8,16", help="--scaling: group sizes (default 4,8,16)")
    p.add_argument("--scale-lengths", default="64,128,256", help="--scaling: max new tokens (default 64,128,256)")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="also write the full report here")
    return p


def spec_from_args(args) -> BenchSpec:
    d = BenchSpec()
    against = getattr(args, "against", d.against)
    trl = against == "trl"
    prec = {"both": ["bf16", "fp32"], None: [default_precision()]}.get(args.precision, [args.precision])
    betas = {"both": ["pos", "zero"], None: TRL_DEFAULTS["betas"] if trl else d.betas}.get(args.beta, [args.beta])
    lr = args.lr if args.lr is not None else (TRL_DEFAULTS["lr"] if trl else d.lr)
    steps = args.steps if args.steps is not None else (TRL_DEFAULTS["steps"] if trl else d.steps)
    return BenchSpec(
        model=args.model,
        prompts=args.prompts,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        kl_coef=args.kl_coef,
        micro_batch_size=args.micro_batch_size,
        baseline_micro_batch_size=args.baseline_micro_batch_size,
        lr=lr,
        n_train=args.n_train,
        seed=args.seed,
        precisions=prec,
        betas=betas,
        repeats=args.repeats,
        steps=steps,
        warmup=args.warmup,
        threads=args.threads,
        quality=not args.no_quality and not trl,
        peak_seconds=args.peak_seconds,
        against=against,
        peer_heap=getattr(args, "peer_heap", d.peer_heap),
    )


def run_from_args(args) -> dict:
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if getattr(args, "scaling", False):
        from rlhf_pg.labs import scaling

        groups = scaling.parse_ints(args.scale_groups, "--scale-groups")
        lengths = scaling.parse_ints(args.scale_lengths, "--scale-lengths")
        report = scaling.run_scaling(spec_from_args(args), groups, lengths, log)
        print(scaling.format_table(report))
    else:
        report = run_benchmark(spec_from_args(args), log=log)
        print(format_table(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json_path}")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        import warnings

        warnings.filterwarnings("ignore")
        res = run_child(json.loads(argv[1]))
        print(_MARK + json.dumps(res), flush=True)
        return 0
    from rlhf_pg.errors import UserError

    try:
        run_from_args(build_parser().parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
