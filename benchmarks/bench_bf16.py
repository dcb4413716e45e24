"""bf16 on the fused path compared with float32 on the same steps (bnao.supernet.precision.bf16_fidelity).

Along one float32 SGD run of the supernet (a new arch each step, one synthetic CIFAR-shaped batch, drop-path
on), every step's loss and gradient are computed again under bf16 autocast with the fused cells, and with the
eager cells (PyTorch's own bf16 arithmetic) as the yardstick; prints the mean and worst loss gap and gradient
cosine of each. Throughput in bf16: benchmarks/bench_supernet.py --kernels fused+graph,fused+graph+bf16.

    python benchmarks/bench_bf16.py --device cpu --steps 10                  # demo-sized net, ~2 min
    python benchmarks/bench_bf16.py --device cpu --layers 3 --channels 20    # the reference's net
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bnao.space import NAOSpace  # noqa: E402
from bnao.supernet import Supernet  # noqa: E402
from bnao.supernet.precision import bf16_fidelity, summarize  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--space", default="small")
    p.add_argument("--layers", type=int, default=1, help="N (default 1; the reference's is 3)")
    p.add_argument("--channels", type=int, default=16, help="C (default 16; the reference's is 20)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="image side (default 32, CIFAR's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    space = NAOSpace(op_set=args.space)
    model = Supernet(space, layers=args.layers, channels=args.channels, num_classes=10, kernels="fused",
                     auxiliary=True, total_steps=args.steps, seed=1).to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    archs = space.sample_array(args.steps, np.random.default_rng(0))
    started = time.perf_counter()
    result = bf16_fidelity(model, images, labels, archs, lr=args.lr)
    summary = summarize(result)
    print(f"device {device}  space {args.space}  N={args.layers} C={args.channels}  batch {args.batch} "
          f"{args.size}x{args.size}  {args.steps} steps ({time.perf_counter() - started:.0f} s)")
    for kernels, s in summary.items():
        print(f"  {kernels} cells, bf16 vs float32: loss gap mean {s['loss_gap_mean']:.2e} max "
              f"{s['loss_gap_max']:.2e}; gradient cosine mean {s['cosine_mean']:.3f} min {s['cosine_min']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "steps": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
