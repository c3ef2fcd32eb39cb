"""CLI: help lists the commands, the happy path trains, user errors are one line with exit code 2."""

import subprocess
import sys

import pytest
from conftest import cpu_subprocess_env

from rlhf_pg.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "config", "eval", "plot", "variance"):
        assert command in out


def test_config_lists_options(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "algo.kl_coef" in out and "batch.group_size" in out and "algo.gae.lam" in out


def test_train_happy_path(tmp_path, capsys, tiny_recipe):
    recipe = tiny_recipe(
        tmp_path, rewards={"functions": [{"name": "length_penalty", "kwargs": {"target": 2, "scale": 1}}]}
    )
    rc = main(["train", str(recipe), f"output_dir={tmp_path / 'out'}", "train.max_steps=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and str(tmp_path / "out") in out
    assert "batch plan: 8 completions = 2 prompts × 4" in out  # the plan is printed at start
    assert (tmp_path / "out" / "model" / "config.json").exists()


def test_user_error_is_one_line_exit_2_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_pg", "train", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        env=cpu_subprocess_env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "missing.yaml" in proc.stderr and "not found" in proc.stderr


def test_bad_override_exit_2(capsys):
    assert main(["config", "recipes/grpo_arithmetic.yaml", "algo.kl_cof=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'algo.kl_coef'" in err


@pytest.mark.parametrize(
    "argv, want",
    [
        (
            ["train", "r.yaml", "--resume", "train.max_steps=2", "--num-processes", "1", "algo.kl_coef=0.1"],
            {"recipe": "r.yaml", "overrides": ["train.max_steps=2", "algo.kl_coef=0.1"], "resume": True},
        ),
        (["config", "r.yaml", "algo.name=rloo"], {"recipe": "r.yaml", "overrides": ["algo.name=rloo"]}),
        (
            ["eval", "runs/x", "--k", "4", "data.eval_limit=50", "--samples", "8"],
            {"target": "runs/x", "overrides": ["data.eval_limit=50"], "k": 4, "samples": 8},
        ),
        (["plot", "runs/a", "--out", "d.png", "runs/b"], {"runs": ["runs/a", "runs/b"], "out": "d.png"}),
        (
            ["variance", "r.yaml", "--repeats", "3", "model.name=x", "--out", "v"],
            {"recipe": "r.yaml", "overrides": ["model.name=x"], "repeats": 3, "out": "v"},
        ),
        (["bench", "--steps", "2", "--precision", "fp32"], {"steps": 2, "precision": "fp32"}),
    ],
)
def test_flags_and_overrides_in_any_order(argv, want):
    """What people type: flags before, between and after the key=value overrides, for every subcommand."""
    from rlhf_pg.cli import parse_args

    args = parse_args(argv)
    assert args.command == argv[0]
    for key, value in want.items():
        assert getattr(args, key) == value, key
