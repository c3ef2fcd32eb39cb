"""Time to the error: every fail-fast check of ``rlhf-pg train`` / ``rlhf-pg eval``, run as a user would.

Each case below is a mistake a user makes (a config key, a data file, a reward function, an
environment, the process layout, the run directory). This script runs each one through the real CLI in
a fresh process on a recipe (default: the main recipe, ``recipes/grpo_arithmetic.yaml`` with
SmolLM2-135M) and prints, per case, the exit code, the seconds from the start of the process to its
exit, and the one line it printed — the figures of the README's error table::

    .venv/bin/python scripts/time_to_error.py                  # all cases, main recipe
    .venv/bin/python scripts/time_to_error.py --json t.json    # also write the rows

Every case must exit with status 2 and one line ``rlhf-pg: error: ...`` on stderr. Most are checks
that need no model and come before any weights are read; ``tests/test_fail_fast.py`` runs the same
cases in-process on the tiny model with the model loader made to fail, which proves the order; this
script measures how long a user waits for each message (mostly Python importing torch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VOWELS = "def vowels(completions, **kwargs):\n    return [float(sum(c in 'aeiou' for c in x)) for x in completions]\n"


@dataclass(frozen=True)
class Case:
    """A user mistake: ``args`` after the recipe (``{d}`` is a scratch directory), files written into
    the scratch directory first, and a phrase the one-line error must contain. ``command`` is train or
    eval; ``previous_run``/``live_run`` prepare ``output_dir``; ``needs_model``: the error is about the
    model itself, so it cannot come before the model's files are read."""

    name: str
    args: tuple[str, ...]
    expect: str
    files: dict[str, str] = field(default_factory=dict)
    command: str = "train"
    previous_run: bool = False
    live_run: bool = False
    needs_model: bool = False
    recipe: str | None = None  # replaces the recipe (e.g. a missing file)


CASES: tuple[Case, ...] = (
    Case("unknown config key", ("algo.kl_cof=0.1",), "unknown config key 'algo.kl_cof'"),
    Case("value out of range", ("train.lr=-1",), "train.lr"),
    Case("impossible combination", ("batch.group_size=1",), "batch.group_size >= 2"),
    Case("missing recipe file", (), "not found", recipe="{d}/nope.yaml"),
    Case("malformed recipe YAML", (), "not valid YAML", files={"bad.yaml": "seed: [1,\n"}, recipe="{d}/bad.yaml"),
    Case(
        "batch not divisible by processes",
        ("batch.prompts_per_step=3", "--num-processes", "2"),
        "not divisible by the 2 processes",
    ),
    Case(
        "vllm engine on several processes",
        ("rollout.backend=vllm", "--num-processes", "2"),
        "runs one engine in one process",
    ),
    Case("a previous run in output_dir", (), "already holds a run", previous_run=True),
    Case("output_dir in use by a live run", (), "is in use by a running rlhf-pg", live_run=True),
    Case("data file missing", ("data.train={d}/missing.jsonl", "data.eval=null"), "does not exist"),
    Case(
        "data without the prompt column",
        ("data.train={d}/q.jsonl", "data.eval=null", "data.eval_split=train"),
        "has no prompt column 'prompt'",
        files={"q.jsonl": '{"question": "1+1?"}\n{"question": "2+2?"}\n'},
    ),
    Case(
        "empty data file",
        ("data.train={d}/empty.jsonl", "data.eval=null", "data.eval_split=train"),
        "has no rows",
        files={"empty.jsonl": ""},
    ),
    Case(
        "reward function file missing",
        ("rewards.functions=[{name: '{d}/nope.py:score'}]",),
        "nope.py",
    ),
    Case(
        "reward function name missing in its file",
        ("rewards.functions=[{name: '{d}/rw.py:vowel'}]",),
        "vowel",
        files={"rw.py": VOWELS},
    ),
    Case(
        "reward function needs a column the data lacks",
        ("rewards.functions=[{name: '{d}/need.py:f'}]",),
        "needs keyword 'solution'",
        files={"need.py": "def f(completions, solution, **kw):\n    return [0.0] * len(completions)\n"},
    ),
    Case(
        "eval data lacks a column a reward function needs",
        (
            "data.train={d}/train.jsonl",
            "data.eval={d}/eval.jsonl",
            "data.eval_split=train",
            "rewards.functions=[{name: '{d}/need.py:f'}]",
        ),
        "eval data",
        files={
            "train.jsonl": '{"prompt": "1+1?", "solution": "2"}\n{"prompt": "2+2?", "solution": "4"}\n',
            "eval.jsonl": '{"prompt": "3+3?"}\n',
            "need.py": "def f(completions, solution, **kw):\n    return [0.0] * len(completions)\n",
        },
    ),
    Case("environment file missing", ("rollout.env={d}/nope.py:Game",), "nope.py"),
    Case(
        "environment without step()",
        ("rollout.env={d}/env.py:Game",),
        "step",
        files={"env.py": "class Game:\n    def reset(self, row):\n        return None\n"},
    ),
    Case(
        "tool without type hints",
        ("rollout.tools=[{d}/tool.py:add]",),
        "add",
        files={"tool.py": "def add(a, b):\n    return a + b\n"},
    ),
    Case("model path missing", ("model.name={d}/no-model",), "does not exist", needs_model=True),
    Case("eval: unknown config key", ("algo.kl_cof=0.1",), "unknown config key", command="eval"),
    Case(
        "eval: reward function file missing",
        ("rewards.functions=[{name: '{d}/nope.py:score'}]",),
        "nope.py",
        command="eval",
    ),
    Case("eval: data file missing", ("data.eval={d}/missing.jsonl",), "does not exist", command="eval"),
)


def prepare(case: Case, scratch: Path, recipe: str, model: str) -> tuple[list[str], Path]:
    """Write the case's files; return (the CLI arguments after ``rlhf-pg``, its output_dir). An eval
    case evaluates ``model`` (the recipe's own)."""
    scratch.mkdir(parents=True, exist_ok=True)
    for name, text in case.files.items():
        (scratch / name).write_text(text)
    out = scratch / "run"
    if case.previous_run:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
    args = [a.replace("{d}", str(scratch)) for a in case.args]
    target = (case.recipe or recipe).replace("{d}", str(scratch))
    if case.command == "eval":
        return ["eval", model, "--recipe", target, "--out", str(scratch / "ev"), *args], out
    return ["train", target, f"output_dir={out}", *args], out


def run_case(case: Case, scratch: Path, recipe: str) -> dict:
    """Run one case in a fresh process; the row of the table."""
    from rlhf_pg.run_dir import DirLock

    argv, out = prepare(case, scratch, recipe, model_of(recipe))
    lock = DirLock(out) if case.live_run else None  # this process plays the live run
    env = dict(os.environ, TQDM_DISABLE="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "rlhf_pg", *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if lock is not None:
        lock.release()
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("rlhf-pg: error: ")]
    ok = p.returncode == 2 and len(errors) == 1 and case.expect in errors[0] and "Traceback" not in p.stderr
    return {
        "case": case.name,
        "command": case.command,
        "exit": p.returncode,
        "seconds": round(seconds, 2),
        "ok": ok,
        "line": errors[0].removeprefix("rlhf-pg: error: ") if errors else (lines[-1] if lines else ""),
    }


def model_of(recipe: str) -> str:
    import yaml

    return yaml.safe_load(Path(recipe).read_text())["model"]["name"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/grpo_arithmetic.yaml")
    ap.add_argument("--scratch", default="runs/time_to_error")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--markdown", action="store_true", help="also print the rows as a Markdown table")
    args = ap.parse_args(argv)
    import platform
    import shutil

    root = Path(args.scratch)
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for i, case in enumerate(CASES):
        row = run_case(case, root / f"case{i:02d}", args.recipe)
        rows.append(row)
        flag = "ok " if row["ok"] else "BAD"
        print(f"{flag} {row['seconds']:6.2f} s  exit {row['exit']}  {case.command:5s} {case.name}: {row['line']}")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(
        f"\n{sum(r['ok'] for r in rows)}/{len(rows)} cases gave one line and exit 2 ({args.recipe}; {cpu}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()})"
    )
    if args.markdown:
        print(
            "\n| mistake | command | seconds to the error | the line (after `rlhf-pg: error: `) |\n|---|---|---:|---|"
        )
        for r in rows:
            line = r["line"].replace("|", "\\|")
            print(f"| {r['case']} | {r['command']} | {r['seconds']:.1f} | {line} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, "cpu": cpu, "rows": rows}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
