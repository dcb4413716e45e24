"""The level schedule of one cell for one arch: which branches run together, and the weight and BN rows
they take (:func:`cell_schedule`, a pure, cached function of the arch).

Used by the eager cells (:func:`bnao.ops.cell.mixed_cell` runs the groups) and by the supernet's per-arch
plans (which gather the slot weights in the order the schedule defines).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Tuple

from ..space.ops import KIND_DIL_SEP_CONV, KIND_IDENTITY, KIND_SEP_CONV, KIND_ZERO

#: Parameter roles of each parametric op kind, in the order of the weight tuples.
ROLES = {
    KIND_SEP_CONV: ("dw1", "pw1", "g1", "b1", "dw2", "pw2", "g2", "b2"),
    KIND_DIL_SEP_CONV: ("dw", "pw", "g", "b"),
    KIND_IDENTITY: ("w", "g", "b"),
}
#: Slot BatchNorms per branch of each op kind (their running statistics are shared across input ids).
NUM_BN = {KIND_SEP_CONV: 2, KIND_DIL_SEP_CONV: 1, KIND_IDENTITY: 1}


def has_weights(kind: int, stride: int) -> bool:
    """Whether a branch of this kind and stride has per-slot weights (identity only when it reduces)."""
    if kind == KIND_IDENTITY:
        return stride == 2
    return kind in (KIND_SEP_CONV, KIND_DIL_SEP_CONV)


@dataclass(frozen=True)
class Group:
    """Branches of one level that share an op and a stride; they run as one grouped computation.

    Attributes:
        op: Op index in the op set.
        kind: Op kind (``KIND_*``).
        kernel: Kernel size (0 when none).
        stride: 1, or 2 for reduction-cell branches reading a cell input.
        positions: Branch positions ``2 * node + branch`` (node counted from 0).
        inputs: Input state id of each branch.
        chunk: Index of this group among the cell's weight-bearing groups of ``op`` (-1 when it has no weights).
        bn_row: First row of this group in the cell's slot-BN order.
    """

    op: int
    kind: int
    kernel: int
    stride: int
    positions: Tuple[int, ...]
    inputs: Tuple[int, ...]
    chunk: int
    bn_row: int


@dataclass(frozen=True)
class CellSchedule:
    """Execution plan of one cell for one arch (pure function of the arch, cached).

    Attributes:
        levels: Per level, the groups that run and then the nodes (0-based) completed at that level.
        op_slots: Per parametric op index, ``(position, input_id)`` of each weight row, in row order.
        op_chunks: Per parametric op index, the number of branches of each of its weight-bearing groups.
        bn_slots: ``(position, op, bn_index)`` of each slot-BN row, in BN order.
        loose: State ids concatenated into the output (never used as inputs).
        num_bn: Number of slot-BN rows.
    """

    levels: Tuple[Tuple[Tuple[Group, ...], Tuple[int, ...]], ...]
    op_slots: Dict[int, Tuple[Tuple[int, int], ...]]
    op_chunks: Dict[int, Tuple[int, ...]]
    bn_slots: Tuple[Tuple[int, int, int], ...]
    loose: Tuple[int, ...]
    num_bn: int


@lru_cache(maxsize=65536)
def cell_schedule(cell_arch: Tuple[int, ...], reduction: bool, table: Tuple[Tuple[int, int], ...]) -> CellSchedule:
    """Schedules the branches of one cell.

    A state's level is 0 for the cell inputs; a branch runs at ``level(input) + 1``;
    a node completes at the maximum level of its two branches. Branches of one
    level with the same op and stride form one :class:`Group`.

    Args:
        cell_arch: ``[x_id, x_op, y_id, y_op] * B`` as a tuple of ints.
        reduction: Whether branches reading inputs 0/1 have stride 2.
        table: ``(kind, kernel)`` per op index (``bnao.space.ops.op_table``).

    Returns:
        The cell's :class:`CellSchedule`.
    """
    num_nodes = len(cell_arch) // 4
    state_level = [0, 0]
    branch_level = []
    for i in range(num_nodes):
        x_id, _, y_id, _ = cell_arch[4 * i : 4 * i + 4]
        lx, ly = state_level[x_id] + 1, state_level[y_id] + 1
        branch_level += [lx, ly]
        state_level.append(max(lx, ly))
    levels = []
    op_rows: Dict[int, List[Tuple[int, int]]] = {}
    op_chunks: Dict[int, List[int]] = {}
    bn_slots: List[Tuple[int, int, int]] = []
    for level in range(1, max(state_level) + 1):
        buckets: Dict[Tuple[int, int], List[int]] = {}
        for pos in range(2 * num_nodes):
            if branch_level[pos] != level:
                continue
            node, b = divmod(pos, 2)
            in_id, op = cell_arch[4 * node + 2 * b], cell_arch[4 * node + 2 * b + 1]
            if table[op][0] == KIND_ZERO:
                continue  # contributes nothing; the node handles it
            stride = 2 if reduction and in_id < 2 else 1
            buckets.setdefault((op, stride), []).append(pos)
        groups = []
        for (op, stride), positions in sorted(buckets.items()):
            kind, kernel = table[op]
            inputs = tuple(cell_arch[4 * (p // 2) + 2 * (p % 2)] for p in positions)
            chunk = -1
            bn_row = len(bn_slots)
            if has_weights(kind, stride):
                chunks = op_chunks.setdefault(op, [])
                chunk = len(chunks)
                chunks.append(len(positions))
                op_rows.setdefault(op, []).extend(zip(positions, inputs))
                for j in range(NUM_BN[kind]):
                    bn_slots.extend((p, op, j) for p in positions)
            groups.append(Group(op, kind, kernel, stride, tuple(positions), inputs, chunk, bn_row))
        done = tuple(i for i in range(num_nodes) if state_level[i + 2] == level)
        levels.append((tuple(groups), done))
    used = set(cell_arch[0::4]) | set(cell_arch[2::4])
    loose = tuple(i for i in range(num_nodes + 2) if i not in used)
    return CellSchedule(
        levels=tuple(levels),
        op_slots={op: tuple(rows) for op, rows in op_rows.items()},
        op_chunks={op: tuple(c) for op, c in op_chunks.items()},
        bn_slots=tuple(bn_slots),
        loose=loose,
        num_bn=len(bn_slots),
    )
