"""A trained network's size (:func:`count_parameters`) and its accuracy and loss on a dataset
(:func:`evaluate_model`)."""

from __future__ import annotations

from typing import Any, Dict, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..autocast import bf16_autocast

__all__ = ["count_parameters", "evaluate_model"]


def count_parameters(model: nn.Module) -> int:
    """Parameters of a network without its auxiliary head (the SPEC's model size)."""
    aux = getattr(model, "auxiliary_head", None)
    aux_ids = {id(p) for p in aux.parameters()} if aux is not None else set()
    return int(sum(p.numel() for p in model.parameters() if id(p) not in aux_ids))


@torch.no_grad()
def evaluate_model(model: nn.Module, data: Any, batch_size: int = 500, device: Union[str, torch.device] = "cpu",
                   *, loader: str = "auto", channels_last: bool = False, bf16: bool = False) -> Dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on a dataset, in eval mode (BN running statistics).

    Args:
        model: A network from :func:`bnao.nets.build_network` (or any logits model).
        data: A ``bnao.data`` dataset.
        batch_size: Images per batch (every image is used; the last batch may be smaller).
        device: Device of ``model``.
        loader: ``bnao.data.create_loader`` name.
        channels_last: Deliver channels-last batches.
        bf16: Autocast to bfloat16.

    Returns:
        ``{"acc": fraction correct, "loss": mean loss, "n": number of images}``.
    """
    from ..data import create_loader

    device = torch.device(device)
    batches = create_loader(loader, data, batch_size, device=device, augment=False, shuffle=False,
                            drop_last=False, seed=0, channels_last=channels_last)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for images, labels in batches:
            with bf16_autocast(device, bf16):
                logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            correct += (logits.argmax(1) == labels).sum()
            n += labels.shape[0]
    finally:
        model.train(was_training)
    return {"acc": float(correct) / max(n, 1), "loss": float(loss_sum) / max(n, 1), "n": n}
