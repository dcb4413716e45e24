"""How far a supernet's bf16 steps are from its float32 steps, measured on the same steps.

Training is chaotic (BatchNorm over small batches, ReLU and max-pool switches amplify any rounding), so two
runs in different precisions drift apart whatever the kernels do. :func:`bf16_fidelity` compares instead
each step of one float32 run with the same step in bf16: from the same weights, batch and drop-path masks it
computes the loss and gradient under bf16 autocast with the fused cells, and with the eager cells (PyTorch's
own bf16 arithmetic, the yardstick), then takes the float32 step.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..autocast import bf16_autocast
from .loss import supernet_loss

__all__ = ["bf16_fidelity", "summarize"]


def _loss_and_grad(model, images: torch.Tensor, labels: torch.Tensor, arch: Tuple[int, ...], kernels: str,
                   bf16: bool, generator_state: torch.Tensor, aux_weight: float) -> Tuple[float, torch.Tensor]:
    """One forward and backward of ``arch`` with ``kernels`` cells, restoring the drop-path generator first
    and the running statistics after (so that every variant sees the same step)."""
    device = images.device
    model.kernels = kernels
    model.zero_grad(set_to_none=True)
    model.generator(device).set_state(generator_state)
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with bf16_autocast(device, bf16):
        if kernels == "fused" and model.cells_path(device, images.dtype) != "fused":
            raise RuntimeError(f"the fused cells are not used: {model.cells_path(device, images.dtype)}")
        loss, _ = supernet_loss(model(images, arch), labels, aux_weight)
    loss.backward()
    grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()])
    model.load_state_dict(running, strict=False)
    return loss.item(), grad


def bf16_fidelity(model, images: torch.Tensor, labels: torch.Tensor, archs: Sequence[Sequence[int]],
                  lr: float = 0.05, aux_weight: float = 0.4) -> Dict[str, Dict[str, List[float]]]:
    """Per step of a float32 SGD run (one arch each), how far the bf16 loss and gradient are from float32's.

    Args:
        model: A float32 :class:`~bnao.supernet.Supernet` in training mode whose fused cells are built for
            ``images``' device; it is trained (float32, fused cells) for ``len(archs)`` steps.
        images: One batch, reused every step.
        labels: Its labels.
        archs: The arch of each step.
        lr: SGD learning rate (momentum 0.9).
        aux_weight: Weight of the auxiliary loss (when the model has the head).

    Returns:
        For ``"fused"`` and ``"eager"`` cells under bf16 autocast: per step ``loss_gap`` (absolute difference
        from the float32 loss) and ``cosine`` (of the bf16 gradient with the float32 one, over every weight).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    device = images.device
    out: Dict[str, Dict[str, List[float]]] = {k: {"loss_gap": [], "cosine": []} for k in ("fused", "eager")}
    for step, arch in enumerate(archs):
        arch = tuple(int(v) for v in arch)
        model.set_step(step)
        state = model.generator(device).get_state()
        bf16 = {k: _loss_and_grad(model, images, labels, arch, k, True, state, aux_weight) for k in out}
        loss, grad = _loss_and_grad(model, images, labels, arch, "fused", False, state, aux_weight)
        for kernels, (bf16_loss, bf16_grad) in bf16.items():
            out[kernels]["loss_gap"].append(abs(bf16_loss - loss))
            out[kernels]["cosine"].append(float(torch.dot(bf16_grad, grad) / (bf16_grad.norm() * grad.norm())))
        # The float32 step: its gradient is in place; one more forward (same masks) moves the running statistics.
        model.generator(device).set_state(state)
        with torch.no_grad():
            model(images, arch)
        optimizer.step()
    return out


def summarize(result: Dict[str, Dict[str, List[float]]]) -> Dict[str, Dict[str, float]]:
    """Means and worst values of :func:`bf16_fidelity`'s per-step figures."""
    return {k: {"loss_gap_mean": float(np.mean(v["loss_gap"])), "loss_gap_max": float(np.max(v["loss_gap"])),
                "cosine_mean": float(np.mean(v["cosine"])), "cosine_min": float(np.min(v["cosine"]))}
            for k, v in result.items()}
