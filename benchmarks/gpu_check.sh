#!/usr/bin/env bash
# The GPU check of issue 15: the embedded model in bf16 on a CUDA GPU (step time, MFU, peak CUDA memory,
# KL at step 0, resume-equality). Needs a CUDA build of torch in the active environment (GPU users bring
# their own: see README "Quick start"); arguments go to benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec "$PY" benchmarks/gpu_check.py "$@"
