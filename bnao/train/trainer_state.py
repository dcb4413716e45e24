"""The stand-alone trainer's checkpoint: what it holds, writing it, and resuming from it.

:class:`StandaloneStateMixin` is a part of :class:`~bnao.train.standalone.StandaloneTrainer`,
kept apart so that the trainer module holds the set-up and the training itself. A checkpoint is
written at the end of every epoch (and at a graceful stop mid-epoch); see the trainer's module
docstring for why restoring it continues exactly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .checkpoint import CheckpointError, load_file, partial_of_rank, save_atomic
from .config import StandaloneConfig

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "StandaloneStateMixin"]

CHECKPOINT_FORMAT = "bnao-standalone-checkpoint"
CHECKPOINT_VERSION = 1

# Settings that may differ between a checkpoint and the run resuming it: they
# change neither the weights nor the order of anything random.
_RESUME_FREE = ("eval_every", "eval_batch_size", "loader", "max_nonfinite_steps")


class StandaloneStateMixin:
    """:meth:`state_dict`, :meth:`save_checkpoint` and :meth:`load_checkpoint` of
    :class:`~bnao.train.standalone.StandaloneTrainer`.

    The host class provides ``config``, ``config_dict``, ``model``, ``optimizer``, ``train_loader``,
    ``parallel``, ``checkpoint_path``, ``steps_per_epoch``, the counters ``epoch`` and ``global_step``,
    ``history``, ``seconds``, ``result`` and ``_partial`` (an epoch stopped part-way).
    """

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue training (written at the end of every epoch)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # The lr is a function of the epoch (cosine), so the schedule's whole state is the epoch.
            "schedule": {"kind": f"cosine-per-{self.config.lr_schedule}", "epoch": self.epoch, "lr_max": self.config.lr_max,
                         "lr_min": self.config.lr_min, "epochs": self.config.epochs},
            # Global torch RNG is reseeded from (seed, epoch) each epoch; kept for the record.
            "rng": {"seed": self.config.seed, "scheme": "torch.manual_seed(mix_seed(seed, 0xE90C, epoch)) per epoch"},
            "loader": self.train_loader.state_dict(),
            "history": self.history,
            "seconds": self.seconds,
            "result": self.result,
            "partial_epoch": self._partial,
            # The training data (dataset, image size), as model.pt's "extra" records it. Checkpoints written
            # before this key existed lack it; `bnao export` then falls back to the skeleton's image size.
            "extra": dict(getattr(self, "data_info", None) or {}),
        }

    def save_checkpoint(self) -> None:
        """Writes :meth:`state_dict` atomically to ``checkpoint_path`` (no-op without one)."""
        if self.checkpoint_path is None or (self.parallel and not self.parallel.is_main):
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(self.state_dict(), self.checkpoint_path)

    def load_checkpoint(self, path: Optional[Union[str, os.PathLike]] = None) -> None:
        """Restores a checkpoint written by :meth:`save_checkpoint` with the same settings.

        Raises:
            CheckpointError: Unreadable file, or it was written for another arch or other settings
                (the message names the keys that differ).
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path given")
        # Only a complete new checkpoint replaces the old one, so a damaged file was damaged after writing;
        # the run's own checkpoint is the only one there is, so starting over is what remains.
        fix = ("Delete it (or move it away) and resume again to train from the first epoch "
               "(`bnao train --resume` starts over when the run has no checkpoint.pt), or restore a copy of it "
               "you kept.")
        state = load_file(path, CHECKPOINT_FORMAT, fix)
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported "
                                  f"(this bnao writes version {CHECKPOINT_VERSION}). {fix}")
        saved, mine = dict(state["config"]), self.config_dict()
        for f in dataclasses.fields(StandaloneConfig):  # settings added since the checkpoint was written
            if f.name not in saved and f.default is not dataclasses.MISSING:
                saved[f.name] = f.default
        differ = sorted(k for k in set(saved) | set(mine)
                        if k not in _RESUME_FREE and saved.get(k) != mine.get(k))
        if differ:
            pairs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine.get(k)!r}" for k in differ)
            raise CheckpointError(f"{path}: cannot resume, the run's settings differ ({pairs}). "
                                  "Resume with the original settings, or use a new output/checkpoint location.")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(f"{path}: cannot resume, the checkpoint has {state['steps_per_epoch']} steps per "
                                  f"epoch and this data {self.steps_per_epoch} (a different training set?).")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.train_loader.load_state_dict(state["loader"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: checkpoint does not fit this network ({err}). {fix}") from None
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.seconds = float(state["seconds"])
        self.result = state.get("result")
        self._partial = partial_of_rank(state.get("partial_epoch"), self.parallel, path)
