"""The supernet's cells on the fused path (``Supernet(kernels="fused")``, ``csrc/cell/DESIGN.md``).

The arch reaches the kernels as the plan's branch codes (an int32 device tensor ``[cells, B, 2, F]``);
everything the step launches is derived from them on the device: the slot weights of each stage are
gathered by index (one ``gather_rows`` per role and stage), every cell runs the static node sequence of
:func:`bnao.ops.fused.cell.fused_cell`, and the slot BatchNorm statistics of a stage are folded into its
running statistics in one ``update_slot_stats``. So the launches and their shapes are the same for every
arch: the step can be captured once as a CUDA graph.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .. import extension
from ..ops.cell import CellBuffers
from ..ops.fused.cell import (
    NodeWeights,
    fused_cell,
    gather_indices,
    gather_node_weights,
    loose_mask,
    stack_index_table,
    supernet_cell_code,
    supernet_role_stacks,
    update_stage_slot_stats,
)

#: Compiled ops the fused path needs on a device type.
FUSED_OPS = ("branch_round", "node_output", "gather_rows", "update_slot_stats")
KERNEL_CHOICES = ("auto", "fused", "eager")


class FusedKernelsUnavailable(RuntimeError):
    """``kernels="fused"`` was asked for where the compiled fused ops are not built."""


def fused_built(device_type: str) -> bool:
    """Whether every fused-cell op has a compiled kernel for ``device_type``."""
    return all(extension.has_kernel(op, device_type) for op in FUSED_OPS)


def check_kernels(kernels: str) -> str:
    """Validates a ``kernels`` choice (``auto``, ``fused``, ``eager``)."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    return kernels


def arch_codes(net, arch: Tuple[int, ...]) -> torch.Tensor:
    """The branch codes of every cell of ``net`` for ``arch`` (host int32 ``[cells, B, 2, F]``)."""
    length = net.space.cell_length
    normal, reduce = arch[:length], arch[length:]
    return torch.stack([supernet_cell_code(net, info.index, reduce if info.reduction else normal)
                        for info in net.cell_info])


class FusedState:
    """Per-device constants of the fused path (the op -> stack table of each stage)."""

    def __init__(self, net, device: torch.device):
        self.device = device
        self.stack_index = [stack_index_table(net.table, net.slot_ops[g], device) for g in range(net.num_stages)]


def run_cells(net, codes: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor, masks: Optional[torch.Tensor],
              update: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Runs every cell of ``net`` on the fused path (batch-statistics BN).

    Args:
        net: The :class:`~bnao.supernet.Supernet`.
        codes: Device int32 ``[cells, B, 2, F]`` (:func:`arch_codes`).
        s0: Stem output 0.
        s1: Stem output 1.
        masks: ``[cells, N, 2B]`` drop-path multipliers or None.
        update: Update running statistics (training).

    Returns:
        ``(last cell's output, auxiliary logits or None)``.
    """
    state = net.fused_state(codes.device)
    weights = _gather_stages(net, codes, state, s1)
    stats: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {g: [] for g in range(net.num_stages)}
    aux_logits = None
    mom, eps = net.bn_momentum, net.bn_eps
    for info, fixed in zip(net.cell_info, net.fixed):
        c0, c1 = fixed.calibrate(s0, s1, True, update)
        # The kernels take NCHW-contiguous states; a convolution may return channels-last ones (e.g. the stem
        # on one-channel images, whose NCHW batch has channels-last strides too). A no-op when contiguous.
        c0, c1 = c0.contiguous(), c1.contiguous()
        red_weights, red_stats = fixed.reduce_weights()
        buffers = CellBuffers(None, red_stats, (fixed.comb_bn.running_mean, fixed.comb_bn.running_var))
        nodes = weights[info.stage][info.local]
        out, mean, invstd = fused_cell(
            c0, c1, codes[info.index], nodes, red_weights, (fixed.comb_w, fixed.comb_bn.weight, fixed.comb_bn.bias),
            buffers, loose_mask(codes[info.index], c1.dtype), reduction=info.reduction, batch_stats=True,
            update_stats=update, drop_mask=masks[info.index] if masks is not None else None, momentum=mom, eps=eps)
        if update:
            stats[info.stage].append((mean, invstd))
        s0, s1 = s1, out
        if net.auxiliary_head is not None and net.training and info.index == net.aux_index:
            aux_logits = net.auxiliary_head(s1)
        if update and info.index == net.stage_cells[info.stage][-1].index:
            _fold_stage_stats(net, info.stage, codes, stats[info.stage], out)
    return s1, aux_logits


def _gather_stages(net, codes: torch.Tensor, state: FusedState, like: torch.Tensor) -> List[List[NodeWeights]]:
    """Per stage, per cell of the stage, its :class:`NodeWeights` as per-node sequences of tensors.

    One gather per role and stage fetches the rows of all the stage's cells at once (cells of a stage are
    contiguous); one ``unbind`` per role splits them into the nodes' slices, so that the backward joins the
    nodes' gradients with one ``stack`` instead of one zero-filled copy and one add per node.
    """
    out = []
    for g in range(net.num_stages):
        cells = net.stage_cells[g]
        stage_codes = codes[cells[0].index : cells[-1].index + 1]
        select, rows = gather_indices(stage_codes, state.stack_index[g])
        gathered = gather_node_weights(supernet_role_stacks(net, g), select, rows, net.stage_channels[g],
                                       (len(cells) * net.num_nodes, 2), like)
        per_node = [role.unbind(0) for role in gathered]
        num_nodes = net.num_nodes
        out.append([NodeWeights(*(role[c * num_nodes : (c + 1) * num_nodes] for role in per_node))
                    for c in range(len(cells))])
    return out


@torch.no_grad()
def _fold_stage_stats(net, stage: int, codes: torch.Tensor, entries, last_out: torch.Tensor) -> None:
    cells = net.stage_cells[stage]
    stage_codes = codes[cells[0].index : cells[-1].index + 1]
    running_mean, running_var = getattr(net, f"s{stage}_running_mean"), getattr(net, f"s{stage}_running_var")
    mean = torch.stack([m for m, _ in entries]).to(running_mean.dtype)
    invstd = torch.stack([v for _, v in entries]).to(running_mean.dtype)
    count = last_out.shape[0] * last_out.shape[-2] * last_out.shape[-1]
    update_stage_slot_stats(running_mean, running_var,
                            stage_codes, mean, invstd, net.bn_momentum, net.bn_eps, count)
