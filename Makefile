PY ?= .venv/bin/python

.PHONY: demo test bench gpu-check gpu-kernel-check

# One command: set up and run a real Balanced NAO search on Fashion-MNIST (CPU is fine).
demo:
	scripts/setup.sh
	$(PY) -m bnao search --config configs/demo.yaml --out runs/demo --overwrite

# One command: set up (CUDA kernels compiled when nvcc exists) and run the C++ and Python tests.
test:
	scripts/test.sh

# The benchmarks (figures go to benchmarks/RESULTS.md by hand, with device, date, command).
bench:
	$(PY) benchmarks/bench_size.py
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_supernet.py

# On a GPU machine (bare is fine): build, C++ and CUDA tests, compute-sanitizer, benchmarks and a
# shortened search in about 8 minutes; report in $(OUT)/gpu-check.md and .json. See README "GPU check".
OUT ?= gpu-check-out
gpu-check:
	PYTHON=$(if $(wildcard .venv/bin/python),.venv/bin/python,python3) scripts/gpu-check.sh $(OUT)

# After a change to the fused-cell kernels: build, their CUDA tests, fused img/s and archs/s and the kernel
# table in about 3 minutes (scripts/gpu-kernel-check.sh); logs under $(OUT).
gpu-kernel-check:
	PYTHON=$(if $(wildcard .venv/bin/python),.venv/bin/python,python3) scripts/gpu-kernel-check.sh $(OUT)
