"""The stacked per-slot weights of :class:`~bnao.supernet.model.Supernet` (SPEC section 4).

A *slot* is ``(cell, node, branch, input id)``. The weights of every slot of one op in one stage are rows of a
few stacked tensors, one per role of the op (:data:`bnao.ops.schedule.ROLES`), and the slots' BatchNorms share one
pair of running-statistics buffers per stage. This module lays out those rows, creates the tensors with NAO's
initialisation and folds a forward's slot batch statistics into the running statistics.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..ops.schedule import NUM_BN, ROLES
from ..space.ops import KIND_DIL_SEP_CONV, KIND_IDENTITY, KIND_SEP_CONV
from .fixed import kaiming
from .plan import Plan

#: ``(op kind, kernel size)`` per op index, as :func:`bnao.space.ops.op_table` gives it.
OpTable = Sequence[Tuple[int, int]]


def slots_per_cell(num_nodes: int) -> int:
    """Slots of one cell: the sum over nodes ``k = 2 .. num_nodes + 1`` of 2 branches times ``k`` input ids."""
    return num_nodes * (num_nodes + 3)


def branch_bases(num_nodes: int) -> List[int]:
    """First row, within a cell, of each branch's slots (index ``2 * node + branch``).

    Node ``node`` (0-based) may read input ids ``0 .. node + 1``, so each of its two branches owns
    ``node + 2`` consecutive rows, one per input id.
    """
    bases: List[int] = []
    base = 0
    for node in range(num_nodes):
        for _ in range(2):
            bases.append(base)
            base += node + 2
    return bases


def bn_layout(table: OpTable) -> Tuple[Dict[int, int], int]:
    """Where each op's slot BatchNorms sit among one branch's running-statistics rows.

    Returns:
        ``({op index: offset of its first BN row}, BN rows per branch)``; ops without BatchNorm are absent.
    """
    offsets: Dict[int, int] = {}
    offset = 0
    for op, (kind, _kernel) in enumerate(table):
        if kind in NUM_BN:
            offsets[op] = offset
            offset += NUM_BN[kind]
    return offsets, offset


def _stacked_shapes(kind: int, kernel: int, cells: int, reduction_cells: int, channels: int, num_nodes: int
                    ) -> Optional[Tuple[int, Dict[str, Tuple[int, ...]]]]:
    """Rows and weight shapes of one op's stacked tensors in a stage, or None where it has no weights there."""
    if kind in (KIND_SEP_CONV, KIND_DIL_SEP_CONV):
        rows = cells * slots_per_cell(num_nodes)
        return rows, {"dw": (rows, channels, 1, kernel, kernel), "pw": (rows, channels, channels)}
    if kind == KIND_IDENTITY and reduction_cells:
        # A stride-2 identity is a weighted reduction, and only on branches reading input 0 or 1.
        rows = reduction_cells * 2 * num_nodes * 2
        return rows, {"w": (rows, channels, channels)}
    return None


def _initial_tensor(role: str, shapes: Dict[str, Tuple[int, ...]], rows: int, channels: int, kernel: int
                    ) -> torch.Tensor:
    """NAO's initial value of one role's stacked tensor: Kaiming convs, unit BN scales, zero BN shifts."""
    base_role = role.rstrip("12")  # "pw1" and "pw2" share a shape and an initialisation
    if base_role == "dw":
        return kaiming(shapes["dw"], kernel * kernel)
    if base_role in ("pw", "w"):
        return kaiming(shapes[base_role], channels)
    if base_role == "g":
        return torch.ones(rows, channels)
    return torch.zeros(rows, channels)


def create_stage_slots(table: OpTable, cells: int, reduction_cells: int, channels: int, num_nodes: int
                       ) -> Tuple[List[int], List[Tuple[int, str, torch.Tensor]]]:
    """The initial stacked tensors of one stage.

    Args:
        table: The op table.
        cells: Cells in the stage.
        reduction_cells: Reduction cells among them.
        channels: The stage's channel count.
        num_nodes: Nodes per cell.

    Returns:
        ``(op indices with stacked tensors, [(op index, role, tensor)])``, both in op order and, within an op,
        in :data:`~bnao.ops.schedule.ROLES` order: the order of the random draws, which the caller keeps as the
        parameters' order so that a seed gives the same weights.
    """
    ops: List[int] = []
    tensors: List[Tuple[int, str, torch.Tensor]] = []
    for op, (kind, kernel) in enumerate(table):
        layout = _stacked_shapes(kind, kernel, cells, reduction_cells, channels, num_nodes)
        if layout is None:
            continue
        rows, shapes = layout
        ops.append(op)
        for role in ROLES[kind]:
            tensors.append((op, role, _initial_tensor(role, shapes, rows, channels, kernel)))
    return ops, tensors


@torch.no_grad()
def update_slot_stats(net, plan: Plan, stats, stage_hw: List[int], batch: int) -> None:
    """Folds the batch statistics of every slot BN of a stage into the shared running statistics at once.

    Args:
        net: The :class:`~bnao.supernet.model.Supernet`.
        plan: The arch's plan (its ``bn_rows[stage]`` are the running-statistics rows of the stats).
        stats: Per stage, the ``(mean, invstd)`` of each of its cells that ran, in ``bn_rows`` order.
        stage_hw: Per stage, the spatial size (height times width) of its activations.
        batch: Samples in the batch.
    """
    for stage, entries in enumerate(stats):
        if not entries:
            continue
        channels = net.stage_channels[stage]
        running_mean = getattr(net, f"s{stage}_running_mean")
        # In the buffers' dtype: bf16 statistics (autocast) are widened, float64 ones kept.
        mean = torch.cat([m for m, _ in entries]).view(-1, channels).to(running_mean.dtype)
        invstd = torch.cat([v for _, v in entries]).view(-1, channels).to(running_mean.dtype)
        count = batch * stage_hw[stage]
        # Running variance is unbiased (as nn.BatchNorm's), the batch's invstd biased.
        var = (invstd.pow(-2) - net.bn_eps).mul_(count / max(count - 1, 1))
        rows = plan.bn_rows[stage]
        running_var = getattr(net, f"s{stage}_running_var")
        running_mean.index_copy_(0, rows, running_mean.index_select(0, rows).lerp_(mean, net.bn_momentum))
        running_var.index_copy_(0, rows, running_var.index_select(0, rows).lerp_(var, net.bn_momentum))
