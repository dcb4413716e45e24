"""Time of bnao::combine's forward + backward against the stack + ReLU + 1x1 convolution it replaces.

A cell's combine at the reference search net's shapes (batch 64, 7 states of which 4 are loose ends):
C=20 at 32x32 (first stage) and C=80 at 8x8 (last stage). Prints ms per forward + backward, on the
device given, with torch's current thread count on a CPU.

    python benchmarks/bench_combine.py --device cpu
    OMP_NUM_THREADS=1 python benchmarks/bench_combine.py --device cpu
    python benchmarks/bench_combine.py --device cuda --json    # one JSON object (make gpu-check)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnao.ops.fused.combine import combine  # noqa: E402

LOOSE = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def _time(run, device: torch.device, repeats: int) -> float:
    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    loose = torch.tensor(LOOSE, device=device)
    rows = []
    for channels, side in ((20, 32), (80, 8)):
        xs = [torch.randn(args.batch_size, channels, side, side, device=device, requires_grad=True) for _ in LOOSE]
        weight = torch.randn(channels, len(LOOSE), channels, device=device, requires_grad=True)
        grad = torch.randn(args.batch_size, channels, side, side, device=device)

        def op():
            torch.autograd.grad(combine(xs, weight, loose), [weight, *xs], grad)

        def convolution():
            columns = (weight * loose.view(1, -1, 1)).reshape(channels, -1, 1, 1)
            out = F.conv2d(F.relu(torch.stack(xs, 1).flatten(1, 2)), columns)
            torch.autograd.grad(out, [weight, *xs], grad)

        rows.append({"channels": channels, "side": side, "combine_ms": _time(op, device, args.repeats),
                     "convolution_ms": _time(convolution, device, args.repeats)})
    if args.json:
        print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                          "rows": rows}))
        return 0
    print(f"{device}, {torch.get_num_threads()} threads, batch {args.batch_size}, 7 states (4 loose)")
    for row in rows:
        shape = f"C={row['channels']}, {row['side']}x{row['side']}"
        print(f"  {shape}: bnao::combine {row['combine_ms']:8.1f} ms, stack + ReLU + 1x1 conv "
              f"{row['convolution_ms']:8.1f} ms (forward + backward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
