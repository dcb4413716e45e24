"""The supernet's cells on the eager path (``Supernet(kernels="eager")``, and where the fused one is not used).

Each cell runs :func:`bnao.ops.cell.mixed_cell`, which schedules the arch's branches by level on the
host; the weights of a stage's slots are gathered once per stacked tensor and split per group.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..ops.cell import CellBuffers, CellWeights, mixed_cell
from ..ops.schedule import ROLES, cell_schedule


def run_cells(net, plan, s0: torch.Tensor, s1: torch.Tensor, masks: Optional[torch.Tensor], batch_stats: bool,
              update: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Runs every cell of ``net`` for the arch of ``plan`` (its cached gather indices).

    Args:
        net: The :class:`~bnao.supernet.Supernet`.
        plan: The arch's plan (``Supernet._plan``).
        s0: Stem output 0.
        s1: Stem output 1.
        masks: ``[cells, N, 2B]`` drop-path multipliers or None.
        batch_stats: BatchNorm with batch statistics.
        update: Update running statistics (training).

    Returns:
        ``(last cell's output, auxiliary logits or None)``.
    """
    training = net.training
    mom, eps = net.bn_momentum, net.bn_eps
    # One gather per stacked tensor, split into the per-group chunks of every cell of the stage.
    chunks: Dict[Tuple[int, int], List[Tuple[torch.Tensor, ...]]] = {}
    for (g, o), idx in plan.gather.items():
        sizes = plan.chunk_sizes[(g, o)]
        roles = [net.slot_tensor(g, o, r).index_select(0, idx).split(sizes) for r in ROLES[net.table[o][0]]]
        chunks[(g, o)] = list(zip(*roles))

    stats: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(net.num_stages)]
    stage_hw = [1] * net.num_stages
    aux_logits = None
    n_ops = len(net.table)
    for ci, fx in zip(net.cell_info, net.fixed):
        c0, c1 = fx.calibrate(s0, s1, batch_stats, update)
        cell_arch = plan.reduce if ci.reduction else plan.normal
        ops = [()] * n_ops
        sched = cell_schedule(cell_arch, ci.reduction, net.table)
        for o, sizes in sched.op_chunks.items():
            start = plan.chunk_start[(ci.index, o)]
            ops[o] = tuple(chunks[(ci.stage, o)][start : start + len(sizes)])
        red_w, red_stats = fx.reduce_weights()
        weights = CellWeights(tuple(ops), red_w, (fx.comb_w, fx.comb_bn.weight, fx.comb_bn.bias),
                              plan.loose[ci.reduction])
        slot_stats = None
        if not batch_stats and sched.num_bn:
            rows = plan.bn_rows[ci.stage]
            # rows of this cell: cells of a stage are laid out in order, each with its own num_bn rows
            start = sum(cell_schedule(plan.reduce if c.reduction else plan.normal, c.reduction,
                                      net.table).num_bn for c in net.stage_cells[ci.stage][: ci.local])
            r = rows.narrow(0, start, sched.num_bn)
            slot_stats = (getattr(net, f"s{ci.stage}_running_mean").index_select(0, r),
                          getattr(net, f"s{ci.stage}_running_var").index_select(0, r))
        buffers = CellBuffers(slot_stats, red_stats, (fx.comb_bn.running_mean, fx.comb_bn.running_var))
        out, mean, invstd = mixed_cell(
            c0, c1, cell_arch, weights, buffers, table=net.table, reduction=ci.reduction,
            batch_stats=batch_stats, update_stats=update,
            drop_mask=masks[ci.index] if masks is not None else None, momentum=mom, eps=eps,
            drop_identity=net.drop_path_identity)
        if update and mean is not None:
            stats[ci.stage].append((mean, invstd))
        stage_hw[ci.stage] = out.shape[-2] * out.shape[-1]
        s0, s1 = s1, out
        if net.auxiliary_head is not None and training and ci.index == net.aux_index:
            aux_logits = net.auxiliary_head(s1)

    if update:
        net._update_slot_stats(plan, stats, stage_hw, s1.shape[0])
    return s1, aux_logits

