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

# Packages go in with uv when it can be had (torch's CUDA build is about 5 GB of wheels: 28 s with uv
# against 77 s with pip on a 2-core machine), else with pip. uv does not read pip's configuration, so
# the indexes, links and constraints pip is configured with are handed on; BNAO_NO_UV=1 keeps pip.
uv=""
uv_args=()
if [ "${BNAO_NO_UV:-0}" != 1 ] && pip install -q uv >/dev/null 2>&1 && [ -x "$venv/bin/uv" ]; then
  uv="$venv/bin/uv"
  pip_setting() { pip config get "global.$1" 2>/dev/null || true; }
  index=$(pip_setting index-url)
  [ -n "${PIP_INDEX_URL:-$index}" ] && uv_args+=(--index-url "${PIP_INDEX_URL:-$index}")
  for url in ${PIP_EXTRA_INDEX_URL:-$(pip_setting extra-index-url)}; do uv_args+=(--extra-index-url "$url"); done
  for links in ${PIP_FIND_LINKS:-$(pip_setting find-links)}; do uv_args+=(--find-links "$links"); done
  for file in ${PIP_CONSTRAINT:-$(pip_setting constraint)}; do [ -f "$file" ] && uv_args+=(--constraint "$file"); done
fi
install() {
  if [ -n "$uv" ] && "$uv" pip install -q --python "$venv/bin/python" "${uv_args[@]}" "$@"; then
    return 0
  fi
  [ -n "$uv" ] && say "uv could not install $*; trying pip"
  pip install -q "$@"
}

if ! python -c "import torch, torchvision" 2>/dev/null; then
  say "installing torch ${TORCH_VERSION:-2.14.1} and torchvision ${TORCHVISION_VERSION:-0.29.1}${uv:+ (with uv)}"
  install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
install numpy pybind11 ninja pyyaml tqdm matplotlib tensorboard
if [ $dev = 1 ]; then
  install pytest scipy hypothesis
  install nvidia-dali-cuda130 || say "WARNING: nvidia-dali-cuda130 not installable here; DALI tests will be skipped"
  install onnx onnxruntime onnxscript || say "WARNING: onnx/onnxruntime not installable here; ONNX export tests will be skipped"
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
