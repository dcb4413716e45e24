"""Branch codes: a cell's arch as a small int32 tensor (``csrc/cell/DESIGN.md``, "Branch code").

One row of ``NUM_FIELDS`` int32 per (node, branch). The fused kernels read every per-branch decision
from it (which state to read, which op, which weight row), so the launch sequence, the shapes and the
memory of a step do not depend on the arch.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

from ...space.ops import KIND_DIL_SEP_CONV, KIND_IDENTITY, KIND_SEP_CONV, KIND_ZERO

# Field indices of a branch code row (keep in sync with csrc/cell/cell_code.h).
INPUT, KIND, KERNEL, DILATION, STRIDE, OP, ROW, FLAGS, BN_ROW = range(9)
NUM_FIELDS = 9
#: FLAGS bits: drop-path applies; the round-1 result is batch-normalised; the round-2 result is.
FLAG_DROP, FLAG_BN1, FLAG_BN2 = 1, 2, 4
#: Gathered depthwise weights are zero-padded to this kernel size (top-left ``k x k`` used).
MAX_KERNEL = 7


def branch_flags(kind: int, stride: int, drop_identity: bool) -> int:
    """FLAGS of a branch of ``kind`` with ``stride``."""
    flags = 0
    if kind != KIND_ZERO and (drop_identity or kind != KIND_IDENTITY):
        flags |= FLAG_DROP
    if kind in (KIND_SEP_CONV, KIND_DIL_SEP_CONV) or (kind == KIND_IDENTITY and stride == 2):
        flags |= FLAG_BN1
    if kind == KIND_SEP_CONV:
        flags |= FLAG_BN2
    return flags


def cell_code(cell_arch: Sequence[int], reduction: bool, table: Sequence[Tuple[int, int]], *,
              slot_row: Callable[[int, int, int, int], int] = lambda node, branch, inp, op: -1,
              bn_row: Callable[[int, int, int], int] = lambda node, branch, op: -1,
              drop_identity: bool = True) -> torch.Tensor:
    """The branch code of one cell (host int32 tensor ``[B, 2, NUM_FIELDS]``).

    Args:
        cell_arch: ``[x_id, x_op, y_id, y_op] * B``.
        reduction: Reduction cell (branches reading inputs 0/1 have stride 2).
        table: ``(kind, kernel)`` per op index.
        slot_row: ``(node, branch, input_id, op) -> row`` of the branch's weights in its op's stacked tensors
            (called only for branches with weights).
        bn_row: ``(node, branch, op) -> row`` of the branch's first slot BN in the stage's running statistics
            (called only for branches with a BN; the round-2 BN of a sep conv is the next row).
        drop_identity: Drop-path on identity branches too (the reference's).
    """
    rows = cell_code_rows(cell_arch, reduction, table, slot_row=slot_row, bn_row=bn_row, drop_identity=drop_identity)
    return torch.tensor(rows, dtype=torch.int32)


def cell_code_rows(cell_arch: Sequence[int], reduction: bool, table: Sequence[Tuple[int, int]], *,
                   slot_row: Callable[[int, int, int, int], int] = lambda node, branch, inp, op: -1,
                   bn_row: Callable[[int, int, int], int] = lambda node, branch, op: -1,
                   drop_identity: bool = True) -> List[List[List[int]]]:
    """:func:`cell_code` as nested Python lists ``[B][2][NUM_FIELDS]`` (host work only: no tensor op per branch)."""
    code = []
    for node in range(len(cell_arch) // 4):
        branches = []
        for branch in range(2):
            inp, op = cell_arch[4 * node + 2 * branch], cell_arch[4 * node + 2 * branch + 1]
            kind, kernel = table[op]
            stride = 2 if reduction and inp < 2 else 1
            flags = branch_flags(kind, stride, drop_identity)
            has_weights = kind in (KIND_SEP_CONV, KIND_DIL_SEP_CONV) or (kind == KIND_IDENTITY and stride == 2)
            branches.append([
                inp, kind, kernel, 2 if kind == KIND_DIL_SEP_CONV else 1, stride, op,
                slot_row(node, branch, inp, op) if has_weights else -1, flags,
                bn_row(node, branch, op) if flags & FLAG_BN1 else -1,
            ])
        code.append(branches)
    return code
