"""The supernet's randomness: drop-path masks, their schedule, and the mask generators' states.

A mixin of :class:`~bnao.supernet.Supernet`. It reads the model's ``seed``, ``step``, ``total_steps``,
``drop_path_keep_prob``, ``num_cells``, ``num_nodes``, ``batch_shard`` and the ``_drop_depth`` buffer, and keeps
``_generators`` (one per device) and ``_absent_rng`` (saved states of devices this machine lacks).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

log = logging.getLogger(__name__)


def _device_present(device: torch.device) -> bool:
    """Whether ``device`` exists on this machine (CPU always; ``cuda:i`` when that GPU is visible)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return False


class DropPathMixin:
    """Drop-path masks of NAO's schedule and the generators they come from (see the module docstring)."""

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of drop-path and dropout masks on ``device`` (created from ``seed``)."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def renew_generator(self, device: torch.device, state: torch.Tensor) -> torch.Generator:
        """Replaces the generator of ``device`` by a fresh one in ``state``, and returns it.

        After a failed CUDA graph capture: a generator registered with the graph can stay in capture mode,
        and its next draw outside a capture then fails ("Offset increment outside graph capture").
        """
        gen = torch.Generator(device=device)
        gen.set_state(state)
        self._generators[str(device)] = gen
        return gen

    def rng_state(self) -> Dict[str, torch.Tensor]:
        """States of the mask generators, keyed by device (``"cpu"``, ``"cuda:0"``, ...).

        States restored for a device this machine lacks are included unchanged, so a run that moves from a
        GPU to a CPU machine and back picks its GPU stream up where it left it.
        """
        state = dict(self._absent_rng)
        state.update({k: g.get_state() for k, g in self._generators.items()})
        return state

    def set_rng_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Restores :meth:`rng_state`, also on a machine with other devices.

        A state restores exactly on a machine that has its device. A state of a device this machine lacks
        (a GPU checkpoint resumed on a CPU machine, or the reverse) is kept aside and saved again; the masks
        on this machine's device then come from a generator seeded with :attr:`seed`. So across device types
        the weights, optimizer state, schedule and sampler draws continue exactly, but the drop-path and
        dropout masks do not (CPU and CUDA generators give different streams for one seed anyway).
        """
        for key, saved in state.items():
            device = torch.device(key)
            if _device_present(device):
                self._absent_rng.pop(key, None)
                self.generator(device).set_state(saved)
            else:
                self._absent_rng[key] = saved
                log.warning("supernet mask generator state for %s kept aside (no such device here): masks on this "
                            "machine come from a fresh stream, so they differ from an uninterrupted run's", key)

    def progress(self, step: Optional[int] = None) -> float:
        """The drop-path progress factor ``min((step + 1) / total_steps, 1)`` at ``step`` (default :attr:`step`);
        1 without a step or total (NAO's schedule)."""
        step = self.step if step is None else step
        if step is None or not self.total_steps:
            return 1.0
        return min(float(step + 1) / self.total_steps, 1.0)

    def keep_probs(self) -> List[float]:
        """Drop-path keep probability of every cell at the current :attr:`step` (NAO's schedule)."""
        keep = self.drop_path_keep_prob
        if keep is None:
            return [1.0] * self.num_cells
        ratio = self.progress()
        return [1.0 - ratio * (i + 1) / self.num_cells * (1.0 - keep) for i in range(self.num_cells)]

    def drop_path_masks(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32,
                        progress: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Drop-path multipliers for one training forward.

        Args:
            batch: Images in the batch.
            device: Where to draw them (with :meth:`generator`).
            dtype: Activation dtype.
            progress: 0-dim device tensor holding :meth:`progress`; None: computed on the host from :attr:`step`.

        Returns:
            ``[num_cells, batch, 2B]``: per cell, sample and branch position, ``0`` (dropped) or
            ``1 / keep`` (kept, with probability ``keep`` of :meth:`keep_probs`); None when drop-path is off.
        """
        keep = self.drop_path_keep_prob
        if keep is None or keep >= 1.0:
            return None
        ratio = self.progress() if progress is None else progress
        # keep per cell computed on the device from a constant: no host-to-device copy per step.
        keep_t = (1.0 - self._drop_depth.to(device) * ratio).view(-1, 1, 1)
        u = torch.rand(self.num_cells, batch * self.batch_shard[1], 2 * self.num_nodes,
                       generator=self.generator(device), device=device)
        u = self._shard_rows(u, 1)
        return torch.where(u < keep_t, keep_t.reciprocal(), torch.zeros((), device=device)).to(dtype)

    def _shard_rows(self, u: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice along ``dim`` of random numbers drawn for the global batch (see ``batch_shard``)."""
        rank, world = self.batch_shard
        if world == 1:
            return u
        local = u.shape[dim] // world
        return u.narrow(dim, rank * local, local)
