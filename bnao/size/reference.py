"""Pure-Python closed-form model size: the reference twin of ``csrc/size/model_size.h``.

It walks the network that :func:`bnao.nets.build_network` builds, cell by cell
and branch by branch, propagating shapes and adding up what every module holds
and computes, without building anything. It is used when the compiled core is
missing and as the independent check of the C++ kernel in the tests.

Conventions (identical in C++):

* parameters: conv weights (no conv has a bias), BN weight and bias (2 per
  channel), classifier weight and bias; the auxiliary head is excluded.
* multiply-adds per image: a conv contributes
  ``out_h * out_w * out_c * (in_c / groups) * k_h * k_w``, the classifier
  ``in * out``; pools, BN, ReLU, additions and concatenations count 0.
* resolution: every stride-2 op maps ``h`` to ``ceil(h / 2)``.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from ..space.ops import KIND_DIL_SEP_CONV, KIND_IDENTITY, KIND_SEP_CONV, op_table


class _Tally:
    """Running totals of parameters and multiply-adds."""

    __slots__ = ("params", "madds")

    def __init__(self):
        self.params = 0
        self.madds = 0

    def conv(self, c_in: int, c_out: int, k: int, hw_out: int, groups: int = 1) -> None:
        w = c_out * (c_in // groups) * k * k
        self.params += w
        self.madds += hw_out * hw_out * w

    def bn(self, c: int) -> None:
        self.params += 2 * c

    def factorized_reduce(self, c_in: int, c_out: int, hw_out: int) -> None:
        self.conv(c_in, c_out // 2, 1, hw_out)
        self.conv(c_in, c_out - c_out // 2, 1, hw_out)
        self.bn(c_out)

    def branch(self, kind: int, k: int, c: int, stride: int, hw_out: int) -> None:
        if kind == KIND_SEP_CONV:
            for _ in range(2):
                self.conv(c, c, k, hw_out, groups=c)
                self.conv(c, c, 1, hw_out)
                self.bn(c)
        elif kind == KIND_DIL_SEP_CONV:
            self.conv(c, c, k, hw_out, groups=c)
            self.conv(c, c, 1, hw_out)
            self.bn(c)
        elif kind == KIND_IDENTITY and stride == 2:
            self.factorized_reduce(c, c, hw_out)
        # zero, pools and a stride-1 identity hold and compute nothing.


def _half(h: int) -> int:
    return (h + 1) // 2


def count_reference(
    arch: Sequence[int],
    num_nodes: int,
    op_set: str,
    skeleton: str = "cifar",
    layers: int = 3,
    channels: int = 20,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
) -> Tuple[int, int]:
    """Parameters and multiply-adds per image of one arch's stand-alone network.

    Args:
        arch: ``8 * num_nodes`` integers, normal cell first (assumed valid).
        num_nodes: ``B``.
        op_set: Op-set name (``"small"`` / ``"middle"``).
        skeleton: ``"cifar"`` or ``"imagenet"``.
        layers: ``N``.
        channels: ``C``.
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Side of the square input (for multiply-adds).

    Returns:
        ``(parameters, multiply_adds)``.
    """
    table = op_table(op_set)
    B = num_nodes
    cells_arch = (list(arch[: 4 * B]), list(arch[4 * B : 8 * B]))
    t = _Tally()
    C = channels
    # State shapes are (level, resolution, channels); level decides calibration like the builder.
    if skeleton == "cifar":
        t.conv(in_channels, 3 * C, 3, image_size)
        t.bn(3 * C)
        s0 = s1 = (0, image_size, 3 * C)
    elif skeleton == "imagenet":
        h1 = _half(image_size)
        h2 = _half(h1)
        h3 = _half(h2)
        t.conv(in_channels, C // 2, 3, h1)
        t.bn(C // 2)
        t.conv(C // 2, C, 3, h2)
        t.bn(C)
        t.conv(C, C, 3, h3)
        t.bn(C)
        s0, s1 = (2, h2, C), (3, h3, C)
    else:
        raise ValueError(f"unknown skeleton {skeleton!r}")

    c = C
    for i in range(3 * layers + 2):
        reduction = i in (layers, 2 * layers + 1)
        if reduction:
            c *= 2
        (l0, h0, c0), (l1, h1, c1) = s0, s1
        if l0 != l1:
            t.factorized_reduce(c0, c, h1)
        elif c0 != c:
            t.conv(c0, c, 1, h0)
            t.bn(c)
        if c1 != c:
            t.conv(c1, c, 1, h1)
            t.bn(c)
        levels = [l1, l1]
        res = [h1, h1]
        used = [False] * (B + 2)
        cell = cells_arch[1 if reduction else 0]
        for node in range(B):
            node_level, node_res = None, None
            for branch in range(2):
                src, op = cell[4 * node + 2 * branch], cell[4 * node + 2 * branch + 1]
                used[src] = True
                stride = 2 if reduction and src < 2 else 1
                out_res = _half(res[src]) if stride == 2 else res[src]
                kind, k = table[op]
                t.branch(kind, k, c, stride, out_res)
                node_level = levels[src] + (stride == 2)
                node_res = out_res
            levels.append(node_level)
            res.append(node_res)
        loose = [j for j in range(B + 2) if not used[j]]
        out_level = max(levels[j] for j in loose)
        out_res = min(res[j] for j in loose)
        for j in loose:
            if levels[j] < out_level:
                t.factorized_reduce(c, c, out_res)
        s0, s1 = s1, (out_level, out_res, c * len(loose))
    c_last = s1[2]
    t.params += c_last * num_classes + num_classes
    t.madds += c_last * num_classes
    return t.params, t.madds
