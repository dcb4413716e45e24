"""Throughput (images/s) of the data loaders, with the full CIFAR training augmentation.

Measures every loader available on the device on CIFAR-shaped synthetic data
(50,000 x 32x32x3 uint8) and, when it is installed, Fashion-MNIST's 60,000
training images, at each batch size, with random crop (padding 4) + flip +
cutout + normalisation. The clock runs over whole batches delivered on the
device (on CUDA it is synchronised before it starts and stops).

Usage::

    python benchmarks/bench_loader.py                       # CPU
    python benchmarks/bench_loader.py --device cuda         # GPU targets: tensor >= 1e6, dali >= 2e5 img/s
    python benchmarks/bench_loader.py --loaders tensor --batch-sizes 256 --seconds 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import cpu_model  # noqa: E402  (benchmarks/ is the script folder)
from bnao.data import (  # noqa: E402
    AugmentConfig,
    DatasetNotFoundError,
    available_loaders,
    create_dataset,
    create_loader,
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loader, device: torch.device, seconds: float, warmup: int, min_batches: int) -> Tuple[float, int]:
    """Images per second over at least ``seconds`` and ``min_batches`` after ``warmup`` batches."""
    stream = loader.stream()
    for _ in range(warmup):
        next(stream)
    sync(device)
    images = batches = 0
    start = time.perf_counter()
    while True:
        x, _ = next(stream)
        images += x.shape[0]
        batches += 1
        if batches >= min_batches and time.perf_counter() - start >= seconds:
            break
    sync(device)
    return images / (time.perf_counter() - start), batches


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--loaders", nargs="*", help="default: every loader available on the device")
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[256, 1024])
    p.add_argument("--num-samples", type=int, default=50000, help="synthetic CIFAR-shaped images")
    p.add_argument("--cutout", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--min-batches", type=int, default=5)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the torch loader")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); 1 avoids oversubscription on a busy CPU")
    p.add_argument("--no-fashion-mnist", action="store_true", help="skip Fashion-MNIST even if installed")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    loaders = args.loaders or available_loaders(device)
    augment = AugmentConfig(crop_padding=4, flip=True, cutout=args.cutout)

    datasets = [("synthetic 32x32x3", create_dataset("synthetic", num_samples=args.num_samples))]
    if not args.no_fashion_mnist:
        try:
            datasets.append(("fashion_mnist 28x28x1", create_dataset("fashion_mnist")))
        except DatasetNotFoundError:
            print("Fashion-MNIST not found; measuring synthetic data only", file=sys.stderr)

    print(f"# device: {device_name(device)}")
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"# date: {datetime.date.today().isoformat()}; torch {torch.__version__}; load average {load}")
    print(f"# command: python benchmarks/bench_loader.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# augmentation: crop pad 4 + flip + cutout {args.cutout} + normalise; "
          f"timed >= {args.seconds}s after {args.warmup} warm-up batches")
    print("| loader | dataset | images | batch | img/s | ms/batch | batches timed |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for ds_name, ds in datasets:
        for name in loaders:
            for bsz in args.batch_sizes:
                kw = {"num_workers": args.num_workers} if name == "torch" else {}
                loader = create_loader(name, ds, bsz, device=device, augment=augment, **kw)
                rate, n = measure(loader, device, args.seconds, args.warmup, args.min_batches)
                print(f"| {name} | {ds_name} | {len(ds)} | {bsz} | {rate:,.0f} | {1000 * bsz / rate:.2f} | {n} |",
                      flush=True)
                rows.append({"loader": name, "dataset": ds_name, "images": len(ds), "batch": bsz,
                             "img_per_s": rate, "batches": n})
                del loader
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device_name(device), "rows": rows}, fh, indent=2)
    print(f"# load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
