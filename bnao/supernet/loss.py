"""The training loss of a :class:`~bnao.supernet.model.Supernet` output (shared by the eager and graph steps)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def supernet_loss(out, labels: torch.Tensor, aux_weight: float, label_smoothing: float = 0.0
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training loss of a supernet output: cross-entropy in float32, plus ``aux_weight`` times the auxiliary head's.

    Args:
        out: Logits, or ``(logits, aux_logits)`` with the auxiliary head in training mode.
        labels: Class labels.
        aux_weight: Weight of the auxiliary head's loss.
        label_smoothing: Label smoothing of both cross-entropies.

    Returns:
        ``(loss, logits)``.
    """
    logits, aux = out if isinstance(out, tuple) else (out, None)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if aux is not None:
        loss = loss + aux_weight * F.cross_entropy(aux.float(), labels, label_smoothing=label_smoothing)
    return loss, logits
