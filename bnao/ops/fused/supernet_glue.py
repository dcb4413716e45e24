"""Glue between :class:`~bnao.supernet.Supernet` and the fused cell: a cell's branch code from the supernet's
slot rows, the supernet's stacked weights per fused role, and a stage's slot statistics folded into its running
statistics (one op call)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .cell import role_sources, slot_bn_rows
from .code import cell_code_rows
from .nodes import update_slot_stats

Tensor = torch.Tensor

__all__ = ["supernet_cell_code", "supernet_cell_rows", "supernet_role_stacks", "update_stage_slot_stats"]


def supernet_cell_code(net, cell: int, cell_arch: Sequence[int]) -> Tensor:
    """Branch code of cell ``cell`` of a :class:`~bnao.supernet.Supernet` (host int32 ``[B, 2, NUM_FIELDS]``).

    ``ROW`` is the supernet's slot row (``slot_index``), ``BN_ROW`` its slot-BN row in the stage's running
    statistics (the eager path's ``(local * 2B + pos) * bn_per_branch + bn_offset[op]``).
    """
    return torch.tensor(supernet_cell_rows(net, cell, cell_arch), dtype=torch.int32)


def supernet_cell_rows(net, cell: int, cell_arch: Sequence[int]) -> List[List[List[int]]]:
    """:func:`supernet_cell_code` as nested lists ``[B][2][NUM_FIELDS]``."""
    info = net.cell_info[cell]
    per_cell = 2 * net.num_nodes
    return cell_code_rows(
        cell_arch, info.reduction, net.table,
        slot_row=lambda node, branch, inp, op: net.slot_index(cell, node, branch, inp, op),
        bn_row=lambda node, branch, op: ((info.local * per_cell + 2 * node + branch) * net._bn_per_branch
                                         + net._bn_offset[op]),
        drop_identity=net.drop_path_identity)


def supernet_role_stacks(net, stage: int) -> Dict[str, List[Tensor]]:
    """Per fused role, the supernet's stacked tensors of ``stage`` feeding it (depthwise as ``[rows, C, k, k]``)."""
    stacks: Dict[str, List[Tensor]] = {}
    for role, sources in role_sources(net.table, net.slot_ops[stage]).items():
        tensors = []
        for op, own in sources:
            t = net.slot_tensor(stage, op, own)
            tensors.append(t.flatten(1, 2) if own.startswith("dw") else t)  # [rows, C, 1, k, k] -> [rows, C, k, k]
        stacks[role] = tensors
    return stacks


def update_stage_slot_stats(running_mean: Tensor, running_var: Tensor, codes: Tensor, mean: Tensor, invstd: Tensor,
                            momentum: float, eps: float, count: int) -> None:
    """Folds the slot statistics of a stage's cells into its running statistics (one op call).

    Args:
        running_mean: The stage's ``[rows, C]`` running means (``s{g}_running_mean``), updated in place.
        running_var: The stage's running variances, updated in place.
        codes: int32 ``[..., B, 2, NUM_FIELDS]`` codes of the cells whose statistics are given.
        mean: ``[..., B, 2, 2, C]`` from :func:`fused_cell` (stacked over the same leading dims).
        invstd: Like ``mean``.
        momentum: BN momentum.
        eps: BN epsilon.
        count: ``N * Ho * Wo`` of the stage.
    """
    channels = mean.shape[-1]
    update_slot_stats(running_mean, running_var, slot_bn_rows(codes).reshape(-1), mean.reshape(-1, channels),
                      invstd.reshape(-1, channels), momentum, eps, count)
