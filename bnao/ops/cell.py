"""The op boundary of the weight-sharing supernet: one call computes one cell for one arch.

:func:`mixed_cell` is the pure-PyTorch reference. It takes the two calibrated
cell inputs, the cell's arch as a tuple of ints and the weights of exactly the
branches that run (gathered by the model in the order
:func:`~bnao.ops.schedule.cell_schedule` defines), and returns the cell output
plus the batch statistics of its shared-slot BatchNorms. Everything crossing
the boundary is a tensor or a tuple of ints. The fused cells
(:mod:`bnao.ops.fused`) compute the same cell with an arch-independent launch
sequence; this reference is what the CPU runs by default (its oneDNN
convolutions are faster there) and what the fused cells are tested against.

Why the reference is fast enough to be worth keeping in eager mode: branches
are scheduled by *level* (a branch can run as soon as its input state exists)
and all branches of one level that share an op and a stride run as ONE chain
of grouped convolutions over their concatenated inputs, with the per-branch
weights stacked along the channel axis. A cell of the default space then
costs a few dozen kernel launches instead of a few hundred.

Weight layout: per parametric op, one tuple of role tensors per weight-bearing
group (``Group.chunk``), ``n`` = branches of the group (in ``Group.positions`` order):

* ``sep_conv k``: ``(dw1 [n,C,1,k,k], pw1 [n,C,C], g1 [n,C], b1 [n,C], dw2, pw2, g2, b2)``
* ``dil_sep_conv k``: ``(dw [n,C,1,k,k], pw [n,C,C], g [n,C], b [n,C])``
* ``identity`` (only stride-2 branches, i.e. factorized reduce):
  ``(w [n,C,C] (rows :C//2 sample even pixels, the rest odd pixels), g [n,C], b [n,C])``

Slot-BN statistics are returned in "BN order": groups in schedule order, and
inside a group each BN of the op (sep conv has two) for all its branches.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..space.ops import KIND_AVG_POOL, KIND_DIL_SEP_CONV, KIND_IDENTITY, KIND_SEP_CONV
from .schedule import Group, cell_schedule

Tensor = torch.Tensor

class CellWeights(NamedTuple):
    """Every weight one :func:`mixed_cell` call reads.

    Attributes:
        ops: Per op index, one entry per weight-bearing group of that op (``Group.chunk``), each the tuple of
            its role tensors with the group's branches as leading dim (see the module docstring); ``()`` for
            ops without weights in this cell.
        reduce_loose: For reduction cells, the factorized-reduce weights ``(w [C,C], g, b)`` of inputs 0 and 1
            (used when they are loose ends); ``()`` otherwise.
        combine: ``(w [C, B+2, C], g [C], b [C])`` of the final ReLU-conv1x1-BN, ``w`` kept per state id.
        loose_index: int64 tensor of the loose-end state ids on the weights' device (selects ``w``'s columns).
    """

    ops: Tuple[Tuple[Tensor, ...], ...]
    reduce_loose: Tuple[Tuple[Tensor, ...], ...]
    combine: Tuple[Tensor, Tensor, Tensor]
    loose_index: Tensor


class CellBuffers(NamedTuple):
    """BatchNorm running statistics a cell reads or updates.

    Attributes:
        slot_stats: ``(mean [num_bn, C], var [num_bn, C])`` rows of the slot BNs in BN order, read only when
            ``batch_stats`` is False; None otherwise.
        reduce_loose: ``((mean, var), (mean, var))`` of the loose-end reductions (reduction cells) or ``()``.
        combine: ``(mean, var)`` of the final combine's BN.
    """

    slot_stats: Optional[Tuple[Tensor, Tensor]]
    reduce_loose: Tuple[Tuple[Tensor, Tensor], ...]
    combine: Tuple[Tensor, Tensor]


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, running: Optional[Tuple[Tensor, Tensor]],
               batch_stats: bool, update: bool, momentum: float, eps: float) -> Tensor:
    """Functional BN with NAO-WS's three modes.

    Args:
        x: ``[n, c, h, w]``.
        weight: Affine scale ``[c]``.
        bias: Affine shift ``[c]``.
        running: ``(mean, var)`` buffers or None.
        batch_stats: Normalise with the batch's statistics (training, and evaluation with ``bn_train``).
        update: Update ``running`` in place (only meaningful with ``batch_stats``).
        momentum: Running-average momentum.
        eps: Variance epsilon.
    """
    if batch_stats:
        rm, rv = running if (update and running is not None) else (None, None)
        return F.batch_norm(x, rm, rv, weight, bias, True, momentum, eps)
    return F.batch_norm(x, running[0], running[1], weight, bias, False, momentum, eps)


def factorized_reduce(xs: Sequence[Tensor], w: Tensor, g: Tensor, b: Tensor,
                      running: Optional[Tuple[Tensor, Tensor]], batch_stats: bool, update: bool,
                      momentum: float, eps: float, stats: Optional[List[Tuple[Tensor, Tensor]]] = None,
                      relu: bool = False) -> Tensor:
    """[ReLU,] 1x1 stride-2 convs on even and on odd pixels, concatenation, BN; for ``n`` inputs at once.

    Args:
        xs: ``n`` inputs ``[N, C_in, H, W]``.
        w: ``[n, C, C_in]``; rows ``:C//2`` read the even pixels, rows ``C//2:`` the odd ones.
        g: BN scale ``[n, C]`` (or ``[C]`` for ``n == 1``).
        b: BN shift, like ``g``.
        running: Running stats for a single-input call; None for slot BNs (whose batch stats go to ``stats``).
        batch_stats: Normalise with batch statistics.
        update: Update ``running``.
        momentum: BN momentum.
        eps: BN epsilon.
        stats: When given, batch statistics ``(mean, invstd)`` are appended (slot BNs).
        relu: ReLU first. The reference has one only in the calibration after a reduction cell; its
            identity-with-stride-2 branches and loose-end reductions have none.

    Returns:
        ``[N, n*C, ceil(H/2), ceil(W/2)]`` (branch ``j`` in channels ``j*C:(j+1)*C``).
    """
    n = len(xs)
    w = w.reshape(n, -1, w.shape[-1])
    c_out, c_in = w.shape[1], w.shape[2]
    half = c_out // 2
    act = F.relu if relu else (lambda t: t)
    parts = []
    for x in xs:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            odd = F.pad(x, (0, 1, 0, 1))[:, :, 1::2, 1::2]
        else:
            odd = x[:, :, 1::2, 1::2]
        parts += [x[:, :, ::2, ::2], odd]
    if c_out % 2 == 0:
        # Even split: one grouped conv (groups = 2n) gives [even_0, odd_0, even_1, odd_1, ...] directly.
        y = F.conv2d(act(torch.cat(parts, 1)), w.reshape(n * c_out, c_in, 1, 1), groups=2 * n)
    else:
        outs = []
        for j in range(n):
            outs.append(F.conv2d(act(parts[2 * j]), w[j, :half, :, None, None]))
            outs.append(F.conv2d(act(parts[2 * j + 1]), w[j, half:, :, None, None]))
        y = torch.cat(outs, 1)
    return _slot_bn(y, g, b, running, batch_stats, update, momentum, eps, stats)


def _slot_bn(y: Tensor, g: Tensor, b: Tensor, running: Optional[Tuple[Tensor, Tensor]], batch_stats: bool,
             update: bool, momentum: float, eps: float, stats: Optional[List[Tuple[Tensor, Tensor]]]) -> Tensor:
    g, b = g.reshape(-1), b.reshape(-1)
    if stats is not None and batch_stats:
        # native_batch_norm also returns the batch mean and 1/std that the caller folds into the
        # shared running statistics, so the statistics cost no extra pass over the activations.
        out, mean, invstd = torch.native_batch_norm(y, g, b, None, None, True, 0.0, eps)
        stats.append((mean.detach(), invstd.detach()))
        return out
    return batch_norm(y, g, b, running, batch_stats, update, momentum, eps)


def _pool(x: Tensor, kind: int, kernel: int, stride: int) -> Tensor:
    if kind == KIND_AVG_POOL:
        return F.avg_pool2d(x, kernel, stride, kernel // 2, count_include_pad=False)
    return F.max_pool2d(x, kernel, stride, kernel // 2)


def _cat(xs: Sequence[Tensor]) -> Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(list(xs), 1)


def mixed_cell(
    s0: Tensor,
    s1: Tensor,
    cell_arch: Tuple[int, ...],
    weights: CellWeights,
    buffers: CellBuffers,
    *,
    table: Tuple[Tuple[int, int], ...],
    reduction: bool,
    batch_stats: bool,
    update_stats: bool,
    drop_mask: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    drop_identity: bool = True,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """One cell of the supernet for one arch (pure-PyTorch reference).

    Args:
        s0: Calibrated input 0 ``[N, C, H, W]``.
        s1: Calibrated input 1, same shape.
        cell_arch: ``[x_id, x_op, y_id, y_op] * B`` as a tuple of ints.
        weights: :class:`CellWeights` gathered for this arch in :func:`~bnao.ops.schedule.cell_schedule` order.
        buffers: :class:`CellBuffers`.
        table: ``(kind, kernel)`` per op index.
        reduction: Reduction cell (branches reading inputs 0/1 stride 2; loose inputs are reduced).
        batch_stats: BN with batch statistics (training, or evaluation with BN in training mode).
        update_stats: Update the non-slot running statistics in place (slot BN stats are returned instead).
        drop_mask: ``[N, 2B]`` drop-path multipliers per branch position (0 or ``1/keep``) in the activation
            dtype; None disables drop-path. Zero branches stay zero; identity branches are dropped like the
            others (the reference's search model drops every branch) unless ``drop_identity`` is False.
        momentum: BN momentum.
        eps: BN epsilon.
        drop_identity: Drop-path on identity branches too.

    Returns:
        ``(out [N, C, H', W'], mean, invstd)``: the cell output and, when ``batch_stats``, the slot BNs'
        batch mean and ``1/sqrt(var_biased + eps)``, each ``[num_bn * C]`` in BN order (None otherwise,
        or when the cell has no slot BNs).
    """
    sched = cell_schedule(cell_arch, reduction, table)
    states: List[Optional[Tensor]] = [s0, s1] + [None] * (len(cell_arch) // 4)
    branch_out: Dict[int, Tensor] = {}
    stats: Optional[List[Tuple[Tensor, Tensor]]] = [] if batch_stats else None
    slot_stats = buffers.slot_stats

    def eval_rows(row: int, n: int) -> Optional[Tuple[Tensor, Tensor]]:
        if batch_stats:
            return None
        return slot_stats[0][row : row + n].reshape(-1), slot_stats[1][row : row + n].reshape(-1)

    for groups, done in sched.levels:
        for grp in groups:
            branch_out.update(_run_group(grp, states, weights, eval_rows, batch_stats, momentum, eps, stats))
        for node in done:
            parts = []
            for pos in (2 * node, 2 * node + 1):
                out = branch_out.get(pos)
                if out is None:
                    continue  # zero op
                op = cell_arch[4 * node + 2 * (pos % 2) + 1]
                droppable = drop_identity or table[op][0] != KIND_IDENTITY
                parts.append((out, drop_mask[:, pos, None, None, None] if drop_mask is not None and droppable
                              else None))
            states[node + 2] = _node_sum(parts, s1, reduction)
    out_states = []
    for i in sched.loose:
        s = states[i]
        if reduction and i < 2:
            w, g, b = weights.reduce_loose[i]
            s = factorized_reduce([s], w, g, b, buffers.reduce_loose[i], batch_stats, update_stats, momentum, eps)
        out_states.append(s)
    cw, cg, cb = weights.combine
    wsel = cw.index_select(1, weights.loose_index).reshape(cw.shape[0], -1, 1, 1)
    out = F.conv2d(F.relu(_cat(out_states)), wsel)
    out = batch_norm(out, cg, cb, buffers.combine, batch_stats, update_stats, momentum, eps)
    if stats:
        return out, torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats])
    return out, None, None


def _run_group(grp: Group, states: List[Optional[Tensor]], weights: CellWeights, eval_rows, batch_stats: bool,
               momentum: float, eps: float, stats: Optional[List[Tuple[Tensor, Tensor]]]) -> Dict[int, Tensor]:
    """The outputs of one group's branches by position; appends its slot BNs' batch statistics to ``stats``.

    ``eval_rows(row, n)``: the running statistics of slot-BN rows ``row .. row + n`` (None with batch statistics).
    """
    xs = [states[i] for i in grp.inputs]
    n = len(xs)
    C = states[1].shape[1]
    branch_out: Dict[int, Tensor] = {}
    if grp.kind in (KIND_SEP_CONV, KIND_DIL_SEP_CONV):
        w = weights.ops[grp.op][grp.chunk]
        k, nc = grp.kernel, n * C
        dil = 2 if grp.kind == KIND_DIL_SEP_CONV else 1
        pad = dil * (k // 2)
        y = F.relu(_cat(xs))
        # Depthwise over all branches at once (groups = n*C), then pointwise per branch (groups = n).
        y = F.conv2d(y, w[0].reshape(nc, 1, k, k), None, grp.stride, pad, dil, nc)
        y = F.conv2d(y, w[1].reshape(nc, C, 1, 1), None, 1, 0, 1, n)
        y = _slot_bn(y, w[2], w[3], eval_rows(grp.bn_row, n), batch_stats, False, momentum, eps, stats)
        if grp.kind == KIND_SEP_CONV:
            y = F.relu(y)
            y = F.conv2d(y, w[4].reshape(nc, 1, k, k), None, 1, pad, 1, nc)
            y = F.conv2d(y, w[5].reshape(nc, C, 1, 1), None, 1, 0, 1, n)
            y = _slot_bn(y, w[6], w[7], eval_rows(grp.bn_row + n, n), batch_stats, False, momentum, eps,
                         stats)
        # One split (its backward is one cat) instead of n slices (n zero-fills + copies in backward).
        branch_out.update(zip(grp.positions, y.split(C, 1)))
    elif grp.kind == KIND_IDENTITY and grp.stride == 2:
        w = weights.ops[grp.op][grp.chunk]
        y = factorized_reduce(xs, w[0], w[1], w[2], eval_rows(grp.bn_row, n), batch_stats, False,
                              momentum, eps, stats)
        branch_out.update(zip(grp.positions, y.split(C, 1)))
    elif grp.kind == KIND_IDENTITY:
        for pos, i in zip(grp.positions, grp.inputs):
            branch_out[pos] = states[i]
    else:  # pools: parameter-free, so branches reading the same state share one result
        uniq = sorted(set(grp.inputs))
        if len(uniq) >= 3:
            y = _pool(_cat([states[i] for i in uniq]), grp.kind, grp.kernel, grp.stride)
            res = dict(zip(uniq, y.split(C, 1)))
        else:
            res = {i: _pool(states[i], grp.kind, grp.kernel, grp.stride) for i in uniq}
        for pos, i in zip(grp.positions, grp.inputs):
            branch_out[pos] = res[i]
    return branch_out


def _node_sum(parts: List[Tuple[Tensor, Optional[Tensor]]], s1: Tensor, reduction: bool) -> Tensor:
    """``x * mask_x + y * mask_y`` over the non-zero branches (zeros of the node's shape when both are zero)."""
    if not parts:
        ref = s1[:, :, ::2, ::2] if reduction else s1
        return torch.zeros_like(ref, memory_format=torch.contiguous_format)
    (a, ma), rest = parts[0], parts[1:]
    acc = a * ma if ma is not None else a
    if not rest:
        return acc if ma is not None else a
    b, mb = rest[0]
    if mb is not None:
        return torch.addcmul(acc, b, mb)
    return acc + b
