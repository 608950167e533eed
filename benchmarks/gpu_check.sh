#!/usr/bin/env bash
# The GPU check of issue 33: a forgetscale LoRA sweep on a Llama-3-8B-shaped model with random weights on one
# CUDA device (step time, MFU, where the time goes), the forgetting measurement per reference kind against one
# plain forward, peak CUDA memory per precision mode (Llama 2 7B shape) and kill/resume (Llama 3.2 1B shape).
# Needs a CUDA build of torch in the active environment (GPU users bring their own) and the folder
# `python benchmarks/gpu_check.py --export-inputs gpu_inputs` writes where the embedded model is installed
# (tokenizer + text; the GPU machine needs no hub). Arguments go to benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" benchmarks/gpu_check.py "$@"
