"""Benchmark (rlhf_pg/labs/bench.py, ``rlhf-pg bench``, scripts/benchmark.py): the report's structure on
the tiny model, both paths doing the same work, ours matching the exact fp32 log-probs and gradient, the
children's peak RSS being their own, the CLI wiring; ``--against trl`` (labs/trl_bench.py) end to end on the
tiny model, TRL configured as ours. No timing assertions."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_subprocess_env

from rlhf_pg import cli
from rlhf_pg.errors import UserError
from rlhf_pg.labs import bench, trl_bench

ROOT = Path(__file__).resolve().parents[1]
# The benchmark measures a CPU: its baseline loads on "cpu" (labs/bench.py _Baseline), its MFU divides by a
# CPU matmul peak, its memory is RSS. On a GPU machine "ours" would move to cuda and face a CPU baseline,
# so these tests run with CUDA hidden (in-process) and CUDA_VISIBLE_DEVICES= (the children).
pytestmark = pytest.mark.cpu_only(reason="the step benchmark compares CPU paths (baseline on cpu, CPU matmul peak)")
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
    assert report["results"]["beta=0"]["ours-fp32"]["median"]["reference"] == 0.0  # not run at all
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
    assert "--precision" in out and "--json" in out and "--threads" in out and "--warmup" in out and "--against" in out
    args = cli._parser().parse_args(["bench", "--beta", "pos", "--precision", "both", "--repeats", "2", "--lr", "1e-5"])
    spec = bench.spec_from_args(args)
    assert spec.betas == ["pos"] and spec.precisions == ["bf16", "fp32"] and spec.repeats == 2 and spec.lr == 1e-5
    d = bench.spec_from_args(cli._parser().parse_args(["bench"]))
    assert d == bench.BenchSpec()  # the CLI defaults are the documented workload
    assert (d.model, d.prompts, d.group_size, d.max_new_tokens, d.kl_coef) == ("smollm2-135m-instruct", 8, 4, 64, 0.04)
    # --against trl: the workload (lr 1e-5, 1 warm-up + 7 measured steps, β > 0 only, no quality child)
    t = bench.spec_from_args(cli._parser().parse_args(["bench", "--against", "trl"]))
    assert (t.against, t.lr, t.warmup, t.steps, t.betas, t.quality) == ("trl", 1e-5, 1, 7, ["pos"], False)
    assert (t.model, t.prompts, t.group_size, t.max_new_tokens, t.kl_coef) == (d.model, 8, 4, 64, 0.04)
    t = bench.spec_from_args(cli._parser().parse_args(["bench", "--against", "trl", "--beta", "both", "--lr", "1e-6"]))
    assert t.betas == ["pos", "zero"] and t.lr == 1e-6
    assert cli.main(["bench", "--steps", "0"]) == cli.EXIT_USER_ERROR  # one line, no traceback
    assert "--steps >= 1" in capsys.readouterr().err


def test_cli_parser_does_not_import_torch():
    """``rlhf-pg --help`` stays fast: building the parser (with bench's options) imports no torch."""
    code = (
        "import sys; from rlhf_pg import cli; cli._parser(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=cpu_subprocess_env())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_child_peak_rss_is_its_own():
    """A child started by a big parent reports its own peak, not the parent's (ru_maxrss would: Linux
    carries it over fork + exec)."""
    big = bytearray(b"\x01") * (256 << 20)  # written, so resident in this (parent) process
    assert bench.peak_rss_mb() > 256
    code = "from rlhf_pg.labs.bench import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT, env=cpu_subprocess_env()
    )
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
        env=cpu_subprocess_env(),
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
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=cpu_subprocess_env(),
    )
    assert "--precision" in proc.stdout and "--json" in proc.stdout


def test_decode_peak_times_every_linear_of_the_model(tiny_model):
    """The decode-shaped peak runs the products of one decoding step: every nn.Linear of the model (the tied
    LM head included), and credits 2 * rows * their weights' size."""
    import torch

    shapes = bench.decode_shapes("tiny-random-llama")
    linears = [m.weight for m in tiny_model.modules() if type(m) is torch.nn.Linear]
    assert sorted(shapes) == sorted(tuple(w.shape) for w in linears)
    assert tiny_model.lm_head.weight.shape in shapes
    assert bench.decode_matmul_peak("tiny-random-llama", 3, 0.02, 1, "fp32") > 0


def test_trl_config_matches_ours():
    """TRL's GRPOConfig for the workload: one generation of P x G completions per optimizer step, accumulated
    over ours' micro-batches; ours' sampling, loss (token-mean = dapo), KL (k3, no importance weight), AdamW."""
    spec = bench.BenchSpec(against="trl", lr=1e-5, steps=7)
    kw = trl_bench.grpo_config_kwargs(spec, 0.04, "bf16", "out")
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 8 * 4
    assert kw["steps_per_generation"] == kw["gradient_accumulation_steps"] == 4 and kw["num_generations"] == 4
    assert (kw["max_completion_length"], kw["temperature"], kw["top_p"], kw["top_k"]) == (64, 1.0, 1.0, 0)
    assert (kw["beta"], kw["loss_type"], kw["scale_rewards"], kw["use_bias_correction_kl"]) == (
        0.04,
        "dapo",
        "group",
        False,
    )
    assert (kw["learning_rate"], kw["adam_beta2"], kw["lr_scheduler_type"], kw["max_grad_norm"]) == (
        1e-5,
        0.99,
        "constant",
        1.0,
    )
    assert kw["num_iterations"] == 1 and kw["max_steps"] == 8 and kw["bf16"] and not kw["gradient_checkpointing"]
    assert not trl_bench.grpo_config_kwargs(spec, 0.04, "fp32", "out")["bf16"]


TRL_TINY = {**TINY, "lr": 1e-5, "betas": ["pos"], "against": "trl"}


def test_against_trl_tiny_end_to_end():
    """rlhf-pg and TRL's GRPOTrainer on the tiny model, in fp32 and bf16: both sides' fields, the same prompts
    and token counts (the tiny model never samples EOS within 4 tokens), TRL resolved to our settings, finite
    ratios, the table."""
    pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[bench]' (CI installs it)")
    spec = bench.BenchSpec(**TRL_TINY, precisions=["fp32", "bf16"], in_process=True)
    report = bench.run_benchmark(spec, log=lambda s: None)
    json.dumps(report)  # --json writes it as is

    assert report["against"] == "trl" and report["machine"]["trl"] == "1.16.0"
    res, ratio = report["results"]["beta=0.04"], report["ratio"]["beta=0.04"]
    assert set(res) == {"rlhf-pg-fp32", "trl-fp32", "rlhf-pg-bf16", "trl-bf16"} and set(ratio) == {"fp32", "bf16"}
    fields = {*trl_bench.TIMES, "completion_tokens", "s_per_1k_completion_tokens", "completion_tokens_per_s"}
    for path, r in res.items():
        m = r["median"]
        assert fields <= set(m) and all(m[k] > 0 for k in fields if k != "rewards"), path
        assert m["completion_tokens"] == 2 * 2 * 4 and m["prompt_tokens"] > 0
        assert m["s_per_1k_completion_tokens"] == pytest.approx(m["step"] / (m["completion_tokens"] / 1000))
        assert r["peak_rss_mb"] > 0 and r["matmul_peak_flop_per_s"] > 0 and len(r["steps"]) == 1
        assert all(m[f"mfu_{k}"] > 0 for k in ("rollout", "reference", "train", "step"))
        run = r["runs"][0]["matmul_peak"]
        assert run["precision"] == r["precision"] and run["before"] > 0 and run["after"] > 0
        step = r["steps"][0]
        assert r["decode_matmul_peak_flop_per_s"] > 0
        rate = step["flops"]["rollout"] / step["rollout"]
        assert step["rollout_vs_decode_peak"] == pytest.approx(rate / r["decode_matmul_peak_flop_per_s"], rel=1e-9)
    for p in ("fp32", "bf16"):
        ours, trl = res[f"rlhf-pg-{p}"], res[f"trl-{p}"]
        assert ours["median"]["prompt_tokens"] == trl["median"]["prompt_tokens"]  # the same prompts
        assert ours["flops"] == trl["flops"]  # the same tokens, so the same FLOPs credited
        assert trl["same_prompts_as_ours"] and trl["old_logprob_passes"] == 0  # on-policy: no old-log-prob pass
        a = trl["trl_args"]
        assert (a["generation_batch_size"], a["num_generations"], a["per_device_train_batch_size"]) == (4, 2, 2)
        assert a["gradient_accumulation_steps"] == a["steps_per_generation"] == 2
        assert (a["loss_type"], a["beta"], a["use_bias_correction_kl"], a["gradient_checkpointing"]) == (
            "dapo",
            0.04,
            False,
            False,
        )
        assert a["bf16"] == a["autocast_forward"] == (p == "bf16") and a["optimizer"] == "AdamW"
        assert a["torch_threads"] == 1 and a["eos_token_ids"] == [2]
        for k in ("step", "train", "completion_tokens_per_s", "s_per_1k_completion_tokens", "peak_rss", "mfu_step"):
            assert ratio[p][k] is not None and math.isfinite(ratio[p][k]) and ratio[p][k] > 0, (p, k)
        assert ratio[p]["completion_tokens"] == 1.0

    table = bench.format_table(report)
    for text in (
        "== GRPO step, beta=0.04: rlhf-pg vs TRL 1.16.0 ==",
        "rlhf-pg/trl fp32",
        "rlhf-pg/trl bf16",
        "completion tok/step",
        "s / 1k completion tok",
        "completion tok/s",
        "peak RSS (MB)",
        "MFU train",
        "decode peak, 4 rows",
        "rollout/decode peak",
        "headline, completion tokens/s rlhf-pg / TRL: fp32 ",
    ):
        assert text in table, text
    assert "WARNING" not in table


def test_against_trl_in_subprocesses(tmp_path):
    """The real mode of --against trl: each side in its own process (child kind ``trl``), through ``rlhf-pg bench``."""
    pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[bench]' (CI installs it)")
    out = tmp_path / "trl.json"
    args = [*TINY_ARGS, "--against", "trl", "--precision", "fp32", "--steps", "1", "--peak-seconds", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_pg", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cpu_subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rlhf-pg vs TRL 1.16.0" in proc.stdout and "rlhf-pg/trl fp32" in proc.stdout
    res = json.loads(out.read_text())["results"]["beta=0.04"]
    assert res["rlhf-pg-fp32"]["median"]["completion_tokens"] == res["trl-fp32"]["median"]["completion_tokens"] == 16
    assert all(r["peak_rss_mb"] > 0 and r["rss_after_load_mb"] > 0 for r in res.values())
    assert res["trl-fp32"]["median"]["mfu_step"] is None  # --peak-seconds 0: no peak, no MFU


def test_scaling_grid_tiny():
    """--scaling: one TRL comparison per (G, length) cell; each side's step time, tokens and growth in G
    over its own smallest-G time; the table; refused without --against trl and for bad lists."""
    pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[bench]' (CI installs it)")
    from rlhf_pg.labs import scaling

    spec = bench.BenchSpec(**{**TRL_TINY, "peak_seconds": 0}, precisions=["fp32"], in_process=True)
    report = scaling.run_scaling(spec, [2, 4], [2, 3], log=lambda s: None)
    json.dumps(report)
    cells = report["cells"]
    assert [(c["group_size"], c["max_new_tokens"]) for c in cells] == [(2, 2), (2, 3), (4, 2), (4, 3)]
    for c in cells:
        for side in ("rlhf-pg", "trl"):
            # the tiny model never samples EOS this early: every completion runs to the length
            assert c[side]["completion_tokens"] == 2 * c["group_size"] * c["max_new_tokens"], (c, side)
            assert c[side]["step"] > 0
        assert c["ratio_completion_tokens_per_s"] > 0
    for c in cells[:2]:
        assert c["rlhf-pg"]["step_vs_smallest_g"] == c["trl"]["step_vs_smallest_g"] == 1.0
    table = scaling.format_table(report)
    assert "tok/s ratio" in table and len(table.splitlines()) == 4 + 4 + 1
    with pytest.raises(UserError, match="add --against trl"):
        scaling.run_scaling(bench.BenchSpec(**TINY), [2], [2])
    with pytest.raises(UserError, match="comma-separated positive integers"):
        scaling.parse_ints("4,x", "--scale-groups")


@pytest.mark.parametrize("peer_heap", ["default", "same"])
def test_peer_heap_reaches_only_the_peers_children(monkeypatch, peer_heap):
    """Ours starts with rlhf-pg's default allocator and policy (as `rlhf-pg train` does); TRL's and the
    baseline's children get the same only under --peer-heap same, and otherwise glibc's defaults."""
    from rlhf_pg.memory import HEAP_ENV, allocator_env

    envs = {}

    def fake_run(cmd, env, **kw):
        envs[json.loads(cmd[-1])["kind"]] = env
        return subprocess.CompletedProcess(cmd, 0, stdout=bench._MARK + "{}\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    for var in (*HEAP_ENV, "LD_PRELOAD", "MIMALLOC_PURGE_DELAY"):
        monkeypatch.delenv(var, raising=False)
    ours = allocator_env("auto", keep=True)
    assert ours  # mimalloc's LD_PRELOAD, or glibc's variables
    spec = bench.spec_from_args(cli._parser().parse_args(["bench", "--against", "trl", "--peer-heap", peer_heap]))
    for kind in ("trl", "baseline", "ours"):
        bench._launch({"kind": kind, "spec": bench.asdict(spec)}, in_process=False)
    for kind in ("trl", "baseline"):
        assert all((envs[kind].get(k) == v) == (peer_heap == "same") for k, v in ours.items())
    assert all(envs["ours"].get(k) == v for k, v in ours.items())
    assert ("same" in bench.heaps(spec)["peer"]) == (peer_heap == "same")
