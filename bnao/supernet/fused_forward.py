"""The supernet's cells on the fused path (``Supernet(kernels="fused")``, ``csrc/cell/DESIGN.md``).

The arch reaches the kernels as the plan's branch codes (an int32 device tensor ``[cells, B, 2, F]``);
everything the step launches is derived from them on the device: the slot weights of each stage are
gathered by index (one ``gather_rows`` per role and stage), every cell runs the static node sequence of
:func:`bnao.ops.fused.cell.fused_cell`, and the slot BatchNorm statistics of a stage are folded into its
running statistics in one ``update_slot_stats``. So the launches and their shapes are the same for every
arch: the step can be captured once as a CUDA graph.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .. import extension
from ..ops.cell import CellBuffers
from ..ops.fused.cell import (
    FUSED_ROLES,
    ROLE_GROUPS,
    NodeWeights,
    fused_cell,
    gather_groups,
    gather_index_lists,
    group_index_lists,
    role_sources,
    loose_list,
    reduce_rows,
    slot_bn_row_list,
    stack_index_lists,
)
from ..ops.fused.nodes import update_slot_stats
from ..ops.fused.round import ACTIVATION_DTYPES, param_dtype
from ..ops.fused.supernet_glue import supernet_cell_rows, supernet_role_stacks
from ..device import to_device

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


def cells_choice(net, device: torch.device, batch_stats: bool, dtype: torch.dtype) -> Tuple[bool, str]:
    """Whether a forward of ``net`` on ``device`` takes the fused cells, and why not (``(use, reason)``); ``dtype``:
    the images' (the activations' unless autocast is on)."""
    if net.kernels == "eager":
        return False, "kernels='eager'"
    built = fused_built(device.type)
    if net.kernels == "fused" and not built:
        raise FusedKernelsUnavailable(
            f"Supernet(kernels='fused'): the fused-cell ops are not built for {device.type} in this bnao "
            "build (see `bnao info`); rebuild with scripts/setup.sh (CUDA: BNAO_CUDA=1) or use kernels='auto'")
    if not built:
        return False, f"the fused-cell ops are not built for {device.type}"
    if net.kernels == "auto" and device.type == "cpu":
        # The CPU kernels exist to prove the fused arithmetic in CI; oneDNN's convolutions of the eager
        # path are several times faster on a CPU (benchmarks/RESULTS.md, "Fused cells").
        return False, "kernels='auto' runs the fused cells on GPUs; on a CPU the eager cells are faster"
    if not batch_stats:
        return False, "evaluation with running statistics"
    activations = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
    if activations not in ACTIVATION_DTYPES:
        return False, f"{activations} activations (the fused cells take float32, float64 and bfloat16)"
    weights, needed = next(net.parameters()).dtype, param_dtype(activations)
    if weights != needed:
        return False, f"{weights} weights with {activations} activations (the fused cells need {needed} weights)"
    return True, ""


class ArchLists(NamedTuple):
    """One arch's :class:`FusedArchData` as host lists (the same layout for every arch of a net)."""

    ints: List[int]  # per stage: select and rows per role group, bn_rows; then reduce_rows of every cell
    spans: List[List[Tuple[int, int]]]  # per stage: (start, length) in ints of each of those
    reduce_span: Tuple[int, int]
    codes: List  # [cells][B][2][NUM_FIELDS]
    loose: List[List[int]]  # [cells][B + 2]


def arch_lists(net, arch: Tuple[int, ...]) -> ArchLists:
    """Everything the fused path reads of ``arch``, derived from its branch codes on the host."""
    codes = _code_rows(net, arch)
    ints: List[int] = []
    spans = []
    for g in range(net.num_stages):
        branches = [branch for info in net.stage_cells[g] for node in codes[info.index] for branch in node]
        select, rows = gather_index_lists(branches, stack_index_lists(net.table, net.slot_ops[g]))
        counts = {role: len(sources) for role, sources in role_sources(net.table, net.slot_ops[g]).items()}
        group_select, group_rows = group_index_lists(select, rows, counts)
        per_branch = slot_bn_row_list(branches)
        # (node, branch) rows of [round] -> (node, round, branch): the order of fused_cell's statistics.
        bn_rows = [per_branch[2 * node + branch][round_index] for node in range(len(branches) // 2)
                   for round_index in range(2) for branch in range(2)]
        stage_spans = []
        for values in (*group_select, *group_rows, bn_rows):
            stage_spans.append((len(ints), len(values)))
            ints += values
        spans.append(stage_spans)
    loose = [loose_list(code) for code in codes]
    reduce_span = (len(ints), 2 * len(codes))
    for cell_loose in loose:
        ints += reduce_rows(cell_loose)
    return ArchLists(ints, spans, reduce_span, codes, loose)


class FusedArchData:
    """What the fused path reads of one arch, on the device (cached in the arch's plan).

    All of it follows from the branch codes. Building it from host lists (:func:`arch_lists`) and uploading it
    in two copies keeps a new arch from costing dozens of small device ops (index fills, comparisons) in its
    first step. :class:`~bnao.supernet.graph_step.PoolTables` builds the same views from one row of a table.

    Attributes:
        codes: int32 ``[cells, B, 2, NUM_FIELDS]``.
        select: Per stage, per :data:`~bnao.ops.fused.cell.ROLE_GROUPS` group, int64 ``[len(group) * M]``: the
            stack of each of the stage's ``M`` branches per role of the group (``gather_rows``).
        rows: Per stage and group, like ``select``: the rows.
        bn_rows: Per stage, int64 ``[cells of the stage * B * 2 * 2]``: the running-statistics row of each slot
            BN in ``(cell, node, round, branch)`` order, -1 where none (``update_slot_stats``).
        reduce_rows: int64 ``[cells, 2]``: :func:`~bnao.ops.fused.cell.reduce_rows` of each cell.
    """

    def __init__(self, packed: torch.Tensor, codes: torch.Tensor, lists: ArchLists, loose=None):
        groups = len(ROLE_GROUPS)
        self.select = [[packed.narrow(0, *span[k]) for k in range(groups)] for span in lists.spans]
        self.rows = [[packed.narrow(0, *span[groups + k]) for k in range(groups)] for span in lists.spans]
        self.bn_rows = [packed.narrow(0, *span[2 * groups]) for span in lists.spans]
        self.reduce_rows = packed.narrow(0, *lists.reduce_span).view(-1, 2)
        self.codes = codes
        self._loose_host = lists.loose
        self._loose: Dict[torch.dtype, torch.Tensor] = dict(loose or {})

    @classmethod
    def build(cls, net, arch: Tuple[int, ...], device: torch.device) -> "FusedArchData":
        """Builds and uploads the data of ``arch`` (one copy of ints, one of codes)."""
        lists = arch_lists(net, arch)
        packed = to_device(lists.ints, torch.int64, device)
        codes = to_device(lists.codes, torch.int32, device)
        return cls(packed, codes, lists)

    def loose(self, dtype: torch.dtype) -> torch.Tensor:
        """``[cells, B + 2]`` loose-end masks (:func:`~bnao.ops.fused.cell.loose_list`) in ``dtype``."""
        mask = self._loose.get(dtype)
        if mask is None and self._loose:
            # From the device copy (rows of PoolTables carry theirs; their host lists are the layout's, not the
            # arch's): a cast, no host read.
            mask = self._loose[dtype] = next(iter(self._loose.values())).to(dtype)
        elif mask is None:
            mask = self._loose[dtype] = torch.tensor(self._loose_host, dtype=dtype).to(self.codes.device)
        return mask


def _code_rows(net, arch: Tuple[int, ...]) -> List[List[List[List[int]]]]:
    length = net.space.cell_length
    normal, reduce = arch[:length], arch[length:]
    return [supernet_cell_rows(net, info.index, reduce if info.reduction else normal) for info in net.cell_info]


def run_cells(net, data: FusedArchData, s0: torch.Tensor, s1: torch.Tensor, masks: Optional[torch.Tensor],
              update: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Runs every cell of ``net`` on the fused path (batch-statistics BN).

    Args:
        net: The :class:`~bnao.supernet.Supernet`.
        data: The arch's :class:`FusedArchData`.
        s0: Stem output 0.
        s1: Stem output 1.
        masks: ``[cells, N, 2B]`` drop-path multipliers or None.
        update: Update running statistics (training).

    Returns:
        ``(last cell's output, auxiliary logits or None)``.
    """
    # Zero groups and the loose-end masks (which scale the combine's weight) take the weights' dtype, not the
    # states' (float32 and bfloat16 under bfloat16 autocast).
    parameter = next(net.parameters())
    weights = _gather_stages(net, data, parameter)
    loose = data.loose(parameter.dtype)
    stats: Dict[int, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {g: ([], []) for g in range(net.num_stages)}
    aux_logits = None
    mom, eps = net.bn_momentum, net.bn_eps
    for info, fixed in zip(net.cell_info, net.fixed):
        c0, c1 = fixed.calibrate(s0, s1, True, update)
        # The kernels take NCHW-contiguous states; a convolution may return channels-last ones (e.g. the stem
        # on one-channel images, whose NCHW batch has channels-last strides too). A no-op when contiguous.
        c0, c1 = c0.contiguous(), c1.contiguous()
        red_weights, red_stats = fixed.reduce_weights()
        buffers = CellBuffers(None, red_stats, (fixed.comb_bn.running_mean, fixed.comb_bn.running_var))
        out, means, invstds = fused_cell(
            c0, c1, data.codes[info.index], weights[info.stage][info.local], red_weights,
            (fixed.comb_w, fixed.comb_bn.weight, fixed.comb_bn.bias), buffers, loose[info.index],
            reduction=info.reduction, batch_stats=True, update_stats=update,
            drop_mask=masks[info.index] if masks is not None else None, momentum=mom, eps=eps, stack_stats=False,
            reduce_input_rows=data.reduce_rows[info.index])
        if update:
            stats[info.stage][0].extend(means)
            stats[info.stage][1].extend(invstds)
        s0, s1 = s1, out
        if net.auxiliary_head is not None and net.training and info.index == net.aux_index:
            aux_logits = net.auxiliary_head(s1)
        if update and info.index == net.stage_cells[info.stage][-1].index:
            _fold_stage_stats(net, info.stage, data, stats[info.stage], out)
    return s1, aux_logits


def _gather_stages(net, data: FusedArchData, like: torch.Tensor) -> List[List[NodeWeights]]:
    """Per stage, per cell of the stage, its :class:`NodeWeights` as per-node sequences of tensors.

    One gather per role group and stage fetches the rows of all the stage's cells at once (cells of a stage
    are contiguous); one ``unbind`` per group splits them into the roles' per-node slices, so that the backward
    joins the nodes' gradients with one ``stack`` per group instead of one zero-filled copy and one add per node.
    """
    out = []
    num_nodes = net.num_nodes
    for g in range(net.num_stages):
        cells = len(net.stage_cells[g])
        gathered = gather_groups(supernet_role_stacks(net, g), data.select[g], data.rows[g], net.stage_channels[g],
                                 like)
        per_node: Dict[str, Tuple[torch.Tensor, ...]] = {}
        for group, tensor in zip(ROLE_GROUPS, gathered):
            # [len(group) * cells * B * 2, *row] -> per (role, cell, node) a [2, *row] slice
            slices = tensor.view(len(group) * cells * num_nodes, 2, *tensor.shape[1:]).unbind(0)
            for k, role in enumerate(group):
                per_node[role] = slices[k * cells * num_nodes : (k + 1) * cells * num_nodes]
        out.append([NodeWeights(*(per_node[role][c * num_nodes : (c + 1) * num_nodes] for role in FUSED_ROLES))
                    for c in range(cells)])
    return out


@torch.no_grad()
def _fold_stage_stats(net, stage: int, data: FusedArchData, stats: Tuple[List[torch.Tensor], List[torch.Tensor]],
                      last_out: torch.Tensor) -> None:
    """One ``update_slot_stats`` for the slot BNs of every cell of ``stage``."""
    running_mean, running_var = getattr(net, f"s{stage}_running_mean"), getattr(net, f"s{stage}_running_var")
    # Per (cell, node, round) a [2 (branch), C] entry: flattened, the (cell, node, round, branch) rows of bn_rows.
    mean = torch.stack(stats[0]).flatten(0, 1).to(running_mean.dtype)
    invstd = torch.stack(stats[1]).flatten(0, 1).to(running_mean.dtype)
    count = last_out.shape[0] * last_out.shape[-2] * last_out.shape[-1]
    update_slot_stats(running_mean, running_var, data.bn_rows[stage], mean, invstd, net.bn_momentum, net.bn_eps,
                      count)
