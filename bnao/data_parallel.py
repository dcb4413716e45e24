"""Data-parallel training steps on ``torch.distributed`` (see :mod:`bnao.distributed` for the launch).

* :class:`ShardedLoader`: every rank reads the same global batch from an identically seeded loader and
  keeps its own contiguous slice, so the loader's state is global and resumes at any world size.
* :class:`GradientSync`: after every backward, the gradients are averaged over the ranks in one flat
  ``all_reduce`` that also carries each rank's non-finite-loss and stop flags. With the step's supernet
  masks, only what the arch used travels (about 8 % of a supernet's weights): unused parameters and
  unused rows have zero gradients on every rank, so leaving them out is exact.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .distributed import Context, DistributedError, comm_device, run_collective


class GradientSync:
    """Averages gradients over the ranks after every backward, in one flat ``all_reduce``.

    The bucket also carries two flags: whether the rank's loss was non-finite and whether it was asked to
    stop. Every rank therefore skips the same steps and stops at the same step boundary, so no rank is left
    waiting in a collective the others never join.

    Args:
        context: The run's context (must be enabled).
        check_arch: Debug: compare the step's arch index across ranks (one extra small ``all_reduce``) and
            raise :class:`DistributedError` when they differ.
    """

    def __init__(self, context: Context, check_arch: bool = False):
        if not context.enabled:
            raise ValueError("GradientSync needs a context with several processes")
        self.context = context
        self.check_arch = bool(check_arch)
        self.stop_agreed = False

    def reduce(self, params: Sequence[torch.nn.Parameter], loss: torch.Tensor, stop: bool,
               masks: Optional[Dict[torch.nn.Parameter, Any]] = None) -> bool:
        """Averages the ``.grad`` of ``params`` over the ranks; returns whether every rank's loss was finite.

        Parameters without a gradient on this rank enter the sum as zeros and leave with None again (every
        rank trains the same arch, so they are the same parameters on every rank); :attr:`stop_agreed` is
        set when any rank asked to stop.

        Args:
            params: The trained parameters, in the same order on every rank.
            loss: This rank's loss (its finiteness travels with the gradients).
            stop: Whether this rank was asked to stop.
            masks: The step's :meth:`~bnao.supernet.Supernet.touched_masks` (the same on every rank): a
                parameter the arch does not use stays out of the all-reduce, and of a stacked parameter only
                the rows the arch uses travel. The other rows' gradients are zero on every rank (no path
                reaches them), so their average is too, and the masked update never reads them.
        """
        device = loss.device
        masks = masks or {}
        travel, parts = [], []
        for p in params:
            mask = masks.get(p)
            if mask is False:  # unused by the step's arch on every rank: MaskedSGD leaves it alone
                continue
            rows = _used_rows(mask, p)
            size = p.numel() if rows is None else rows.numel() * (p.numel() // max(p.shape[0], 1))
            if p.grad is None:
                parts.append(torch.zeros(size, device=device))
            else:
                parts.append((p.grad if rows is None else p.grad.index_select(0, rows)).reshape(-1).float())
            travel.append((p, rows, p.grad is None))
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.tensor(1.0 if stop else 0.0, device=device)])
        bucket = torch.cat(parts + [flags]).to(comm_device(self.context))
        run_collective("the gradient all-reduce", dist.all_reduce, bucket)
        bad, stopping = bucket[-2:].tolist()
        self.stop_agreed = stopping > 0
        bucket = bucket[:-2].div_(self.context.world_size).to(device)
        offset = 0
        for (p, rows, was_missing), part in zip(travel, parts):
            reduced = bucket[offset: offset + part.numel()]
            offset += part.numel()
            if was_missing:
                continue
            if rows is None:
                p.grad.copy_(reduced.view_as(p.grad))
            else:
                p.grad.index_copy_(0, rows, reduced.view(rows.numel(), *p.shape[1:]).to(p.grad.dtype))
        return bad == 0

    def verify_arch(self, index: int, step: int) -> None:
        """Raises :class:`DistributedError` unless every rank drew arch ``index`` at ``step``."""
        if not self.check_arch:
            return
        value = torch.tensor([index, -index], dtype=torch.int64, device=comm_device(self.context))
        run_collective("the arch check", dist.all_reduce, value, op=dist.ReduceOp.MAX)
        high, low = int(value[0]), -int(value[1])
        if high != low:
            raise DistributedError(
                f"step {step}: the ranks trained different archs (pool indices {low}..{high}); weight sharing "
                "would silently break. Every rank must run the same config and seed (same sampler stream)")


def _used_rows(mask: Any, param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """Indices of the rows a 0/1 row mask (``[rows, 1, ...]``) selects; None for any other mask (all travels).

    Computed once per mask and kept on it: the supernet caches its masks per arch.
    """
    if not torch.is_tensor(mask) or mask.dim() != param.dim() or mask.shape[0] != param.shape[0] or any(
            size != 1 for size in mask.shape[1:]):
        return None
    rows = getattr(mask, "_bnao_used_rows", None)
    if rows is None:
        rows = mask.reshape(-1).nonzero().flatten()
        mask._bnao_used_rows = rows
    return rows


class ShardedLoader:
    """This rank's contiguous slice of every batch of a loader that every rank builds identically.

    Every rank reads the same global batch (same order and augmentation: the loaders are seeded alike) and
    keeps rows ``[rank * b, (rank + 1) * b)`` with ``b = batch_size / world_size``. The loader's state is
    the global one, so a checkpoint resumes at any world size that divides the batch.

    Args:
        loader: A ``bnao.data`` loader over the whole dataset with the global batch size.
        context: The run's context.
        what: The config key of the batch size (named in errors).

    Raises:
        DistributedError: The batch size is not a multiple of the world size.
    """

    def __init__(self, loader: Any, context: Context, what: str = "the batch size"):
        if loader.batch_size % context.world_size:
            raise DistributedError(
                f"{what} {loader.batch_size} does not split evenly over {context.world_size} processes; choose a "
                f"multiple of {context.world_size} (it is the global batch, each process takes "
                f"{what}/{context.world_size} images)")
        self.loader = loader
        self.context = context
        self.local_batch = loader.batch_size // context.world_size

    @property
    def batch_size(self) -> int:
        """The global batch size (the loader state's unit)."""
        return self.loader.batch_size

    def _slice(self, batch):
        start = self.context.rank * self.local_batch
        return tuple(t[start: start + self.local_batch] for t in batch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            yield self._slice(batch)

    def stream(self) -> Iterator:
        while True:
            yield from self

    def __getattr__(self, name: str) -> Any:
        # position, epoch, set_epoch, state_dict, load_state_dict, ...: the global loader's.
        if name == "loader":  # not set yet (copy, unpickling): no endless lookup
            raise AttributeError(name)
        return getattr(self.loader, name)


__all__ = ["GradientSync", "ShardedLoader"]
