"""``bnao train``: stand-alone training of one architecture, with the paper's final setting as a preset.

Without a preset: a short training at the search network's size (N=3, C=20,
10 epochs, batch 128, cosine lr 0.025 -> 0, auxiliary head 0.4, drop-path
keep 0.9, no dropout). This is not the search's re-ranking, whose ``final.*``
settings are batch 64, lr 0.025 -> 0.001, drop-path keep 0.8 and dropout 0.4
(``--batch-size 64 --lr-min 0.001 --drop-path-keep-prob 0.8 --dropout 0.4``
reproduce it). ``--preset cifar10-final`` is the final training of
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
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import report_error
from .train_inputs import (DEFAULTS, PRESETS, RUN_FILES, UsageError, check_run_dir, load_datasets, load_training_data,
                           read_arch_argument, read_stored_config, resolve_arch, resolve_settings, training_config)

__all__ = ["DATASET_CHOICES", "DEFAULTS", "HELP", "PRESETS", "RUN_FILES", "UsageError", "add_arguments",
           "check_run_dir", "load_datasets", "read_arch_argument", "resolve_settings", "run"]

HELP = "train one architecture stand-alone"

DATASET_CHOICES = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bnao train``'s arguments."""
    parser.epilog = (
        "Without --preset: N=3, C=20, 10 epochs, batch 128, cosine lr 0.025->0, aux 0.4, drop-path keep 0.9, "
        "no dropout (the search's re-ranking uses batch 64, lr 0.025->0.001, drop-path keep 0.8 and dropout 0.4: "
        "pass --batch-size 64 --lr-min 0.001 --drop-path-keep-prob 0.8 --dropout 0.4 for it). --preset cifar10-final: the NAO reference's final CIFAR-10 "
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
    """The body of :func:`run`: settings, arch, data and config, then the training and its report.

    Raises:
        UsageError: Bad input (reported by :func:`run` with exit code 2).
    """
    from ..distributed import shutdown

    _set_thread_count(args.threads)
    out = Path(args.out)
    check_run_dir(out, args.resume)
    stored: Optional[Dict[str, Any]] = None
    if args.resume:
        stored = read_stored_config(out)
    settings = resolve_settings(args, stored)
    space, arch = resolve_arch(args.arch, settings, stored, out)
    settings["arch"] = str(arch)
    train_data, test_data = load_training_data(settings)
    config = training_config(settings, args.eval_every)

    # Under torchrun: data-parallel, rank 0 writes and prints. Every rank has checked --out above, before
    # this rendezvous, so none of them sees the files rank 0 writes next.
    context, device = _join_process_group(args.device, args.timeout)
    say = print if context.is_main else (lambda *a, **k: None)
    _prepare_out_dir(out, settings, stored, context)
    trainer = _create_trainer(args, arch, space, (train_data, test_data), config, device, context, say,
                              settings)
    say(f"bnao train: arch {arch}\n  {settings['dataset']} ({len(train_data)} train / {len(test_data)} test images), "
          f"N={config.layers} C={config.channels}, {trainer.params:,} params, {config.epochs} epochs of "
          f"{trainer.steps_per_epoch} steps, device {trainer.device}, {context.describe()}", flush=True)
    exit_code, result = _fit(trainer, args.resume, out, say)
    if exit_code is not None:
        return exit_code
    if context.is_main:
        _write_results(out, arch, settings, result, trainer, context)
    shutdown()
    return 0


def _set_thread_count(threads: Optional[int]) -> None:
    """Applies ``--threads`` to torch (nothing when it is not given).

    Raises:
        UsageError: ``threads`` is below 1.
    """
    if threads is None:
        return
    if threads < 1:
        raise UsageError("--threads must be >= 1")
    import torch

    torch.set_num_threads(threads)


def _join_process_group(device_name: str, timeout: float):
    """Joins torchrun's process group (when launched by it) and picks this process's device.

    Returns:
        ``(context, device)``.

    Raises:
        UsageError: The process group or the device cannot be set up.
    """
    from ..distributed import DistributedError, init_from_env, rank_device

    try:
        context = init_from_env(device_name, timeout)
        device = rank_device(device_name, context)
    except (DistributedError, ValueError) as err:
        raise UsageError(str(err)) from None
    return context, device


def _prepare_out_dir(out: Path, settings: Dict[str, Any], stored: Optional[Dict[str, Any]], context) -> None:
    """Rank 0 creates ``out`` and, for a new run, writes ``config.json``; every rank waits for it."""
    from ..distributed import barrier, launch_record

    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if stored is None:
            _write_json(out / "config.json", dict(settings, **launch_record(context)))
    barrier("creating the output directory")


def _epoch_reporter(say: Callable[..., None], config) -> Callable[[Dict[str, Any]], None]:
    """The trainer's ``on_epoch`` callback: one summary line per epoch through ``say``."""
    from ..search.report import fmt_seconds

    def on_epoch(rec: Dict[str, Any]) -> None:
        test = ""
        if rec.get("eval_acc") is not None:
            test = f" | test acc {100 * rec['eval_acc']:.2f}% loss {rec['eval_loss']:.4f}"
        skipped = f" ({rec['skipped_steps']} non-finite steps skipped)" if rec.get("skipped_steps") else ""
        say(f"epoch {rec['epoch']}/{config.epochs} lr {rec['lr']:.5f} train loss {rec['train_loss']:.4f} "
              f"acc {100 * rec['train_acc']:.2f}%{test} | {fmt_seconds(rec['seconds'])}{skipped}", flush=True)

    return on_epoch


def _create_trainer(args: argparse.Namespace, arch, space, data: Tuple[Any, Any], config, device, context,
                    say: Callable[..., None], settings: Dict[str, Any]):
    """The stand-alone trainer of ``arch``, checkpointing into ``--out``.

    Args:
        args: The parsed arguments (``out`` and ``no_progress`` are used).
        arch: The arch to train.
        space: Its search space.
        data: ``(train, test)`` data sets.
        config: The validated training config.
        device: This process's device.
        context: The process group context.
        say: Prints on rank 0 only.
        settings: The resolved settings (the dataset is recorded in the checkpoint).

    Raises:
        UsageError: The trainer rejects the settings.
    """
    from ..train import StandaloneTrainer

    train_data, test_data = data
    try:
        return StandaloneTrainer(arch, space, train_data, test_data, config, device=device,
                                 checkpoint_path=Path(args.out) / "checkpoint.pt",
                                 on_epoch=_epoch_reporter(say, config), parallel=context,
                                 data_info={"dataset": settings["dataset"], "data_dir": settings.get("data_dir")},
                                 progress=not args.no_progress and sys.stderr.isatty() and context.is_main)
    except ValueError as err:  # DistributedError too: a batch that does not split over the processes
        raise UsageError(str(err)) from None


def _fit(trainer, resume: bool, out: Path,
         say: Callable[..., None]) -> Tuple[Optional[int], Optional[Dict[str, Any]]]:
    """Trains (from the checkpoint when resuming) until done, a signal, or a failure.

    Returns:
        ``(None, result)`` when training finished; ``(exit code, None)`` when a signal stopped it (the
        checkpoint is written) or it failed (a write, a non-finite loss or the process group).

    Raises:
        UsageError: The checkpoint cannot be read.
    """
    from ..distributed import DistributedError
    from ..safe_io import FileWriteError
    from ..signals import GracefulStop, Stopped
    from ..train import CheckpointError, NonFiniteLossError

    try:
        with GracefulStop() as stop:
            if resume and (out / "checkpoint.pt").exists():
                trainer.load_checkpoint()
                say(f"  resumed after epoch {trainer.epoch}", flush=True)
            elif resume:
                # Not refused: a run stopped before its first epoch ended has config.json but no checkpoint,
                # and starting over is the only way to continue it. The notice says so, in case the user
                # expected a checkpoint that was moved or deleted.
                say(f"bnao train: notice: {out} has no checkpoint.pt (the run stopped before its first epoch "
                    "ended, or the file was removed); training starts over from epoch 1", file=sys.stderr,
                    flush=True)
            try:
                return None, trainer.fit(resume=False)
            except Stopped as stopped:
                # A run of several processes resumes a stopped epoch only with as many (its data shards).
                world = trainer.parallel.world_size if trainer.parallel is not None else 1
                launcher = f"torchrun --nproc_per_node={world} -m bnao" if world > 1 else "bnao"
                say(f"bnao train: stopped by {stop.signal_name} at {stopped.where}; the checkpoint is written. "
                      f"Resume with: {launcher} train --resume --out {out}", file=sys.stderr)
                return stop.exit_code, None
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    except (FileWriteError, NonFiniteLossError, DistributedError) as err:
        return report_error("train", err, code=1), None


def _write_results(out: Path, arch, settings: Dict[str, Any], result: Dict[str, Any], trainer, context) -> None:
    """Rank 0's report: writes ``model.pt`` and ``metrics.json`` and prints the test error."""
    from ..distributed import launch_record
    from ..search.report import fmt_seconds
    from ..train import save_model

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
               extra=dict(trainer.data_info))
    _write_json(out / "metrics.json", metrics)
    print(f"test error {100 * result['eval_error']:.2f}% (accuracy {100 * result['eval_acc']:.2f}%), "
          f"loss {result['eval_loss']:.4f}, params {result['params'] / 1e6:.3f}M, {result['epochs']} epochs in "
          f"{fmt_seconds(result['seconds'])}\nwrote {out / 'model.pt'}, {out / 'metrics.json'}", flush=True)
