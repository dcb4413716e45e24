#!/usr/bin/env bash
# gpu-check: on a bare GPU machine (python3 with torch, nvcc, pytest, no network), build bnao
# for the visible GPU, run the C++ and Python CUDA tests, one step under compute-sanitizer and
# the benchmarks, within 8 minutes; writes DIR/gpu-check.md, DIR/gpu-check.json and
# DIR/gpu-check-logs.tar.gz, and prints the report.
#
#   scripts/gpu-check.sh DIR [--budget S] [--only a,b] [--skip a,b] [--smoke]
#
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), BNAO_COMMIT
# (shown when the checkout has no .git), BNAO_GPU_CHECK_SMOKE=1 (= --smoke: CPU plumbing run).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: scripts/gpu-check.sh DIR [--budget S] [--only a,b] [--skip a,b] [--smoke]" >&2
  exit 2
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
