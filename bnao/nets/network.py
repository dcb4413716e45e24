"""Stand-alone networks of NAO archs: CIFAR and ImageNet skeletons (SPEC section 2).

Shapes are tracked at build time as ``(level, channels)`` where ``level`` is
the number of stride-2 reductions applied so far; the real resolution of a
level-``l`` tensor is the image size halved (rounding up) ``l`` times, so the
network runs at any input size and needs none at build time.

The built network has exactly the parameter count computed by
``bnao.model_size`` (auxiliary head excluded); its multiply-adds per image
equal ``bnao.model_size(..., measure="madds")`` at the given image size.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..space.nao import ArchLike, NAOSpace
from ..space.ops import KIND_IDENTITY, KIND_ZERO, op_table
from .layers import (
    AuxHeadCIFAR,
    AuxHeadImageNet,
    FactorizedReduce,
    ReLUConvBN,
    drop_path,
    make_op,
    scheduled_keep_prob,
)

SKELETONS = ("cifar", "imagenet")


def check_skeleton_args(skeleton: str, layers: int, channels: int, num_classes: int, in_channels: int) -> None:
    """Refuses an unknown skeleton or a non-positive size (shared by the stand-alone net and the supernet).

    Raises:
        ValueError: naming the argument and the accepted values.
    """
    if skeleton not in SKELETONS:
        raise ValueError(f"unknown skeleton {skeleton!r}; choose one of {SKELETONS}")
    for name, value in (("layers", layers), ("channels", channels), ("num_classes", num_classes),
                        ("in_channels", in_channels)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
Shape = Tuple[int, int]  # (level, channels)


class Node(nn.Module):
    """One node: two branches (op on an earlier state), summed, drop-path on each branch.

    The reference drops every branch, identity included (a dropped zero branch is still zero, so zero
    branches are skipped); ``drop_path_identity=False`` exempts identity branches.
    """

    def __init__(self, x_id: int, x_kind_kernel: Tuple[int, int], y_id: int, y_kind_kernel: Tuple[int, int],
                 channels: int, reduction: bool, drop_path_identity: bool = True):
        super().__init__()
        self.x_id, self.y_id = x_id, y_id
        # Reduction cells stride only the branches that read a cell input (ids 0, 1).
        x_stride = 2 if reduction and x_id < 2 else 1
        y_stride = 2 if reduction and y_id < 2 else 1
        self.x_op = make_op(*x_kind_kernel, channels, x_stride)
        self.y_op = make_op(*y_kind_kernel, channels, y_stride)
        skip = (KIND_ZERO,) if drop_path_identity else (KIND_IDENTITY, KIND_ZERO)
        self.x_drop = x_kind_kernel[0] not in skip
        self.y_drop = y_kind_kernel[0] not in skip

    def forward(self, states: List[torch.Tensor], keep_prob: Optional[float]) -> torch.Tensor:
        x = self.x_op(states[self.x_id])
        y = self.y_op(states[self.y_id])
        if keep_prob is not None and self.training:
            if self.x_drop:
                x = drop_path(x, keep_prob)
            if self.y_drop:
                y = drop_path(y, keep_prob)
        return x + y


class Cell(nn.Module):
    """A normal or reduction cell built from ``4*B`` integers.

    Args:
        cell_arch: ``[x_id, x_op, y_id, y_op] * B``.
        table: ``(kind, kernel)`` per op index (``bnao.space.ops.op_table``).
        prev: ``(level, channels)`` of the two inputs (output of the cell before the previous one, then of the previous one).
        channels: ``C`` of this cell.
        reduction: Whether this is a reduction cell.
        drop_path_identity: Drop-path on identity branches too (the reference's).
    """

    def __init__(self, cell_arch: Sequence[int], table, prev: Tuple[Shape, Shape], channels: int, reduction: bool,
                 drop_path_identity: bool = True):
        super().__init__()
        (l0, c0), (l1, c1) = prev
        self.channels = channels
        # Calibration (NAO's MaybeCalibrateSize): equal resolution and C channels for both inputs.
        if l0 != l1:
            self.pre0: nn.Module = FactorizedReduce(c0, channels, relu=True)
        elif c0 != channels:
            self.pre0 = ReLUConvBN(c0, channels)
        else:
            self.pre0 = nn.Identity()
        self.pre1: nn.Module = ReLUConvBN(c1, channels) if c1 != channels else nn.Identity()
        level = l1
        levels = [level, level]
        used = [0] * (len(cell_arch) // 4 + 2)
        self.nodes = nn.ModuleList()
        for i in range(len(cell_arch) // 4):
            x_id, x_op, y_id, y_op = (int(v) for v in cell_arch[4 * i : 4 * i + 4])
            self.nodes.append(Node(x_id, table[x_op], y_id, table[y_op], channels, reduction, drop_path_identity))
            used[x_id] += 1
            used[y_id] += 1
            # Every node of a reduction cell is at the reduced level: node 2 reads only inputs.
            levels.append(level + 1 if reduction else level)
        self.concat = [i for i, u in enumerate(used) if u == 0]
        out_level = max(levels[i] for i in self.concat)
        # Loose ends at a finer resolution (inputs of a reduction cell) are factorized-reduced first.
        self.reduce_loose = nn.ModuleDict(
            {str(i): FactorizedReduce(channels, channels) for i in self.concat if levels[i] < out_level}
        )
        self.out_shape: Shape = (out_level, channels * len(self.concat))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, keep_prob: Optional[float]) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for node in self.nodes:
            states.append(node(states, keep_prob))
        outs = []
        for i in self.concat:
            key = str(i)
            outs.append(self.reduce_loose[key](states[i]) if key in self.reduce_loose else states[i])
        return torch.cat(outs, dim=1)


class NASNetwork(nn.Module):
    """A stack of ``3N + 2`` cells (reductions at ``N`` and ``2N + 1``) on a CIFAR or ImageNet stem.

    Use :func:`build_network` to create one. ``forward(x)`` returns logits; in
    training mode with an auxiliary head it returns ``(logits, aux_logits)``.
    """

    def __init__(self, arch: Sequence[int], space: NAOSpace, skeleton: str, layers: int, channels: int,
                 num_classes: int, in_channels: int, auxiliary: bool, drop_path_keep_prob: Optional[float],
                 dropout: float, total_steps: Optional[int], drop_path_identity: bool = True):
        super().__init__()
        check_skeleton_args(skeleton, layers, channels, num_classes, in_channels)
        if skeleton == "imagenet" and channels < 2:
            raise ValueError("the ImageNet stem needs channels >= 2 (its first conv has channels // 2)")
        if drop_path_keep_prob is not None and not 0.0 < drop_path_keep_prob <= 1.0:
            raise ValueError(f"drop_path_keep_prob must be in (0, 1], got {drop_path_keep_prob}")
        arch = list(arch)
        B = space.num_nodes
        table = op_table(space.op_set)
        normal, reduce = arch[: 4 * B], arch[4 * B :]
        self.skeleton = skeleton
        self.drop_path_keep_prob = drop_path_keep_prob
        self.total_steps = total_steps
        self.step: Optional[int] = None
        self.num_cells = 3 * layers + 2
        self.reduction_indices = (layers, 2 * layers + 1)
        self.aux_index = 2 * layers + 1

        if skeleton == "cifar":
            c_stem = 3 * channels
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, c_stem, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_stem),
            )
            prev: List[Shape] = [(0, c_stem), (0, c_stem)]
        else:
            half = channels // 2
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=False),
                nn.Conv2d(half, channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=False),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            prev = [(2, channels), (3, channels)]

        c = channels
        self.cells = nn.ModuleList()
        self.auxiliary_head: Optional[nn.Module] = None
        for i in range(self.num_cells):
            reduction = i in self.reduction_indices
            if reduction:
                c *= 2
            cell = Cell(reduce if reduction else normal, table, (prev[0], prev[1]), c, reduction, drop_path_identity)
            self.cells.append(cell)
            prev = [prev[1], cell.out_shape]
            if auxiliary and i == self.aux_index:
                head = AuxHeadCIFAR if skeleton == "cifar" else AuxHeadImageNet
                self.auxiliary_head = head(cell.out_shape[1], num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(prev[1][1], num_classes)
        self._init_parameters()

    def _init_parameters(self) -> None:
        # NAO's init: Kaiming normal for every conv / linear weight. Meta tensors have no data to fill.
        for p in self.parameters():
            if p.dim() >= 2 and p.device.type != "meta":
                nn.init.kaiming_normal_(p)

    def set_step(self, step: int) -> None:
        """Sets the training step that scales drop-path (see :func:`scheduled_keep_prob`)."""
        self.step = int(step)

    def forward(self, x: torch.Tensor, step: Optional[int] = None):
        """Logits of a batch ``[n, in_channels, h, w]``.

        Args:
            x: Images.
            step: Training step for the drop-path schedule (default: the last :meth:`set_step`).

        Returns:
            ``logits``, or ``(logits, aux_logits)`` in training mode when the auxiliary head exists.
        """
        step = self.step if step is None else step
        if self.skeleton == "cifar":
            s0 = s1 = self.stem(x)
        else:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        aux_logits = None
        for i, cell in enumerate(self.cells):
            keep = None
            if self.drop_path_keep_prob is not None and self.training:
                keep = scheduled_keep_prob(self.drop_path_keep_prob, i, self.num_cells, step, self.total_steps)
            s0, s1 = s1, cell(s0, s1, keep)
            if self.auxiliary_head is not None and i == self.aux_index and self.training:
                aux_logits = self.auxiliary_head(s1)
        out = self.dropout(self.global_pooling(s1).flatten(1))
        logits = self.classifier(out)
        if self.auxiliary_head is not None and self.training:
            return logits, aux_logits
        return logits


def build_network(
    arch: Union[ArchLike, Sequence[int]],
    space: Union[NAOSpace, str] = "small",
    skeleton: str = "cifar",
    layers: int = 3,
    channels: int = 20,
    num_classes: int = 10,
    in_channels: int = 3,
    auxiliary: bool = False,
    drop_path_keep_prob: Optional[float] = None,
    dropout: float = 0.0,
    total_steps: Optional[int] = None,
    drop_path_identity: bool = True,
) -> NASNetwork:
    """Builds the stand-alone network of an arch.

    Args:
        arch: The arch (string, list, array or :class:`~bnao.space.Arch`); validated against ``space``.
        space: A :class:`~bnao.space.NAOSpace` or an op-set name (``"small"``/``"middle"``, B=5).
        skeleton: ``"cifar"`` (stem conv to 3C) or ``"imagenet"`` (two stride-2 stems).
        layers: ``N``, normal cells between reductions.
        channels: ``C`` of the first cells (doubled at each reduction).
        num_classes: Outputs of the classifier.
        in_channels: Channels of the input images.
        auxiliary: Adds the auxiliary head after the second reduction cell (training mode only).
        drop_path_keep_prob: Base keep probability of drop-path (None: no drop-path).
        dropout: Dropout rate before the classifier.
        total_steps: Training steps, for the progress factor of drop-path (None: no progress scaling).
        drop_path_identity: Drop-path on identity branches too, as the reference does (False: exempt them).

    Returns:
        The network (on the current default device; build under ``torch.device("meta")`` to count cheaply).
    """
    if isinstance(space, str):
        space = NAOSpace(op_set=space)
    flat = space.arch(arch).to_list()
    return NASNetwork(flat, space, skeleton, layers, channels, num_classes, in_channels, auxiliary,
                      drop_path_keep_prob, dropout, total_steps, drop_path_identity)
