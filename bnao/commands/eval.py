"""``bnao eval``: evaluate a model file written by ``bnao train`` on a dataset split.

The network is rebuilt from the arch and settings stored in the file, so no
network flags are needed. The dataset defaults to the one it was trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from .errors import report_error
from .train_inputs import UsageError, check_limit

HELP = "evaluate a trained checkpoint on a test set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bnao eval``'s arguments."""
    parser.add_argument("model", metavar="MODEL.pt", help="model file written by `bnao train` (DIR/model.pt)")
    parser.add_argument("--dataset", default=None,
                        help="a registered dataset (fashion_mnist, cifar10, ...; default: the one the model was trained on)")
    parser.add_argument("--data-dir", default=None, help="data directory searched first (default: the training run's)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="split to evaluate (default test)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N images")
    parser.add_argument("--batch-size", type=int, default=500, help="default 500")
    parser.add_argument("--loader", default="auto", help="data loader (auto, tensor, torch, dali)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _check_inputs(args: argparse.Namespace) -> None:
    """Checks the options before anything is loaded.

    Raises:
        UsageError: A bad ``--batch-size``, ``--limit`` or ``--loader``, or a directory as MODEL.pt.
    """
    from ..train.config import check_loader

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_limit("--limit", args.limit)
    try:
        check_loader(args.loader)
    except ValueError as err:  # it names the loader setting, which is --loader here
        raise UsageError(f"--{err}") from None
    _check_model_path(Path(args.model))


def _check_model_path(path: Path) -> None:
    """Refuses a directory as MODEL.pt, naming the model file inside it when there is one.

    Raises:
        UsageError: ``path`` is a directory.
    """
    if not path.is_dir():
        return
    if (path / "model.pt").is_file():
        raise UsageError(f"{path} is a directory; pass the model file in it: bnao eval {path / 'model.pt'}")
    raise UsageError(f"{path} is a directory without a model.pt; pass the model.pt that `bnao train --out DIR` "
                     "writes when its training ends")


def run(args: argparse.Namespace) -> int:
    """Runs ``bnao eval``; exit code 2 for a missing/corrupt model file or missing data."""
    import numpy as np

    from ..data import DATASETS, DatasetNotFoundError, create_dataset
    from ..size import check_image_size, image_hw
    from ..train import CheckpointError, count_parameters, evaluate_model, load_model, resolve_device

    def fail(msg: str) -> int:
        return report_error("eval", msg)

    try:
        _check_inputs(args)
    except UsageError as err:
        return fail(str(err))
    try:
        device = resolve_device(args.device)
        model, info = load_model(args.model, device=device)
    except CheckpointError as err:
        return fail(str(err))
    except (ValueError, RuntimeError) as err:
        return fail(str(err))
    cfg, extra = info["config"], info.get("extra", {})
    name = args.dataset or extra.get("dataset")
    if not name:
        return fail(f"{args.model} does not record its dataset; pass --dataset")
    if name not in DATASETS:
        return fail(DATASETS.unknown_name_message(name))
    root = args.data_dir if args.data_dir is not None else extra.get("data_dir")
    kw: Dict[str, Any] = {}
    if name == "synthetic":
        kw = {"num_samples": 10000 if args.limit is None else args.limit}
    try:
        data = create_dataset(name, root=root, split=args.split, **kw)
    except DatasetNotFoundError as err:
        return fail(str(err))
    if args.limit is not None and len(data) > args.limit:
        data = data.subset(np.arange(args.limit))
    shape = getattr(data, "image_shape", None)
    channels = int(shape[-1]) if shape is not None else 3
    if channels != cfg["in_channels"] or data.num_classes != cfg["num_classes"]:
        return fail(f"{name} has {channels}-channel images and {data.num_classes} classes, but the model expects "
                    f"{cfg['in_channels']} channels and {cfg['num_classes']} classes; pass the --dataset it was "
                    f"trained on ({extra.get('dataset')})")
    # The skeleton is in the model file and the size in the data, so this is the first point both are known;
    # it comes before any forward, which would otherwise fail deep inside a convolution.
    hw = image_hw(data)
    if hw is not None:
        try:
            check_image_size(cfg["skeleton"], *hw)
        except ValueError as err:
            return fail(f"{name}'s images do not fit this model: {err}")
    res = evaluate_model(model, data, args.batch_size, device, loader=args.loader)
    out = {
        "model": str(args.model),
        "arch": cfg["arch"],
        "dataset": name,
        "split": args.split,
        "images": res["n"],
        "accuracy": res["acc"],
        "error": 1.0 - res["acc"],
        "loss": res["loss"],
        "params": count_parameters(model),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{name} {args.split} ({res['n']} images): accuracy {100 * res['acc']:.2f}%, "
              f"error {100 * (1 - res['acc']):.2f}%, loss {res['loss']:.4f}, params {out['params']:,} "
              f"({out['params'] / 1e6:.3f}M)\narch {cfg['arch']}")
    return 0
