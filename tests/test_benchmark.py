"""Benchmark (rlhf_pg/labs/bench.py, ``rlhf-pg bench``, scripts/benchmark.py): the report's structure on
the tiny model, both paths doing the same work, ours matching the exact fp32 log-probs and gradient, the
children's peak RSS being their own, the CLI wiring. No timing assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_pg import cli
from rlhf_pg.labs import bench

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    model="tiny-random-llama",
    prompts=2,
    group_size=2,
    max_new_tokens=4,
    micro_batch_size=2,
    n_train=16,
    repeats=1,
    steps=1,
    threads=1,
    peak_seconds=0.05,
)
TINY_ARGS = [
    "--model",
    "tiny-random-llama",
    "--prompts",
    "2",
    "--group-size",
    "2",
    "--max-new-tokens",
    "4",
    "--micro-batch-size",
    "2",
    "--n-train",
    "16",
    "--repeats",
    "1",
    "--threads",
    "1",
]


def test_report_structure_same_work_and_exact_fp32():
    spec = bench.BenchSpec(**TINY, precisions=["fp32", "bf16"], in_process=True)
    report = bench.run_benchmark(spec, log=lambda s: None)
    json.dumps(report)  # --json writes it as is

    assert set(report["results"]) == set(report["speedup"]) == {"beta=0.04", "beta=0"}
    assert set(report["matmul_peak_flop_per_s"]) == {"fp32", "bf16"}
    for key, res in report["results"].items():
        beta = 0.04 if key == "beta=0.04" else 0.0
        assert set(res) == {"ours-fp32", "ours-bf16", "baseline"}
        for path, r in res.items():
            assert set(bench.PHASES) <= set(r["median"]) and all(r["median"][p] >= 0 for p in bench.PHASES)
            assert r["peak_rss_mb"] > 0 and r["n_params"] > 0 and r["tokens_per_s"] > 0
            assert len(r["steps"]) == spec.repeats * spec.steps
            assert r["precision"] == ("fp32" if path == "baseline" else path.removeprefix("ours-"))
            # FLOPs: the distinct tokens S (each prompt once + completions), 2N per forward, 6N for training
            s = r["steps"][0]
            S = s["prompt_tokens"] + s["completion_tokens"]
            assert bench.step_flops(s, r["n_params"], beta) == {
                "rollout": 2 * r["n_params"] * S,
                "reference": 2 * r["n_params"] * S if beta else 0,
                "train": 6 * r["n_params"] * S,
                "step": (10 if beta else 8) * r["n_params"] * S,
            }
            assert set(r["mfu"]) == {"rollout", "reference", "train", "step"}
            assert all(r["mfu"][k] > 0 for k in ("rollout", "train", "step"))
            assert (r["mfu"]["reference"] is None) == (beta == 0)
        # The same work: the same prompts; the tiny random model never samples EOS within 4 tokens, so
        # both paths generate prompts × G × max_new_tokens tokens and train on the same token count.
        base = res["baseline"]["median"]
        for path in ("ours-fp32", "ours-bf16"):
            ours = res[path]["median"]
            assert ours["completion_tokens"] == base["completion_tokens"] == 2 * 2 * 4
            assert ours["prompt_tokens"] == base["prompt_tokens"] > 0
            assert ours["seq_tokens"] == base["seq_tokens"] == 2 * base["prompt_tokens"] + 16
            assert res[path]["flops"] == res["baseline"]["flops"]  # both paths credited the same FLOPs
            assert set(bench.PHASES) | {"peak_rss", "rollout_tokens_per_s"} <= set(report["speedup"][key][path])
    # β = 0: ours loads and runs no reference model, so that phase has no speed-up to report; the
    # baseline still runs its old-log-prob pass there
    assert report["results"]["beta=0"]["ours-fp32"]["median"]["reference"] < 1e-3
    assert report["results"]["beta=0"]["baseline"]["median"]["reference"] > 0
    assert report["speedup"]["beta=0"]["ours-fp32"]["reference"] is None

    # In fp32 ours computes the exact quantities the plain full-log-softmax path computes.
    q = report["quality"]["ours-fp32"]
    for k in ("logp_rollout_vs_exact", "logp_train_vs_exact", "logp_reference_vs_exact"):
        assert q[k]["max_abs"] < 1e-4, (k, q[k])
    assert q["grad_cosine"] > 0.9999 and q["grad_rel_err"] < 1e-3
    # bf16 autocast: close, not exact (the exact pass runs without Accelerate's autocast wrapper)
    q = report["quality"]["ours-bf16"]
    assert q["grad_cosine"] > 0.99 and q["logp_train_vs_exact"]["mean_abs"] > 0

    table = bench.format_table(report)
    for text in (
        "== GRPO step, beta=0.04 ==",
        "== GRPO step, beta=0 ==",
        "x ours-fp32",
        "x ours-bf16",
        "step CPU time (s)",
        "ref + old logp (s)",
        "peak RSS (MB)",
        "MFU train",
        "MFU reference",
        "FLOPs (both paths alike)",
        "quality",
    ):
        assert text in table, text
    beta0 = table[table.index("== GRPO step, beta=0 ==") : table.index("== quality")]
    assert "MFU reference" not in beta0  # no reference FLOPs at β = 0


def test_cli_bench_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--precision" in out and "--json" in out and "--threads" in out and "--warmup" in out
    args = cli._parser().parse_args(["bench", "--beta", "pos", "--precision", "both", "--repeats", "2", "--lr", "1e-5"])
    spec = bench.spec_from_args(args)
    assert spec.betas == ["pos"] and spec.precisions == ["bf16", "fp32"] and spec.repeats == 2 and spec.lr == 1e-5
    d = bench.spec_from_args(cli._parser().parse_args(["bench"]))
    assert d == bench.BenchSpec()  # the CLI defaults are the documented workload
    assert (d.model, d.prompts, d.group_size, d.max_new_tokens, d.kl_coef) == ("smollm2-135m-instruct", 8, 4, 64, 0.04)
    assert cli.main(["bench", "--steps", "0"]) == cli.EXIT_USER_ERROR  # one line, no traceback
    assert "--steps >= 1" in capsys.readouterr().err


def test_cli_parser_does_not_import_torch():
    """``rlhf-pg --help`` stays fast: building the parser (with bench's options) imports no torch."""
    code = (
        "import sys; from rlhf_pg import cli; cli._parser(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_child_peak_rss_is_its_own():
    """A child started by a big parent reports its own peak, not the parent's (ru_maxrss would: Linux
    carries it over fork + exec)."""
    big = bytearray(b"\x01") * (256 << 20)  # written, so resident in this (parent) process
    assert bench.peak_rss_mb() > 256
    code = "from rlhf_pg.labs.bench import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    del big
    assert 0 < float(out.stdout) < 128


def test_children_run_in_subprocesses(tmp_path):
    """The real mode: every path in its own process (``python -m rlhf_pg.labs.bench --child``), JSON back to
    the parent, the table on stdout; through ``rlhf-pg bench``."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_pg",
            "bench",
            *TINY_ARGS,
            "--beta",
            "pos",
            "--precision",
            "bf16",
            "--no-quality",
            "--peak-seconds",
            "0",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== GRPO step, beta=0.04 ==" in proc.stdout and "x ours-bf16" in proc.stdout
    report = json.loads(out.read_text())
    res = report["results"]["beta=0.04"]
    assert res["ours-bf16"]["median"]["completion_tokens"] == res["baseline"]["median"]["completion_tokens"] == 16
    assert all(r["peak_rss_mb"] > 0 and r["rss_after_load_mb"] > 0 for r in res.values())
    assert "mfu" not in res["baseline"]  # --peak-seconds 0: no peak, no MFU


def test_script_is_a_thin_wrapper():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--help"], capture_output=True, text=True, check=True
    )
    assert "--precision" in proc.stdout and "--json" in proc.stdout
