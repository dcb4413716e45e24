"""NAO controller cost at the reference's settings (SPEC section 5).

Fits the controller on a pool of 1,000 archs (scores: a smooth function of the
arch plus noise, so the predictor has something to learn), for a few epochs,
and extrapolates the reference's 1,000 epochs; then times generation of 300
new archs from the top 100. Prints what it measured.

    python benchmarks/bench_controller.py [--epochs 20] [--archs 1000] [--device cpu] [--threads 0]
"""

import argparse
import platform
import time

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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    space = NAOSpace()
    rng = np.random.default_rng(0)
    archs = space.sample_array(args.archs, rng)
    ops = archs.reshape(-1, 2 * space.num_nodes, 4)[:, :, [1, 3]]
    scores = (ops < 2).mean(axis=(1, 2)) + 0.05 * rng.standard_normal(args.archs)  # share of sep convs + noise

    ctrl = NAOController(space, device=args.device, seed=0)
    t0 = time.perf_counter()
    metrics = ctrl.fit(archs, scores, epochs=args.epochs)
    fit_s = time.perf_counter() - t0
    top = archs[np.argsort(-scores)[:100]]
    t0 = time.perf_counter()
    new, info = ctrl.generate(top, 300, exclude_hashes=space.hash_array(archs), return_info=True)
    gen_s = time.perf_counter() - t0

    print(f"device {args.device} ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}")
    print(f"fit: {args.archs} archs x {args.epochs} epochs in {fit_s:.1f} s = {fit_s / args.epochs * 1000:.0f} ms/epoch"
          f" -> 1000 epochs ~ {fit_s / args.epochs * 1000 / 60:.1f} min")
    print(f"held-out pairwise accuracy after {args.epochs} epochs: {metrics['pairwise_accuracy']:.3f}, "
          f"reconstruction (token) {metrics['reconstruction_token']:.3f}")
    print(f"generate: {len(new)} new archs from 100 seeds in {gen_s:.2f} s ({info['rounds']} rounds)")
    # Sanity: predicted scores of the new archs vs their seeds.
    print(f"mean predicted score: seeds {ctrl.predict(top).mean():.3f}, new {ctrl.predict(new).mean():.3f}")
    print(f"pairwise accuracy of predictions on the training pool: {pairwise_accuracy(scores, ctrl.predict(archs)):.3f}")


if __name__ == "__main__":
    main()
