"""Command line: ``rlhf-pg train RECIPE.yaml [key=value ...]`` and friends.

Thin on purpose: it parses arguments, builds the config and hands over. Errors in user input
(:class:`UserError`) are printed as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    """The ``rlhf-pg`` parser: one subcommand per ``_add_*`` helper below."""
    p = argparse.ArgumentParser(
        prog="rlhf-pg",
        description="Policy-gradient RL fine-tuning (REINFORCE, RLOO, GRPO, PPO) for Hugging Face causal LMs.",
        epilog="Run 'rlhf-pg COMMAND --help' for a command's options. Recipes live in recipes/.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_config(sub)
    _add_eval(sub)
    _add_plot(sub)
    _add_variance(sub)
    _add_bench(sub)
    _add_push(sub)
    return p


def _add_push(sub) -> None:
    """``rlhf-pg push RUN_DIR REPO``."""
    pu = sub.add_parser(
        "push",
        help="upload a trained model (or adapter), its card and config to the Hub",
        description="Upload RUN_DIR/model (or a model directory) to the Hub model repo REPO.",
    )
    pu.add_argument("run", metavar="RUN_DIR", help="a run directory (its model/) or a saved model directory")
    pu.add_argument("repo", metavar="REPO", help="Hub model repo, e.g. user/my-grpo-model")


def _add_train(sub) -> None:
    """``rlhf-pg train RECIPE [key=value ...] [--resume] [--num-processes N]``."""
    t = sub.add_parser(
        "train",
        help="train a policy from a YAML recipe",
        description="Train from a YAML recipe; any option can be overridden as dotted key=value "
        "(e.g. train.max_steps=5 algo.kl_coef=0.02). 'rlhf-pg config' lists the options.",
    )
    t.add_argument("recipe", help="path of the YAML recipe, e.g. recipes/grpo_arithmetic.yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe options")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in output_dir (same as train.resume=true)",
    )
    t.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes: relaunches itself with 'accelerate launch' (GPUs if present, "
        "else CPU processes over gloo). For other setups call 'accelerate launch -m rlhf_pg train ...'",
    )


def _add_config(sub) -> None:
    """``rlhf-pg config [RECIPE] [key=value ...]``."""
    c = sub.add_parser(
        "config",
        help="list every option with its default and meaning, or print a resolved recipe",
        description="Without a recipe: list all options. With one: print the resolved config.",
    )
    c.add_argument("recipe", nargs="?", help="recipe to resolve (optional)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")


def _add_eval(sub) -> None:
    """``rlhf-pg eval MODEL_OR_RUN [key=value ...] [--recipe] [--k] [--samples] [--out]``."""
    e = sub.add_parser(
        "eval",
        help="evaluate a model, run directory or checkpoint on a recipe's eval split",
        description="Greedy reward per function, accuracy and completion length on the recipe's "
        "eval split; with --k > 1 also sampled reward and unbiased pass@k. Writes "
        "eval.json and eval_samples.jsonl.",
    )
    e.add_argument(
        "target",
        metavar="MODEL_OR_RUN",
        help="model alias, hub id or save_pretrained directory; a run directory (config.yaml + "
        "model/); or a LoRA adapter directory",
    )
    e.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe options")
    e.add_argument("--recipe", help="YAML recipe (data, rewards, sampling); default: the run's config.yaml")
    e.add_argument(
        "--k", type=int, default=1, help="report pass@k (k sampled completions per prompt; default 1: greedy only)"
    )
    e.add_argument(
        "--samples",
        type=int,
        default=None,
        metavar="N",
        help="sampled completions per prompt (n >= k; default k) for the unbiased pass@k estimator",
    )
    e.add_argument("--out", help="output directory (default: the run directory, else ./eval_<name>)")


def _add_plot(sub) -> None:
    """``rlhf-pg plot RUN_DIR [RUN_DIR ...] [--out PNG]``."""
    pl = sub.add_parser(
        "plot",
        help="PNG dashboard of one or more runs' metrics.jsonl",
        description="Reward (and per function), eval accuracy/reward, KL and its coefficient, "
        "entropy, completion length, clip fractions, value loss and explained "
        "variance against the step; several runs are overlaid.",
    )
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    pl.add_argument("--out", help="PNG path (default: FIRST_RUN_DIR/dashboard.png)")


def _add_variance(sub) -> None:
    """``rlhf-pg variance RECIPE [key=value ...]`` and the gradient-variance lab's options."""
    v = sub.add_parser(
        "variance",
        help="gradient-variance lab: compare policy-gradient estimators at a policy",
        description="Estimate the policy gradient with several estimators (REINFORCE, reward-to-go, "
        "baselines, RLOO, GRPO, optimal baseline) from the same sampled completions, "
        "on K batches of each size N; report variance, gradient norm, SNR and cosine; "
        "write variance.json and a log-log PNG.",
    )
    v.add_argument("recipe", help="YAML recipe (its model, prompts, rewards and sampling)")
    v.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.name=runs/x/model")
    v.add_argument(
        "--batch-sizes",
        default=None,
        metavar="N1,N2,...",
        help="completions per batch, multiples of batch.group_size (default: G,2G,4G)",
    )
    v.add_argument("--repeats", type=int, default=8, metavar="K", help="independent batches per size (default 8)")
    v.add_argument(
        "--proj-dim",
        type=int,
        default=512,
        metavar="D",
        help="sketch dimension for the flattened gradient (default 512; 0 = exact, small models only)",
    )
    v.add_argument(
        "--params",
        default=None,
        metavar="REGEX",
        help="only parameters whose name matches this regex (default: every trainable parameter)",
    )
    v.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    v.add_argument("--out", default=None, help="output directory (default: output_dir of the recipe + '/variance')")


def _add_bench(sub) -> None:
    """``rlhf-pg bench``: its options are the benchmark's own (:func:`rlhf_pg.labs.bench.build_parser`)."""
    bm = sub.add_parser(
        "bench",
        help="benchmark one GRPO step (rlhf-pg vs plain transformers, or vs TRL: --against trl): times, RSS, MFU",
        description="The fixed workload of rlhf_pg/labs/bench.py (SmolLM2-135M-Instruct, 8 prompts "
        "x 4 samples, 64 new tokens, GRPO with and without a reference model), done by "
        "rlhf-pg and the plain transformers way (or TRL's GRPOTrainer, --against trl), each run in its own "
        "process; per-phase times, speed-ups, peak RSS, MFU.",
    )
    from .labs import bench  # standard library only at import time: --help stays fast

    bench.build_parser(bm)


def accelerate_launch(n: int, target: list[str], launcher: str = "accelerate.commands.launch") -> list[str]:
    """The command that runs ``target`` (``-m module ...`` or a script and its arguments) on ``n`` local
    processes under ``accelerate launch``, on a free rendezvous port (two runs on one machine do not collide).
    ``launcher``: the module run as ``accelerate launch`` (``rlhf_pg.launch``: one line for a user error)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = ["--num_processes", str(n), "--num_machines", "1", "--main_process_port", str(port)]
    flags += ["--dynamo_backend", "no", "--mixed_precision", "no", "--multi_gpu"]
    return [sys.executable, "-m", launcher, *flags, *target]


def visible_gpus() -> int:
    """CUDA devices this process can use: 0 without CUDA or with ``CUDA_VISIBLE_DEVICES=`` (empty)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_devices(n: int, gpus: int) -> str:
    """What ``--num-processes n`` runs on, given ``gpus`` visible CUDA devices: ``"cpu"`` (no CUDA: CPU
    processes synchronising over gloo) or ``"gpu"`` (one process per GPU, NCCL). Both launch the same way
    (``--multi_gpu``: torchrun starts the processes; each one's Accelerator picks cuda:LOCAL_RANK or, without
    CUDA, the CPU). Fewer GPUs than processes is a :class:`UserError`: ranks would share a GPU or look for a
    ``cuda:N`` that is not there."""
    if gpus == 0:
        return "cpu"
    if gpus >= n:
        return "gpu"
    raise UserError(
        f"--num-processes {n} needs {n} GPUs, found {gpus}: use --num-processes {gpus}, "
        "or CUDA_VISIBLE_DEVICES= for CPU processes"
    )


def _launch(args) -> int:
    """Re-run this command under ``accelerate launch`` with N processes (thin: accelerate does the work)."""
    import subprocess

    n = args.num_processes
    if n < 1:
        raise UserError(f"--num-processes {n}: give a positive number of processes")
    # The checks that need no model, once and before any process starts (otherwise every process would
    # print the same error after its imports): the recipe, the batch layout over n processes, output_dir.
    from .config import batch_plan, check_backend_processes, load_config
    from .memory import PRELOADED_ENV, allocator_env
    from .run_dir import check_output_dir

    cfg = load_config(args.recipe, args.overrides + (["train.resume=true"] if args.resume else []))
    batch_plan(cfg, n)
    check_backend_processes(cfg, n)
    check_output_dir(cfg)
    launch_devices(n, visible_gpus())  # before any process starts
    heap = allocator_env(cfg.train.allocator, cfg.train.reuse_freed_memory)  # every process starts with it
    cmd = accelerate_launch(n, ["-m", "rlhf_pg", "train", args.recipe, *args.overrides], "rlhf_pg.launch") + (
        ["--resume"] if args.resume else []
    )
    env = dict(os.environ, **heap, **({PRELOADED_ENV: "1"} if "LD_PRELOAD" in heap else {}))
    # One BLAS/OpenMP pool per process that together fill the cores; oversubscription is very slow.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    import tempfile

    from .launch import ERROR_FILE_ENV, reported

    with tempfile.TemporaryDirectory(prefix="rlhf-pg-launch-", ignore_cleanup_errors=True) as tmp:
        env[ERROR_FILE_ENV] = os.path.join(tmp, "error")  # a process's user error: one line, here, at the end
        rc = subprocess.call(cmd, env=env)
        message = reported(env[ERROR_FILE_ENV])
    if message is not None:
        raise UserError(message)
    return rc


def _cmd_train(args) -> int:
    os.environ.setdefault("TQDM_DISABLE", "0")
    if args.num_processes != 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args)
    from .config import load_config

    cfg = load_config(args.recipe, args.overrides + (["train.resume=true"] if args.resume else []))
    if args.from_command_line:  # not for main([...]) called in a Python process: it would be replaced
        from .memory import exec_with_allocator

        exec_with_allocator(cfg.train.allocator, cfg.train.reuse_freed_memory)  # before torch is imported
    from .run_dir import check_output_dir

    check_output_dir(cfg)  # a previous run or a live one in output_dir: say so before loading anything
    from .trainer import Interrupted, Trainer

    trainer = Trainer(cfg)
    try:
        hist = trainer.train()
    except Interrupted as stop:
        if trainer.acc.is_main_process:
            again = " ".join(["rlhf-pg train", args.recipe, *args.overrides, "--resume"])
            print(
                f"rlhf-pg: stopped after step {stop.step}; checkpoint saved in {stop.path}\nresume with: {again}",
                file=sys.stderr,
            )
        return 128 + stop.signum
    if trainer.acc.is_main_process:
        _summary(cfg, hist)
    return 0


def _summary(cfg, hist) -> None:
    start, end = hist.get("eval_start"), hist["eval_end"]
    print("\n=== rlhf-pg run summary ===")
    for key in ("eval/accuracy", "eval/reward"):
        if key in end:
            before = f"{start[key]:.3f}" if start else "n/a"
            name, after, n = key.removeprefix("eval/"), end[key], end["eval/n"]
            print(f"{name:>9}: before {before}  ->  after {after:.3f}   (held-out, greedy, n={n})")
    out = cfg.output_dir
    print(f"  metrics: {os.path.join(out, 'metrics.jsonl')}   samples: {os.path.join(out, 'samples.jsonl')}")
    if cfg.train.save_model:
        model = os.path.join(out, "model")
        if cfg.model.lora is None:
            print(f"    model: {model}  (AutoModelForCausalLM.from_pretrained loads it)")
        else:
            print(f"  adapter: {model}  (peft: PeftModel.from_pretrained(base_model, path) loads it)")
            if cfg.model.lora.save_merged:
                print(f"   merged: {os.path.join(model, 'merged')}  (AutoModelForCausalLM.from_pretrained loads it)")


def _cmd_config(args) -> int:
    from .config import describe_fields, dump_config, load_config

    if args.recipe is None and not args.overrides:
        for key, default, doc in describe_fields():
            print(f"{key} = {default}\n    {doc}")
        return 0
    print(dump_config(load_config(args.recipe, args.overrides)), end="")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import format_report, run_eval

    report = run_eval(args.target, args.recipe, args.overrides, k=args.k, n_samples=args.samples, out=args.out)
    print(format_report(report))
    return 0


def _cmd_plot(args) -> int:
    from .plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


def _cmd_variance(args) -> int:
    from .labs.variance import run_variance_cli

    run_variance_cli(
        args.recipe,
        args.overrides,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        proj_dim=args.proj_dim,
        params=args.params,
        threads=args.threads,
        out=args.out,
    )
    return 0


def _cmd_bench(args) -> int:
    from .labs.bench import run_from_args

    run_from_args(args)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; a subcommand's flags and ``key=value`` overrides may come in any order
    (``train recipe.yaml --resume train.max_steps=2``), as people type them."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in subcommands:
        return parser.parse_args(argv)  # no subcommand: the top-level help (or an error naming the choices)
    args = subcommands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def _cmd_push(args) -> int:
    from .model_card import push

    print(f"pushed to {push(args.run, args.repo)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.from_command_line = argv is None
    if args.command is None:
        parser = _parser()
        parser.print_help()
        return 0
    handlers = {
        "train": _cmd_train,
        "config": _cmd_config,
        "eval": _cmd_eval,
        "plot": _cmd_plot,
        "variance": _cmd_variance,
        "bench": _cmd_bench,
        "push": _cmd_push,
    }
    try:
        return handlers[args.command](args)
    except UserError as e:
        from .launch import leave_for_launcher

        if not leave_for_launcher(str(e)):  # under --num-processes N the launching CLI prints it, once
            print(f"rlhf-pg: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("rlhf-pg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
