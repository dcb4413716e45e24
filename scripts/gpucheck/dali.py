"""The DALI part of gpu-check: DALI's GPU pipeline feeding the supernet, when DALI can be had.

A GPU machine has no network and no DALI. ``../shared/gpu/prepare.sh dali``
splits DALI's wheel and its dependencies into the ignored folders
``.gpu-dali1`` .. ``.gpu-dali5`` of the checkout; once all five were carried
there, this part joins and installs them into ``work/dali-site`` (put on
``PYTHONPATH`` for its commands only) and runs:

1. the CUDA tests that need DALI (``pytest -m "cuda and dali"``);
2. the DALI array pipeline's img/s on the GPU (``bench_loader.py --loaders dali``);
3. a few supernet steps fed by the DALI loader (``bnao profile --loader dali``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Dict, List, Optional

from . import measure
from .runner import CUT, FAIL, PASS, SKIP, Context, Figure, PartResult

WHEEL_FOLDERS = [f".gpu-dali{i}" for i in range(1, 6)]


def _importable(ctx: Context, env: Dict[str, str]) -> bool:
    probe = subprocess.run([ctx.python, "-c", "import nvidia.dali, nvidia.dali.plugin.pytorch"], cwd=ctx.repo,
                           env=dict(ctx.env, **env), capture_output=True, timeout=120)
    return probe.returncode == 0


def install_from_folders(ctx: Context) -> Optional[str]:
    """Joins the carried wheel parts and installs them into ``work/dali-site``; returns that path (None: absent)."""
    folders = [ctx.repo / f for f in WHEEL_FOLDERS]
    if not all(f.is_dir() for f in folders):
        return None
    stage = ctx.work / "dali-wheels"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for folder in folders:
        for item in folder.iterdir():
            shutil.copy(item, stage / item.name)
    wheel = stage / (stage / "WHEEL_NAME").read_text().strip()
    with open(wheel, "wb") as out:
        for part in sorted(stage.glob("part0*")):
            out.write(part.read_bytes())
            part.unlink()
    site = ctx.work / "dali-site"
    run = ctx.command([ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                       "--target", site, *sorted(str(w) for w in stage.glob("*.whl"))], "dali.log")
    return str(site) if run.returncode == 0 else None


def _profile_figure(ctx: Context, env: Dict[str, str]) -> List[Figure]:
    sizes = (["--steps", "30", "--warmup", "5"] if not ctx.smoke
             else ["--layers", "1", "--channels", "4", "--batch-size", "8", "--steps", "2", "--warmup", "1"])
    run = ctx.command([ctx.python, "-m", "bnao", "profile", "--device", ctx.device, "--loader", "dali",
                       "--no-count-ops", "--sequence-archs", "0", "--json", *sizes], "dali-profile.log", env=env)
    result = run.json_output()
    if run.returncode != 0 or not result:
        return []
    return [Figure(f"supernet training fed by the DALI loader, batch {result['batch_size']}", result["img_per_s"],
                   "img/s", note="bnao profile --loader dali (no target: compare with the tensor loader's row)")]


def dali_ready(ctx: Context) -> Optional[PartResult]:
    """The part's skip when it has nothing to run (no GPU, or neither DALI nor its wheels here), else None.
    Checked before the budget, so a run without the wheels says skipped, not cut."""
    if not ctx.gpu and not ctx.smoke:
        return PartResult("dali", SKIP, "no GPU")
    if not all((ctx.repo / f).is_dir() for f in WHEEL_FOLDERS) and not _importable(ctx, {}):
        return PartResult("dali", SKIP, "DALI's wheels were not brought along (run ../shared/gpu/prepare.sh dali "
                                        "and carry .gpu-dali1 .. .gpu-dali5)")
    return None


def dali_part(ctx: Context) -> PartResult:
    """Runs the DALI checks; the runner calls it once :func:`dali_ready` found DALI or its carried wheels."""
    env: Dict[str, str] = {}
    source = "already installed"
    if not _importable(ctx, env):
        site = install_from_folders(ctx)
        if site is None:
            return PartResult("dali", FAIL, "DALI's carried wheels did not install", log="logs/dali.log")
        env = {"PYTHONPATH": site}
        source = "installed from the carried wheels"
        if not _importable(ctx, env):
            return PartResult("dali", FAIL, "DALI installed from the carried wheels but does not import",
                              log="logs/dali.log")
    xml = ctx.logs / "pytest-dali.xml"
    tests = ctx.command([ctx.python, "-m", "pytest", "-q", "-m", "cuda and dali", "-p", "no:cacheprovider", "-rs",
                         f"--junitxml={xml}", "tests/test_cuda_paths.py"], "dali-pytest.log", env=env)
    counts = measure.pytest_counts(xml) if xml.exists() else {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    bench_json = ctx.logs / "bench-loader-dali.json"
    sizes = ["--batch-sizes", "256", "--seconds", "2"] if not ctx.smoke else [
        "--batch-sizes", "64", "--seconds", "0.3", "--num-samples", "1000", "--warmup", "1", "--min-batches", "2"]
    ctx.command([ctx.python, "benchmarks/bench_loader.py", "--device", ctx.device, "--loaders", "dali", *sizes,
                 "--no-fashion-mnist", "--json", bench_json], "dali-bench.log", env=env)
    figures = []
    if bench_json.exists():
        figures += measure.loader_figures(json.loads(bench_json.read_text())["rows"], "dali", 256)
    figures += _profile_figure(ctx, env)
    failed = counts["failed"] + counts["errors"]
    ok = not tests.timed_out and failed == 0 and len(figures) >= 2
    summary = (f"DALI {source}; tests {counts['passed']} passed, {failed} failed, {counts['skipped']} skipped; "
               f"{len(figures)} figures")
    status = CUT if ctx.time_left() <= 0 else (PASS if ok else FAIL)
    return PartResult("dali", status, summary, figures=figures, details={"tests": counts, "source": source},
                      log="logs/dali.log")
