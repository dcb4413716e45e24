#!/usr/bin/env bash
# gpu-kernel-check: the short check after a change to the fused-cell CUDA kernels, for a session with a few
# minutes of GPU left (about 3 minutes on an H200 from a bare machine, build included): build bnao for the
# visible GPU, the fused kernels' CUDA tests (rounds, cells, bf16, captured steps), the supernet's img/s and
# archs/s on the fused cells replayed as CUDA graphs, and the fused cells' kernel table. Everything is written
# under OUT (logs, bench.json, kernels.json); `make gpu-check` remains the full check.
#
#   scripts/gpu-kernel-check.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu-kernel-check.sh OUT" >&2
  exit 2
fi
out=$1
mkdir -p "$out"
py=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
arch=$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || { echo "no GPU" >&2; exit 2; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
status=0
step() {  # step NAME LIMIT_S COMMAND...: runs with a time limit, logs to OUT/NAME.log, prints its tail
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "== $name: rc $rc in $(( $(date +%s) - start )) s (limit $limit s)"
  tail -n "${TAIL:-6}" "$out/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}
step build 240 $py -m pip install --no-build-isolation --no-deps -e . || exit 1
step tests 90 $py -m pytest -q -m cuda -p no:cacheprovider tests/test_fused_round.py tests/test_fused_cell.py \
  tests/test_fused_bf16.py tests/test_graph_step.py
TAIL=12 step bench 75 $py benchmarks/bench_supernet.py --device cuda --batch-sizes 64,256 --steps 20 --warmup 3 \
  --eval-archs 50 --kernels fused+graph --json "$out/bench.json"
TAIL=40 step kernels 60 $py -m bnao profile --device cuda --kernels fused --graph off --no-count-ops \
  --sequence-archs 0 --pool-size 50 --top-kernels 12 --batch-size 64 --steps 5 --warmup 3 --eval-archs 10 \
  --eval-batch 500
exit $status
