"""Gather, node-output and slot-statistics ops of the fused cell (``csrc/cell/DESIGN.md``, "Ops").

Each function runs ``torch.ops.bnao.*`` when the compiled core has a kernel for the tensors' device and
otherwise the pure-PyTorch reference of :mod:`.reference`. The compiled ops carry their own autograd
(the backward is a compiled op too) and fake kernels, so they trace under ``torch.compile`` and pass
``torch.library.opcheck``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ... import extension
from .reference import gather_rows_reference, node_output_reference, update_slot_stats_reference

Tensor = torch.Tensor

__all__ = ["gather_rows", "node_output", "update_slot_stats"]


def gather_rows(stacks: Sequence[Tensor], select: Tensor, rows: Tensor, shape: Sequence[int]) -> Tensor:
    """``out[r]`` = top-left corner of ``stacks[select[r]][rows[r]]`` zero-padded to ``shape`` (zeros where
    ``select[r] < 0``).

    Args:
        stacks: 1 to 16 floating ``[rows_s, *sizes_s]`` tensors of one dtype and device, ``sizes_s <= shape``.
        select: int64 ``[R]`` stack per gathered row (-1: zero row).
        rows: int64 ``[R]`` row in the selected stack. Rows must be unique per stack (the backward writes
            without atomics; the CPU kernel checks it, the CUDA kernel relies on it).
        shape: Shape of one gathered row (1 to 4 dims).

    Returns:
        ``[R, *shape]``. Its gradient reaches the stacks densely: zeros in rows no entry selected.
    """
    stacks = list(stacks)
    if extension.has_kernel("gather_rows", stacks[0].device.type):
        return torch.ops.bnao.gather_rows(stacks, select, rows, [int(s) for s in shape])
    return gather_rows_reference(stacks, select, rows, shape)


def node_output(pre: Tensor, code: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
                drop_mask: Optional[Tensor] = None) -> Tensor:
    """A node's state from its two round-2 results (``node_output_reference``).

    Args:
        pre: ``[2, N, C, H, W]`` round-2 results of the node's branches.
        code: int32 ``[2, NUM_FIELDS]`` branch codes, on ``pre``'s device.
        mean: ``[2, C]`` round-2 batch means (used where FLAG_BN2 is set). This, ``invstd``, ``gamma``, ``beta``
            and ``drop_mask`` are float32 for bfloat16 ``pre`` (:func:`~bnao.ops.fused.round.param_dtype`).
        invstd: ``[2, C]`` round-2 batch ``1/sqrt(var + eps)``.
        gamma: ``[2, C]`` BN2 scales.
        beta: ``[2, C]`` BN2 shifts.
        drop_mask: ``[N, 2]`` drop-path multipliers (applied where FLAG_DROP is set); None: off. It
            receives no gradient.

    Returns:
        ``[N, C, H, W]``: the sum of the non-zero branches.
    """
    if extension.has_kernel("node_output", pre.device.type):
        return torch.ops.bnao.node_output(pre, code, mean, invstd, gamma, beta, drop_mask)
    return node_output_reference(pre, code, (mean, invstd, gamma, beta), drop_mask)


def update_slot_stats(running_mean: Tensor, running_var: Tensor, bn_rows: Tensor, mean: Tensor, invstd: Tensor,
                      momentum: float, eps: float, count: int) -> None:
    """Folds slot-BN batch statistics into a stage's running statistics in place.

    The same update as ``Supernet._update_slot_stats``: for each ``k`` with ``bn_rows[k] >= 0``, the running
    mean moves towards ``mean[k]`` and the running variance towards the unbiased batch variance
    ``(1/invstd[k]^2 - eps) * count/(count-1)``, both by ``momentum`` (``lerp``).

    Args:
        running_mean: Contiguous ``[rows, C]``, updated in place.
        running_var: Contiguous ``[rows, C]``, updated in place.
        bn_rows: int64 ``[K]`` running row per statistics row (-1: skip); unique.
        mean: ``[K, C]`` batch means (converted to the buffers' dtype).
        invstd: ``[K, C]`` batch ``1/sqrt(biased var + eps)``.
        momentum: Running-average momentum.
        eps: BN epsilon.
        count: Values per channel behind each statistic (``N * H * W``).
    """
    if extension.has_kernel("update_slot_stats", running_mean.device.type):
        torch.ops.bnao.update_slot_stats(running_mean, running_var, bn_rows, mean.detach(), invstd.detach(),
                                         float(momentum), float(eps), int(count))
    else:
        update_slot_stats_reference(running_mean, running_var, bn_rows, mean, invstd, momentum, eps, count)


def _flat_stack_sizes(stacks: Sequence[Tensor]) -> List[int]:
    return [int(s) for stack in stacks for s in stack.shape]


# --------------------------------------------------------------------------- autograd and fake kernels
if extension.has_ops() and hasattr(torch.ops.bnao, "gather_rows"):

    def _check_gather_indices(op, select, rows):
        torch._check(select.dim() == 1 and rows.dim() == 1 and select.shape[0] == rows.shape[0],
                     lambda: f"bnao::{op}: select and rows must be 1-D of one length")
        torch._check(select.dtype == torch.int64 and rows.dtype == torch.int64,
                     lambda: f"bnao::{op}: select and rows must be int64")

    @torch.library.register_fake("bnao::gather_rows")
    def _gather_rows_fake(stacks, select, rows, shape):
        torch._check(1 <= len(stacks) <= 16, lambda: "bnao::gather_rows: pass 1 to 16 stacks")
        torch._check(1 <= len(shape) <= 4 and all(s > 0 for s in shape),
                     lambda: "bnao::gather_rows: shape must have 1 to 4 positive dims")
        _check_gather_indices("gather_rows", select, rows)
        for stack in stacks:
            torch._check(stack.dim() == len(shape) + 1 and stack.dtype == stacks[0].dtype,
                         lambda: "bnao::gather_rows: every stack needs stack 0's dtype, a row dim and shape's dims")
        return stacks[0].new_empty((select.shape[0], *shape))

    @torch.library.register_fake("bnao::gather_rows_backward")
    def _gather_rows_backward_fake(grad, select, rows, stack_sizes):
        per_stack = grad.dim()  # one row dim plus the gathered row's dims
        torch._check(2 <= per_stack <= 5, lambda: "bnao::gather_rows_backward: grad must be [R, *shape]")
        torch._check(len(stack_sizes) > 0 and len(stack_sizes) % per_stack == 0,
                     lambda: "bnao::gather_rows_backward: stack_sizes must hold grad.dim() ints per stack")
        _check_gather_indices("gather_rows_backward", select, rows)
        return [grad.new_empty(stack_sizes[i : i + per_stack]) for i in range(0, len(stack_sizes), per_stack)]

    def _gather_rows_setup(ctx, inputs, output):
        stacks, select, rows, shape = inputs
        ctx.save_for_backward(select, rows)
        ctx.stack_sizes = _flat_stack_sizes(stacks)

    def _gather_rows_backward(ctx, grad):
        select, rows = ctx.saved_tensors
        grads = torch.ops.bnao.gather_rows_backward(grad.contiguous(), select, rows, ctx.stack_sizes)
        return list(grads), None, None, None

    torch.library.register_autograd("bnao::gather_rows", _gather_rows_backward, setup_context=_gather_rows_setup)

    def _gather_rows_backward_setup(ctx, inputs, output):
        grad, select, rows, _sizes = inputs
        ctx.save_for_backward(select, rows)
        ctx.shape = list(grad.shape[1:])

    def _gather_rows_double_backward(ctx, grads):
        # The backward is linear in grad: its own gradient is the forward gather again.
        select, rows = ctx.saved_tensors
        return torch.ops.bnao.gather_rows(list(grads), select, rows, ctx.shape), None, None, None

    torch.library.register_autograd("bnao::gather_rows_backward", _gather_rows_double_backward,
                                    setup_context=_gather_rows_backward_setup)

    @torch.library.register_fake("bnao::node_output")
    def _node_output_fake(pre, code, mean, invstd, gamma, beta, drop_mask):
        torch._check(pre.dim() == 5 and pre.shape[0] == 2, lambda: "bnao::node_output: pre must be [2, N, C, H, W]")
        return pre.new_empty(pre.shape[1:])

    @torch.library.register_fake("bnao::node_output_backward")
    def _node_output_backward_fake(grad, pre, code, mean, invstd, gamma, drop_mask):
        torch._check(pre.dim() == 5 and grad.shape == pre.shape[1:],
                     lambda: "bnao::node_output_backward: pre must be [2, N, C, H, W] and grad pre.shape[1:]")
        return (torch.empty_like(pre), torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean),
                torch.empty_like(mean))

    def _node_output_setup(ctx, inputs, output):
        pre, code, mean, invstd, gamma, _beta, drop_mask = inputs
        ctx.save_for_backward(pre, code, mean, invstd, gamma, drop_mask)

    def _node_output_backward(ctx, grad):
        pre, code, mean, invstd, gamma, drop_mask = ctx.saved_tensors
        grad_pre, grad_mean, grad_invstd, grad_gamma, grad_beta = torch.ops.bnao.node_output_backward(
            grad.contiguous(), pre, code, mean, invstd, gamma, drop_mask)
        return grad_pre, None, grad_mean, grad_invstd, grad_gamma, grad_beta, None

    torch.library.register_autograd("bnao::node_output", _node_output_backward, setup_context=_node_output_setup)

    @torch.library.register_fake("bnao::update_slot_stats")
    def _update_slot_stats_fake(running_mean, running_var, bn_rows, mean, invstd, momentum, eps, count):
        torch._check(mean.shape == invstd.shape, lambda: "bnao::update_slot_stats: mean and invstd differ in shape")
        return None
