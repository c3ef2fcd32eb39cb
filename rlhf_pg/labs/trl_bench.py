"""rlhf-pg against TRL's ``GRPOTrainer`` on the same GRPO workload (``rlhf-pg bench --against trl``).

    rlhf-pg bench --against trl --precision both --json trl.json   # needs the `bench` extra (trl==1.16.0)

Both sides run the same workload (:class:`~rlhf_pg.labs.bench.BenchSpec`): the model, the built-in
`arithmetic` prompts (TRL gets ours' conversational ``prompt`` messages and the ``answer`` column, in the
order ours draws them, so both see the same prompts at every step), the reward (ours' ``accuracy``, called by
TRL with its keyword arguments), P prompts × G samples per step, at most ``max_new_tokens`` new tokens,
temperature 1, top-p 1, top-k off, β (k3 KL to a frozen reference, in the loss), group-normalised advantages
(std + 1e-4), PPO clip 0.2, token-mean loss over the whole step, one AdamW step per RL step (β = (0.9, 0.99),
no weight decay, constant learning rate, grad-norm clip 1.0, fused), gradients accumulated over micro-batches
of ``micro_batch_size`` completions, no gradient checkpointing, fp32 weights; bf16 = each side's own
autocast (ours ``train.mixed_precision=bf16``, TRL ``GRPOConfig(bf16=True)``). :func:`grpo_config_kwargs`
is TRL's configuration, setting by setting.

Every run is a child process of its own (``python -m rlhf_pg.labs.bench --child JOB``, kind ``ours`` or
``trl``); per repetition and precision the two sides run back to back, their order alternating between
repetitions. Each child makes ``warmup`` unmeasured and ``steps`` measured RL steps (one TRL optimizer step =
one RL step); numbers are medians over the measured steps of all repetitions, ratios (rlhf-pg / TRL) the median
over repetitions of the ratio of the two sides' medians within the repetition. The matmul peak
(:func:`~rlhf_pg.labs.bench.matmul_peak`, in the precision of the run) is measured by the parent right before
and right after each child; the run's MFU is against the mean of the two, so a machine that other jobs slow
down lowers the peak too.

TRL's phases are timed around its own methods, which compute exactly what they compute untimed: rollout =
``_generate`` (chat template, ``model.generate``, decoding), rewards = ``_calculate_rewards``, reference = the
log-prob passes it makes without gradients (``_get_per_token_logps_and_entropies`` under ``no_grad``: the
reference model; an "old log-prob" pass would be counted here too, and is not made at these settings), step =
from the Trainer's ``on_step_begin`` to its ``on_step_end`` callback (the gradient-accumulation loop, gradient
clipping, the optimizer and scheduler steps), train = step − ``_generate_and_score_completions`` (the
micro-batches' forward + backward, clipping, AdamW). What the Trainer does between two steps (fetching the
next batch, logging) is reported as ``between_steps``. Ours' phases are the trainer's own ``time/*``.

Completion tokens per step (each side samples its own completions, so lengths differ) are reported next to
the times: s per 1k completion tokens and completion tokens/s of the whole step (the headline ratio) normalise
for them. FLOPs are the harness's (:func:`~rlhf_pg.labs.bench.step_flops`): the FLOPs the step needs for its
own tokens, so MFU ratios are throughput ratios.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rlhf_pg.labs import bench

TRL_VERSION = "1.16.0"
"""The TRL release compared against (the `bench` extra pins it)."""
SIDES = ("rlhf-pg", "trl")
TIMES = ("step", "rollout", "reference", "train", "rewards", "step_cpu")
"""Per-step times (s) reported for both sides."""
RATIO_KEYS = (
    *TIMES,
    "completion_tokens",
    "s_per_1k_completion_tokens",
    "completion_tokens_per_s",
    "rollout_tokens_per_s",
    "mfu_rollout",
    "mfu_reference",
    "mfu_train",
    "mfu_step",
    "rollout_vs_decode_peak",
)
"""Per-step quantities whose rlhf-pg / TRL ratio is reported (plus peak RSS, per run)."""


def trl_version() -> str | None:
    """The installed TRL's version, None when it is not importable."""
    try:
        import trl
    except ImportError:
        return None
    return str(trl.__version__)


def check_available() -> str:
    """The installed TRL's version, or a :class:`~rlhf_pg.errors.UserError` saying how to install it."""
    from rlhf_pg.errors import UserError

    version = trl_version()
    if version is None:
        raise UserError(
            f"bench --against trl needs TRL: pip install -e '.[bench]' (installs trl=={TRL_VERSION}), "
            "or use --against baseline"
        )
    return version


def grpo_config_kwargs(spec: bench.BenchSpec, beta: float, precision: str, out_dir: str) -> dict[str, Any]:
    """TRL's ``GRPOConfig`` for the workload; each setting is the one rlhf-pg uses (see the comments)."""
    micro = spec.micro_batch_size
    accumulation = spec.prompts * spec.group_size // micro
    return dict(
        output_dir=out_dir,
        seed=spec.seed,
        use_cpu=True,
        # precision: fp32 weights; bf16 = Accelerate autocast, as ours' train.mixed_precision=bf16
        bf16=precision == "bf16",
        fp16=False,
        model_init_kwargs={"dtype": "float32"},  # ours: model.dtype auto = float32 on CPU
        # ours: model.gradient_checkpointing false (TRL's default is true; transformers 5.24 renamed the setting)
        activation_checkpointing=False,
        gradient_checkpointing=False,
        # batch: one generation of P x G completions per optimizer step, accumulated over micro-batches of `micro`
        per_device_train_batch_size=micro,  # ours: batch.micro_batch_size (also TRL's reference-pass chunk)
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,  # = gradient_accumulation_steps: one rollout per optimizer step
        num_generations=spec.group_size,  # G
        num_iterations=1,  # ours: batch.epochs 1 (on-policy: no old-log-prob pass on either side)
        max_steps=spec.warmup + spec.steps,
        shuffle_dataset=False,  # the dataset is ours' prompts in ours' order (one row per prompt and step)
        # sampling: ours' rollout settings
        max_completion_length=spec.max_new_tokens,
        temperature=spec.temperature,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        # GRPO: group-normalised advantage (std + 1e-4, as ours), clip 0.2, token-mean over the whole step
        scale_rewards="group",  # ours: algo.grpo.scale group
        epsilon=0.2,  # ours: algo.clip.eps_low / eps_high 0.2
        loss_type="dapo",  # Σ token losses / tokens of the accumulated step = ours' loss_agg token-mean
        importance_sampling_level="token",
        beta=beta,  # k3 KL to the frozen reference, in the loss (ours: kl_estimator k3, kl_in loss)
        use_bias_correction_kl=False,  # ours' KL term is not weighted by the importance ratio (TRL's default is)
        mask_truncated_completions=False,
        entropy_coef=0.0,
        # optimizer: ours' AdamW (setup.py) and schedule
        learning_rate=spec.lr,
        optim="adamw_torch_fused",
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        # no evaluation, saving, trackers or progress bars; log every step (TRL's per-step metrics)
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


# ------------------------------------------------------------------------------------ the TRL child
def _trl_dataset(spec: bench.BenchSpec, tokenizer, beta: float):
    """Ours' prompts of steps 0 … warmup+steps−1 in ours' order (TRL's sampler takes them in turn), and,
    per step, ours' token ids of those prompts (to check TRL renders the same ones)."""
    import datasets

    from rlhf_pg.order import step_rows
    from rlhf_pg.setup import build_datasets

    cfg = bench._config(spec, beta, "fp32", "unused")
    train_data, _ = build_datasets(cfg, tokenizer)
    per_step = [step_rows(len(train_data), spec.prompts, cfg.seed, s) for s in range(spec.warmup + spec.steps)]
    rows = [r for step in per_step for r in step]
    sub = train_data.select(rows)
    ds = datasets.Dataset.from_dict({"prompt": sub["prompt"], "answer": sub["answer"]})
    ids = [[list(train_data[r]["prompt_ids"]) for r in step] for step in per_step]
    return ds, ids


class _Clock:
    """Per-step phase times and token counts of the TRL run, filled by the trainer's hooks."""

    def __init__(self, group_size: int, expected_prompt_ids: list[list[list[int]]]):
        self.G = group_size
        self.expected = expected_prompt_ids
        self.steps: list[dict[str, Any]] = []
        self.cur: dict[str, Any] | None = None
        self.t0 = self.c0 = 0.0
        self.last_end: float | None = None

    def begin(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.cur = {
            "rollout": 0.0,
            "rewards": 0.0,
            "reference": 0.0,
            "generate_and_score": 0.0,
            "no_grad_logprob_passes": 0,
            "old_logprob_passes": 0,
            "completion_tokens": 0,
            "completion_len_max": 0,
            "prompt_tokens": 0,
            "reward": None,
            "same_prompts_as_ours": None,
            "between_steps": (self.t0 - self.last_end) if self.last_end is not None else None,
        }

    def end(self) -> None:
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        s = self.cur
        s["step"], s["step_cpu"] = wall, cpu
        s["train"] = wall - s.pop("generate_and_score")
        s["seq_tokens"] = self.G * s["prompt_tokens"] + s["completion_tokens"]
        self.steps.append(s)
        self.cur, self.last_end = None, time.perf_counter()

    def add(self, key: str, value: float) -> None:
        if self.cur is not None:
            self.cur[key] += value

    def generated(self, prompt_ids: list, completion_ids: list) -> None:
        """Token counts of the step's rollout, and whether its prompts are ours' (same ids, same multiset)."""
        if self.cur is None:
            return
        self.cur["completion_tokens"] += sum(len(c) for c in completion_ids)
        self.cur["completion_len_max"] = max([self.cur["completion_len_max"], *(len(c) for c in completion_ids)])
        self.cur["prompt_tokens"] += sum(len(p) for p in prompt_ids) // self.G  # each prompt is there G times
        step = len(self.steps)
        if step < len(self.expected):
            want = sorted(tuple(p) for p in self.expected[step] for _ in range(self.G))
            self.cur["same_prompts_as_ours"] = sorted(tuple(p) for p in prompt_ids) == want


def _timed_trainer_class(clock: _Clock):
    """A ``GRPOTrainer`` subclass whose overrides time TRL's own methods and change nothing they compute."""
    import torch
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                clock.add("generate_and_score", time.perf_counter() - t0)

        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            clock.add("rollout", time.perf_counter() - t0)
            clock.generated(out[0], out[1])  # prompt_ids, completion_ids (lists of token ids)
            return out

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            clock.add("rewards", time.perf_counter() - t0)
            if clock.cur is not None:
                clock.cur["reward"] = torch.nanmean(out[:, 0]).item()
            return out

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            if torch.is_grad_enabled():  # the training forward: part of "train"
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            clock.add("reference", time.perf_counter() - t0)
            clock.add("no_grad_logprob_passes", 1)
            clock.add("old_logprob_passes", int(model is not self.ref_model))
            return out

    return TimedGRPOTrainer


def child_trl(spec: bench.BenchSpec, which: str, precision: str) -> dict:
    """TRL's ``GRPOTrainer.train()`` for warmup + steps optimizer steps, timed per phase (see the module doc)."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig

    from rlhf_pg.models import load_tokenizer, resolve_model
    from rlhf_pg.rewards import REWARD_REGISTRY

    torch.set_num_threads(spec.threads)
    beta = bench._beta(spec, which)
    tokenizer = load_tokenizer(spec.model)  # ours' tokenizer: the same chat template, pad token and padding side
    dataset, expected = _trl_dataset(spec, tokenizer, beta)
    clock = _Clock(spec.group_size, expected)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(**grpo_config_kwargs(spec, beta, precision, tmp))
        trainer = _timed_trainer_class(clock)(
            model=str(resolve_model(spec.model)),  # a local directory: TRL loads policy and reference from it
            reward_funcs=REWARD_REGISTRY["accuracy"],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepClock()],
        )
        for cb in (PrinterCallback, ProgressCallback):  # no per-step dicts or bars on stdout
            trainer.remove_callback(cb)
        rss_load = bench._rss_mb()
        trainer.train()
        n_params = bench._n_params(trainer.model)
        a = trainer.args
        resolved = {
            k: getattr(a, k)
            for k in (
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "steps_per_generation",
                "generation_batch_size",
                "num_generations",
                "max_completion_length",
                "loss_type",
                "scale_rewards",
                "beta",
                "use_bias_correction_kl",
                "gradient_checkpointing",
                "bf16",
                "learning_rate",
                "lr_scheduler_type",
                "max_grad_norm",
                "adam_beta1",
                "adam_beta2",
                "weight_decay",
            )
        }
        resolved["optim"] = str(getattr(a.optim, "value", a.optim))
        resolved["optimizer"] = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__
        resolved["eos_token_ids"] = list(trainer.eos_token_ids)
        resolved["autocast_forward"] = hasattr(trainer.accelerator.unwrap_model(trainer.model), "_original_forward")
        resolved["torch_threads"] = torch.get_num_threads()
        logged = [
            {k: v for k, v in e.items() if k in ("completions/mean_length", "reward", "kl", "entropy", "step_time")}
            for e in trainer.state.log_history
            if "reward" in e
        ]
    if len(clock.steps) != spec.warmup + spec.steps:
        raise RuntimeError(f"TRL ran {len(clock.steps)} optimizer steps, expected {spec.warmup + spec.steps}")
    steps = clock.steps[spec.warmup :]
    return {
        "steps": steps,
        "n_params": n_params,
        "rss_after_load_mb": rss_load,
        "trl_args": resolved,
        "trl_logged": logged[spec.warmup :],
    }


# ------------------------------------------------------------------------------------------ parent
def _peak(spec: bench.BenchSpec, precision: str) -> float | None:
    if spec.peak_seconds <= 0:
        return None
    return bench.matmul_peak(spec.peak_seconds, spec.threads, (precision,))[precision]


def _decode_peak(spec: bench.BenchSpec, precision: str) -> float | None:
    """The decoding step's products alone at the rollout's rows (prompts × G): :func:`bench.decode_matmul_peak`."""
    if spec.peak_seconds <= 0:
        return None
    rows = spec.prompts * spec.group_size
    return bench.decode_matmul_peak(spec.model, rows, spec.peak_seconds, spec.threads, precision)


def _measure(spec: bench.BenchSpec, log: Callable[[str], None]) -> dict[str, dict[str, list[dict]]]:
    """All repetitions: per β run and precision, one child per side, back to back, the order alternating per
    repetition; the matmul peak right before and after each child, the decode-shaped peak once per precision
    (before its first child). Returns β run → path → children."""
    paths = [f"{side}-{p}" for p in spec.precisions for side in SIDES]
    runs: dict[str, dict[str, list[dict]]] = {b: {p: [] for p in paths} for b in spec.betas}
    decode_peaks: dict[str, float | None] = {}  # per precision, measured once (before its first child)
    for rep in range(spec.repeats):
        for which in spec.betas:
            for prec in spec.precisions:
                for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                    job = {
                        "kind": "ours" if side == "rlhf-pg" else "trl",
                        "beta": which,
                        "precision": prec,
                        "spec": asdict(spec),
                    }
                    t0 = time.perf_counter()
                    if prec not in decode_peaks:
                        decode_peaks[prec] = _decode_peak(spec, prec)
                    before = _peak(spec, prec)
                    res = bench._launch(job, spec.in_process)
                    after = _peak(spec, prec)
                    used = (before + after) / 2 if before is not None and after is not None else None
                    res["matmul_peak"] = {"precision": prec, "before": before, "after": after, "used": used}
                    res["decode_matmul_peak"] = decode_peaks[prec]
                    res["repetition"] = rep
                    runs[which][f"{side}-{prec}"].append(res)
                    tokens = bench._median([s["completion_tokens"] for s in res["steps"]])
                    log(
                        f"[bench] rep {rep + 1}/{spec.repeats} β={bench._beta(spec, which):g} {side}-{prec:>4}: step "
                        f"{bench._median([s['step'] for s in res['steps']]):.2f} s, {tokens:.0f} completion tokens, "
                        f"peak RSS {res['peak_rss_mb']:.0f} MB (child {time.perf_counter() - t0:.0f} s)"
                    )
    return runs


def _per_step(s: dict, n_params: int, beta: float, peak: float | None, decode_peak: float | None = None) -> dict:
    """One measured step with its derived quantities: throughput, FLOPs, MFU against the run's peak, and the
    rollout's FLOP rate against the decode-shaped peak (``rollout_vs_decode_peak``)."""
    s = dict(s)
    tok = s["completion_tokens"]
    s["other"] = s["step"] - sum(s[k] for k in ("rollout", "rewards", "reference", "train"))
    s["s_per_1k_completion_tokens"] = s["step"] / (tok / 1000) if tok else None
    s["completion_tokens_per_s"] = tok / s["step"] if s["step"] > 0 else None
    s["rollout_tokens_per_s"] = tok / s["rollout"] if s["rollout"] > 0 else None
    fl = bench.step_flops(s, n_params, beta)
    for k in ("rollout", "reference", "train", "step"):
        ok = peak is not None and fl[k] > 0 and s[k] > 0
        s[f"mfu_{k}"] = fl[k] / s[k] / peak if ok else None
    ok = decode_peak is not None and fl["rollout"] > 0 and s["rollout"] > 0
    s["rollout_vs_decode_peak"] = fl["rollout"] / s["rollout"] / decode_peak if ok else None
    s["flops"] = fl
    return s


def _side_result(children: list[dict], beta: float, precision: str) -> dict[str, Any]:
    """One side's summary at one β and precision over all its children's measured steps."""
    n_params = children[0]["n_params"]
    for c in children:
        decode_peak = c.get("decode_matmul_peak")
        c["steps"] = [_per_step(s, n_params, beta, c["matmul_peak"]["used"], decode_peak) for s in c["steps"]]
    steps = [s for c in children for s in c["steps"]]
    numeric = [k for k, v in steps[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    numeric += [  # None in some steps
        k for k in steps[0] if (k.startswith("mfu_") or k == "rollout_vs_decode_peak") and k not in numeric
    ]
    r = {
        "precision": precision,
        "median": {k: bench._median([s[k] for s in steps]) for k in numeric},
        "peak_rss_mb": bench._median([c["peak_rss_mb"] for c in children]),
        "rss_after_load_mb": bench._median([c["rss_after_load_mb"] for c in children]),
        "n_params": n_params,
        "flops": {k: bench._median([s["flops"][k] for s in steps]) for k in steps[0]["flops"]},
        "matmul_peak_flop_per_s": bench._median([c["matmul_peak"]["used"] for c in children]),
        "decode_matmul_peak_flop_per_s": bench._median([c.get("decode_matmul_peak") for c in children]),
        "runs": [
            {"repetition": c["repetition"], "peak_rss_mb": c["peak_rss_mb"], "matmul_peak": c["matmul_peak"]}
            for c in children
        ],
        "steps": steps,
    }
    if "trl_args" in children[0]:
        r["trl_args"] = children[0]["trl_args"]
        r["same_prompts_as_ours"] = all(s.get("same_prompts_as_ours") for s in steps)
        r["old_logprob_passes"] = sum(s["old_logprob_passes"] for s in steps)
        r["trl_logged"] = [e for c in children for e in c["trl_logged"]]
    return r


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and a > 1e-9 and b > 1e-9 else None


def _ratios(ours: list[dict], trl: list[dict]) -> dict[str, float | None]:
    """rlhf-pg / TRL: within each repetition the ratio of the two sides' medians, then the median over
    repetitions (None where a side has no such phase, e.g. the reference at β = 0)."""
    per_rep: dict[str, list] = {k: [] for k in (*RATIO_KEYS, "peak_rss")}
    for o, t in zip(ours, trl):
        for k in RATIO_KEYS:
            per_rep[k].append(
                _ratio(bench._median([s[k] for s in o["steps"]]), bench._median([s[k] for s in t["steps"]]))
            )
        per_rep["peak_rss"].append(_ratio(o["peak_rss_mb"], t["peak_rss_mb"]))
    return {k: bench._median(v) for k, v in per_rep.items()}


def run_trl_comparison(spec: bench.BenchSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole comparison; the report's shape is :func:`format_table`'s input (and ``--json``'s)."""
    from rlhf_pg import metrics

    version = check_available()
    started = time.perf_counter()
    machine = bench._machine(spec)
    machine["trl"] = version
    from rlhf_pg.models import resolve_model

    log(f"[bench] model {spec.model}: {resolve_model(spec.model)}; against TRL {version} GRPOTrainer")
    runs = _measure(spec, log)
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for which in spec.betas:
        beta = bench._beta(spec, which)
        key = f"beta={beta:g}"
        results[key], ratios[key] = {}, {}
        for p in spec.precisions:
            for side in SIDES:
                results[key][f"{side}-{p}"] = _side_result(runs[which][f"{side}-{p}"], beta, p)
            ratios[key][p] = _ratios(runs[which][f"rlhf-pg-{p}"], runs[which][f"trl-{p}"])
    config = grpo_config_kwargs(spec, bench._beta(spec, spec.betas[0]), spec.precisions[0], "<tmp>")
    config.pop("output_dir")
    config["bf16"] = "per precision: true for bf16, false for fp32"
    config["beta"] = "per run: " + ", ".join(f"{bench._beta(spec, b):g}" for b in spec.betas)
    return {
        "against": "trl",
        "workload": {k: v for k, v in asdict(spec).items() if k not in ("in_process",)},
        "machine": machine,
        "c_heap": bench.heaps(spec),
        "trl_grpo_config": config,
        "flop_formula": metrics.FLOP_FORMULA,
        "matmul_peak": "per run: the mean of the peak measured right before and right after the child",
        "decode_matmul_peak": "per precision, once: one decoding step's products alone (every nn.Linear of the "
        "model at prompts x G rows, model-sized random weights), best of ~peak_seconds",
        "peak_rss": "VmHWM (own high-water mark) of each child process, median over repetitions",
        "ratio_definition": "rlhf-pg / TRL per repetition (ratio of the medians), median over repetitions",
        "results": results,
        "ratio": ratios,
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------- table
_ROWS = (
    ("step", "step (s)", "{:.3f}"),
    ("rollout", "rollout (s)", "{:.3f}"),
    ("reference", "reference (s)", "{:.3f}"),
    ("train", "train (s)", "{:.3f}"),
    ("rewards", "rewards (s)", "{:.3f}"),
    ("step_cpu", "step CPU time (s)", "{:.3f}"),
    ("completion_tokens", "completion tok/step", "{:.0f}"),
    ("s_per_1k_completion_tokens", "s / 1k completion tok", "{:.3f}"),
    ("completion_tokens_per_s", "completion tok/s", "{:.1f}"),
    ("rollout_tokens_per_s", "rollout tok/s", "{:.1f}"),
)
_MFU_ROWS = (("mfu_rollout", "MFU rollout"), ("mfu_reference", "MFU reference"), ("mfu_train", "MFU train"))


def _row(label: str, vals: list, ratios: list | None = None, fmt: str = "{:.2f}") -> str:
    """One table row: the label, a value per path ('-' for None) and, optionally, the ratio columns."""
    s = f"{label:<22}" + "".join(f"{(fmt.format(v) if v is not None else '-'):>14}" for v in vals)
    if ratios is not None:
        s += "".join(f"{(f'{r:.2f}x' if r is not None else '-'):>18}" for r in ratios)
    return s


def format_table(report: dict) -> str:
    """Plain-text tables: per β, each side's medians in each precision and the ratios rlhf-pg / TRL."""
    w, m = report["workload"], report["machine"]
    load = "/".join(f"{x:.2f}" for x in m["loadavg_at_start"]) if m["loadavg_at_start"] else "?"
    lines = [
        f"workload: {w['model']}, {w['prompts']} prompts x {w['group_size']} samples, <= {w['max_new_tokens']} new "
        f"tokens, T={w['temperature']:g}, lr {w['lr']:g}, micro-batch {w['micro_batch_size']}; "
        f"{w['repeats']} repetitions x {w['steps']} step(s) after {w['warmup']} warm-up; medians",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, load average at start {load}; "
        f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}",
        "rlhf-pg: Trainer.step() (token-mean, micro-batches); TRL: GRPOTrainer, loss_type dapo, scale_rewards "
        "group, use_bias_correction_kl false, gradient_checkpointing false, shuffle_dataset false (ours' prompts); "
        + (
            f"C heap: rlhf-pg {report['c_heap']['rlhf-pg']}; TRL {report['c_heap']['peer']}"
            if "c_heap" in report  # a report written before it was recorded: the option only
            else f"TRL's C heap: --peer-heap {w.get('peer_heap', 'default')}"
        ),
        "FLOPs (both sides alike, each for its own tokens): rollout 2*N*S, reference 2*N*S*[beta>0], train 6*N*S; "
        "MFU vs the matmul peak measured around each run, in the run's precision; the rollout also vs the "
        "decode peak (one decoding step's products alone, every linear of the model at prompts x G rows)",
    ]
    for key, res in report["results"].items():
        paths = list(res)
        precs = list(report["ratio"][key])
        lines += ["", f"== GRPO step, {key}: rlhf-pg vs TRL {m['trl']} ==", ""]
        lines.append(
            f"{'':<22}" + "".join(f"{p:>14}" for p in paths) + "".join(f"{'rlhf-pg/trl ' + p:>18}" for p in precs)
        )
        rat = report["ratio"][key]
        for k, label, fmt in _ROWS:
            lines.append(_row(label, [res[p]["median"].get(k) for p in paths], [rat[q][k] for q in precs], fmt))
        lines.append(
            _row("peak RSS (MB)", [res[p]["peak_rss_mb"] for p in paths], [rat[q]["peak_rss"] for q in precs], "{:.0f}")
        )
        lines.append(_row("RSS after load (MB)", [res[p]["rss_after_load_mb"] for p in paths], fmt="{:.0f}"))
        peaks = [res[p]["matmul_peak_flop_per_s"] for p in paths]
        if any(v is not None for v in peaks):
            lines.append(_row("matmul peak (GFLOP/s)", [v / 1e9 if v else None for v in peaks], fmt="{:.1f}"))
            for k, label in (*_MFU_ROWS, ("mfu_step", "MFU step")):
                vals = [res[p]["median"].get(k) for p in paths]
                if any(v is not None for v in vals):
                    lines.append(
                        _row(
                            label,
                            [100 * v if v is not None else None for v in vals],
                            [rat[q][k] for q in precs],
                            "{:.1f}%",
                        )
                    )
        dpeaks = [res[p].get("decode_matmul_peak_flop_per_s") for p in paths]
        if any(v is not None for v in dpeaks):
            rows = w["prompts"] * w["group_size"]
            lines.append(_row(f"decode peak, {rows} rows", [v / 1e9 if v else None for v in dpeaks], fmt="{:.1f}"))
            vals = [res[p]["median"].get("rollout_vs_decode_peak") for p in paths]
            lines.append(
                _row(
                    "rollout/decode peak",
                    [100 * v if v is not None else None for v in vals],
                    [rat[q].get("rollout_vs_decode_peak") for q in precs],
                    "{:.1f}%",
                )
            )
        head = ", ".join(
            f"{q} {rat[q]['completion_tokens_per_s']:.2f}x" for q in precs if rat[q]["completion_tokens_per_s"]
        )
        lines.append(f"headline, completion tokens/s rlhf-pg / TRL: {head}")
        same = [p for p in paths if p.startswith("trl-") and not res[p].get("same_prompts_as_ours", True)]
        lines.append(
            "  (ratio columns: rlhf-pg / TRL, median over repetitions; above 1 = rlhf-pg higher, so for times and RSS "
            "below 1 is better. 'train' = forward + backward + AdamW of all micro-batches"
            + ("; WARNING: TRL's prompts differed from ours in " + ", ".join(same) if same else "")
            + ")"
        )
    return "\n".join(lines)
