#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh --dev), builds the C++ core and its
# unit tests with CMake and runs them (ctest), then runs the Python suite (pytest).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
. "${BNAO_VENV:-.venv}/bin/activate"

echo "[bnao test] C++ unit tests"
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build-cmake -j"$(nproc)" >/dev/null
ctest --test-dir build-cmake --output-on-failure

echo "[bnao test] C++ unit tests under AddressSanitizer and UndefinedBehaviorSanitizer"
# A separate tree (CMAKE_BUILD_TYPE=Sanitize, see CMakeLists.txt): any report aborts its test, and a
# canary that must be caught proves the instrumentation is live. Leak checking is off: libtorch's
# operator registries live until exit by design, and those reports are about torch, not bnao.
cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=Sanitize -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build-sanitize -j"$(nproc)" >/dev/null
ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-sanitize --output-on-failure

echo "[bnao test] Python tests"
python -m pytest -q "$@"
