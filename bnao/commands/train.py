"""``bnao train``: stand-alone training of one architecture, with the paper's final setting as a preset.

Without a preset the settings are those of the search's final re-ranking
(N=3, C=20, 10 epochs, batch 128, cosine lr 0.025 -> 0, auxiliary head 0.4,
drop-path keep 0.9). ``--preset cifar10-final`` is the final training of
NAO / Balanced NAO on CIFAR-10, from the reference's ``NAO_V2/train_cifar.py``
and ``train_NAONet_V2_36_cifar10.sh``: N=6, C=36, 600 epochs, batch 128,
SGD momentum 0.9, weight decay 3e-4, cosine lr 0.025 -> 0 (per epoch),
gradient clip 5, cutout 16, auxiliary head weight 0.4, drop-path keep 0.8
and dropout 0.4 before the classifier (the reference's ``keep_prob=0.6``).
Drop-path keep 0.9 is the *search* (weight-sharing supernet) default; final
training uses 0.8. Explicit flags override the preset.

The output directory receives ``config.json`` (resolved settings),
``checkpoint.pt`` (after every epoch, atomically), ``model.pt`` (weights,
arch and network settings, for ``bnao eval``) and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import report_error

HELP = "train one architecture stand-alone"

DATASET_CHOICES = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")

#: Settings without a preset: the search's final re-ranking training (``final.*`` of the search config).
DEFAULTS: Dict[str, Any] = {
    "dataset": "cifar10",
    "space": "small",
    "nodes": 5,
    "layers": 3,
    "channels": 20,
    "epochs": 10,
    "batch_size": 128,
    "lr": 0.025,
    "lr_min": 0.0,
    "lr_schedule": "epoch",
    "weight_decay": 3e-4,
    "grad_clip": 5.0,
    "cutout": 0,
    "augment": True,
    "auxiliary_weight": 0.4,
    "drop_path_keep_prob": 0.9,
    "dropout": 0.0,
    "label_smoothing": 0.0,
    "seed": 0,
}

#: Named settings; explicit flags override them.
PRESETS: Dict[str, Dict[str, Any]] = {
    # NAO_V2/train_cifar.py defaults + train_NAONet_V2_36_cifar10.sh (--use_aux_head --cutout_size=16).
    "cifar10-final": {
        "dataset": "cifar10", "layers": 6, "channels": 36, "epochs": 600, "batch_size": 128, "lr": 0.025,
        "lr_min": 0.0, "weight_decay": 3e-4, "grad_clip": 5.0, "cutout": 16, "auxiliary_weight": 0.4,
        "drop_path_keep_prob": 0.8, "dropout": 0.4,
    },
}

# Files that mark a directory as holding a `bnao train` run.
RUN_FILES = ("config.json", "checkpoint.pt", "model.pt", "metrics.json")


class UsageError(Exception):
    """Bad input: reported as ``error: ...`` with exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bnao train``'s arguments."""
    parser.epilog = (
        "Without --preset: the search's re-ranking training (N=3, C=20, 10 epochs, batch 128, cosine lr "
        "0.025->0, aux 0.4, drop-path keep 0.9). --preset cifar10-final: the NAO reference's final CIFAR-10 "
        "training (N=6, C=36, 600 epochs, batch 128, cutout 16, aux 0.4, drop-path keep 0.8 -- 0.9 is the "
        "search supernet's value --, dropout 0.4, grad clip 5, weight decay 3e-4). Writes DIR/config.json, "
        "DIR/checkpoint.pt (every epoch), DIR/model.pt (for `bnao eval`) and DIR/metrics.json.")
    parser.add_argument("arch", nargs="?", default=None,
                        help='the arch: "0 1 0 1 ..." (8*B integers, normal cell first), a JSON list or '
                             '{"normal": [...], "reduction": [...]}, or @FILE holding one of these (or a JSON '
                             'object with an "arch" key, such as a search\'s best.json); optional with --resume')
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory of this run")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="named settings: cifar10-final = the paper's CIFAR-10 final training (N=6, C=36, "
                             "600 epochs, cutout 16, aux 0.4, drop-path keep 0.8, dropout 0.4)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help=f"training data: {', '.join(DATASET_CHOICES)} or any registered dataset; trains on the "
                        f"full train split and tests on the test split (default {DEFAULTS['dataset']})")
    g.add_argument("--data-dir", default=None, help="data directory searched first")
    g.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="use only the first N training images (quick runs)")
    g.add_argument("--test-limit", type=int, default=None, metavar="N", help="use only the first N test images")
    g.add_argument("--loader", default="auto", help="data loader (auto, tensor, torch, dali)")
    g = parser.add_argument_group("network")
    g.add_argument("--space", choices=("small", "middle"), default=None, help="op set (default small)")
    g.add_argument("--nodes", type=int, default=None, help="nodes per cell B (default 5)")
    g.add_argument("--layers", type=int, default=None, help=f"N, normal cells per stage (default {DEFAULTS['layers']})")
    g.add_argument("--channels", type=int, default=None, help=f"C, channels of the first cells (default {DEFAULTS['channels']})")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULTS['epochs']}")
    g.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    g.add_argument("--lr", type=float, default=None, help=f"initial (max) learning rate of the cosine (default {DEFAULTS['lr']})")
    g.add_argument("--lr-min", type=float, default=None, help="final learning rate of the cosine (default 0)")
    g.add_argument("--lr-schedule", choices=("epoch", "step"), default=None,
                   help="cosine set once per epoch (the reference's) or before every step (default epoch)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="no random crop and flip of the training images (cutout stays)")
    g.add_argument("--weight-decay", type=float, default=None, help="default 3e-4")
    g.add_argument("--grad-clip", type=float, default=None, help="gradient-norm clip, 0 = off (default 5)")
    g.add_argument("--cutout", type=int, default=None, help="cutout square side, 0 = off (default 0)")
    g.add_argument("--auxiliary-weight", type=float, default=None,
                   help="auxiliary head loss weight, 0 = no auxiliary head (default 0.4)")
    g.add_argument("--drop-path-keep-prob", type=float, default=None,
                   help="drop-path keep probability, 1 = off (default 0.9)")
    g.add_argument("--dropout", type=float, default=None, help="dropout before the classifier (default 0)")
    g.add_argument("--label-smoothing", type=float, default=None, help="default 0")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--eval-every", type=int, default=1, help="test every N epochs (0: only at the end)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny nets on a busy CPU)")
    g.add_argument("--seed", type=int, default=None, help="default 0")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: seconds a process waits for the others before it stops with an error")


# argparse dest -> settings key, for every setting a preset may hold.
_SETTING_ARGS = ("dataset", "space", "nodes", "layers", "channels", "epochs", "batch_size", "lr", "lr_min",
                 "lr_schedule", "augment", "weight_decay", "grad_clip", "cutout", "auxiliary_weight",
                 "drop_path_keep_prob", "dropout", "label_smoothing", "seed")


def _explicit(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in _SETTING_ARGS if getattr(args, k) is not None}


def resolve_settings(args: argparse.Namespace, stored: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults < preset < stored run (on --resume) < explicit flags."""
    settings = dict(DEFAULTS)
    preset = args.preset or (stored or {}).get("preset")
    if preset:
        settings.update(PRESETS[preset])
    if stored:
        settings.update({k: stored[k] for k in DEFAULTS if k in stored})
    settings.update(_explicit(args))
    settings["preset"] = preset
    for key in ("bf16", "channels_last"):
        settings[key] = bool(getattr(args, key) or (stored or {}).get(key, False))
    for key in ("train_limit", "test_limit", "data_dir", "loader"):
        value = getattr(args, key)
        settings[key] = value if value is not None else (stored or {}).get(key)
    return settings


def read_arch_argument(text: str) -> Any:
    """The arch value of the ARCH argument: the text itself, or what ``@FILE`` holds.

    Raises:
        UsageError: ``@FILE`` is missing, empty or holds JSON without an arch.
    """
    if not text.startswith("@"):
        return text
    path = Path(text[1:])
    try:
        content = path.read_text().strip()
    except OSError as err:
        raise UsageError(f"cannot read the arch file {path}: {err.strerror or err}") from None
    if not content:
        raise UsageError(f"the arch file {path} is empty")
    if content.startswith("{"):
        try:
            obj = json.loads(content)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not valid JSON: {err}") from None
        if isinstance(obj, dict) and "arch" in obj:
            return obj["arch"]
        if isinstance(obj, dict) and "best_arch" in obj:
            return obj["best_arch"]
        return obj
    # A file may hold several lines (a pool): the first non-comment line is the arch.
    lines = [ln for ln in content.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines[0]


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuses a directory that holds another run unless resuming, and a resume with nothing to resume.

    Raises:
        UsageError: The directory cannot be used.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    present = [f for f in RUN_FILES if (out / f).exists()]
    if present and not resume:
        raise UsageError(f"{out} holds another run ({', '.join(present)}); pass --resume to continue it, "
                         "or choose a new --out directory")
    if resume and not (out / "config.json").exists():
        raise UsageError(f"nothing to resume in {out} (no config.json); drop --resume to start a new run there")


def load_datasets(settings: Dict[str, Any]):
    """Train and test splits for ``settings`` (with the limits applied)."""
    import numpy as np

    from ..data import create_dataset, list_datasets

    name, root = settings["dataset"], settings.get("data_dir")
    if name not in list_datasets():
        import difflib

        close = difflib.get_close_matches(name, list_datasets(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown dataset {name!r}{hint} (available: {', '.join(list_datasets())})")
    kw: Dict[str, Any] = {}
    if name == "synthetic":
        # Generate only what is used: 50k CIFAR-shaped images are wasted on a quick run.
        kw = {"num_samples": settings.get("train_limit") or 50000}
    train = create_dataset(name, root=root, split="train", **kw)
    if name == "synthetic":
        kw = {"num_samples": settings.get("test_limit") or 10000}
    test = create_dataset(name, root=root, split="test", **kw)
    if settings.get("train_limit") and len(train) > settings["train_limit"]:
        train = train.subset(np.arange(settings["train_limit"]))
    if settings.get("test_limit") and len(test) > settings["test_limit"]:
        test = test.subset(np.arange(settings["test_limit"]))
    return train, test


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Runs ``bnao train``; returns the exit code (2 for bad input, 1 when training diverged)."""
    try:
        return _run(args)
    except UsageError as err:
        return report_error("train", err)
    except KeyboardInterrupt:
        print(f"\nbnao train: interrupted; the last finished epoch is checkpointed. Continue with "
              f"`bnao train --resume --out {args.out}`", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from ..data import DatasetNotFoundError
    from ..distributed import DistributedError, barrier, init_from_env, launch_record, rank_device, shutdown
    from ..space import InvalidArchError, NAOSpace
    from ..safe_io import FileWriteError
    from ..signals import GracefulStop, Stopped
    from ..train import CheckpointError, NonFiniteLossError, StandaloneTrainer, make_config, save_model
    from ..search.report import fmt_seconds

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_run_dir(out, args.resume)
    stored: Optional[Dict[str, Any]] = None
    if args.resume:
        stored = json.loads((out / "config.json").read_text())
    settings = resolve_settings(args, stored)

    try:
        space = NAOSpace(num_nodes=int(settings["nodes"]), op_set=settings["space"])
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.arch is None and stored is None:
        raise UsageError("give the arch to train (ARCH), or --resume an existing run")
    try:
        arch = space.arch(read_arch_argument(args.arch)) if args.arch is not None else space.arch(stored["arch"])
    except InvalidArchError as err:
        raise UsageError(f"invalid arch: {err}") from None
    if stored is not None and str(arch) != stored["arch"]:
        raise UsageError(f"{out} holds a run of arch {stored['arch']!r}, not {str(arch)!r}; "
                         "drop ARCH to resume it, or choose a new --out")
    settings["arch"] = str(arch)

    try:
        train_data, test_data = load_datasets(settings)
    except DatasetNotFoundError as err:
        raise UsageError(str(err)) from None

    aux_weight = float(settings["auxiliary_weight"])
    keep = settings["drop_path_keep_prob"]
    try:
        config = make_config(
            skeleton="imagenet" if settings["dataset"] == "imagenet" else "cifar",
            layers=int(settings["layers"]), channels=int(settings["channels"]), epochs=int(settings["epochs"]),
            batch_size=int(settings["batch_size"]), lr_max=float(settings["lr"]), lr_min=float(settings["lr_min"]),
            lr_schedule=str(settings.get("lr_schedule", "epoch")), augment=bool(settings.get("augment", True)),
            weight_decay=float(settings["weight_decay"]), grad_clip=float(settings["grad_clip"]) or None,
            auxiliary=aux_weight > 0, auxiliary_weight=aux_weight,
            drop_path_keep_prob=None if keep is None or float(keep) >= 1.0 else float(keep),
            dropout=float(settings["dropout"]), cutout=int(settings["cutout"]),
            label_smoothing=float(settings["label_smoothing"]), bf16=settings["bf16"],
            channels_last=settings["channels_last"], loader=settings.get("loader") or "auto",
            eval_every=int(args.eval_every), seed=int(settings["seed"]))
        config.validate()
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None

    # Under torchrun: data-parallel, rank 0 writes and prints. Every rank has checked --out above, before
    # this rendezvous, so none of them sees the files rank 0 writes next.
    try:
        context = init_from_env(args.device, args.timeout)
        device = rank_device(args.device, context)
    except (DistributedError, ValueError) as err:
        raise UsageError(str(err)) from None
    say = print if context.is_main else (lambda *a, **k: None)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if stored is None:
            _write_json(out / "config.json", dict(settings, **launch_record(context)))
    barrier("creating the output directory")

    def on_epoch(rec: Dict[str, Any]) -> None:
        test = ""
        if rec.get("eval_acc") is not None:
            test = f" | test acc {100 * rec['eval_acc']:.2f}% loss {rec['eval_loss']:.4f}"
        skipped = f" ({rec['skipped_steps']} non-finite steps skipped)" if rec.get("skipped_steps") else ""
        say(f"epoch {rec['epoch']}/{config.epochs} lr {rec['lr']:.5f} train loss {rec['train_loss']:.4f} "
              f"acc {100 * rec['train_acc']:.2f}%{test} | {fmt_seconds(rec['seconds'])}{skipped}", flush=True)

    try:
        trainer = StandaloneTrainer(arch, space, train_data, test_data, config, device=device,
                                    checkpoint_path=out / "checkpoint.pt", on_epoch=on_epoch, parallel=context,
                                    progress=not args.no_progress and sys.stderr.isatty() and context.is_main)
    except ValueError as err:  # DistributedError too: a batch that does not split over the processes
        raise UsageError(str(err)) from None
    say(f"bnao train: arch {arch}\n  {settings['dataset']} ({len(train_data)} train / {len(test_data)} test images), "
          f"N={config.layers} C={config.channels}, {trainer.params:,} params, {config.epochs} epochs of "
          f"{trainer.steps_per_epoch} steps, device {trainer.device}, {context.describe()}", flush=True)
    try:
        with GracefulStop() as stop:
            if args.resume and (out / "checkpoint.pt").exists():
                trainer.load_checkpoint()
                say(f"  resumed after epoch {trainer.epoch}", flush=True)
            try:
                result = trainer.fit(resume=False)
            except Stopped as stopped:
                say(f"bnao train: stopped by {stop.signal_name} at {stopped.where}; the checkpoint is written. "
                      f"Resume with: bnao train --resume --out {out}", file=sys.stderr)
                return stop.exit_code
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    except (FileWriteError, NonFiniteLossError, DistributedError) as err:
        return report_error("train", err, code=1)
    if not context.is_main:
        shutdown()
        return 0

    metrics = {
        "arch": str(arch),
        "dataset": settings["dataset"],
        "test_acc": result["eval_acc"],
        "test_error": result["eval_error"],
        "test_loss": result["eval_loss"],
        "params": result["params"],
        "epochs": result["epochs"],
        "steps": result["steps"],
        "seconds": result["seconds"],
        "device": str(trainer.device),
        **launch_record(context),
        "history": result["history"],
    }
    save_model(out / "model.pt", trainer.model, trainer.config_dict(), metrics={k: v for k, v in metrics.items()
                                                                                if k != "history"},
               extra={"dataset": settings["dataset"], "data_dir": settings.get("data_dir")})
    _write_json(out / "metrics.json", metrics)
    print(f"test error {100 * result['eval_error']:.2f}% (accuracy {100 * result['eval_acc']:.2f}%), "
          f"loss {result['eval_loss']:.4f}, params {result['params'] / 1e6:.3f}M, {result['epochs']} epochs in "
          f"{fmt_seconds(result['seconds'])}\nwrote {out / 'model.pt'}, {out / 'metrics.json'}", flush=True)
    shutdown()
    return 0
