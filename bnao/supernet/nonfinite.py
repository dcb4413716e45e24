"""The supernet trainer's guard against non-finite losses (see :mod:`bnao.supernet.trainer`).

A step whose loss is NaN or infinite is skipped (no weight update), counted
and logged; ``max_bad_steps`` of them in a row raise
:class:`NonFiniteLossError` so that the caller can fall back to its last good
checkpoint.

On CUDA the finiteness check waits only for the forward pass: the flag is
copied to pinned host memory behind the forward's kernels and an event is
recorded after the copy, so the host, once it has launched the backward,
waits on that event rather than on the backward itself.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch

from ..device import copy_flag_to_host

# The trainer's logger: these warnings were always emitted under it, and log
# configurations that filter or route it should keep seeing them.
log = logging.getLogger("bnao.supernet.trainer")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


class NonFiniteGuardMixin:
    """The non-finite-loss check and the per-step accounting of :class:`~bnao.supernet.trainer.SupernetTrainer`.

    The host class provides ``device``, ``optimizer``, ``max_bad_steps``, ``global_step``,
    ``bad_steps_total``, ``bad_in_row`` and ``_flag_host`` (a one-element bool tensor, pinned on CUDA).
    """

    def _loss_is_finite(self, loss: torch.Tensor) -> Optional[bool]:
        """Whether the step's loss is finite, or None on CUDA, where the answer comes later.

        Args:
            loss: The step's loss (on :attr:`device`).

        Returns:
            The flag off CUDA. On CUDA None: the flag is on its way to ``_flag_host`` and
            ``_pending_event`` marks its arrival; the caller waits on that event after launching the backward.
        """
        flag = torch.isfinite(loss.detach())
        if self.device.type != "cuda":
            return bool(flag)
        # Copied behind the forward's kernels: waiting on this event does not wait for the backward.
        self._pending_event = copy_flag_to_host(flag, self._flag_host)
        return None  # resolved after the backward is launched

    def _account(self, tally: Dict[str, Any], finite: bool, lr: float, loss: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor, update: Optional[Callable[[], None]]) -> None:
        """Counts a step: a finite one runs ``update`` (the optimizer; None when already applied) and adds to the
        loss and accuracy sums; a non-finite one is skipped, and ``max_bad_steps`` of them in a row stop training.

        Raises:
            NonFiniteLossError: ``max_bad_steps`` consecutive non-finite losses.
        """
        if not finite:
            tally["bad"] += 1
            self.bad_steps_total += 1
            self.bad_in_row += 1
            if update is not None:  # graph steps keep their captured .grad tensors (the next replay overwrites them)
                self.optimizer.zero_grad(set_to_none=True)
            log.warning("supernet step %d: non-finite loss (%s); step skipped (%d in a row)",
                        self.global_step, "nan/inf", self.bad_in_row)
            if self.bad_in_row >= self.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_in_row} consecutive supernet steps had a NaN or infinite loss (last at step "
                    f"{self.global_step}, lr {lr:.4g}); training stopped. Resume from the last good checkpoint, "
                    "e.g. with a lower lr_max, grad_clip, or without bf16.")
            return
        self.bad_in_row = 0
        if update is not None:
            update()
        tally["good"] += 1
        with torch.no_grad():
            tally["loss"] += loss.detach().float()
            tally["correct"] += (logits.detach().argmax(1) == labels).sum().float()
        tally["seen"] += labels.shape[0]


__all__ = ["NonFiniteLossError", "NonFiniteGuardMixin"]
