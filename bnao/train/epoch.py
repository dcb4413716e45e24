"""One epoch of stand-alone training: the steps, the skipped non-finite ones, a stop mid-epoch.

:class:`EpochTrainingMixin` is a part of :class:`~bnao.train.standalone.StandaloneTrainer`, kept
apart so that the trainer module holds the set-up, evaluation and the loop over epochs. Everything
random in an epoch is drawn from streams seeded by ``(seed, epoch)`` (see the trainer's module
docstring), or, for an epoch stopped part-way, continued from the random state kept in its checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..autocast import bf16_autocast
from ..data.loaders.base import mix_seed
from ..device import copy_flag_to_host
from ..distributed import average_buffers, sum_across_ranks
from ..signals import Stopped, stop_requested

__all__ = ["EpochSums", "EpochTrainingMixin", "NonFiniteLossError"]

# Salts that separate the random streams derived from the one user seed.
_SALT_INIT, _SALT_EPOCH, _SALT_LOADER = 0x1A17, 0xE90C, 0x10AD


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss (or gradient norm) stayed NaN/inf for several steps."""


@dataclasses.dataclass
class EpochSums:
    """Running sums of the epoch in progress (checkpointed with it when it is stopped part-way).

    Attributes:
        loss_sum: Training loss summed over the images of the finite steps (float64 tensor on the device,
            so that adding a step's loss does not wait for the device).
        correct: Correctly classified images of the finite steps (int64 tensor on the device).
        seen: Images of the finite steps.
        skipped: Steps whose update was skipped for a non-finite loss or gradient.
        bad_run: Consecutive non-finite steps up to the latest one.
    """

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int
    skipped: int
    bad_run: int


class EpochTrainingMixin:
    """:meth:`_train_epoch` and its steps for :class:`~bnao.train.standalone.StandaloneTrainer`.

    The host class provides ``config``, ``model``, ``optimizer``, ``train_loader``, ``device``,
    ``parallel``, ``grad_sync``, ``progress``, ``checkpoint_path``, ``steps_per_epoch``, ``total_steps``,
    the counters ``epoch`` and ``global_step``, ``_partial`` and :meth:`save_checkpoint`.
    """

    def _read_flag(self, flag: torch.Tensor) -> bool:
        """A 0-dim bool tensor's value; on CUDA through pinned memory, waiting only for the work queued so far."""
        if self.device.type != "cuda":
            return bool(flag)
        if getattr(self, "_flag_host", None) is None:
            self._flag_host = torch.zeros(1, dtype=torch.bool, pin_memory=True)
        copy_flag_to_host(flag, self._flag_host).synchronize()
        return bool(self._flag_host[0])

    def _autocast(self):
        return bf16_autocast(self.device, self.config.bf16)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss of one output head (cross-entropy with optional label smoothing)."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        """Trains epoch ``epoch`` (or the rest of it, when it was stopped part-way) and returns its record.

        Args:
            epoch: The epoch's index (0-based).

        Returns:
            ``{"epoch", "lr", "train_loss", "train_acc", "skipped_steps"}``, over every process's images.

        Raises:
            NonFiniteLossError: The loss or gradient stayed non-finite for ``max_nonfinite_steps`` steps.
            Stopped: A stop was requested mid-epoch; the epoch so far is checkpointed.
        """
        lr, sums = self._start_epoch(epoch)
        batches = self.train_loader
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False,
                       unit="step", dynamic_ncols=True)
        per_step = self.config.lr_schedule == "step"
        for images, labels in batches:
            loss, logits, finite = self._train_step(images, labels, per_step)
            self._update_or_skip(sums, finite, loss, logits, labels, epoch, lr, bar)
            self.global_step += 1
            if bar is not None:
                bar.update(1)
                if sums.seen and self.global_step % 20 == 0:
                    bar.set_postfix(loss=f"{float(sums.loss_sum) / sums.seen:.3f}")
            stop = self.grad_sync.stop_agreed if self.grad_sync is not None else stop_requested()
            if stop and self.train_loader.position < self.steps_per_epoch:
                if bar is not None:
                    bar.close()
                self._stop_mid_epoch(epoch, float(sums.loss_sum), int(sums.correct), sums.seen, sums.skipped,
                                     sums.bad_run)
        if bar is not None:
            bar.close()
        loss_sum, correct, seen = sums.loss_sum, sums.correct, sums.seen
        if self.parallel:  # one model and one record on every rank
            average_buffers(self.model)
            loss_sum, correct, seen = sum_across_ranks([float(loss_sum), int(correct), seen], "the epoch's statistics")
        return {"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / max(seen, 1),
                "train_acc": float(correct) / max(seen, 1), "skipped_steps": sums.skipped}

    def _start_epoch(self, epoch: int) -> Tuple[float, EpochSums]:
        """Sets the epoch's learning rate and random streams, or restores those of an epoch stopped part-way.

        Args:
            epoch: The epoch's index (0-based).

        Returns:
            ``(the epoch's learning rate, its running sums)``: zero for a new epoch, the checkpointed ones
            for an epoch continued.
        """
        cfg = self.config
        lr = cfg.lr_at(epoch) if cfg.lr_schedule == "epoch" else cfg.lr_at_step(epoch * self.steps_per_epoch,
                                                                                 self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        partial, self._partial = self._partial, None
        if partial is None:
            self.train_loader.set_epoch(epoch)
            # Rank 0 draws one process's stream; the others their own (rank-salted), not copies of it.
            rank = (self.parallel.rank,) if self.parallel and self.parallel.rank else ()
            torch.manual_seed(mix_seed(cfg.seed, _SALT_EPOCH, epoch, *rank))
        else:  # continue an epoch stopped part-way: the loader's position came with the checkpoint
            self._set_rng(partial["rng"])
        loss_sum = torch.tensor(partial["loss_sum"] if partial else 0.0, dtype=torch.float64, device=self.device)
        correct = torch.tensor(partial["correct"] if partial else 0, dtype=torch.int64, device=self.device)
        seen, skipped, bad_run = (partial["seen"], partial["skipped"], partial["bad_run"]) if partial else (0, 0, 0)
        return lr, EpochSums(loss_sum, correct, seen, skipped, bad_run)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor,
                    per_step: bool) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """Forward and backward of one batch (gradients averaged over the processes and clipped).

        Args:
            images: The batch's images.
            labels: Their labels.
            per_step: Set the learning rate of this step (``lr_schedule: step``).

        Returns:
            ``(loss, logits, whether the loss and gradient are finite)``; the update is not applied yet.
        """
        cfg, model = self.config, self.model
        model.set_step(self.global_step)
        if per_step:
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr_at_step(self.global_step, self.total_steps)
        with self._autocast():
            out = model(images)
        logits, aux_logits = out if isinstance(out, tuple) else (out, None)
        loss = self._loss(logits, labels)
        if aux_logits is not None:
            loss = loss + cfg.auxiliary_weight * self._loss(aux_logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        # A non-finite loss or gradient would poison the weights and momentum: skip the update. The
        # backward and the clipping are queued before the host looks at the flag, so the GPU keeps
        # working while the host waits (the backward of a rare bad step is wasted, not harmful).
        loss.backward()
        ok = torch.isfinite(loss.detach())
        if self.grad_sync is not None:  # average over the ranks; all agree on skipping and stopping
            agreed = self.grad_sync.reduce(list(model.parameters()), loss, stop_requested())
            ok = torch.tensor(agreed, device=self.device)
        if cfg.grad_clip:
            norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            ok = ok & torch.isfinite(norm)
        return loss, logits, self._read_flag(ok)

    def _update_or_skip(self, sums: EpochSums, finite: bool, loss: torch.Tensor, logits: torch.Tensor,
                        labels: torch.Tensor, epoch: int, lr: float, bar: Optional[Any]) -> None:
        """Applies a finite step's update and adds it to the sums, or skips a non-finite one.

        Args:
            sums: The epoch's running sums (updated in place).
            finite: Whether the step's loss and gradient are finite.
            loss: The step's loss.
            logits: The step's logits.
            labels: The batch's labels.
            epoch: The epoch's index (0-based), for the error message.
            lr: The epoch's learning rate, for the error message.
            bar: The epoch's progress bar (closed before an error), or None.

        Raises:
            NonFiniteLossError: This was the ``max_nonfinite_steps``-th non-finite step in a row.
        """
        if finite:
            self.optimizer.step()
            sums.bad_run = 0
            n = labels.shape[0]
            sums.loss_sum += loss.detach().double() * n
            sums.correct += (logits.detach().argmax(1) == labels).sum()
            sums.seen += n
            return
        sums.skipped += 1
        sums.bad_run += 1
        self.optimizer.zero_grad(set_to_none=True)
        if sums.bad_run >= self.config.max_nonfinite_steps:
            if bar is not None:
                bar.close()
            kept = (f"the last good checkpoint (end of epoch {self.epoch}) is kept at {self.checkpoint_path}"
                    if self.checkpoint_path is not None and self.epoch > 0 else "no checkpoint was written")
            raise NonFiniteLossError(
                f"training diverged: loss or gradient was {loss.item()} for {sums.bad_run} consecutive steps "
                f"(epoch {epoch + 1}, step {self.global_step + 1}, lr {lr:g}); {kept}. Lower the learning "
                "rate, turn off bf16, or check the data for NaNs.")

    def _rng_state(self) -> Dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng(self, state: Dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _stop_mid_epoch(self, epoch: int, loss_sum: float, correct: int, seen: int, skipped: int, bad_run: int) -> None:
        """Checkpoints the epoch in progress at this step boundary and raises :class:`Stopped`."""
        self._partial = {"loss_sum": loss_sum, "correct": correct, "seen": seen, "skipped": skipped,
                         "bad_run": bad_run, "rng": self._rng_state()}
        if self.parallel:  # each rank's sums and random stream, kept by rank in the one checkpoint
            from ..distributed import gather_objects

            average_buffers(self.model)
            self._partial = {"by_rank": gather_objects(self._partial, "a stop mid-epoch")}
        self.save_checkpoint()
        raise Stopped(f"epoch {epoch + 1}, step {self.train_loader.position} of {self.steps_per_epoch}")
