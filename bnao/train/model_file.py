"""Trained-model files (``model.pt``): weights plus what rebuilds the network.

``bnao train`` writes one; ``bnao eval`` and :func:`load_model` read it. The
file holds the arch string, the search space, the network settings, the
final metrics and the state dict, so no command-line flags are needed to
rebuild the network.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..nets.network import build_network
from ..space import create_search_space
from .checkpoint import CheckpointError, load_file, save_atomic
from .trainer_state import CHECKPOINT_FORMAT

MODEL_FORMAT = "bnao-model"
MODEL_VERSION = 1


def save_model(path: Union[str, os.PathLike], model: nn.Module, config: Dict[str, Any],
               metrics: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None) -> None:
    """Writes a model file atomically.

    Args:
        path: Destination (``.pt``).
        model: The trained network (its state dict is stored on the CPU).
        config: :meth:`StandaloneTrainer.config_dict` (``arch``, ``space``, ``skeleton``,
            ``layers``, ``channels``, ``num_classes``, ``in_channels``, ``auxiliary``, ``dropout``...).
        metrics: Final metrics (test accuracy, params...).
        extra: Anything else worth keeping (dataset name, normalisation...).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"format": MODEL_FORMAT, "version": MODEL_VERSION, "config": dict(config),
                 "metrics": dict(metrics or {}), "extra": dict(extra or {}), "state_dict": state}, path)


def load_model(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuilds the network stored in a model file and loads its weights.

    Args:
        path: A file written by :func:`save_model` (``bnao train``'s ``model.pt``).
        device: Where to put the model.

    Returns:
        ``(model in eval mode, file contents without the state dict)``.

    Raises:
        CheckpointError: Missing, corrupt or not a bnao model file, or weights that do not fit.
    """
    fix = "Pass the model.pt written by `bnao train --out DIR` (retrain if it was damaged)."
    # A run's checkpoint.pt is a readable file of the wrong kind: say which file to pass, not "retrain".
    checkpoint = ("It is a `bnao train` checkpoint; pass the model.pt beside it, which `bnao train` writes when "
                  "the training ends (finish a stopped run with `bnao train --resume --out DIR`). `bnao export` "
                  "accepts checkpoints too.")
    data = load_file(path, MODEL_FORMAT, fix, other_kinds={CHECKPOINT_FORMAT: checkpoint})
    if data.get("version") != MODEL_VERSION:
        raise CheckpointError(f"{path}: model file version {data.get('version')} is not supported "
                              f"(this bnao reads version {MODEL_VERSION}). {fix}")
    cfg = data["config"]
    try:
        space = create_search_space("nao", **cfg["space"])
        with torch.device("meta"):
            # Build on meta (no init cost), then materialise on the device and load the weights.
            model = build_network(cfg["arch"], space, skeleton=cfg["skeleton"], layers=cfg["layers"],
                                  channels=cfg["channels"], num_classes=cfg["num_classes"],
                                  in_channels=cfg["in_channels"], auxiliary=cfg["auxiliary"],
                                  drop_path_keep_prob=cfg.get("drop_path_keep_prob"),
                                  dropout=cfg.get("dropout", 0.0))
        model = model.to_empty(device=torch.device(device))
        model.load_state_dict(data["state_dict"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: the stored network cannot be rebuilt ({type(err).__name__}: {err}). {fix}") from None
    model.eval()
    info = {k: v for k, v in data.items() if k != "state_dict"}
    return model, info
