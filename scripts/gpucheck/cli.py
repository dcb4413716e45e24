"""Command line of gpu-check (``scripts/gpu_check.py``; ``scripts/gpu-check.sh`` wraps it).

    python3 scripts/gpu_check.py OUT_DIR [--budget 470] [--only a,b] [--skip a,b] [--smoke]
    python3 scripts/gpu_check.py --one-step cuda      # the workload run under compute-sanitizer

Without a GPU every GPU part is reported as skipped ("no GPU"). ``--smoke`` (or
``BNAO_GPU_CHECK_SMOKE=1``) runs every part's driver on the CPU with tiny sizes
instead, to check the plumbing and the report on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .parts import PARTS, repo_root
from .report import overall, write_report
from .runner import Context, run_parts

DEFAULT_BUDGET_S = 470.0  # the whole run, build included, within 8 minutes

_PROBE = """
import json, sys, torch
d = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0],
     "gpu": torch.cuda.is_available()}
if d["gpu"]:
    p = torch.cuda.get_device_properties(0)
    d.update(name=p.name, arch=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
             memory_gib=round(p.total_memory / 2**30, 1), count=torch.cuda.device_count())
print(json.dumps(d))
"""


def _output(argv: List[str], cwd: Path) -> Optional[str]:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def probe_environment(python: str, repo: Path) -> Dict[str, Any]:
    """Torch, CUDA, GPU, driver and commit of this machine (what the report's header shows)."""
    raw = _output([python, "-c", _PROBE], repo)
    info: Dict[str, Any] = json.loads(raw) if raw else {"gpu": False, "torch": "not importable", "python": "?"}
    info["driver"] = _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], repo)
    commit = _output(["git", "rev-parse", "--short=12", "HEAD"], repo) or os.environ.get("BNAO_COMMIT")
    if commit and _output(["git", "status", "--porcelain", "--untracked-files=no"], repo):
        commit += " (with uncommitted changes)"
    info["commit"] = commit or "unknown (no .git here; set BNAO_COMMIT)"
    return info


def header(info: Dict[str, Any], smoke: bool, budget: float) -> Dict[str, Any]:
    """The report's header fields."""
    if info.get("gpu"):
        device = (f"{info['name']} (sm_{info['arch'].replace('.', '')}, {info['sms']} SMs, {info['memory_gib']} GiB"
                  f"{', %d GPUs visible' % info['count'] if info['count'] > 1 else ''})")
    else:
        device = "no CUDA GPU visible"
    return {
        "device": device + (" - CPU smoke run" if smoke else ""),
        "driver": info.get("driver") or "-",
        "torch": f"{info.get('torch')} (CUDA {info.get('torch_cuda')})",
        "python": info.get("python"),
        "commit": info.get("commit"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget": f"{budget:.0f} s",
        "smoke": smoke,
        "gpu": bool(info.get("gpu")),
    }


def pack_logs(out: Path) -> None:
    """``gpu-check-logs.tar.gz``: every log in one file (a device session brings back only a few files)."""
    with tarfile.open(out / "gpu-check-logs.tar.gz", "w:gz") as tar:
        tar.add(out / "logs", arcname="logs")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Build, test and benchmark bnao on a GPU; write gpu-check.md/.json.")
    p.add_argument("out", nargs="?", help="output folder")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BNAO_GPU_CHECK_BUDGET", DEFAULT_BUDGET_S)),
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--only", default="", help="comma-separated parts to run (others are skipped)")
    p.add_argument("--skip", default="", help="comma-separated parts not to run")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("BNAO_GPU_CHECK_SMOKE") == "1",
                   help="run every driver on the CPU with tiny sizes (plumbing check without a GPU)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs bnao (default: this one)")
    p.add_argument("--one-step", metavar="DEVICE", help="run the one-step workload on DEVICE and exit")
    args = p.parse_args(argv)
    if args.one_step:
        from .onestep import run_one_step

        return run_one_step(args.one_step)
    if not args.out:
        p.error("the output folder is required")
    start = time.monotonic()
    repo, out = repo_root(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = probe_environment(args.python, repo)
    meta = header(info, args.smoke, args.budget)
    print(f"[gpu-check] {meta['device']}; torch {meta['torch']}; commit {meta['commit']}", flush=True)
    ctx = Context(out, repo, args.python, gpu=bool(info.get("gpu")), smoke=args.smoke,
                  deadline=start + args.budget)
    ctx.info = info
    names = {part.name for part in PARTS}
    only, skip = [n for n in args.only.split(",") if n], [n for n in args.skip.split(",") if n]
    unknown = sorted(set(only + skip) - names)
    if unknown:
        p.error(f"unknown parts {unknown}; the parts are {[part.name for part in PARTS]}")
    results = run_parts(ctx, PARTS, only=only, skip=skip, echo=lambda line: print(line, flush=True))
    meta["seconds"] = round(time.monotonic() - start, 1)
    meta["budget"] += f" (used {meta['seconds']:.0f} s)"
    text = write_report(out, meta, results)
    pack_logs(out)
    print("\n" + text, flush=True)
    return 1 if overall(results) == "FAIL" else 0
