#!/usr/bin/env bash
# One-GPU check for the `paper` preset (see benchmarks/gpu_check.py): `python -m benchmarks.gpu_check`
# from the repository root under a time limit, with JAX allowed 95% of the card's memory. Flags pass
# through, e.g. a dry run on a CPU:
#   bash benchmarks/gpu_check.sh --preset cpu-small --start 8 --max 16 --steps 2
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
exec timeout 470 "$PY" -m benchmarks.gpu_check "$@"
