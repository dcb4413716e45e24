"""Supernet training and pool-evaluation throughput at the reference's search settings.

Small op set, N=3, C=20, 10 classes, fp32, synthetic CIFAR-shaped data on the
device, size-proportional sampler over a random pool of 1000 archs; batch 64
and 256; pool evaluation at batch 500. Targets on an H100 (issue 3): >= 3,000
img/s at batch 64, >= 10,000 img/s at batch 256, >= 100 archs/s evaluation.

    python benchmarks/bench_supernet.py --device cuda
    python benchmarks/bench_supernet.py --device cuda --kernels eager,fused,fused+graph   # side by side
    python benchmarks/bench_supernet.py --device cuda --kernels fused+graph,fused+graph+bf16
    python benchmarks/bench_supernet.py --device cpu --steps 3 --warmup 1 --eval-archs 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnao.supernet.profiling import format_result, profile_supernet  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="64,256", help="comma-separated training batches (default 64,256)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per batch size (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--eval-archs", type=int, default=200, help="archs for the evaluation timing (default 200)")
    p.add_argument("--layers", type=int, default=3, help="N (default 3, the reference's; smaller for smoke runs)")
    p.add_argument("--channels", type=int, default=20, help="C (default 20, the reference's)")
    p.add_argument("--eval-batch", type=int, default=500, help="dev batch of the evaluation (default 500)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for every variant (or a +bf16 variant)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--kernels", default="auto",
                   help="comma-separated variants to compare side by side: eager, fused (eager steps on the fused "
                        "cells), fused+graph (steps replayed as CUDA graphs), auto (default); a +bf16 suffix adds "
                        "bf16 autocast to one variant (e.g. fused+graph+bf16)")
    p.add_argument("--json", metavar="FILE", help="also write all figures as JSON (rewritten after each result, "
                                                  "so a run cut short keeps what it measured)")
    args = p.parse_args()
    results = []
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    for variant in [k for k in args.kernels.split(",") if k]:
        kernels, *options = variant.split("+")
        if kernels not in ("auto", "eager", "fused") or not set(options) <= {"graph", "bf16"}:
            p.error(f"unknown variant {variant!r}: use eager, fused, fused+graph or auto, optionally +bf16")
        graph = "on" if "graph" in options else ("auto" if kernels == "auto" else "off")
        bf16 = args.bf16 or "bf16" in options
        for i, bs in enumerate(sizes):
            r = profile_supernet(dataset="synthetic", space="small", layers=args.layers, channels=args.channels,
                                 classes=10, batch_size=bs, steps=args.steps, warmup=args.warmup, device=args.device,
                                 bf16=bf16, channels_last=args.channels_last, pool_size=1000,
                                 sampler="proportional", eval_archs=args.eval_archs if i == len(sizes) - 1 else 0,
                                 eval_batch=args.eval_batch, kernels=kernels, graph=graph)
            print(format_result(r), flush=True)
            print(flush=True)
            results.append(r)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
