"""Size-proportional sampling: bnao's alias sampler against the reference's way.

For each pool size it measures, with model-size-like weights (uniform integers
in [1e5, 5e6]):

* bnao: table build time (``create_sampler``) and the mean latency of one
  ``sampler.draw()`` from Python, after warm-up;
* the reference's way: ``numpy.random.choice(range(n), p=p)`` per step, with
  ``p`` recomputed from the Python list of sizes at every call, as the
  reference implementation does;
* ``torch.multinomial(weights, 1)`` per draw;

then the throughput of batched ``draw(n)`` from a pool of 1e6 on each device.
Prints Markdown tables (pasted into benchmarks/RESULTS.md).

Usage:
    python benchmarks/bench_sampler.py [--sizes 1e3,1e4,1e5,1e6,1e7] [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from typing import Callable, List

import numpy as np
import torch

import bnao
from bnao import extension

from _common import cpu_model  # noqa: E402  (benchmarks/ is the script folder)


def mean_call_seconds(fn: Callable[[], object], budget_s: float, min_calls: int = 3, max_calls: int = 10_000) -> float:
    """Mean wall time of fn() over as many calls as fit in budget_s (at least min_calls)."""
    fn()  # warm-up (allocations, lazy imports)
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= max_calls or (calls >= min_calls and elapsed >= budget_s):
            return elapsed / calls


def bnao_single_draw_seconds(sampler, calls: int) -> float:
    """Mean latency of sampler.draw() over `calls` calls, after a warm-up that fills the buffer."""
    draw = sampler.draw
    for _ in range(20_000):
        draw()
    start = time.perf_counter()
    for _ in range(calls):
        draw()
    return (time.perf_counter() - start) / calls


def reference_draw(sizes: List[int]) -> int:
    """One draw the reference's way: probabilities rebuilt from the Python list, then numpy choice."""
    total = sum(sizes)
    p = [s / total for s in sizes]
    return int(np.random.choice(range(len(sizes)), p=p))


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    if us >= 1e4:
        return f"{us / 1e3:,.1f} ms"
    return f"{us:,.3f} us" if us < 10 else f"{us:,.1f} us"


def single_draw_table(sizes: List[int], budget_s: float) -> List[str]:
    rows = [
        "| pool | bnao table build (best of 3) | bnao `draw()` | reference `np.random.choice` | `torch.multinomial` | bnao speed-up vs reference |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(rows), flush=True)
    bnao.create_sampler("proportional", [1.0, 2.0]).draw()  # loads the extension outside the timings
    rng = np.random.default_rng(0)
    for n in sizes:
        sizes_np = rng.integers(100_000, 5_000_001, n)
        # Table build = create_sampler (validation + alias table), best of 3.
        build = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            sampler = bnao.create_sampler("proportional", sizes_np, seed=1)
            build = min(build, time.perf_counter() - start)
        single = bnao_single_draw_seconds(sampler, calls=1_000_000)
        sizes_list = sizes_np.tolist()
        reference = mean_call_seconds(lambda: reference_draw(sizes_list), budget_s, max_calls=2_000)
        weights = torch.from_numpy(sizes_np).double()
        multinomial = mean_call_seconds(lambda: torch.multinomial(weights, 1), budget_s, max_calls=20_000)
        rows.append(
            f"| {n:,} | {build * 1e3:,.1f} ms | {fmt_us(single)} | {fmt_us(reference)} | "
            f"{fmt_us(multinomial)} | {reference / single:,.0f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def batched_draws(device: str, pool: int, per_call: int, budget_s: float) -> dict:
    """Draws per second of ``sampler.draw(per_call)`` on ``device`` (synchronised), with what ran."""
    sizes_np = np.random.default_rng(1).integers(100_000, 5_000_001, pool)
    sampler = bnao.create_sampler("proportional", sizes_np, seed=1, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        sampler.draw(per_call)
        sync()

    seconds = mean_call_seconds(call, budget_s, min_calls=5)
    kernel = "compiled" if extension.has_kernel("alias_draw", device) else "NumPy reference"
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    return {"device": device, "device_name": name, "kernel": kernel, "pool": pool, "per_call": per_call,
            "draws_per_s": per_call / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7", help="comma-separated pool sizes")
    parser.add_argument(
        "--device", default="all", choices=["cpu", "cuda", "all"], help="devices for batched draws (all = cpu + cuda if present)"
    )
    parser.add_argument("--budget", type=float, default=1.0, help="seconds spent per timed baseline")
    parser.add_argument("--batch-pool", type=float, default=1e6, help="pool size of the batched-draw benchmark")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON (an empty --sizes skips the "
                        "single-draw table)")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"cpu: {cpu_model()} ({torch.get_num_threads()} torch threads), load average {os.getloadavg()[0]:.1f}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, bnao {bnao.__version__}, "
          f"compiled kernels: cpu={extension.has_kernel('alias_draw', 'cpu')} cuda={extension.has_kernel('alias_draw', 'cuda')}")
    print()
    if sizes:
        print("One size-proportional draw from Python (weights: uniform integers in [1e5, 5e6]):")
        print()
        single_draw_table(sizes, args.budget)
        print()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    print("Batched draws, `sampler.draw(n)`:")
    print()
    print("| device | kernel | pool | draws per call | draws/s |")
    print("|---|---|---:|---:|---:|")
    batched = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("| cuda | - | - | - | not measured: no CUDA GPU visible |")
            continue
        per_call = 100_000_000 if device == "cuda" else 10_000_000
        r = batched_draws(device, int(args.batch_pool), per_call, args.budget)
        batched.append(r)
        print(f"| {device} ({r['device_name']}) | {r['kernel']} | {r['pool']:,} | {r['per_call']:,} | "
              f"{r['draws_per_s']:,.3g} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"batched": batched}, fh, indent=2)


if __name__ == "__main__":
    main()
