"""The workload run under compute-sanitizer: every CUDA path of bnao once, on a small model.

Two supernet training steps per cell path (eager, fused, fused in bf16; drop-path masks drawn on
the device, masked SGD, the non-finite flag copied through pinned memory), a batch of the
GPU-resident loader, batched and single alias draws (the compiled CUDA kernel), a pool
evaluation (float32 and bf16) and the combine op's forward and backward. Small sizes keep
memcheck's slowdown to seconds.
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def run_one_step(device: str) -> int:
    """Runs the workload on ``device``; prints one line per stage and returns 0."""
    from bnao import create_sampler, create_search_space, model_size
    from bnao.data import create_dataset, create_loader
    from bnao.supernet import Supernet, SupernetTrainer, evaluate_pool

    dev = torch.device(device)
    space = create_search_space("nao", op_set="small")
    pool = space.sample_array(16, rng=0)
    sizes = np.asarray(model_size(pool, space=space, layers=1, channels=8), dtype=np.float64)
    sampler = create_sampler("proportional", sizes, seed=0, device=dev)
    draws = sampler.draw(100_000)
    single = [sampler.draw() for _ in range(3)]
    assert int(draws.max()) < len(pool) and all(0 <= i < len(pool) for i in single)
    print(f"sampler: {draws.numel() + len(single)} draws on {draws.device}", flush=True)

    data = create_dataset("synthetic", num_samples=64, image_shape=(32, 32, 3), num_classes=10)
    loader = create_loader("tensor", data, 16, device=dev, augment=True, seed=0)
    images, labels = next(iter(loader))
    print(f"loader: batch {tuple(images.shape)} on {images.device}", flush=True)

    from bnao.supernet.fused_forward import fused_built

    # Every cell path: the eager PyTorch cells and, where built, the fused kernels in float32 and in bf16.
    paths = [("eager", False)] + ([("fused", False), ("fused", True)] if fused_built(dev.type) else [])
    for kernels, bf16 in paths:
        torch.manual_seed(0)
        model = Supernet(space, layers=1, channels=8, num_classes=10, total_steps=2, kernels=kernels).to(dev)
        trainer = SupernetTrainer(model, sampler, pool, loader, steps_total=2, device=dev, seed=0, bf16=bf16)
        # Two steps: on the fused path the first runs uncaptured and captures, the second replays the graphs
        # (without the caching allocator, as under memcheck, no capture is tried and both run uncaptured).
        stats = trainer.train_steps(2)
        assert np.isfinite(stats["loss"]), stats
        status = trainer.graph_status
        print(f"train ({kernels} cells{', bf16' if bf16 else ''}): 2 steps, loss {stats['loss']:.4f}; step "
              f"{status['mode']} ({status['reason']})", flush=True)

    for bf16 in (False, True):
        acc, loss = evaluate_pool(model, pool[:2], (images, labels), bf16=bf16)
        assert np.isfinite(loss).all()
        print(f"evaluate{' (bf16)' if bf16 else ''}: 2 archs, accuracy {acc.tolist()}", flush=True)
    _combine_both_ways(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    print("one step: ok", flush=True)
    return 0


def _combine_both_ways(dev: torch.device) -> None:
    """bnao::combine forward and backward (pool evaluation runs the forward only; the backward's kernels,
    a per-element item and a block reduction, run nowhere else), float32 and bf16, with a partial tile."""
    from bnao import extension

    if not extension.has_kernel("combine", dev.type):
        print("combine: not built for this device", flush=True)
        return
    for dtype in (torch.float32, torch.bfloat16):
        states = [torch.randn(2, 11, 5, 5, device=dev).to(dtype).requires_grad_() for _ in range(7)]
        weight = torch.randn(11, 7, 11, device=dev, requires_grad=True)
        loose = torch.tensor([1, 0, 0, 1, 0, 1, 1], dtype=torch.float32, device=dev)
        out = torch.ops.bnao.combine(states, weight, loose)
        out.float().square().sum().backward()
        assert torch.isfinite(weight.grad).all() and not weight.grad[:, 1].any()
        print(f"combine ({dtype}): forward and backward, 7 states, 11 channels", flush=True)


if __name__ == "__main__":
    sys.exit(run_one_step(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
