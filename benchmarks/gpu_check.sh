#!/usr/bin/env bash
# The prepared GPU check (issue 22, item 6): on one GPU (an H200: under 8 minutes), from the repository root:
#   bash benchmarks/gpu_check.sh            -> benchmarks/results/gpu.json (and gpu_log.txt next to it)
# It runs `pytest -m gpu` (tests/test_gpu.py), then times DiT-XL/2 sampling (fp32 / tf32 / bf16 / compiled), IGD
# `fast` against plain sampling and ResNet-AP10 evaluation (benchmarks/gpu_check.py; `--smoke` checks it on a CPU).
# Extra arguments go to gpu_check.py (e.g. --sections dit,igd --steps 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
mkdir -p benchmarks/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
timeout 480 "$PY" benchmarks/gpu_check.py --results benchmarks/results/gpu.json "$@" 2>&1 \
  | tee benchmarks/results/gpu_log.txt
