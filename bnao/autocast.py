"""The one bfloat16 autocast context of bnao (``bf16: true`` in the configs, ``--bf16`` on the commands).

Every forward that honours ``bf16`` (supernet training, eager and captured; pool evaluation; the
stand-alone trainer and its evaluation; the launch recorder; the fidelity measurement) enters it through
:func:`bf16_autocast`, so they all run the same precision policy.
"""

from __future__ import annotations

import torch


def bf16_autocast(device: torch.device, enabled: bool, *, capturable: bool = False) -> torch.autocast:
    """bfloat16 autocast on ``device``'s type, a no-op context when not ``enabled``.

    Args:
        device: The device the forward runs on (its type selects CPU or CUDA autocast).
        enabled: Whether bf16 is on; False gives a context that changes nothing.
        capturable: For a part that may be captured in a CUDA graph: autocast's cast cache is turned off,
            since a graph would not replay the casts it cached (PyTorch's rule for autocast under CUDA
            graphs). Eager parts keep the cache, which saves re-casting a weight used twice in one forward.

    Returns:
        The ``torch.autocast`` context.
    """
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(enabled),
                          cache_enabled=False if capturable else None)
