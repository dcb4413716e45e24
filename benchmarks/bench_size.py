"""Throughput of the closed-form model size on one CPU thread (issue 2, "Figures").

Measures archs/s of ``bnao.model_size`` for the search defaults (small op set,
B=5, CIFAR skeleton, N=3, C=20) in three ways:

* the compiled kernel on 1e6 archs (through the Python API and the raw op);
* the pure-Python reference (``backend="reference"``) on fewer archs;
* the reference implementation's way: building every network on the CPU and
  summing its parameters, on a few archs.

Usage: python benchmarks/bench_size.py [--archs 1000000] [--ref-archs 2000] [--build-archs 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from _common import cpu_model, timed  # noqa: E402  (benchmarks/ is the script folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, default=1_000_000, help="archs for the compiled kernel")
    parser.add_argument("--ref-archs", type=int, default=2000, help="archs for the Python reference")
    parser.add_argument("--build-archs", type=int, default=5, help="networks built the reference's way")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from bnao.extension import has_kernel
    from bnao.nets import build_network
    from bnao.size import model_size
    from bnao.space import NAOSpace
    from bnao.space.ops import op_table

    torch.set_num_threads(1)
    space = NAOSpace(num_nodes=5, op_set="small")
    cfg = dict(skeleton="cifar", layers=3, channels=20, classes=10)
    rows = []
    print(f"device: {cpu_model()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}")
    if hasattr(os, "getloadavg"):
        # Other processes on the host slow every row; the load average says how busy it was.
        print("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print("config: small op set, B=5, cifar skeleton, N=3, C=20, 10 classes, 32x32")

    archs = space.sample_array(args.archs, 0)
    if has_kernel("model_size", "cpu"):
        t = timed(lambda: model_size(archs, space, **cfg), args.repeats)
        rows.append(("C++ kernel via bnao.model_size (params)", args.archs, t))
        t = timed(lambda: model_size(archs, space, measure="both", **cfg), args.repeats)
        rows.append(("C++ kernel via bnao.model_size (params+madds)", args.archs, t))
        table = op_table("small")
        kinds, kernels = [k for k, _ in table], [s for _, s in table]
        tensor = torch.from_numpy(archs)
        t = timed(lambda: torch.ops.bnao.model_size(tensor, 5, kinds, kernels, 0, 3, 20, 10, 3, 32), args.repeats)
        rows.append(("C++ kernel, raw torch.ops.bnao.model_size", args.archs, t))
    else:
        print("compiled kernel not available: C++ rows skipped")

    ref = archs[: args.ref_archs]
    t = timed(lambda: model_size(ref, space, backend="reference", **cfg), max(1, args.repeats // 2))
    rows.append(("Python reference (closed form)", len(ref), t))

    built = archs[: args.build_archs]

    def build_all():
        for a in built:
            net = build_network(a, space, layers=3, channels=20, num_classes=10)
            sum(p.numel() for p in net.parameters())

    t = timed(build_all, 1)
    rows.append(("reference's way: build each network on CPU", len(built), t))

    print()
    print(f"| {'method':<48} | {'archs':>9} | {'seconds':>9} | {'archs/s':>14} |")
    print(f"|{'-' * 50}|{'-' * 10}:|{'-' * 10}:|{'-' * 15}:|")
    for name, n, sec in rows:
        print(f"| {name:<48} | {n:>9,} | {sec:>9.4f} | {n / sec:>14,.0f} |")
    # Sanity: the kernel's count equals the built network's.
    if has_kernel("model_size", "cpu"):
        net = build_network(built[0], space, layers=3, channels=20, num_classes=10)
        assert sum(p.numel() for p in net.parameters()) == int(model_size(built[0], space, **cfg)[0])
    sizes = model_size(archs[:100_000], space, **cfg)
    print(f"\nparams over 1e5 random archs: min {sizes.min():,}, median {int(np.median(sizes)):,}, max {sizes.max():,}")


if __name__ == "__main__":
    main()
