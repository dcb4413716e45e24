"""The supernet trainer's resumable state and checkpoint files (see :mod:`bnao.supernet.trainer`).

:meth:`TrainerStateMixin.state_dict` holds everything a resumed run needs to
continue with bit-identical weights on the same device and software: the
model, the optimizer, the schedule, the step counters, the draw counts, the
pool, the used-slot record, the sampler, the loader position and every random
generator in play. Checkpoint files are loaded onto the CPU first, so they
also move between GPU and CPU machines (see the trainer's module docstring for
what is then exact and what is not).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Union

import numpy as np
import torch

from ..train.checkpoint import CheckpointError, load_file, save_atomic

#: The ``format`` tag of a supernet checkpoint file.
CHECKPOINT_FORMAT = "bnao-supernet-checkpoint"


class TrainerStateMixin:
    """:meth:`state_dict`, :meth:`load_state_dict` and the checkpoint files of
    :class:`~bnao.supernet.trainer.SupernetTrainer`.

    The host class provides ``model``, ``optimizer``, ``params``, ``sampler``, ``loader``, ``device``,
    ``pool``, ``counts``, ``ever_used``, the schedule and step counters, ``set_pool`` and the ``_graph_step`` and
    ``_iter`` caches that a restore invalidates.
    """

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue training exactly."""
        state: Dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"steps": self.schedule_steps, "step": self.schedule_step},
            "global_step": self.global_step,
            "bad_steps_total": self.bad_steps_total,
            "bad_in_row": self.bad_in_row,
            "counts": torch.from_numpy(self.counts.copy()),
            # int8 is exact (ids <= B, ops < 16) and 8x smaller in a checkpoint.
            "pool": torch.from_numpy(self.pool.astype(np.int8)),
            "ever_used": list(self.ever_used),
            "model_rng": self.model.rng_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        if hasattr(self.loader, "state_dict"):
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self._graph_step = None  # its static tensors hold the state being replaced
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule_steps = int(state["schedule"]["steps"])
        self.schedule_step = int(state["schedule"]["step"])
        self.global_step = int(state["global_step"])
        self.bad_steps_total = int(state["bad_steps_total"])
        self.bad_in_row = int(state["bad_in_row"])
        pool = state["pool"].numpy() if torch.is_tensor(state["pool"]) else np.asarray(state["pool"])
        if pool.shape != self.pool.shape or not np.array_equal(pool, self.pool):
            self.set_pool(pool)
        # Checkpoints written before the option existed restart the record of used slots.
        self.ever_used = list(state.get("ever_used", [None] * len(self.params)))
        if len(self.ever_used) != len(self.params):
            raise ValueError(f"ever_used has {len(self.ever_used)} entries, the model {len(self.params)} parameters")
        self.ever_used = [e.to(self.device) if torch.is_tensor(e) else e for e in self.ever_used]
        counts = state["counts"]
        self.counts = (counts.numpy() if torch.is_tensor(counts) else np.asarray(counts)).astype(np.int64).copy()
        self.model.set_rng_state(state["model_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            # Only the GPUs both machines have (a checkpoint may come from a machine with more or fewer).
            for index, saved in zip(range(torch.cuda.device_count()), state["cuda_rng"]):
                torch.cuda.set_rng_state(saved, index)
        if "sampler" in state and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])
        if "loader" in state and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(state["loader"])
        self._iter = None  # the next batch comes from the restored loader position

    def save_checkpoint(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes :meth:`state_dict` atomically (temp file in the same directory, fsync, rename)."""
        save_atomic({"format": CHECKPOINT_FORMAT, "trainer": self.state_dict()}, path)

    def load_checkpoint(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Restores a file written by :meth:`save_checkpoint`.

        Raises:
            CheckpointError: The file is missing, truncated/corrupt or not a supernet checkpoint.
        """
        data = load_file(path, CHECKPOINT_FORMAT, "Resume from an earlier checkpoint or restart the training.",
                         map_location="cpu")
        try:
            self.load_state_dict(data["trainer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path}: the supernet checkpoint does not fit this trainer/model ({err})") from None


__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "TrainerStateMixin"]
