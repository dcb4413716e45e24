"""Scoring a pool of archs with the shared weights (SPEC section 4, NAO-WS evaluation).

Every arch is run on the same held-out batch(es) with BatchNorm in training
mode (batch statistics, as NAO-WS does: running statistics of a supernet mean
nothing for one arch) but without touching the running statistics, the
weights or any random generator; no gradients. The batches stay on the device
and per-arch results are collected on the device, so the only host
synchronisation is the final copy of the ``[n]`` results.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .model import Supernet

Batch = Tuple[torch.Tensor, torch.Tensor]


def _as_batches(batches: Union[Batch, Iterable[Batch]]) -> Sequence[Batch]:
    if isinstance(batches, tuple) and len(batches) == 2 and torch.is_tensor(batches[0]):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError("evaluate_pool needs at least one (images, labels) batch")
    return out


@torch.no_grad()
def evaluate_pool(model: Supernet, archs: Union[np.ndarray, Sequence], batches: Union[Batch, Iterable[Batch]], *,
                  bf16: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Accuracy and loss of every arch of a pool with the supernet's shared weights.

    Args:
        model: The supernet.
        archs: ``int64 [n, 8B]`` pool (or a sequence of archs).
        batches: One ``(images, labels)`` batch (the reference uses one batch of 500 dev images) or several;
            they should already be on the model's device.
        bf16: bfloat16 autocast.

    Returns:
        ``(accuracy, loss)``, both ``float64 [n]``; with several batches, image-weighted means.
    """
    batches = _as_batches(batches)
    archs = np.asarray(archs, dtype=np.int64)
    if archs.ndim == 1:
        archs = archs[None, :]
    model.space.validate_array(archs)
    device = next(model.parameters()).device
    batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]
    total = float(sum(int(y.shape[0]) for _, y in batches))
    n = len(archs)
    acc = torch.zeros(n, device=device, dtype=torch.float32)
    loss = torch.zeros(n, device=device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for i, row in enumerate(archs.tolist()):
                arch = tuple(row)
                for x, y in batches:
                    logits = model(x, arch, bn_train=True).float()
                    # Sums stay on the device: no synchronisation per arch.
                    loss[i] += F.cross_entropy(logits, y, reduction="sum")
                    acc[i] += (logits.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    return (acc / total).double().cpu().numpy(), (loss / total).double().cpu().numpy()


__all__ = ["evaluate_pool"]
