"""The fused cell's combine: its output before the BN, from every state, reading only the loose ends.

``combine(states, weight, loose)`` = the sum over the loose ends ``s`` of ``loose[s] * W[:, s, :] . ReLU(x_s)``
(``csrc/cell/DESIGN.md``, "combine"; reference :func:`~.reference.combine_reference`). It replaces the
``stack`` of all ``B + 2`` states, their ``ReLU`` and a 1x1 convolution with zeroed columns by one kernel
that reads the loose states only and writes the output: of the evaluation forward's bytes those three ops
moved 40% (benchmarks/NOTES.md).

The fused cell uses it in training and in pool evaluation. Its backward is its own op: the states' gradient
tiles ``kCombineTile`` input channels per work item, and the weight gradient runs in two passes (tiles of
``kCombineTile x kCombineTile`` weights summed over chunks of pixels, one GPU block per tile and chunk, then
the chunks added in a fixed order), so it is deterministic on every device (``csrc/cell/combine.h``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ... import extension
from .reference import combine_reference
from .round import ACTIVATION_DTYPES, param_dtype

Tensor = torch.Tensor

__all__ = ["combine", "combine_applies"]


def combine(states: Sequence[Tensor], weight: Tensor, loose: Tensor) -> Tensor:
    """A cell's output before its BN from all its states (:mod:`bnao.ops.fused.combine`).

    Args:
        states: The ``S`` states (cell inputs, then nodes), each ``[N, C, H, W]`` of one dtype and device.
        weight: ``[C, S, C]`` 1x1-convolution weight per state, in :func:`~.round.param_dtype` of the states'
            dtype (float32 for bfloat16 states).
        loose: ``[S]`` 1 for a loose end, 0 otherwise, like ``weight``; on the states' device. A constant
            mask: it takes no gradient.

    Returns:
        ``[N, C, H, W]`` in the states' dtype. Differentiable in the states and the weight (zero gradients
        where not loose).
    """
    states = list(states)
    if extension.has_kernel("combine", states[0].device.type):
        return torch.ops.bnao.combine(states, weight, loose)
    return combine_reference(states, weight, loose)


def combine_applies(states: Sequence[Tensor], weight: Tensor) -> bool:
    """Whether the fused cell can take :func:`combine`: compiled for the device and given the dtypes the op
    takes (under autocast a state may come out in another dtype than the others)."""
    first = states[0]
    if not extension.has_kernel("combine", first.device.type) or first.dtype not in ACTIVATION_DTYPES:
        return False
    return weight.dtype == param_dtype(first.dtype) and all(s.dtype == first.dtype for s in states)


# --------------------------------------------------------------------------- autograd and fake kernels
if extension.has_ops() and hasattr(torch.ops.bnao, "combine"):

    def _check_combine(op, states, weight, loose):
        torch._check(1 <= len(states) <= 16, lambda: f"bnao::{op}: pass 1 to 16 states")
        first = states[0]
        torch._check(first.dim() == 4 and first.numel() > 0,
                     lambda: f"bnao::{op}: states must be non-empty [N, C, H, W]")
        torch._check(first.dtype in ACTIVATION_DTYPES,
                     lambda: f"bnao::{op}: states must be float32, float64 or bfloat16, got {first.dtype}")
        same = all(s.shape == first.shape and s.dtype == first.dtype and s.device == first.device for s in states)
        torch._check(same, lambda: f"bnao::{op}: every state must match state 0's shape, dtype and device")
        torch._check(weight.device == first.device and loose.device == first.device,
                     lambda: f"bnao::{op}: weight and loose must be on the states' device")
        channels, count = first.shape[1], len(states)
        torch._check(tuple(weight.shape) == (channels, count, channels),
                     lambda: f"bnao::{op}: weight must be [C, S, C] = [{channels}, {count}, {channels}]")
        torch._check(tuple(loose.shape) == (count,), lambda: f"bnao::{op}: loose must be [S] = [{count}]")
        torch._check(weight.dtype == param_dtype(first.dtype) and loose.dtype == weight.dtype,
                     lambda: f"bnao::{op}: weight and loose must be {param_dtype(first.dtype)} for {first.dtype} "
                     "states")

    @torch.library.register_fake("bnao::combine")
    def _combine_fake(states, weight, loose):
        _check_combine("combine", states, weight, loose)
        return torch.empty_like(states[0], memory_format=torch.contiguous_format)

    @torch.library.register_fake("bnao::combine_backward")
    def _combine_backward_fake(grad, states, weight, loose):
        _check_combine("combine_backward", states, weight, loose)
        torch._check(grad.shape == states[0].shape, lambda: "bnao::combine_backward: grad must be the states' shape")
        return ([torch.empty_like(s, memory_format=torch.contiguous_format) for s in states],
                torch.empty_like(weight, memory_format=torch.contiguous_format))

    def _combine_setup(ctx, inputs, output):
        states, weight, loose = inputs
        torch._check(not loose.requires_grad,
                     lambda: "bnao::combine: loose is a constant 0/1 mask and takes no gradient; pass loose.detach()")
        ctx.save_for_backward(weight, loose, *states)

    def _combine_backward(ctx, grad):
        weight, loose, *states = ctx.saved_tensors
        grad_states, grad_weight = torch.ops.bnao.combine_backward(grad.contiguous(), states, weight, loose)
        return list(grad_states), grad_weight, None

    torch.library.register_autograd("bnao::combine", _combine_backward, setup_context=_combine_setup)
