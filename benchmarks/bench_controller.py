"""NAO controller cost at the reference's settings (SPEC section 5).

Fits the controller on a pool of 1,000 archs (scores: a smooth function of the
arch plus noise, so the predictor has something to learn), for a few epochs,
and extrapolates the reference's 1,000 epochs; then times generation of 300
new archs from the top 100. Prints what it measured.

    python benchmarks/bench_controller.py [--epochs 20] [--archs 1000] [--device cpu] [--threads 0]
    python benchmarks/bench_controller.py --device cuda --epochs 3 --graph auto,off --json out.json

With several ``--graph`` variants (controller.graph: auto = minibatches replayed as CUDA graphs where
possible, off = uncaptured) each fits a fresh controller of the same seed, side by side.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bnao.controller import NAOController
from bnao.metrics import pairwise_accuracy
from bnao.space import NAOSpace


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--graph", default="auto", help="comma-separated controller.graph variants (auto, on, off)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    space = NAOSpace()
    rng = np.random.default_rng(0)
    archs = space.sample_array(args.archs, rng)
    ops = archs.reshape(-1, 2 * space.num_nodes, 4)[:, :, [1, 3]]
    scores = (ops < 2).mean(axis=(1, 2)) + 0.05 * rng.standard_normal(args.archs)  # share of sep convs + noise
    print(f"device {args.device} ({platform.processor() or platform.machine()}), "
          f"torch threads {torch.get_num_threads()}")
    rows = [fit_variant(space, archs, scores, args.device, args.epochs, graph)
            for graph in args.graph.split(",") if graph]
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "archs": args.archs, "epochs": args.epochs,
                                               "rows": rows}, indent=2))


EXPAND, BATCH = 10, 100  # the fit's defaults (the reference's): 10 copies of the training archs, batches of 100


def fit_variant(space, archs, scores, device, epochs, graph):
    """Fits a fresh controller (seed 0) with ``graph``, then generates 300 archs; prints and returns the figures.

    The time per epoch is the median over the epochs after the second: the first two hold each minibatch
    size's warm-up run and its capture (with graphs), which the fit's own ``seconds_per_epoch`` averages in.
    """
    ctrl = NAOController(space, device=device, seed=0)
    ends = []  # the progress callback reads the epoch's loss sums, so each epoch has finished on the device
    t0 = time.perf_counter()
    metrics = ctrl.fit(archs, scores, epochs=epochs, graph=graph, expand=EXPAND, batch_size=BATCH,
                       progress=lambda epoch, total, values: ends.append(time.perf_counter()))
    fit_s = time.perf_counter() - t0
    durations = np.diff(ends)[1:] if len(ends) >= 4 else np.diff([t0] + ends)  # epochs 3.. when there are some
    epoch_s = float(np.median(durations))
    per_epoch = -(-metrics["num_train"] * EXPAND // BATCH)
    top = archs[np.argsort(-scores)[:100]]
    t0 = time.perf_counter()
    new, info = ctrl.generate(top, 300, exclude_hashes=space.hash_array(archs), return_info=True)
    gen_s = time.perf_counter() - t0
    path = metrics["graph"]
    print(f"graph={graph} ({path['mode']}: {path['reason']})")
    print(f"  fit: {len(archs)} archs x {epochs} epochs in {fit_s:.1f} s; steady epoch {epoch_s * 1000:.0f} ms, "
          f"{epoch_s / per_epoch * 1000:.2f} ms/minibatch -> 1000 epochs ~ {epoch_s * 1000 / 60:.1f} min")
    print(f"  held-out pairwise accuracy after {epochs} epochs: {metrics['pairwise_accuracy']:.3f}, "
          f"reconstruction (token) {metrics['reconstruction_token']:.3f}")
    print(f"  generate: {len(new)} new archs from 100 seeds in {gen_s:.2f} s ({info['rounds']} rounds)")
    print(f"  pairwise accuracy of predictions on the training pool: "
          f"{pairwise_accuracy(scores, ctrl.predict(archs)):.3f}")
    return {"graph": graph, "path": path, "fit_s": fit_s, "epoch_s": epoch_s, "minibatches": per_epoch,
            "minibatch_ms": epoch_s / per_epoch * 1000, "generate_s": gen_s,
            "pairwise_accuracy": metrics["pairwise_accuracy"]}


if __name__ == "__main__":
    main()
