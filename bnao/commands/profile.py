"""``bnao profile``: supernet training throughput, per-phase time split, peak memory, pool evaluation speed."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from .errors import report_error

HELP = "profile supernet training throughput"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bnao profile``."""
    parser.add_argument("--dataset", default="synthetic",
                        help="synthetic (CIFAR-shaped random images), fashion_mnist, cifar10, ... (default synthetic)")
    parser.add_argument("--data-dir", default=None, help="data directory for real datasets")
    parser.add_argument("--space", default="small", choices=["small", "middle"], help="op set (default small)")
    parser.add_argument("--layers", type=int, default=3, help="N, normal cells per stage (default 3)")
    parser.add_argument("--channels", type=int, default=20, help="C of the first stage (default 20)")
    parser.add_argument("--classes", type=int, default=10, help="classes of synthetic data (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels_last activations")
    parser.add_argument("--pool-size", type=int, default=1000, help="random archs in the pool (default 1000)")
    parser.add_argument("--sampler", default="proportional", choices=["proportional", "uniform"],
                        help="arch sampler (default proportional to model size)")
    parser.add_argument("--eval-archs", type=int, default=0,
                        help="also time pool evaluation over this many archs at batch --eval-batch (default 0: skip)")
    parser.add_argument("--eval-batch", type=int, default=500, help="dev batch of the evaluation (default 500)")
    parser.add_argument("--loader", default="auto", help="data loader (default auto)")
    parser.add_argument("--no-count-ops", action="store_true", help="skip counting the ops launched per step")
    parser.add_argument("--kernels", default="auto", choices=["auto", "fused", "eager"],
                        help="supernet cells: fused kernels, eager PyTorch, or auto (default)")
    parser.add_argument("--graph", default="auto", choices=["auto", "on", "off"],
                        help="training steps as replayed CUDA graphs on the fused path (auto: where possible; on: required, "
                             "an error where the fused cells are not used; on a CPU the same device-data step runs "
                             "uncaptured, as the report's 'step' line says)")
    parser.add_argument("--sequence-archs", type=int, default=5,
                        help="compare the launch sequence of a training step over this many archs (default 5; 0: skip)")
    parser.add_argument("--top-kernels", type=int, default=0, metavar="N",
                        help="list the N kernels (ops on a CPU) that take most of a training step (default 0: skip)")
    parser.add_argument("--trace", metavar="DIR", default=None, help="write a torch.profiler trace to DIR")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    """Runs the measurement and prints it; 2 on a usage or data error."""
    from ..data import DatasetNotFoundError
    from ..supernet.fused_forward import FusedKernelsUnavailable
    from ..supernet.profiling import format_result, profile_supernet

    for name in ("layers", "channels", "classes", "batch_size", "steps", "pool_size"):
        if getattr(args, name) < 1:
            return report_error("profile", f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup", "eval_archs", "sequence_archs", "top_kernels"):
        if getattr(args, name) < 0:
            return report_error("profile", f"--{name.replace('_', '-')} must be >= 0")
    try:
        result = profile_supernet(
            dataset=args.dataset, data_root=args.data_dir, space=args.space, layers=args.layers,
            channels=args.channels, classes=args.classes, batch_size=args.batch_size, steps=args.steps,
            warmup=args.warmup, device=args.device, bf16=args.bf16, channels_last=args.channels_last,
            pool_size=args.pool_size, sampler=args.sampler, eval_archs=args.eval_archs,
            eval_batch=args.eval_batch, trace_dir=args.trace, count_ops=not args.no_count_ops,
            loader=args.loader, sequence_archs=args.sequence_archs, kernels=args.kernels, graph=args.graph,
            top=args.top_kernels,
        )
    except (DatasetNotFoundError, FusedKernelsUnavailable, ValueError, KeyError) as err:
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        if args.dataset != "synthetic" and isinstance(err, DatasetNotFoundError):
            message += "\n(use --dataset synthetic to profile on random CIFAR-shaped data)"
        return report_error("profile", message)
    print(json.dumps(json_result(result), indent=2) if args.json else format_result(result))
    return 0


def json_result(result: Dict[str, Any]) -> Dict[str, Any]:
    """The ``--json`` form of a profile: plain values where the text output has sentences or rounds.

    ``kernels`` (``"fused"`` or ``"eager"``) and ``kernels_note`` (the reason for the eager path, absent on
    the fused one) are the profile's own keys, as it stores them. The op and kernel counts are whole
    launches per step as the text prints them: the profile averages them over its counted steps, and a mean
    such as 829.5 reads as a fraction of a launch.
    """
    out: Dict[str, Any] = {}
    for key, value in result.items():
        if key.startswith("ops_") or key == "kernels_per_step":
            out[key] = round(value)  # Python's round is the half-to-even of the text output's "{:.0f}"
        else:
            out[key] = value
    return out
