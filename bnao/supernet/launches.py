"""The launch sequence of a supernet training step, and whether it depends on the arch.

A step whose sequence of ops (names and tensor shapes) is the same for every arch can be captured
once as a CUDA graph and replayed for any arch (the fused path's promise, csrc/cell/DESIGN.md).
The eager path schedules branches by level, so its sequence changes with the arch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..autocast import bf16_autocast

Launch = Tuple[str, Tuple[Tuple[int, ...], ...]]


class _Recorder(TorchDispatchMode):
    """Records every op dispatched below autograd: its name and the shapes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: List[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shapes = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(a, torch.Tensor))
        self.launches.append((str(func.overloadpacket.__name__), shapes))
        return func(*args, **kwargs)


def launch_sequence(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, arch: Any,
                    bf16: bool = False) -> List[Launch]:
    """The ops one training forward and backward of ``arch`` dispatches, in order (after a first, unrecorded one).

    Args:
        model: A :class:`~bnao.supernet.Supernet` (left in training mode; its gradients are cleared).
        images: A batch ``[N, C, H, W]`` on the model's device.
        labels: Its labels ``[N]``.
        arch: The arch to run.
        bf16: Under bfloat16 autocast (its casts are part of the sequence).

    Returns:
        ``(op name, tensor argument shapes)`` per dispatched op.
    """
    model.train()
    recorder = _Recorder()
    # The first step of an arch builds and caches its plan (index tensors): a one-off per arch, not part
    # of the steady-state sequence that a captured graph would replay.
    for record in (False, True):
        model.zero_grad(set_to_none=True)
        with recorder if record else contextlib.nullcontext(), bf16_autocast(images.device, bf16):
            out = model(images, arch)
            logits = out[0] if isinstance(out, tuple) else out
            F.cross_entropy(logits, labels).backward()
    model.zero_grad(set_to_none=True)
    return recorder.launches


def compare_launch_sequences(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                             archs: Sequence[Any], bf16: bool = False) -> Dict[str, Any]:
    """Records :func:`launch_sequence` for each arch and compares them.

    The model's running statistics and drop-path generator advance as in training; take a copy of the
    model first when that matters.

    Returns:
        ``{"archs": k, "identical": bool, "distinct": number of distinct sequences,
        "ops_min": shortest, "ops_max": longest}``.
    """
    sequences = [launch_sequence(model, images, labels, arch, bf16) for arch in archs]
    lengths = [len(s) for s in sequences]
    distinct = len({tuple(s) for s in sequences})
    return {"archs": len(sequences), "identical": distinct == 1, "distinct": distinct,
            "ops_min": min(lengths), "ops_max": max(lengths)}
