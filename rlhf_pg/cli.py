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
    p = argparse.ArgumentParser(
        prog="rlhf-pg",
        description="Policy-gradient RL fine-tuning (REINFORCE, RLOO, GRPO, PPO) for Hugging Face causal LMs.",
        epilog="Run 'rlhf-pg COMMAND --help' for a command's options. Recipes live in recipes/.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a policy from a YAML recipe",
                       description="Train from a YAML recipe; any option can be overridden as dotted key=value "
                                   "(e.g. train.max_steps=5 algo.kl_coef=0.02). 'rlhf-pg config' lists the options.")
    t.add_argument("recipe", help="path of the YAML recipe, e.g. recipes/grpo_arithmetic.yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe options")

    c = sub.add_parser("config", help="list every option with its default and meaning, or print a resolved recipe",
                       description="Without a recipe: list all options. With one: print the resolved config.")
    c.add_argument("recipe", nargs="?", help="recipe to resolve (optional)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    return p


def _cmd_train(args) -> int:
    os.environ.setdefault("TQDM_DISABLE", "0")
    from .config import load_config

    cfg = load_config(args.recipe, args.overrides)
    from .trainer import Trainer

    trainer = Trainer(cfg)
    hist = trainer.train()
    if trainer.acc.is_main_process:
        _summary(cfg, hist)
    return 0


def _summary(cfg, hist) -> None:
    start, end = hist.get("eval_start"), hist["eval_end"]
    print("\n=== rlhf-pg run summary ===")
    for key in ("eval/accuracy", "eval/reward"):
        if key in end:
            before = f"{start[key]:.3f}" if start else "n/a"
            print(f"{key.removeprefix('eval/'):>9}: before {before}  ->  after {end[key]:.3f}   (held-out, greedy, n={end['eval/n']})")
    out = cfg.output_dir
    print(f"  metrics: {os.path.join(out, 'metrics.jsonl')}   samples: {os.path.join(out, 'samples.jsonl')}")
    if cfg.train.save_model:
        print(f"    model: {os.path.join(out, 'model')}  (AutoModelForCausalLM.from_pretrained loads it)")


def _cmd_config(args) -> int:
    from .config import describe_fields, dump_config, load_config

    if args.recipe is None and not args.overrides:
        for key, default, doc in describe_fields():
            print(f"{key} = {default}\n    {doc}")
        return 0
    print(dump_config(load_config(args.recipe, args.overrides)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"train": _cmd_train, "config": _cmd_config}
    try:
        return handlers[args.command](args)
    except UserError as e:
        print(f"rlhf-pg: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("rlhf-pg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
