"""The supernet's modules that do not depend on the arch: stems and each cell's fixed parts.

Each cell's calibration of its inputs (NAO's ``MaybeCalibrateSize``), the factorized reduction of its
loose inputs (reduction cells) and its final combine have weights that no input id selects; they are
plain parameters here, read by both the eager and the fused cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.cell import batch_norm, factorized_reduce


@dataclass(frozen=True)
class CellInfo:
    index: int
    stage: int
    local: int  # index among the stage's cells
    red_local: int  # index among the stage's reduction cells (-1 for normal cells)
    reduction: bool
    channels: int


def kaiming(shape: Sequence[int], fan_in: int) -> torch.Tensor:
    # NAO initialises every conv / linear weight with Kaiming normal (fan_in, gain sqrt(2)).
    return torch.randn(*shape) * math.sqrt(2.0 / fan_in)


class ConvBN(nn.Module):
    """Conv (no bias) + BN with functional BN modes (stem convs)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.weight = nn.Parameter(kaiming((c_out, c_in, kernel, kernel), c_in * kernel * kernel))
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, batch_stats: bool, update: bool) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return batch_norm(x, self.bn.weight, self.bn.bias, (self.bn.running_mean, self.bn.running_var),
                          batch_stats, update, self.bn.momentum, self.bn.eps)


class CellFixed(nn.Module):
    """Per-cell weights that do not depend on the input id: calibration, loose-end reduction, final combine."""

    def __init__(self, c0: int, c1: int, reduce0: bool, channels: int, num_states: int, reduction: bool):
        super().__init__()
        c = channels
        # NAO's MaybeCalibrateSize: factorized reduce after a reduction cell, else ReLU-conv1x1-BN if needed.
        self.pre0 = "fr" if reduce0 else ("rcb" if c0 != c else None)
        self.pre1 = "rcb" if c1 != c else None
        if self.pre0:
            self.pre0_w = nn.Parameter(kaiming((c, c0), c0))
            self.pre0_bn = nn.BatchNorm2d(c)
        if self.pre1:
            self.pre1_w = nn.Parameter(kaiming((c, c1), c1))
            self.pre1_bn = nn.BatchNorm2d(c)
        self.reduction = reduction
        if reduction:  # loose inputs of a reduction cell are factorized-reduced (one module per input, as NAO)
            self.red0_w = nn.Parameter(kaiming((c, c), c))
            self.red0_bn = nn.BatchNorm2d(c)
            self.red1_w = nn.Parameter(kaiming((c, c), c))
            self.red1_bn = nn.BatchNorm2d(c)
        # Final combine: weight per state id [C_out, B+2, C_in]; the used columns are the loose ends.
        self.comb_w = nn.Parameter(kaiming((c, num_states, c), c))
        self.comb_bn = nn.BatchNorm2d(c)

    @staticmethod
    def _stats(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
        return bn.running_mean, bn.running_var

    def calibrate(self, s0: torch.Tensor, s1: torch.Tensor, batch_stats: bool, update: bool):
        if self.pre0 == "fr":
            # The reference's MaybeCalibrateSize applies a ReLU before this factorized reduce.
            s0 = factorized_reduce([s0], self.pre0_w, self.pre0_bn.weight, self.pre0_bn.bias,
                                   self._stats(self.pre0_bn), batch_stats, update, self.pre0_bn.momentum,
                                   self.pre0_bn.eps, relu=True)
        elif self.pre0 == "rcb":
            s0 = F.conv2d(F.relu(s0), self.pre0_w[:, :, None, None])
            s0 = batch_norm(s0, self.pre0_bn.weight, self.pre0_bn.bias, self._stats(self.pre0_bn), batch_stats,
                            update, self.pre0_bn.momentum, self.pre0_bn.eps)
        if self.pre1 == "rcb":
            s1 = F.conv2d(F.relu(s1), self.pre1_w[:, :, None, None])
            s1 = batch_norm(s1, self.pre1_bn.weight, self.pre1_bn.bias, self._stats(self.pre1_bn), batch_stats,
                            update, self.pre1_bn.momentum, self.pre1_bn.eps)
        return s0, s1

    def reduce_weights(self):
        if not self.reduction:
            return (), ()
        return ((self.red0_w, self.red0_bn.weight, self.red0_bn.bias),
                (self.red1_w, self.red1_bn.weight, self.red1_bn.bias)), \
            (self._stats(self.red0_bn), self._stats(self.red1_bn))
