"""Data-parallel supernet throughput on 1 and more processes (torch.distributed; gloo on CPUs, NCCL on GPUs).

Every process trains the same arch at every step on its slice of the global batch, with the gradients
averaged in one all-reduce (:mod:`bnao.distributed`), exactly as ``torchrun -m bnao search`` does. The
script starts ``torchrun --standalone`` once per process count, times ``--steps`` steps after ``--warmup``,
and prints global images per second and the scaling efficiency ``img/s(K) / (K * img/s(1))`` at a fixed
*per-process* batch (weak scaling: the global batch grows with K), and the CPU time per image of all
processes together with its ratio to one process's (the distributed overhead, less sensitive than wall
time to other work on a shared machine; GPU runs: wall time is the figure).

    python benchmarks/bench_distributed.py --procs 1,2 --device cpu          # this CPU, one thread each
    python benchmarks/bench_distributed.py --procs 1,2,4,8 --device cuda     # a multi-GPU machine

Small op set, synthetic CIFAR-shaped data resident on the device, size-proportional sampler over 1000
random archs; N, C and the batch per process are options (CPU defaults are small so a run takes a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One rank: build, warm up, time, and (rank 0) print one JSON line."""
    import numpy as np
    import torch

    from bnao import data_parallel, distributed
    from bnao.data import create_dataset, create_loader
    from bnao.sampling import create_sampler
    from bnao.space import NAOSpace
    from bnao.supernet import Supernet, SupernetTrainer

    torch.set_num_threads(args.threads)
    context = distributed.init_from_env(args.device, timeout_s=600)
    device = distributed.rank_device(args.device, context)
    global_batch = args.batch_per_process * context.world_size
    data = create_dataset("synthetic", num_samples=max(4096, 4 * global_batch), image_shape=(32, 32, 3),
                          num_classes=10, seed=0)
    loader = create_loader("tensor", data, global_batch, device=device, shuffle=True, drop_last=True, seed=0)
    space = NAOSpace(num_nodes=5, op_set="small")
    pool = space.sample_array(1000, rng=np.random.default_rng(0))
    torch.manual_seed(0)
    model = Supernet(space, layers=args.layers, channels=args.channels, num_classes=10,
                     kernels=args.kernels).to(device)
    sync = None
    if context.enabled:
        loader = data_parallel.ShardedLoader(loader, context)
        model.batch_shard = (context.rank, context.world_size)
        sync = data_parallel.GradientSync(context)
    sampler = create_sampler("proportional", np.arange(1.0, 1001.0), seed=0, device=device)
    trainer = SupernetTrainer(model, sampler, pool, loader, steps_total=args.warmup + args.steps, seed=0,
                              device=device, data_parallel=sync)
    trainer.train_steps(args.warmup)
    distributed.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    stats = trainer.train_steps(args.steps)
    distributed.barrier()
    elapsed = time.perf_counter() - start
    # CPU seconds of all ranks: on a shared machine wall time measures the neighbours too, CPU time less so.
    cpu = distributed.sum_across_ranks([time.process_time() - cpu_start], "the CPU time")[0]
    if context.is_main:
        print(json.dumps({"processes": context.world_size, "backend": context.backend, "device": str(device),
                          "global_batch": global_batch, "steps": args.steps, "seconds": elapsed,
                          "img_per_s": global_batch * args.steps / elapsed, "trainer_img_per_s": stats["img_per_s"],
                          "ms_per_step": 1000 * elapsed / args.steps,
                          "cpu_ms_per_image": 1000 * cpu / (global_batch * args.steps)}), flush=True)
    distributed.shutdown()


def launch(args: argparse.Namespace, processes: int) -> dict:
    """Runs the workers of one process count under torchrun; returns rank 0's figures."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone",
               __file__, "--worker", "--device", args.device, "--layers", str(args.layers), "--channels",
               str(args.channels), "--batch-per-process", str(args.batch_per_process), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--kernels", args.kernels]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{processes} processes failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="1,2", help="comma-separated process counts (default 1,2)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--batch-per-process", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--kernels", default="eager", choices=("auto", "fused", "eager"),
                   help="supernet cells (default eager; the same all-reduce serves both paths)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    results = [launch(args, int(k)) for k in args.procs.split(",") if k]
    base, base_cpu = results[0]["img_per_s"] / results[0]["processes"], results[0]["cpu_ms_per_image"]
    for r in results:
        r["efficiency"] = r["img_per_s"] / (r["processes"] * base)
        r["cpu_efficiency"] = base_cpu / r["cpu_ms_per_image"]
        print(f"{r['processes']} process(es) ({r['backend']}, {r['device']}): global batch {r['global_batch']}, "
              f"{r['img_per_s']:.0f} img/s, {r['ms_per_step']:.1f} ms/step, scaling efficiency {r['efficiency']:.2f}; "
              f"{r['cpu_ms_per_image']:.2f} CPU ms/image (efficiency {r['cpu_efficiency']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
