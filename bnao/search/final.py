"""Stand-alone training at the end of a search: the re-rank's settings, and the winner's final training.

The reference re-ranks the top archs by a short stand-alone training inside the
search and leaves the final training of the winner to a separate script
(``train_cifar.py``). bnao can do that last step in the same run
(``final.full_epochs > 0``): the best arch of the re-rank is trained on the
whole training split (no ``data.train_limit``, no dev hold-out) and tested on
the dataset's test split; the model lands in the run directory as
``model.pt`` (readable by ``bnao eval``, ``bnao export`` and
:func:`bnao.load_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..data import DatasetNotFoundError, create_dataset
from ..space import NAOSpace


def standalone_settings(config: Dict[str, Any], num_classes: int, in_channels: int) -> Dict[str, Any]:
    """The :class:`~bnao.train.StandaloneConfig` fields of the ``final`` section (re-rank and final training).

    Args:
        config: A resolved search configuration.
        num_classes: Classes of the dataset.
        in_channels: Image channels of the dataset.
    """
    final, supernet = config["final"], config["supernet"]
    return dict(
        skeleton=supernet["skeleton"], layers=final["layers"] or supernet["layers"],
        channels=final["channels"] or supernet["channels"], num_classes=num_classes, in_channels=in_channels,
        epochs=final["epochs"], batch_size=final["batch_size"], lr_max=final["lr_max"], lr_min=final["lr_min"],
        lr_schedule=final["lr_schedule"], augment=bool(final["augment"]),
        weight_decay=final["weight_decay"], auxiliary=final["auxiliary"], auxiliary_weight=final["auxiliary_weight"],
        drop_path_keep_prob=final["drop_path_keep_prob"], dropout=final["dropout"], cutout=final["cutout"],
        loader=config["data"]["loader"], seed=int(config["seed"]),
    )


def _dataset_options(config: Dict[str, Any]) -> Dict[str, Any]:
    data = config["data"]
    if data["dataset"] != "synthetic":
        return {}
    side, channels = int(data["synthetic_size"]), int(data["synthetic_channels"])
    return dict(num_samples=int(data["synthetic_samples"]), image_shape=(side, side, channels),
                num_classes=int(data["synthetic_classes"]), seed=int(config["seed"]))


def train_best(config: Dict[str, Any], arch: str, space: NAOSpace, run_dir: Path, *,
               device: torch.device, num_classes: int, in_channels: int, progress: bool = False,
               echo: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """Trains ``arch`` on the whole training split for ``final.full_epochs`` epochs and tests it.

    Resumable: the training checkpoints after every epoch to ``run_dir/final/checkpoint.pt``.

    Args:
        config: The search configuration.
        arch: The arch string (the re-rank's winner).
        space: Its search space.
        run_dir: The run directory (``model.pt`` is written there).
        device: Training device.
        num_classes: Classes of the dataset.
        in_channels: Image channels.
        progress: Progress bars.
        echo: Where the one-line summary goes.

    Returns:
        ``{"test_accuracy", "test_loss", "epochs", "train_images", "test_images", "seconds", "model_file"}``,
        or None when the dataset has no test split (said through ``echo``).
    """
    from ..distributed import current
    from ..train import StandaloneTrainer, make_config, save_model

    data = config["data"]
    options = _dataset_options(config)
    try:
        test = create_dataset(data["dataset"], root=data["root"], split="test", **options)
    except DatasetNotFoundError as err:
        echo(f"final training skipped: {data['dataset']} has no test split here ({err})")
        return None
    train = create_dataset(data["dataset"], root=data["root"], split="train", **options)
    settings = standalone_settings(config, num_classes, in_channels)
    settings["epochs"] = int(config["final"]["full_epochs"])
    settings["eval_every"] = 0  # the test split is for the final figure, not for watching epochs
    trainer = StandaloneTrainer(arch, space, train, test, make_config(**settings), device=device,
                                checkpoint_path=run_dir / "final" / "checkpoint.pt", progress=progress,
                                parallel=current())  # data-parallel under torchrun; rank 0 writes
    result = trainer.fit(resume=True)
    model_file = run_dir / "model.pt"
    metrics = {"test_acc": result["eval_acc"], "test_error": result["eval_error"], "params": result["params"]}
    if current().is_main:
        save_model(model_file, trainer.model, trainer.config_dict(), metrics=metrics,
                   extra={"dataset": data["dataset"], "source": "bnao search (final.full_epochs)"})
    return {
        "test_accuracy": float(result["eval_acc"]),
        "test_loss": float(result["eval_loss"]),
        "epochs": int(result["epochs"]),
        "train_images": int(len(train)),
        "test_images": int(len(test)),
        "seconds": float(result["seconds"]),
        "model_file": str(model_file),
    }


__all__ = ["standalone_settings", "train_best"]
