#!/usr/bin/env bash
# Lens's GPU check in one command, on a machine with one NVIDIA GPU, from a clean clone: installs Lens (the
# README's `make setup`: torch's CUDA build comes with it) and runs scripts/gpu_check.py on the GPU, the install and
# the check together within GPU_CHECK_BUDGET_S (default 480 s, 8 minutes). Writes one JSON (default
# benchmarks/gpu-check.json, or the first argument) and exits non-zero if a stage failed or time ran out.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${GPU_CHECK_BUDGET_S:-480}
out=${1:-benchmarks/gpu-check.json}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
make setup
left=$((budget - SECONDS))
if [ "$left" -lt 60 ]; then
  echo "gpu_check: the install took ${SECONDS} s of the ${budget} s budget; no time left for the check" >&2
  exit 124
fi
echo "gpu_check: installed in ${SECONDS} s; ${left} s left for the check" >&2
exec timeout --signal=INT --kill-after=20 "$left" .venv/bin/python scripts/gpu_check.py --device cuda --out "$out"
