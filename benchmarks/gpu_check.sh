#!/usr/bin/env bash
# The GPU check in one go (<= 8 minutes, one results file): see benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--budget 480]   # needs CUDA: exit 1 without
#   bash benchmarks/gpu_check.sh --dry-run                                # the plan, on any machine
# Run it from a checkout set up with `make .venv/.installed-dev` and a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec timeout --kill-after=10 500 "$PY" benchmarks/gpu_check.py "$@"
