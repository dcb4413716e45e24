#!/usr/bin/env bash
# Sets up a virtual environment with bnao installed in editable mode.
#
#   scripts/setup.sh            # for running bnao (CUDA kernels only if a GPU is visible)
#   scripts/setup.sh --dev      # for development and tests: CUDA kernels compiled whenever
#                               # nvcc exists (no GPU needed), a failed build is an error,
#                               # DALI and the test dependencies installed
#
# Environment: BNAO_VENV (default .venv), PYTHON (default python3), TORCH_VERSION /
# TORCHVISION_VERSION (default 2.14.1 / 0.29.1, used only when torch is missing),
# BNAO_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1
venv=${BNAO_VENV:-.venv}
say() { echo "[bnao setup] $*"; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

if ! python -c "import torch, torchvision" 2>/dev/null; then
  say "installing torch ${TORCH_VERSION:-2.14.1} and torchvision ${TORCHVISION_VERSION:-0.29.1}"
  pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
pip install -q numpy pybind11 ninja pyyaml tqdm matplotlib tensorboard
if [ $dev = 1 ]; then
  pip install -q pytest scipy hypothesis
  pip install -q nvidia-dali-cuda130 || say "WARNING: nvidia-dali-cuda130 not installable here; DALI tests will be skipped"
  pip install -q onnx onnxruntime onnxscript || say "WARNING: onnx/onnxruntime not installable here; ONNX export tests will be skipped"
fi

# Fashion-MNIST, the embedded default data set, comes from Debian's package.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    say "installing Debian's dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) ||
      say "WARNING: could not install dataset-fashion-mnist"
  else
    say "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir"
  fi
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  # torch's own detection can pick a misleading nvcc link on PATH.
  export CUDA_HOME=/usr/local/cuda
fi
if [ $dev = 1 ]; then
  export BNAO_REQUIRE_EXTENSION=1
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && python -c "import torch,sys; sys.exit(torch.version.cuda is None)"; then
    export BNAO_CUDA=${BNAO_CUDA:-1}
  fi
elif ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  # No GPU to run them: skip compiling CUDA kernels (minutes on a small machine).
  export BNAO_CUDA=${BNAO_CUDA:-0}
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
say "building bnao (BNAO_CUDA=${BNAO_CUDA:-auto})"
pip install -q --no-build-isolation --no-deps -e .
python -m bnao info
if [ $dev = 1 ]; then
  python -c "import bnao.extension as e, sys; sys.exit(0 if e.has_ops() else 'the compiled core did not load')"
fi
