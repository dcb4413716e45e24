"""Cost of keeping two search checkpoints: time per checkpoint and disk, with and without the previous one.

Builds a real search (``BalancedNAO``: supernet, pool, sampler, trainer, controller) from a preset on
synthetic data of the preset's image shape (the checkpoint does not hold data), fills the pool's
per-iteration scores and the draw counts as after ``--iterations`` search iterations, then times
``RunDir.save_checkpoint`` (temp file + fsync + hard link of the old file + rename) against a
plain atomic write of the same bytes without keeping the previous file, and reports both files'
sizes. Loading is timed too (weights_only load + NumPy decoding).

    python benchmarks/bench_checkpoint.py --config cifar10                    # the reference settings
    python benchmarks/bench_checkpoint.py --config cifar10 --pool-size 1000000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnao import safe_io  # noqa: E402
from bnao.search.config import load_config  # noqa: E402
from bnao.search.rundir import RunDir  # noqa: E402


def build_search(preset: str, pool_size: int, iterations: int, folder: Path):
    """A search at ``preset``'s settings with a pool of ``pool_size`` and ``iterations`` done."""
    from bnao.search.loop import BalancedNAO

    overrides = [f"search.pool_size={pool_size}", "data.dataset=synthetic", "data.synthetic_samples=512",
                 "device=cpu", f"search.iterations={iterations}"]
    config = load_config(preset, overrides)
    run_dir = RunDir(folder / "run")
    run_dir.create(config)
    search = BalancedNAO(config, run_dir, progress=False, echo=lambda line: None)
    rng = np.random.default_rng(0)
    n = len(search.pool)
    search.pool.scores = [rng.random(n).astype(np.float32) for _ in range(iterations + 1)]
    search.pool.predicted = rng.random(n).astype(np.float32)
    search.draws = [{"index": np.arange(n), "draws": rng.integers(0, 50, n)} for _ in range(iterations + 1)]
    search.state.update(iteration=iterations, phase="train", train_step=0, phase_seconds={})
    return search, run_dir


def time_saves(run_dir: RunDir, search, repeats: int) -> dict:
    """Median seconds of a checkpoint keeping the previous one vs a plain atomic write of the same bytes."""
    search.checkpoint()  # a first one, so every timed save has a previous file to keep
    data = run_dir.checkpoint_path.read_bytes()
    keep, plain, full, load, link = [], [], [], [], []
    single = run_dir.path / "single.pt"
    for _ in range(repeats):
        t0 = time.perf_counter()
        # The only step keeping the previous file adds to a write: a hard link and a rename.
        safe_io._keep_as_previous(run_dir.checkpoint_path, run_dir.previous_checkpoint_path)
        link.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        search.checkpoint()  # what the search does: serialise, write keeping the previous, progress.json
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        safe_io.atomic_write_bytes(run_dir.checkpoint_path, data, previous=run_dir.previous_checkpoint_path)
        keep.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        safe_io.atomic_write_bytes(single, data)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_dir.load_checkpoint()
        load.append(time.perf_counter() - t0)
    return {
        "checkpoint_bytes": run_dir.checkpoint_path.stat().st_size,
        "previous_bytes": run_dir.previous_checkpoint_path.stat().st_size,
        "checkpoint_s": statistics.median(full),
        "write_keep_previous_s": statistics.median(keep),
        "write_single_s": statistics.median(plain),
        "keep_previous_step_s": statistics.median(link),
        "load_s": statistics.median(load),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10", help="preset (default cifar10, the reference settings)")
    parser.add_argument("--pool-size", type=int, default=None, help="pool size (default: the preset's)")
    parser.add_argument("--iterations", type=int, default=3, help="search iterations done (scores, draws)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    pool_size = args.pool_size or load_config(args.config)["search"]["pool_size"]
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        search, run_dir = build_search(args.config, pool_size, args.iterations, Path(folder))
        result = {"config": args.config, "pool_size": len(search.pool), "iterations": args.iterations,
                  **time_saves(run_dir, search, args.repeats)}
    if args.json:
        print(json.dumps(result))
    else:
        mb = 1 / 2**20
        print(f"{args.config}, pool {result['pool_size']:,}: checkpoint {result['checkpoint_bytes'] * mb:.1f} MiB "
              f"(+{result['previous_bytes'] * mb:.1f} MiB kept as checkpoint.prev.pt); write keeping the previous "
              f"{1e3 * result['write_keep_previous_s']:.1f} ms vs single {1e3 * result['write_single_s']:.1f} ms "
              f"(the link + rename that keeps it: {1e3 * result['keep_previous_step_s']:.3f} ms); "
              f"whole checkpoint {1e3 * result['checkpoint_s']:.1f} ms; load {1e3 * result['load_s']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
