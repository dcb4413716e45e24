"""The parts of gpu-check, in the order they run: :data:`PARTS`.

Adding a check is one entry in :data:`PARTS` (a :class:`~gpucheck.runner.Part`
with its driver). Each driver runs on a GPU machine with the reference sizes
and, in CPU smoke mode (``--smoke``), on the CPU with tiny sizes so that the
plumbing is exercised without a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from . import measure
from .dali import dali_part, dali_ready
from .runner import CUT, FAIL, PASS, SKIP, Context, Figure, Part, PartResult


def _status(result, ok: bool) -> str:
    return CUT if result.timed_out else (PASS if ok else FAIL)


def _failure_summary(result, what: str) -> str:
    if result.timed_out:
        return f"{what}: killed at its time limit"
    return f"{what}: exit code {result.returncode}; last lines: {result.tail(3)!r}"


def _cmake_commands(ctx: Context, cuda: bool) -> str:
    """Shell line that configures and builds the C++ core and its tests under work/cmake."""
    build = ctx.work / "cmake"
    prefix = f"$({ctx.python} -c 'import torch; print(torch.utils.cmake_prefix_path)')"
    flags = ""
    if cuda:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        arch = ctx.info.get("arch", "9.0").replace(".", "")
        flags = f"-DBNAO_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES={arch} -DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc"
    jobs = os.cpu_count() or 2
    return (f"cmake -S . -B {build} -DCMAKE_PREFIX_PATH=\"{prefix}\" {flags} && "
            f"cmake --build {build} -j{jobs}")


def build(ctx: Context) -> PartResult:
    """pip build of bnao for the visible GPU only, with the CMake build of the C++ tests alongside."""
    if not ctx.gpu or ctx.smoke:
        return PartResult("build", SKIP, "no GPU build in this mode: the installed bnao is used")
    # The C++ tests build in the background meanwhile (the machine has cores for both).
    ctx.start_background("cmake", ["bash", "-c", _cmake_commands(ctx, cuda=True)], "cmake-build.log")
    env = {"CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda"), "TORCH_CUDA_ARCH_LIST": ctx.info["arch"],
           "MAX_JOBS": str(os.cpu_count() or 2), "BNAO_CUDA": "1", "BNAO_REQUIRE_EXTENSION": "1"}
    pip = ctx.command([ctx.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."],
                      "build.log", env=env)
    if pip.returncode != 0:
        return PartResult("build", _status(pip, False), _failure_summary(pip, "pip install"), log="logs/build.log")
    probe = ctx.command([ctx.python, "-c", "import bnao.extension as e, sys; "
                         "sys.exit(0 if e.has_kernel('alias_draw', 'cuda') else 'no CUDA kernel in bnao._C')"],
                        "build.log", append=True)
    ok = probe.returncode == 0
    summary = (f"bnao._C built for sm_{ctx.info['arch'].replace('.', '')} in {pip.seconds:.0f} s, CUDA kernels "
               "loaded" if ok else "bnao._C built but its CUDA kernels did not load")
    return PartResult("build", _status(probe, ok), summary, details={"pip_seconds": pip.seconds},
                      log="logs/build.log")


def ctest(ctx: Context) -> PartResult:
    """The C++ unit tests (ctest), with their CUDA cases when CUDA is built."""
    if not ctx.gpu and not ctx.smoke:
        return PartResult("ctest", SKIP, "no GPU")
    cuda = ctx.gpu and not ctx.smoke
    if "cmake" in ctx.background:
        code = ctx.wait_background("cmake")
        if code != 0:
            why = "killed at its time limit" if code is None else f"exit code {code}"
            return PartResult("ctest", CUT if code is None else FAIL, f"CMake build: {why}",
                              log="logs/cmake-build.log")
    else:
        built = ctx.command(["bash", "-c", _cmake_commands(ctx, cuda=cuda)], "cmake-build.log")
        if built.returncode != 0:
            return PartResult("ctest", _status(built, False), _failure_summary(built, "CMake build"),
                              log="logs/cmake-build.log")
    run = ctx.command(["ctest", "--test-dir", ctx.work / "cmake", "--output-on-failure"], "ctest.log")
    counts = measure.ctest_counts(run.log.read_text(errors="replace"))
    ok = run.returncode == 0 and counts["parsed"] and counts["failed"] == 0
    # On a GPU the CUDA cases must really run, not skip.
    if cuda and counts["skipped"]:
        ok = False
    summary = f"{counts['total'] - counts['failed'] - counts['skipped']}/{counts['total']} passed"
    if counts["skipped"]:
        summary += f", skipped: {', '.join(counts['skipped_names'])}"
    if counts["failed"]:
        summary += f", failed: {', '.join(counts['failed_names'])}"
    return PartResult("ctest", _status(run, ok), summary, details=counts, log="logs/ctest.log")


def pytest_cuda(ctx: Context) -> PartResult:
    """``pytest -m cuda``: every CUDA path against its CPU counterpart."""
    if not ctx.gpu and not ctx.smoke:
        return PartResult("pytest-cuda", SKIP, "no GPU")
    xml = ctx.logs / "pytest-cuda.xml"
    targets = ["tests/test_cuda_paths.py", "tests/test_cuda_data.py"] if ctx.smoke else ["tests"]
    crashes: List[measure.PytestCrash] = []
    # A crash loses the whole failure list: run again without each test that crashed (twice at most), so
    # one crashing test does not hide the others' results (the H200's first run, 2026-11-27).
    for attempt in range(3):
        log_name = "pytest-cuda.log" if attempt == 0 else f"pytest-cuda-{attempt + 1}.log"
        xml.unlink(missing_ok=True)
        run = ctx.command([ctx.python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs",
                           "--tb=short", f"--junitxml={xml}", *[f"--deselect={c.test}" for c in crashes],
                           *targets], log_name)
        if run.timed_out or xml.exists():
            break
        crash = measure.pytest_crash(run.log.read_text(errors="replace"))
        if crash is None or crash.test is None:
            break
        crashes.append(crash)
    crashed = "; ".join(str(c) for c in crashes)
    if run.timed_out or not xml.exists():
        summary = (f"pytest crashed: {crashed} (the logs have the tests before each crash)" if crashes
                   else _failure_summary(run, "pytest"))
        return PartResult("pytest-cuda", _status(run, False), summary, log=f"logs/{log_name}")
    c = measure.pytest_counts(xml)
    summary = f"{c['passed']} passed, {c['failed'] + c['errors']} failed, {c['skipped']} skipped"
    if c["failed_ids"]:
        summary += ": " + ", ".join(c["failed_ids"][:5])
    if crashes:
        summary += f"; crashed, then left out: {crashed}"
    status = FAIL if c["failed"] + c["errors"] or crashes else (SKIP if c["passed"] == 0 else PASS)
    return PartResult("pytest-cuda", status, summary, details=c, log=f"logs/{log_name}")


def sanitizer(ctx: Context) -> PartResult:
    """One training step (plus draws, a loader batch and an evaluation) under compute-sanitizer memcheck."""
    one_step = [ctx.python, "scripts/gpu_check.py", "--one-step", ctx.device]
    if ctx.smoke or not ctx.gpu:
        if not ctx.smoke:
            return PartResult("sanitizer", SKIP, "no GPU")
        run = ctx.command(one_step, "sanitizer.log")
        return PartResult("sanitizer", _status(run, run.returncode == 0),
                          "one step on the CPU, without compute-sanitizer (smoke run)", log="logs/sanitizer.log")
    tool = shutil.which("compute-sanitizer") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                             "bin", "compute-sanitizer")
    if not os.path.exists(tool):
        return PartResult("sanitizer", SKIP, "compute-sanitizer not found")
    # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
    run = ctx.command([tool, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20"] + one_step,
                      "sanitizer.log", env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    errors = measure.sanitizer_errors(run.log.read_text(errors="replace"))
    ok = run.returncode == 0 and errors == 0
    summary = (f"memcheck: {errors} errors" if errors is not None else "memcheck printed no error summary")
    return PartResult("sanitizer", _status(run, ok), summary, details={"errors": errors}, log="logs/sanitizer.log")


def bench_supernet(ctx: Context) -> PartResult:
    """Supernet img/s at batch 64 and 256 (split per phase, peak memory) and evaluation archs/s at batch 500,
    on the eager cells, the fused cells and the fused cells with replayed CUDA graphs side by side, the last
    also in bf16; the figures measured before a timeout are kept."""
    if not ctx.gpu and not ctx.smoke:
        return PartResult("bench-supernet", SKIP, "no GPU")
    out = ctx.logs / "bench-supernet.json"
    # On an H200 (2026-11-27) 50 steps and 200 archs fitted three of the eight configurations in the part's
    # 120 s, 30 steps and 100 archs seven; the uncaptured fused cells are left to the kernels part.
    sizes = (["--batch-sizes", "64,256", "--steps", "20", "--warmup", "3", "--eval-archs", "50",
              # The default CUDA path first: a run cut at its limit keeps the figures that matter most.
              "--kernels", "fused+graph,eager,fused+graph+bf16"] if not ctx.smoke
             else ["--batch-sizes", "8", "--steps", "2", "--warmup", "1", "--eval-archs", "2", "--layers", "1",
                   "--channels", "4", "--eval-batch", "50"])
    run = ctx.command([ctx.python, "benchmarks/bench_supernet.py", "--device", ctx.device, *sizes, "--json", out],
                      "bench-supernet.log")
    try:  # a run cut short keeps the figures it wrote (the file is rewritten after each result)
        figures = measure.supernet_figures(json.loads(out.read_text())) if out.exists() else []
    except ValueError:  # cut while writing
        figures = []
    if run.returncode != 0:
        return PartResult("bench-supernet", _status(run, False), _failure_summary(run, "bench_supernet.py"),
                          figures=figures, log="logs/bench-supernet.log")
    return PartResult("bench-supernet", PASS, f"{len(figures)} figures", figures=figures,
                      log="logs/bench-supernet.log")


def _json_bench(ctx: Context, name: str, script: str, args: List[Any], to_figures) -> PartResult:
    """Part ``name``: ``benchmarks/<script> --device <device> *args --json FILE``, its figures ``to_figures(the
    JSON)``; skipped without a GPU outside smoke mode, failed (or cut) when the script fails or writes nothing."""
    if not ctx.gpu and not ctx.smoke:
        return PartResult(name, SKIP, "no GPU")
    out, log = ctx.logs / f"{name}.json", f"logs/{name}.log"
    run = ctx.command([ctx.python, f"benchmarks/{script}", "--device", ctx.device, *args, "--json", out],
                      f"{name}.log")
    if run.returncode != 0 or not out.exists():
        return PartResult(name, _status(run, False), _failure_summary(run, script), log=log)
    figures = to_figures(json.loads(out.read_text()))
    return PartResult(name, PASS, f"{len(figures)} figures", figures=figures, log=log)


def bench_sampler(ctx: Context) -> PartResult:
    """Batched alias draws per second from a pool of 1e6."""
    args = ["--sizes", "", "--batch-pool", "1e4" if ctx.smoke else "1e6", "--budget", "0.2" if ctx.smoke else "1"]
    return _json_bench(ctx, "bench-sampler", "bench_sampler.py", args, measure.sampler_figures)


def bench_loader(ctx: Context) -> PartResult:
    """The GPU-resident (tensor) loader's img/s with the full CIFAR augmentation."""
    sizes = (["--batch-sizes", "256", "1024", "--seconds", "2"] if not ctx.smoke
             else ["--batch-sizes", "256", "--seconds", "0.5", "--num-samples", "2000", "--warmup", "1",
                   "--min-batches", "2", "--threads", "1"])
    return _json_bench(ctx, "bench-loader", "bench_loader.py", ["--loaders", "tensor", *sizes, "--no-fashion-mnist"],
                       lambda data: measure.loader_figures(data["rows"], "tensor", 256))


def bench_controller(ctx: Context) -> PartResult:
    """The controller's minibatch time with CUDA graphs (controller.graph=auto) and without (off)."""
    sizes = (["--archs", "1000", "--epochs", "6"] if not ctx.smoke
             else ["--archs", "40", "--epochs", "4", "--threads", "1"])
    return _json_bench(ctx, "bench-controller", "bench_controller.py", [*sizes, "--graph", "auto,off"],
                       measure.controller_figures)


# A shortened search at the reference settings: every phase runs at full size per unit
# (same network, batch, pool growth ratio, controller), only fewer units of each.
# Pool 50 + 3 x 25 and 10,000 images: on an H200 (2026-11-27) pool 100 + 3 x 50 on 50,000 images took 152 s, 48 s
# of it scoring archs and 48 s re-ranking one arch for an epoch. The unit costs of steps, archs and re-rank
# epochs (scaled to the reference's 45,000 training images) do not depend on the pool; the controller's epoch
# and the generation carry a per-epoch or per-round cost that small pools inflate (0.215 against 0.071 ms per
# epoch x arch on the H200), so the controller is extrapolated from bench-controller's epoch on 1,000 archs.
SEARCH_GPU = ["data.dataset=synthetic", "data.synthetic_samples=10000", "supernet.epochs=1",
              "supernet.steps_per_epoch=120", "search.pool_size=50", "search.new_per_iteration=25", "search.top_k=25",
              "controller.epochs=40", "final.rerank_top=1", "final.epochs=1"]
SEARCH_SMOKE = ["data.dataset=synthetic", "data.synthetic_samples=600", "search.iterations=1", "supernet.layers=1", "supernet.channels=4",
                "supernet.batch_size=16", "supernet.epochs=1", "supernet.steps_per_epoch=2",
                "supernet.eval_batch_size=20", "search.pool_size=8", "search.new_per_iteration=4", "search.top_k=4",
                "controller.epochs=2", "final.rerank_top=1", "final.epochs=1", "final.batch_size=32"]


def _controller_epoch(ctx: Context) -> Optional[Tuple[int, float]]:
    """``(archs, seconds)`` of a controller epoch as the search runs it (controller.graph=auto) from the
    bench-controller part of this run, measured on the reference's 1,000 archs; None when it did not run."""
    path = ctx.logs / "bench-controller.json"
    try:
        printed = json.loads(path.read_text())
        row = next(r for r in printed["rows"] if r["graph"] == "auto")
        return int(printed["archs"]), float(row["epoch_s"])
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def search(ctx: Context) -> PartResult:
    """A shortened search at the reference settings, each phase extrapolated to 50 epochs x 4 rounds."""
    if not ctx.gpu and not ctx.smoke:
        return PartResult("search", SKIP, "no GPU")
    run_dir = ctx.work / "search"
    overrides = SEARCH_SMOKE if ctx.smoke else SEARCH_GPU
    run = ctx.command([ctx.python, "-m", "bnao", "search", "--config", "cifar10", "--out", run_dir, "--overwrite",
                       "--no-progress", "--device", ctx.device, *overrides], "search.log")
    if run.returncode != 0:
        return PartResult("search", _status(run, False), _failure_summary(run, "bnao search"), log="logs/search.log")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    ext = measure.extrapolate_search(run_dir, config, controller_epoch=_controller_epoch(ctx))
    for name in ("history.jsonl", "ranking.jsonl", "best.json", "config.yaml"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, ctx.logs / f"search-{name}")
    figures = [
        Figure("full search at the reference settings (extrapolated)", ext["total_s"], "s",
               measure.TARGETS["search_s"], better="lower",
               note=f"about {measure.REFERENCE_SEARCH_S / 3600:.0f} h for the reference; phases in the table below"),
        Figure("shortened search (measured)", run.seconds, "s", note=" ".join(overrides)),
    ]
    paths = "; ".join(f"{phase} {path['mode']} ({path['reason']})" for phase, path in ext["paths"].items() if path)
    return PartResult("search", PASS, f"{ext['rounds']} rounds of {ext['steps_per_round']} steps" +
                      (f"; {paths}" if paths else ""), figures=figures,
                      details={"extrapolation": ext}, log="logs/search.log")


def kernels(ctx: Context) -> PartResult:
    """Where the device time goes, kernel by kernel, on the fused and the eager cells: per training step at
    batch 64 (uncaptured, so each kernel is attributed) and per evaluated arch at batch 500
    (``bnao profile --top-kernels``): what to tune next."""
    if not ctx.gpu and not ctx.smoke:
        return PartResult("kernels", SKIP, "no GPU")
    sizes = (["--batch-size", "64", "--steps", "5", "--warmup", "3", "--eval-archs", "10", "--eval-batch", "500"]
             if not ctx.smoke else ["--batch-size", "4", "--steps", "1", "--warmup", "1", "--layers", "1",
                                    "--channels", "4", "--eval-archs", "2", "--eval-batch", "20"])
    tables, summaries = {}, []
    for cells in ("fused", "eager"):
        run = ctx.command([ctx.python, "-m", "bnao", "profile", "--device", ctx.device, "--kernels", cells,
                           "--graph", "off", "--no-count-ops", "--sequence-archs", "0", "--pool-size", "50",
                           "--top-kernels", "15", "--json", *sizes], f"kernels-{cells}.log")
        printed = run.json_output() or {}
        found = {f"{cells} cells, training step, batch {printed.get('batch_size')}": printed.get("top_kernels"),
                 f"{cells} cells, pool evaluation, batch {printed.get('eval_batch')}": printed.get("top_eval_kernels")}
        if run.returncode != 0 or not all(found.values()):
            summaries.append(_failure_summary(run, f"bnao profile --kernels {cells}"))
            continue
        if not all(table["rows"] and table["total_ms"] > 0 for table in found.values()):
            # e.g. CUPTI not allowed in a container
            summaries.append(f"{cells}: the profiler recorded no kernel (see logs/kernels-{cells}.log)")
            continue
        tables.update(found)
        summaries.append(", ".join(f"{cells} {t['total_ms']:.2f} ms per {t['unit']} (top {t['rows'][0]['share']:.0%} "
                                   f"{t['rows'][0]['name'][:40]})" for t in found.values()))
    combine = _combine_against_convolution(ctx, summaries)
    status = PASS if len(tables) == 4 and combine else FAIL
    return PartResult("kernels", status, "; ".join(summaries), details={"top_kernels": tables, "combine": combine},
                      log="logs/kernels-fused.log")


def _combine_against_convolution(ctx: Context, summaries: List[str]) -> Optional[Dict[str, Any]]:
    """``benchmarks/bench_combine.py``: bnao::combine's forward + backward against the stack + ReLU + 1x1
    convolution (cuDNN) it replaced in training, at the first and last stage's shapes; None when it failed."""
    batch = ["--batch-size", "64"] if not ctx.smoke else ["--batch-size", "2", "--repeats", "1"]
    run = ctx.command([ctx.python, "benchmarks/bench_combine.py", "--device", ctx.device, "--json", *batch],
                      "kernels-combine.log")
    printed = run.json_output()
    if run.returncode != 0 or not printed:
        summaries.append(_failure_summary(run, "benchmarks/bench_combine.py"))
        return None
    summaries.append("combine fwd+bwd vs stack+ReLU+conv: " + ", ".join(
        f"C={row['channels']} {row['combine_ms']:.2f}/{row['convolution_ms']:.2f} ms" for row in printed["rows"]))
    return printed


PARTS: List[Part] = [
    Part("build", "build bnao for the visible GPU (and the C++ tests alongside)", 240, 60, build),
    Part("ctest", "C++ unit tests with CUDA cases", 120, 10, ctest),
    Part("pytest-cuda", "pytest -m cuda: CUDA paths against the CPU", 150, 30, pytest_cuda),
    Part("bench-supernet", "supernet img/s at batch 64 and 256, evaluation archs/s", 120, 30, bench_supernet),
    Part("bench-sampler", "batched alias draws/s from a pool of 1e6", 60, 10, bench_sampler),
    Part("bench-loader", "GPU-resident loader img/s", 60, 10, bench_loader),
    Part("bench-controller", "controller minibatch time, CUDA graphs on and off", 60, 10, bench_controller),
    # The kernel tables before the search: they say what to tune next, the search only how long it takes.
    Part("kernels", "the top kernels of a training step and of an evaluated arch, fused and eager cells", 90, 30,
         kernels),
    Part("search", "shortened search, extrapolated to the reference settings", 200, 60, search),
    # Memcheck after the figures: the parts' limits add up to more than the 470 s budget, and on the H200
    # (2026-11-27) the figures were what a run cut short lacked.
    Part("sanitizer", "one training step under compute-sanitizer memcheck", 120, 30, sanitizer),
    Part("dali", "DALI GPU pipeline into the supernet (when its wheels were brought)", 120, 30, dali_part,
         ready=dali_ready),
]


def repo_root() -> Path:
    """The repository this file belongs to."""
    return Path(__file__).resolve().parents[2]
