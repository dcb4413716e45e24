"""The tensor loader's augmentation: ``bnao::gather_augment`` (one kernel) against its pure-PyTorch reference.

Each call gathers a batch from 50,000 random 32x32x3 uint8 images stored with a zero border of 4 (as the
``tensor`` loader keeps CIFAR on its device) and applies random crop, flip, normalisation and cutout 16.
Each variant is timed for at least ``--seconds`` after ``--warmup`` calls (synchronised on a GPU); the
outermost ops of one call are counted with torch.profiler. Prints a Markdown table (benchmarks/RESULTS.md).

Usage:
    python benchmarks/bench_augment.py [--device cpu|cuda] [--batch-sizes 256 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bnao import extension
from bnao.data.augment import AugmentConfig, normalisation, pad_images, sample_params
from bnao.ops.augment import gather_augment_reference


def _time(fn: Callable[[], torch.Tensor], device: torch.device, seconds: float, warmup: int) -> float:
    """Seconds per call, the clock synchronised with the device at both ends."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
        if calls % 16 == 0:
            sync()
    sync()
    return (time.perf_counter() - start) / calls


def _outermost_ops(fn: Callable[[], torch.Tensor]) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith(("aten::", "bnao::")) and e.cpu_parent is None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not extension.has_kernel("gather_augment", device.type):
        raise SystemExit(f"bnao._C has no gather_augment kernel for {device.type}: {extension.load_error()}")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_samples, 32, 32, 3), dtype=torch.uint8, generator=gen)
    cfg = AugmentConfig(crop_padding=4, cutout=16)
    data = pad_images(images.to(device), 4)
    scale, shift = normalisation([0.49, 0.48, 0.45], [0.25, 0.24, 0.26], device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} logical CPUs)"
    print(f"# device: {name}, torch threads {torch.get_num_threads()}; date: {datetime.date.today()}; "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print("| batch | reference: img/s (ms) | ops | bnao::gather_augment: img/s (ms) | ops |")
    print("|---|---|---|---|---|")
    for batch in args.batch_sizes:
        index = torch.randint(0, args.num_samples, (batch,), generator=gen).to(device)
        params = sample_params(batch, 32, 32, cfg, gen).to(device)
        call = (data, index, params, 32, 32, 4, 16, scale, shift)
        cells = []
        for fn in (lambda: gather_augment_reference(*call), lambda: torch.ops.bnao.gather_augment(*call)):
            seconds = _time(fn, device, args.seconds, args.warmup)
            cells.append(f"{batch / seconds:,.0f} ({seconds * 1e3:.3f}) | {_outermost_ops(fn)}")
        print(f"| {batch} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
