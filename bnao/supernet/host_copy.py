"""Host values onto a device: the one way the supernet uploads per-arch and per-pool index data."""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype)`` on ``device``; to a GPU from pinned memory, without blocking the host.

    A pageable host-to-device copy makes the host wait for the GPU (a profile shows ``Memcpy HtoD (Pageable
    -> Device)``). The pinned block is held by the caching host allocator until its copy has run, so the
    temporary may go out of scope at once.
    """
    pinned = torch.device(device).type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)
