"""Pure-PyTorch references of the fused cell ops (semantics of ``csrc/cell/DESIGN.md``).

They read the branch code on the host, so they are slow and arch-dependent in their launch
sequence: they exist to define what the kernels compute and to test them (``torch.testing``,
float64 ``gradcheck``). Every function is differentiable in all its float arguments.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...space.ops import (
    KIND_AVG_POOL,
    KIND_DIL_SEP_CONV,
    KIND_IDENTITY,
    KIND_MAX_POOL,
    KIND_SEP_CONV,
    KIND_ZERO,
)
from .code import DILATION, FLAG_BN1, FLAG_BN2, FLAG_DROP, FLAGS, INPUT, KERNEL, KIND, STRIDE

Tensor = torch.Tensor
Norm = Tuple[Tensor, Tensor, Tensor, Tensor]  # (mean [2,C], invstd [2,C], gamma [2,C], beta [2,C])


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``(x - mean) * invstd * gamma + beta`` per channel of ``x [N, C, H, W]`` (``mean`` etc. ``[C]``)."""
    view = (1, -1, 1, 1)
    return (x - mean.view(view)) * (invstd * gamma).view(view) + beta.view(view)


def batch_stats(y: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Mean and ``1/sqrt(biased var + eps)`` per channel of ``y [N, C, H, W]`` (differentiable)."""
    mean = y.mean(dim=(0, 2, 3))
    var = (y - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    return mean, (var + eps).rsqrt()


def _depthwise(x: Tensor, dw: Tensor, kernel: int, stride: int, dilation: int) -> Tensor:
    channels = x.shape[1]
    weight = dw[:, :kernel, :kernel].reshape(channels, 1, kernel, kernel)
    return F.conv2d(F.relu(x), weight, None, stride, dilation * (kernel // 2), dilation, channels)


def _pointwise(x: Tensor, pw: Tensor) -> Tensor:
    return torch.einsum("oc,nchw->nohw", pw, x)


def _factorized_reduce(x: Tensor, pw: Tensor) -> Tensor:
    # Rows :C//2 read the even pixels, the others the odd pixels (zero past the edge), no ReLU.
    half = pw.shape[0] // 2
    odd = F.pad(x, (0, 1, 0, 1))[:, :, 1::2, 1::2] if x.shape[-1] % 2 or x.shape[-2] % 2 else x[:, :, 1::2, 1::2]
    return torch.cat([_pointwise(x[:, :, ::2, ::2], pw[:half]), _pointwise(odd, pw[half:])], 1)


def _round1_branch(x: Tensor, row: List[int], dw: Tensor, pw: Tensor) -> Tensor:
    kind, kernel, dilation, stride = row[KIND], row[KERNEL], row[DILATION], row[STRIDE]
    if kind in (KIND_SEP_CONV, KIND_DIL_SEP_CONV):
        return _pointwise(_depthwise(x, dw, kernel, stride, dilation), pw)
    if kind == KIND_AVG_POOL:
        return F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
    if kind == KIND_MAX_POOL:
        return F.max_pool2d(x, 3, stride, 1)
    if kind == KIND_IDENTITY:
        return _factorized_reduce(x, pw) if stride == 2 else x
    if kind == KIND_ZERO:
        return torch.zeros_like(x[:, :, ::stride, ::stride])
    raise ValueError(f"unknown op kind {kind}")


def branch_round_reference(sources: Sequence[Tensor], code: Tensor, round_index: int, dw: Tensor, pw: Tensor,
                           in_norm: Optional[Norm] = None, eps: float = 1e-5) -> Tuple[Tensor, Tensor, Tensor]:
    """One round of the two branches of a node (DESIGN.md, "branch_round").

    Args:
        sources: Round 1: the states the node may read (``[N, C, H, W]`` each; in a reduction cell the
            two cell inputs have twice the nodes' resolution). Round 2: ``[pre1]``, the round-1 result
            ``[2, N, C, Ho, Wo]``, branch ``b`` reading ``pre1[b]``.
        code: ``[2, NUM_FIELDS]`` int32 branch codes of the node.
        round_index: 1 or 2.
        dw: ``[2, C, 7, 7]`` depthwise weights, top-left ``k x k`` used.
        pw: ``[2, C, C]`` pointwise weights (round 1: also the factorized reduce's).
        in_norm: Round 2 only: round 1's ``(mean, invstd, gamma, beta)``, applied to the branches whose
            FLAG_BN1 is set before the round's body.
        eps: BN epsilon.

    Returns:
        ``(pre [2, N, C, Ho, Wo], mean [2, C], invstd [2, C])``: the round's result before its BN, and its
        batch statistics for the branches whose BN flag of this round is set (0 and 1 otherwise).
    """
    rows = code.tolist()
    outs, means, invstds = [], [], []
    for b, row in enumerate(rows):
        if round_index == 1:
            y = _round1_branch(sources[row[INPUT]], row, dw[b], pw[b])
            has_bn = bool(row[FLAGS] & FLAG_BN1)
        else:
            x = sources[0][b]
            if row[FLAGS] & FLAG_BN1:
                x = normalize(x, *(t[b] for t in in_norm))
            y = _pointwise(_depthwise(x, dw[b], row[KERNEL], 1, 1), pw[b]) if row[KIND] == KIND_SEP_CONV else x
            has_bn = bool(row[FLAGS] & FLAG_BN2)
        outs.append(y)
        if has_bn:
            mean, invstd = batch_stats(y, eps)
        else:
            mean, invstd = y.new_zeros(y.shape[1]), y.new_ones(y.shape[1])
        means.append(mean)
        invstds.append(invstd)
    return torch.stack(outs), torch.stack(means), torch.stack(invstds)


def node_output_reference(pre: Tensor, code: Tensor, norm: Norm, drop_mask: Optional[Tensor]) -> Tensor:
    """The node's state: ``sum_b mask[:, b] * y_b`` (DESIGN.md, "node_output").

    Args:
        pre: Round 2's ``[2, N, C, H, W]``.
        code: ``[2, NUM_FIELDS]`` branch codes.
        norm: Round 2's ``(mean, invstd, gamma, beta)``, applied to the branches whose FLAG_BN2 is set.
        drop_mask: ``[N, 2]`` multipliers (0 or ``1/keep``), applied to branches with FLAG_DROP; None: off.

    Returns:
        ``[N, C, H, W]``; zero branches contribute nothing.
    """
    out = torch.zeros_like(pre[0])
    for b, row in enumerate(code.tolist()):
        if row[KIND] == KIND_ZERO:
            continue
        y = normalize(pre[b], *(t[b] for t in norm)) if row[FLAGS] & FLAG_BN2 else pre[b]
        if drop_mask is not None and row[FLAGS] & FLAG_DROP:
            y = y * drop_mask[:, b].view(-1, 1, 1, 1)
        out = out + y
    return out


def gather_rows_reference(stacks: Sequence[Tensor], select: Tensor, rows: Tensor, shape: Sequence[int]) -> Tensor:
    """Rows of several stacks, zero-padded to one shape (DESIGN.md, "gather_rows").

    Differentiable in every stack and free of host synchronisation (a ``torch.where`` per stack).

    Args:
        stacks: ``[rows_s, *sizes_s]`` tensors, ``sizes_s <= shape`` elementwise.
        select: int64 ``[R]``: stack of each gathered row, -1 for a zero row.
        rows: int64 ``[R]``: row in the selected stack.
        shape: Shape of one gathered row.

    Returns:
        ``[R, *shape]``: ``out[r]`` = the top-left corner of ``stacks[select[r]][rows[r]]`` zero-padded to
        ``shape``, zeros where ``select[r] < 0``.
    """
    shape = [int(s) for s in shape]
    out = stacks[0].new_zeros((select.shape[0], *shape))
    hit_view = (-1,) + (1,) * len(shape)
    for index, stack in enumerate(stacks):
        if stack.shape[0] == 0:
            continue  # no row can select it
        pad: List[int] = []
        for d in reversed(range(len(shape))):
            pad += [0, shape[d] - stack.shape[d + 1]]
        padded = F.pad(stack, pad)
        # Rows of other stacks may be out of this one's range: clamp them, torch.where drops them.
        taken = padded.index_select(0, rows.clamp(0, stack.shape[0] - 1))
        out = torch.where((select == index).view(hit_view), taken, out)
    return out


def update_slot_stats_reference(running_mean: Tensor, running_var: Tensor, bn_rows: Tensor, mean: Tensor,
                                invstd: Tensor, momentum: float, eps: float, count: int) -> None:
    """Folds slot-BN batch statistics into running statistics in place (``Supernet._update_slot_stats``).

    Args:
        running_mean: ``[rows, C]`` running means, updated in place.
        running_var: ``[rows, C]`` running (unbiased) variances, updated in place.
        bn_rows: int64 ``[K]``: running row of each statistics row; rows < 0 are skipped. Unique.
        mean: ``[K, C]`` batch means.
        invstd: ``[K, C]`` batch ``1/sqrt(biased var + eps)``.
        momentum: Running-average momentum.
        eps: BN epsilon.
        count: Values per channel behind each statistic (``N * H * W``), for the unbiased variance.
    """
    with torch.no_grad():
        valid = bn_rows >= 0
        rows = bn_rows[valid]
        m = mean[valid].to(running_mean.dtype)
        var = (invstd[valid].to(running_var.dtype).pow(-2) - eps).mul_(count / max(count - 1, 1))
        running_mean.index_copy_(0, rows, running_mean.index_select(0, rows).lerp_(m, momentum))
        running_var.index_copy_(0, rows, running_var.index_select(0, rows).lerp_(var, momentum))


def combine_reference(states: Sequence[Tensor], weight: Tensor, loose: Tensor) -> Tensor:
    """A cell's output before its BN: the sum over the loose ends ``s`` (``loose[s] != 0``) of
    ``loose[s] * weight[:, s, :] . ReLU(states[s])``, one 1x1 convolution per loose state (``weight [C, S, C]``).

    States that are not loose take no part (a NaN in one does not reach the output), as in the eager cell,
    which concatenates only the loose ends.
    """
    out = None
    for s, flag in enumerate(loose.tolist()):
        if flag == 0:
            continue
        term = F.conv2d(F.relu(states[s]), (weight[:, s, :] * loose[s]).to(states[s].dtype)[:, :, None, None])
        out = term if out is None else out + term
    return out if out is not None else torch.zeros_like(states[0])
