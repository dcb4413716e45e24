"""Large pools: set-up cost and per-step cost of a search at pool sizes 1e3 .. 1e6.

Builds the search (random pool -> canonical hashes, exact model sizes, sampler
table, supernet trainer) on tiny synthetic data with a tiny supernet, then
times supernet steps and one checkpoint at each pool size. Per-step cost must
not grow with the pool: a step draws one index (O(1)) and reads one row.

    python benchmarks/bench_pool.py [--sizes 1e3,1e6] [--steps 30]
"""

import argparse
import os
import tempfile
import time

import torch

from _common import cpu_model
from bnao.search.config import load_config
from bnao.search.loop import BalancedNAO
from bnao.search.rundir import RunDir


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e3,1e6")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    print(f"device: cpu ({cpu_model()}), torch threads {torch.get_num_threads()}")
    print("| pool | set-up s | ms/step (draw+train) | draw ms/step | checkpoint s | checkpoint MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in [int(float(x)) for x in args.sizes.split(",")]:
        config = load_config(None, [
            "device=cpu", "data.dataset=synthetic", "data.synthetic_samples=2000", "data.synthetic_size=16",
            "supernet.layers=1", "supernet.channels=4", "supernet.batch_size=32", "supernet.eval_batch_size=100",
            f"search.pool_size={n}",
        ])
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = RunDir(tmp)
            run_dir.create(config)
            t0 = time.perf_counter()
            search = BalancedNAO(config, run_dir, progress=False, echo=lambda s: None)
            search._start_iteration(0)  # sampler over the whole pool, as in iteration 0 (includes a checkpoint)
            setup = time.perf_counter() - t0
            search.trainer.train_steps(3)  # warm-up
            stats = search.trainer.train_steps(args.steps)
            t0 = time.perf_counter()
            search.checkpoint()
            ckpt_s = time.perf_counter() - t0
            mb = os.path.getsize(run_dir.checkpoint_path) / 2**20
        step_ms = stats["ms_per_step"]
        draw_ms = stats.get("draw_ms", float("nan"))
        print(f"| {n:,} | {setup:.1f} | {step_ms:.1f} | {draw_ms:.3f} | {ckpt_s:.2f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
