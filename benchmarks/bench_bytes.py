"""Bytes a supernet training step moves, counted per op: the memory-bandwidth floor of a step.

Runs one training step (forward, backward, optimizer) of the supernet at the reference's search settings and
adds, for every op dispatched below autograd that computes (views and allocations left out), the bytes of its
tensor arguments and results: what the op reads and writes if it touches each tensor once (perfect reuse
inside a kernel, none across kernels). Divided by the batch this is the traffic per image of today's launch
sequence; divided by a GPU's memory bandwidth it is the shortest time a step can take, so
``batch / floor`` bounds img/s from above. Runs on the CPU: the count does not depend on the device.

    python benchmarks/bench_bytes.py --kernels fused --batch-size 64
    python benchmarks/bench_bytes.py --kernels fused --batch-size 500 --evaluation
    python benchmarks/bench_bytes.py --kernels fused --batch-size 64 --bf16    # under bf16 autocast
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnao.autocast import bf16_autocast  # noqa: E402
from bnao.supernet.profiling import _NO_KERNEL  # noqa: E402

#: Positions of the source lists of bnao's node-round ops (``sources``; ``grad_sources``).
_SOURCE_LISTS = {"bnao.branch_round": (0,), "bnao.branch_round_backward": (3,),
                 "bnao.branch_round_backward_accumulate": (0, 4)}
#: kWeightGradChunkPairs and kMaxWeightGradChunks of csrc/cell/combine.h (``weight_grad_chunks``): how many
#: chunks of partial sums the combine's weight gradient writes.
_CHUNK_PAIRS, _MAX_CHUNKS = 4096, 64
#: Memory bandwidth (bytes/s) of the GPUs a gpu-check may run on (vendor figures: H100 SXM HBM3, H200 HBM3e).
BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}


class _ByteCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = Counter()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = f"aten::{func.overloadpacket.__name__}" if func.namespace == "aten" else str(func.overloadpacket)
        # A dispatched _to_copy is a real copy (a dtype cast under bf16 autocast): counted, unlike the rest of
        # the profiler's no-kernel list.
        if (name in _NO_KERNEL and name != "aten::_to_copy") or func.namespace not in ("aten", "bnao") or func.is_view:
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        total = sum(t.numel() * t.element_size() for t in tensors)
        # A node round reads (and its backward writes the gradients of) at most the two sources its branches
        # select, out of every state it is handed: count two, not all.
        for position in _SOURCE_LISTS.get(name, ()):
            sources = args[position]
            total -= sum(t.numel() * t.element_size() for t in sources[2:])
        # The combine and its backward read only the loose states (loose[s] != 0, checked on the device); the
        # backward still writes every state's gradient (zeros where not loose).
        if name in ("bnao.combine", "bnao.combine_backward"):
            states, weight, loose = args[-3:]
            total -= sum(t.numel() * t.element_size() for t, flag in zip(states, loose.tolist()) if flag == 0)
        # Its weight gradient's partial sums (csrc/cell/combine.h): written once, read once, float32 on a GPU
        # (double on a CPU, where this count does not aim).
        if name == "bnao.combine_backward":
            pairs = states[0].shape[0] * states[0].shape[2] * states[0].shape[3]
            chunks = min(max(pairs // _CHUNK_PAIRS, 1), _MAX_CHUNKS)
            total += 2 * chunks * weight.numel() * 4
        self.bytes[name] += total
        self.ops += 1
        return out


def main() -> int:
    from bnao.data import create_dataset, create_loader
    from bnao.sampling import create_sampler
    from bnao.space import NAOSpace
    from bnao.supernet import Supernet, SupernetTrainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default="fused", choices=["fused", "eager"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--channels", type=int, default=20)
    p.add_argument("--top", type=int, default=8, help="ops with the most bytes to list")
    p.add_argument("--evaluation", action="store_true",
                   help="count one pool-evaluation forward (batch statistics, no gradient) instead of a step")
    p.add_argument("--bf16", action="store_true", help="under bf16 autocast (its casts are counted too)")
    args = p.parse_args()
    torch.manual_seed(0)
    space = NAOSpace(op_set="small")
    model = Supernet(space, layers=args.layers, channels=args.channels, num_classes=10, kernels=args.kernels,
                     total_steps=10)
    pool = space.sample_array(20, 0)
    sampler = create_sampler("proportional", torch.ones(20).double().numpy(), seed=0)
    data = create_dataset("synthetic", num_samples=2 * args.batch_size, image_shape=(32, 32, 3), num_classes=10)
    loader = create_loader("tensor", data, args.batch_size, device="cpu", shuffle=True, drop_last=True, seed=0)
    trainer = SupernetTrainer(model, sampler, pool, loader, steps_total=10, graph="off", bf16=args.bf16)
    counter = _ByteCounter()
    if not args.evaluation:
        trainer.train_steps(1)  # plans and buffers of a first step are not part of the steady state
    if args.evaluation:
        images, _ = next(iter(loader))
        arch = tuple(int(v) for v in pool[0])
        model.eval()
        with torch.no_grad(), bf16_autocast("cpu", args.bf16):
            model(images, arch, bn_train=True)
            with counter:
                model(images, arch, bn_train=True)
    else:
        saved = {}  # storage -> bytes of every tensor autograd keeps for the backward: activation memory

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.train_steps(1)
    total = sum(counter.bytes.values())
    what = "evaluation forward" if args.evaluation else "training step"
    print(f"{what}, {args.kernels} cells{' (bf16)' if args.bf16 else ''}, N={args.layers}, C={args.channels}, batch {args.batch_size}: "
          f"{counter.ops} dispatched compute ops, "
          f"{total / 2**20:,.1f} MiB per {'forward' if args.evaluation else 'step'}, "
          f"{total / args.batch_size / 2**20:,.2f} MiB per image")
    if not args.evaluation:
        print(f"  saved for the backward: {sum(saved.values()) / 2**20:,.1f} MiB")
    for name, value in counter.bytes.most_common(args.top):
        print(f"  {name:<40} {value / 2**20:10,.1f} MiB ({value / total:5.1%})")
    for gpu, bandwidth in BANDWIDTH.items():
        floor = total / bandwidth
        print(f"  floor on {gpu} ({bandwidth / 1e12:.2f} TB/s): {floor * 1e3:.3f} ms per "
              f"{'forward' if args.evaluation else 'step'}, "
              f"at most {args.batch_size / floor:,.0f} img/s" + (f", {1 / floor:,.0f} archs/s" if args.evaluation else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
