"""The fused mixed cell: one static launch sequence for every arch (``csrc/cell/DESIGN.md``).

:func:`fused_cell` computes what :func:`bnao.ops.cell.mixed_cell` computes with batch statistics, but reads
the arch from the branch code (device data) instead of scheduling it on the host: per node
``branch_round(1)``, ``branch_round(2)``, ``node_output``; then the combine, the compiled ``combine`` op
(stack + ReLU + 1x1 convolution where it is not compiled). The launches and
their shapes are the same for every arch of a cell, so a step can be captured in a CUDA graph once
``branch_round`` is the compiled op.

The weights of the branches come from the supernet's stacked slot tensors through :func:`gather_rows`,
one call per fused role and stage. A role (``dw1, pw1, g1, b1, dw2, pw2, g2, b2``) is fed by the stacks
of the ops that have it: a sep conv by its own eight roles; a dilated sep conv by ``dw, pw, g, b`` as
``dw1, pw1, g1, b1``; a stride-2 identity (factorized reduce) by ``w, g, b`` as ``pw1, g1, b1``. The
static table op -> stack index per role turns the codes' ``(op, row)`` into ``(select, rows)`` on the
device (:func:`gather_indices`).
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...space.ops import KIND_DIL_SEP_CONV, KIND_IDENTITY, KIND_SEP_CONV
from ..cell import CellBuffers, batch_norm, factorized_reduce
from .code import BN_ROW, FLAG_BN1, FLAG_BN2, FLAGS, INPUT, MAX_KERNEL, OP, ROW
from .cell_nodes import fused_nodes, fused_nodes_and_combine, has_fused_nodes
from .combine import combine as combine_op
from .combine import combine_applies
from .nodes import gather_rows, node_output, update_slot_stats
from .round import branch_round

Tensor = torch.Tensor

#: The gathered weight roles of a branch, in the order of :class:`NodeWeights`.
FUSED_ROLES = ("dw1", "pw1", "g1", "b1", "dw2", "pw2", "g2", "b2")
#: Per op kind with weights, fused role -> the op's own role (``bnao.ops.schedule.ROLES``).
ROLE_SOURCES = {
    KIND_SEP_CONV: {role: role for role in FUSED_ROLES},
    KIND_DIL_SEP_CONV: {"dw1": "dw", "pw1": "pw", "g1": "g", "b1": "b"},
    KIND_IDENTITY: {"pw1": "w", "g1": "g", "b1": "b"},
}




class NodeWeights(NamedTuple):
    """Gathered per-branch weights of a cell's nodes, each with leading dims ``[B, 2]`` (node, branch).

    Unused entries are zero (a branch reads only the roles of its op kind). ``dw*``: ``[B, 2, C, 7, 7]``
    (top-left ``k x k`` used); ``pw*``: ``[B, 2, C, C]``; ``g*``, ``b*``: ``[B, 2, C]``.
    """

    dw1: Tensor
    pw1: Tensor
    g1: Tensor
    b1: Tensor
    dw2: Tensor
    pw2: Tensor
    g2: Tensor
    b2: Tensor


def role_sources(table: Sequence[Tuple[int, int]], ops: Sequence[int]) -> Dict[str, List[Tuple[int, str]]]:
    """Per fused role, the ``(op, op role)`` of each stack feeding it, in stack order.

    Args:
        table: ``(kind, kernel)`` per op index.
        ops: Op indices that have stacked tensors in the stage (``Supernet.slot_ops[stage]``).
    """
    sources: Dict[str, List[Tuple[int, str]]] = {role: [] for role in FUSED_ROLES}
    for op in ops:
        for role, own in ROLE_SOURCES.get(table[op][0], {}).items():
            sources[role].append((op, own))
    return sources


def stack_index_lists(table: Sequence[Tuple[int, int]], ops: Sequence[int]) -> List[List[int]]:
    """``[len(FUSED_ROLES)][num_ops]``: the stack index of each op in each role (-1: the op has none)."""
    sources = role_sources(table, ops)
    index = [[-1] * len(table) for _ in FUSED_ROLES]
    for r, role in enumerate(FUSED_ROLES):
        for s, (op, _own) in enumerate(sources[role]):
            index[r][op] = s
    return index


def stack_index_table(table: Sequence[Tuple[int, int]], ops: Sequence[int], device=None) -> Tensor:
    """:func:`stack_index_lists` as an int64 tensor ``[len(FUSED_ROLES), num_ops]``."""
    return torch.tensor(stack_index_lists(table, ops), dtype=torch.int64, device=device)


def gather_index_lists(branches: Sequence[Sequence[int]], stack_index: Sequence[Sequence[int]]
                       ) -> Tuple[List[List[int]], List[List[int]]]:
    """``(select, rows)`` of every role for branch code rows, on the host.

    Args:
        branches: Branch code rows (``NUM_FIELDS`` ints each), in the order the gather returns them.
        stack_index: :func:`stack_index_lists`.

    Returns:
        ``select, rows``, each ``[len(FUSED_ROLES)][M]`` with ``M`` the number of branches: the stack per role
        (-1 for branches without weights, i.e. ``ROW < 0``, or ops without that role) and the row (0 where none).
    """
    select = [[per_op[b[OP]] if b[ROW] >= 0 else -1 for b in branches] for per_op in stack_index]
    rows = [[b[ROW] if s >= 0 else 0 for b, s in zip(branches, role)] for role in select]
    return select, rows


def gather_indices(codes: Tensor, stack_index: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`gather_index_lists` of int32 codes ``[..., 2, NUM_FIELDS]`` as int64 tensors on the codes' device."""
    branches = codes.reshape(-1, codes.shape[-1]).tolist()
    select, rows = gather_index_lists(branches, stack_index.tolist())
    return (torch.tensor(select, dtype=torch.int64, device=codes.device),
            torch.tensor(rows, dtype=torch.int64, device=codes.device))


def role_shape(role: str, channels: int) -> Tuple[int, ...]:
    """Shape of one gathered row of ``role``."""
    if role.startswith("dw"):
        return channels, MAX_KERNEL, MAX_KERNEL
    if role.startswith("pw"):
        return channels, channels
    return (channels,)


#: Roles of one row shape, gathered together: one ``gather_rows`` per group and stage instead of per role. A
#: group's stacks must number at most 16 (``gather_rows``' limit): the middle op set has 7 sep / dil sep convs
#: and identity per role of round 1 and 3 sep convs per role of round 2, so BN scales and shifts pair by round.
ROLE_GROUPS = (("dw1", "dw2"), ("pw1", "pw2"), ("g1", "b1"), ("g2", "b2"))


def group_index_lists(select: Sequence[Sequence[int]], rows: Sequence[Sequence[int]],
                      stack_counts: Dict[str, int]) -> Tuple[List[List[int]], List[List[int]]]:
    """Per :data:`ROLE_GROUPS` group, the roles' ``(select, rows)`` concatenated, each role's stacks numbered after
    the previous roles' (the stacks of a group are passed to ``gather_rows`` as one list).

    Args:
        select: Per role (:data:`FUSED_ROLES` order) the stack of each branch (:func:`gather_index_lists`).
        rows: Like ``select``: the rows.
        stack_counts: Stacks per role.
    """
    group_select, group_rows = [], []
    for group in ROLE_GROUPS:
        offset, g_select, g_rows = 0, [], []
        for role in group:
            r = FUSED_ROLES.index(role)
            g_select += [s + offset if s >= 0 else -1 for s in select[r]]
            g_rows += list(rows[r])
            offset += stack_counts[role]
        group_select.append(g_select)
        group_rows.append(g_rows)
    return group_select, group_rows


def gather_groups(stacks: Dict[str, Sequence[Tensor]], group_select: Sequence[Tensor], group_rows: Sequence[Tensor],
                  channels: int, like: Tensor) -> List[Tensor]:
    """One :func:`gather_rows` per :data:`ROLE_GROUPS` group: ``[len(group) * M, *row shape]`` each, role-major.

    Args:
        stacks: Per fused role, its stacks in :func:`role_sources` order.
        group_select: Per group, int64 ``[len(group) * M]`` (:func:`group_index_lists`).
        group_rows: Like ``group_select``.
        channels: ``C``.
        like: A tensor of the weights' dtype and device, for groups without any stack (zeros).
    """
    out = []
    for group, select, rows in zip(ROLE_GROUPS, group_select, group_rows):
        shape = role_shape(group[0], channels)
        group_stacks = [t for role in group for t in stacks[role]]
        if group_stacks:
            out.append(gather_rows(group_stacks, select, rows, shape))
        else:
            out.append(like.new_zeros((select.shape[0], *shape)))
    return out


def gather_node_weights(stacks: Dict[str, Sequence[Tensor]], select: Tensor, rows: Tensor, channels: int,
                        lead_shape: Sequence[int], like: Tensor) -> NodeWeights:
    """Gathers every role (:func:`gather_groups`) and shapes it ``[*lead_shape, *row shape]``.

    Args:
        stacks: Per fused role, its stacks in :func:`role_sources` order, each ``[rows, *row sizes]``
            (depthwise ``[rows, C, k, k]``).
        select: From :func:`gather_indices` (per role; regrouped on the host here).
        rows: From :func:`gather_indices`.
        channels: ``C``.
        lead_shape: Leading dims of the branches, e.g. ``(cells, B, 2)``.
        like: A tensor of the weights' dtype and device, for roles without any stack (zeros).
    """
    counts = {role: len(stacks[role]) for role in FUSED_ROLES}
    group_select, group_rows = group_index_lists(select.tolist(), rows.tolist(), counts)
    device = select.device
    gathered = gather_groups(stacks, [torch.tensor(g, device=device) for g in group_select],
                             [torch.tensor(g, device=device) for g in group_rows], channels, like)
    per_role = {}
    for group, tensor in zip(ROLE_GROUPS, gathered):
        for k, role in enumerate(group):
            per_role[role] = tensor.view(len(group), -1, *tensor.shape[1:])[k].view(*lead_shape, *tensor.shape[1:])
    return NodeWeights(*(per_role[role] for role in FUSED_ROLES))


def loose_list(code: Sequence[Sequence[Sequence[int]]]) -> List[int]:
    """``[B + 2]``: 1 for the states no branch of the cell code ``[B][2][NUM_FIELDS]`` reads (the loose ends)."""
    used = {branch[INPUT] for node in code for branch in node}
    return [0 if state in used else 1 for state in range(len(code) + 2)]


def loose_mask(code: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """:func:`loose_list` of an int32 cell code ``[B, 2, NUM_FIELDS]`` as a float tensor on its device."""
    return torch.tensor(loose_list(code.tolist()), dtype=dtype, device=code.device)


def slot_bn_row_list(branches: Sequence[Sequence[int]]) -> List[int]:
    """Per branch code row, the running-statistics rows of its round-1 and round-2 slot BNs (-1 where none).

    Matches the statistics :func:`fused_cell` returns: round 1's BN is ``BN_ROW`` (when FLAG_BN1), round 2's
    ``BN_ROW + 1`` (when FLAG_BN2). Rows of ``branches`` in ``(node, branch)`` order give ``[node][round][branch]``
    entries once regrouped by node (:func:`slot_bn_rows`).
    """
    return [[b[BN_ROW] if b[FLAGS] & FLAG_BN1 else -1, b[BN_ROW] + 1 if b[FLAGS] & FLAG_BN2 else -1]
            for b in branches]


def slot_bn_rows(code: Tensor) -> Tensor:
    """int64 ``[..., B, 2, 2]`` (node, round, branch): running-statistics row of each slot BN, -1 where none."""
    lead = code.shape[:-2]
    per_branch = slot_bn_row_list(code.reshape(-1, code.shape[-1]).tolist())  # [(node, branch)][round]
    rows = torch.tensor(per_branch, dtype=torch.int64, device=code.device).view(*lead, 2, 2)
    return rows.transpose(-1, -2)  # [.., node, branch, round] -> [..., node, round, branch]


def fused_cell(s0: Tensor, s1: Tensor, code: Tensor, nodes: NodeWeights,
               reduce_loose: Sequence[Tuple[Tensor, Tensor, Tensor]], combine: Tuple[Tensor, Tensor, Tensor],
               buffers: CellBuffers, loose: Tensor, *, reduction: bool, batch_stats: bool = True,
               update_stats: bool = True, drop_mask: Optional[Tensor] = None, momentum: float = 0.1,
               eps: float = 1e-5, stack_stats: bool = True,
               reduce_input_rows: Optional[Tensor] = None) -> Tuple[Tensor, Any, Any]:
    """One cell for the arch in ``code``, equal to ``mixed_cell`` with batch statistics.

    Args:
        s0: Calibrated input 0 ``[N, C, H, W]``.
        s1: Calibrated input 1, same shape.
        code: int32 ``[B, 2, NUM_FIELDS]`` branch codes on the activations' device.
        nodes: :class:`NodeWeights` of this cell (leading dims ``[B, 2]``).
        reduce_loose: Reduction cells: ``((w [C, C], g, b), (w, g, b))`` of inputs 0 and 1; ``()`` otherwise.
        combine: ``(w [C, B+2, C], g [C], b [C])`` of the final ReLU-conv1x1-BN.
        buffers: :class:`~bnao.ops.cell.CellBuffers` (``slot_stats`` unused: slot statistics are returned).
        loose: ``[B + 2]`` float mask of the loose ends (:func:`loose_mask`), on the device.
        reduction: Reduction cell (inputs 0/1 are always factorized-reduced for the combine).
        batch_stats: Must be True: evaluation with running statistics stays on the eager path.
        update_stats: Update the combine's and (where loose) the input reductions' running statistics.
        drop_mask: ``[N, 2B]`` drop-path multipliers per branch position; None: off.
        momentum: BN momentum.
        eps: BN epsilon.
        stack_stats: Return the statistics stacked per cell; False: as lists of ``2B`` tensors ``[2, C]``
            (node, round), for a caller that stacks a whole stage's at once (one launch instead of one per cell).
        reduce_input_rows: Reduction cells: int64 ``[2]`` :func:`reduce_rows` on the device (None: built from
            ``loose`` on the host, which synchronises with the device).

    Returns:
        ``(out, mean, invstd)``: the cell output and the slot BNs' batch statistics, ``[B, 2, 2, C]``
        (node, round, branch; detached), 0 and 1 where a branch has no such BN. Their running rows are
        :func:`slot_bn_rows`.
    """
    if not batch_stats:
        raise ValueError("fused_cell computes batch-statistics BN only; evaluate with running statistics on "
                         "the eager path (bnao.ops.cell.mixed_cell)")
    inputs = [s0, s1]  # the combine's states 0 and 1: a reduction cell's are its inputs factorized-reduced
    if reduction:
        if reduce_input_rows is None:
            reduce_input_rows = torch.tensor(reduce_rows(loose.tolist()), device=loose.device)
        inputs = [_reduce_input(inputs[i], reduce_loose[i], buffers.reduce_loose[i], reduce_input_rows[i : i + 1],
                                update_stats, momentum, eps) for i in (0, 1)]
    w, g, b = combine
    compiled_nodes = has_fused_nodes(s1.device.type)
    if compiled_nodes and combine_applies([s0, s1, *inputs], w):
        # Nodes and combine as one autograd node (cell_nodes.py): no copy of the node states' gradients.
        out, means, invstds = fused_nodes_and_combine(s0, s1, code, nodes, drop_mask, reduction, eps,
                                                      tuple(inputs) if reduction else None, w, loose.to(w.dtype))
    else:
        if compiled_nodes:
            node_states, means, invstds = fused_nodes(s0, s1, code, nodes, drop_mask, reduction, eps)
        else:
            node_states, means, invstds = _nodes_by_op(s0, s1, code, nodes, drop_mask, reduction, eps)
        out = _combine([*inputs, *node_states], loose, w)
    out = batch_norm(out, g, b, buffers.combine, True, update_stats, momentum, eps)
    means, invstds = [m.detach() for m in means], [v.detach() for v in invstds]
    if not stack_stats:
        return out, means, invstds
    shape = (code.shape[0], 2, 2, s1.shape[1])
    return out, torch.stack(means).view(shape), torch.stack(invstds).view(shape)


def _nodes_by_op(s0: Tensor, s1: Tensor, code: Tensor, nodes: NodeWeights, drop_mask: Optional[Tensor],
                 reduction: bool, eps: float) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """The nodes one op at a time under autograd (where :func:`fused_nodes` lacks a compiled op: the references).

    Returns:
        ``(node states, means, invstds)``: per node its state, and round 1's and round 2's batch statistics.
    """
    states = [s0, s1]
    means, invstds = [], []
    for node in range(code.shape[0]):
        node_code = code[node]
        pre1, mean1, invstd1 = branch_round(list(states), node_code, 1, nodes.dw1[node], nodes.pw1[node], None, eps,
                                            reduction=reduction)
        norm1 = (mean1, invstd1, nodes.g1[node], nodes.b1[node])
        pre2, mean2, invstd2 = branch_round([pre1], node_code, 2, nodes.dw2[node], nodes.pw2[node], norm1, eps,
                                            reduction=reduction)
        mask = drop_mask[:, 2 * node : 2 * node + 2] if drop_mask is not None else None
        states.append(node_output(pre2, node_code, mean2, invstd2, nodes.g2[node], nodes.b2[node], mask))
        means += [mean1, mean2]
        invstds += [invstd1, invstd2]
    return states[2:], means, invstds


def _reduce_input(x: Tensor, weights: Tuple[Tensor, Tensor, Tensor], running: Tuple[Tensor, Tensor],
                  row: Tensor, update: bool, momentum: float, eps: float) -> Tensor:
    """Factorized reduce (no ReLU) + batch-statistics BN of a reduction cell's input, always computed.

    The running statistics change only when the input is loose, decided by device data: ``row`` (int64
    ``[1]``) is 0 then and -1 otherwise, and ``update_slot_stats`` skips rows < 0 (no host synchronisation,
    the same launches for every arch).
    """
    w, g, b = weights
    if not update:
        return factorized_reduce([x], w, g, b, None, True, False, momentum, eps)
    stats: List[Tuple[Tensor, Tensor]] = []
    y = factorized_reduce([x], w, g, b, None, True, False, momentum, eps, stats=stats)
    (mean, invstd), = stats
    running_mean, running_var = running
    with torch.no_grad():
        update_slot_stats(running_mean.view(1, -1), running_var.view(1, -1), row, mean.view(1, -1).to(running_mean.dtype),
                          invstd.view(1, -1).to(running_mean.dtype), momentum, eps, y.shape[0] * y.shape[2] * y.shape[3])
    return y


def reduce_rows(loose: Sequence[int]) -> List[int]:
    """``[2]``: per cell input of a reduction cell, 0 when it is a loose end (its reduction's running statistics
    are updated) and -1 otherwise, from :func:`loose_list`."""
    return [0 if loose[i] else -1 for i in (0, 1)]


def _combine(states: List[Tensor], loose: Tensor, w: Tensor) -> Tensor:
    """``sum_s loose[s] * W[:, s, :] . ReLU(state_s)`` (before the cell's BN) where the nodes ran without it.

    All ``B + 2`` states go in, so the shapes do not depend on the arch. The
    :func:`~bnao.ops.fused.combine.combine` kernel reads the loose states only; where it is not compiled (or the
    dtypes do not fit it) the states are stacked along the channels, with the columns of states that are not
    loose zeroed in the weight, for a 1x1 convolution.
    """
    if combine_applies(states, w):
        return combine_op(states, w, loose.to(w.dtype))
    weight = (w * loose.to(w.dtype).view(1, -1, 1)).reshape(w.shape[0], -1, 1, 1)
    return F.conv2d(F.relu(torch.stack(states, 1).flatten(1, 2)), weight)
