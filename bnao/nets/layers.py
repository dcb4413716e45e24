"""Building blocks of the stand-alone NAO networks (SPEC section 2).

The modules have the parameters of the NAO reference's (renqianluo/NAO_pytorch,
NAO_V2, ``operations.py``) so that a network built here has exactly the
parameters whose number ``bnao.model_size`` computes in closed form
(``bnao/size/reference.py`` and ``csrc/size/model_size.h`` mirror every module
below; change them together). The forward passes follow the reference too:
ReLU before a factorized reduce only where the reference has one (the
calibration after a reduction cell), none on identity-with-stride-2 branches
or loose-end reductions. Known differences: the factorized reduce samples the
same pixels as the reference's stride-2 ``AvgPool2d(1)`` + 1x1 conv but with a
strided 1x1 conv, and splits odd ``c_out`` unevenly where the reference
asserts it is even; the auxiliary head falls back to adaptive pooling for
inputs other than 8x8 / 7x7.

All convolutions have no bias; every BatchNorm is affine.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..space.ops import (
    KIND_AVG_POOL,
    KIND_DIL_SEP_CONV,
    KIND_IDENTITY,
    KIND_MAX_POOL,
    KIND_SEP_CONV,
    KIND_ZERO,
)


def drop_path(x: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """Drops whole samples of a branch output with probability ``1 - keep_prob``.

    Kept samples are scaled by ``1 / keep_prob`` so that the expectation is unchanged.

    Args:
        x: Branch output ``[n, c, h, w]``.
        keep_prob: Probability of keeping a sample, in ``(0, 1]``.

    Returns:
        The masked tensor (``x`` itself when ``keep_prob >= 1``).
    """
    if keep_prob >= 1.0:
        return x
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep_prob)
    return x / keep_prob * mask


def scheduled_keep_prob(keep_prob: float, layer_id: int, num_layers: int, step: Optional[int], total_steps: Optional[int]) -> float:
    """NAO's drop-path schedule: the drop rate grows with the depth of the cell and with training progress.

    ``keep = 1 - (layer_id + 1) / num_layers * (1 - keep_prob)``, then
    ``keep = 1 - (step + 1) / total_steps * (1 - keep)``. Without
    ``total_steps`` (or ``step``) the progress factor is 1, i.e. the end-of-training rate.

    Args:
        keep_prob: Base keep probability (e.g. 0.9 during search, 0.6 in final training).
        layer_id: Index of the cell in the stack (0-based).
        num_layers: Number of cells in the stack.
        step: Current training step (0-based) or None.
        total_steps: Total number of training steps or None.

    Returns:
        The keep probability to use for this cell at this step.
    """
    keep = 1.0 - float(layer_id + 1) / num_layers * (1.0 - keep_prob)
    if step is not None and total_steps:
        ratio = min(float(step + 1) / total_steps, 1.0)
        keep = 1.0 - ratio * (1.0 - keep)
    return keep


class ReLUConvBN(nn.Module):
    """ReLU, conv ``k x k`` (no bias), BN: the 1x1 channel calibration of a cell input."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(F.relu(x)))


class _SubsampleConv(nn.Conv2d):
    """A 1x1 stride-2 conv (no bias) of the pixels ``(offset + 2i, offset + 2j)``, zero where they fall outside.

    ``offset=0`` is ``nn.Conv2d(c_in, c_out, 1, stride=2)`` itself. ``offset=1`` is the reference's
    second factorized-reduce path (pad right/bottom by one, drop the first row and column, strided 1x1
    conv): the odd pixels, and a zero last row/column for odd sizes, where that path reads only padding.
    The conv runs on the subsampled pixels rather than with a stride: the same products and sums, without
    the padded copy of the input, and oneDNN's channels-last strided 1x1 conv and its backward are 2-3x
    slower than a plain one on a quarter of the pixels. Parameters, state dict and output shape are
    ``nn.Conv2d``'s.
    """

    def __init__(self, c_in: int, c_out: int, offset: int):
        super().__init__(c_in, c_out, 1, stride=2, bias=False)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset == 0:
            return F.conv2d(x[:, :, ::2, ::2], self.weight)
        if torch.jit.is_tracing():  # the reference's form, whose shapes a trace follows for any input size
            return F.conv2d(F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:], self.weight, stride=2)
        h, w = x.shape[-2:]
        out = F.conv2d(x[:, :, 1::2, 1::2], self.weight)
        dh, dw = (h + 1) // 2 - out.shape[-2], (w + 1) // 2 - out.shape[-1]
        if dh or dw:
            out = F.pad(out, (0, dw, 0, dh))
        return out


class FactorizedReduce(nn.Module):
    """Halves the resolution with two 1x1 stride-2 convs on the input and on the input shifted by one pixel.

    ``c_out // 2`` channels come from the first path and ``c_out - c_out // 2``
    from the second (so odd ``c_out`` works), then BN over the concatenation.
    Output resolution is ``ceil(h / 2)`` like every other stride-2 op here.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        relu: ReLU before the convs. The reference has one only in the calibration after a reduction
            cell (``MaybeCalibrateSize``); its identity-with-stride-2 op and loose-end reductions have none.
    """

    def __init__(self, c_in: int, c_out: int, relu: bool = False):
        super().__init__()
        self.relu = relu
        self.conv1 = _SubsampleConv(c_in, c_out // 2, offset=0)
        # The second path samples the odd pixels (the reference pads right/bottom and drops the first row/column).
        self.conv2 = _SubsampleConv(c_in, c_out - c_out // 2, offset=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            x = F.relu(x)
        return self.bn(torch.cat([self.conv1(x), self.conv2(x)], dim=1))


class SepConv(nn.Module):
    """NAO/DARTS separable conv, applied twice: (ReLU, depthwise k x k, pointwise 1x1, BN) x 2.

    Only the first depthwise conv carries the stride. ReLUs are functional:
    a network holds hundreds of these and fewer submodules keep building it cheap.
    """

    def __init__(self, c: int, kernel_size: int, stride: int):
        super().__init__()
        pad = kernel_size // 2
        self.dw1 = nn.Conv2d(c, c, kernel_size, stride=stride, padding=pad, groups=c, bias=False)
        self.pw1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw2 = nn.Conv2d(c, c, kernel_size, stride=1, padding=pad, groups=c, bias=False)
        self.pw2 = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.pw1(self.dw1(F.relu(x))))
        return self.bn2(self.pw2(self.dw2(F.relu(x))))


class DilSepConv(nn.Module):
    """Dilated separable conv (DARTS DilConv, once): ReLU, depthwise k x k dilation 2, pointwise 1x1, BN."""

    def __init__(self, c: int, kernel_size: int, stride: int, dilation: int = 2):
        super().__init__()
        pad = dilation * (kernel_size // 2)
        self.dw = nn.Conv2d(c, c, kernel_size, stride=stride, padding=pad, dilation=dilation, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pw(self.dw(F.relu(x))))


class AvgPool(nn.AvgPool2d):
    """``nn.AvgPool2d(k, stride, k // 2, count_include_pad=False)``, faster on channels-last CPU tensors.

    There (float32, no autocast) the window sums come from a depthwise convolution with a kernel of ones
    and are divided by the number of pixels inside the image, which is what the pooling computes: oneDNN's
    depthwise convolution and its input gradient are 3-4x faster than ATen's channels-last pooling and its
    backward at few channels (8 channels of 28x28, batch 256: 4.6 ms against 13.6 ms forward and backward,
    one thread). No parameters or buffers: the state dict is ``nn.AvgPool2d``'s (empty).
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__(kernel_size, stride=stride, padding=kernel_size // 2, count_include_pad=False)
        self._consts: dict = {}

    def _fast(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last) and not torch.is_autocast_enabled("cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return super().forward(x)
        k, s, p = int(self.kernel_size), int(self.stride), int(self.padding)
        c, h, w = x.shape[1:]
        key = (c, h, w)
        consts = self._consts.get(key)
        if consts is None:
            ones = torch.ones(1, 1, h, w)
            counts = F.conv2d(ones, torch.ones(1, 1, k, k), stride=s, padding=p)  # pixels inside each window
            consts = self._consts[key] = (torch.ones(c, 1, k, k), counts)
        kernel, counts = consts
        return F.conv2d(x, kernel, stride=s, padding=p, groups=c) / counts


class Identity(nn.Module):
    """Returns its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """Zeros of the output shape (half resolution when ``stride == 2``), keeping the graph connected."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


def make_op(kind: int, kernel: int, channels: int, stride: int) -> nn.Module:
    """The module of one branch operation.

    Args:
        kind: Op kind code (``bnao.space.ops.KIND_*``).
        kernel: Kernel size (ignored by identity and zero).
        channels: Channels in and out.
        stride: 1, or 2 for a reduction-cell branch reading a cell input.

    Returns:
        The operation as an ``nn.Module``.
    """
    if kind == KIND_SEP_CONV:
        return SepConv(channels, kernel, stride)
    if kind == KIND_DIL_SEP_CONV:
        return DilSepConv(channels, kernel, stride)
    if kind == KIND_AVG_POOL:
        return AvgPool(kernel, stride)
    if kind == KIND_MAX_POOL:
        return nn.MaxPool2d(kernel, stride=stride, padding=kernel // 2)
    if kind == KIND_IDENTITY:
        return Identity() if stride == 1 else FactorizedReduce(channels, channels)
    if kind == KIND_ZERO:
        return Zero(stride)
    raise ValueError(f"unknown op kind {kind}")


class _AuxHead(nn.Module):
    """Auxiliary classifier: ReLU, 5x5 average pool to 2x2, conv1x1 -> 128, BN, ReLU, conv2x2 -> 768, [BN], ReLU, linear.

    The reference pools with a fixed ``AvgPool2d(5, stride)`` that maps an 8x8
    (CIFAR, stride 3) or 7x7 (ImageNet, stride 2) map to 2x2. That pooling is
    used whenever it gives 2x2; other input sizes (e.g. 7x7 after two
    reductions of a 28x28 Fashion-MNIST image) fall back to adaptive average
    pooling to 2x2 so the head works for any resolution.
    """

    def __init__(self, c_in: int, num_classes: int, pool_stride: int, bn_after_conv2: bool):
        super().__init__()
        self.pool_stride = pool_stride
        self.relu = nn.ReLU(inplace=False)
        layers = [
            nn.Conv2d(c_in, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
        ]
        if bn_after_conv2:
            layers.append(nn.BatchNorm2d(768))
        layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        h, w = x.shape[-2:]
        if h >= 5 and w >= 5 and (h - 5) // self.pool_stride + 1 == 2 and (w - 5) // self.pool_stride + 1 == 2:
            x = F.avg_pool2d(x, 5, stride=self.pool_stride, padding=0, count_include_pad=False)
        else:
            x = F.adaptive_avg_pool2d(x, 2)
        x = self.features(x)
        return self.classifier(x.flatten(1))


class AuxHeadCIFAR(_AuxHead):
    """NAO's CIFAR auxiliary head (8x8 input: AvgPool 5 stride 3; BN after both convs)."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__(c_in, num_classes, pool_stride=3, bn_after_conv2=True)


class AuxHeadImageNet(_AuxHead):
    """DARTS's ImageNet auxiliary head (7x7 input: AvgPool 5 stride 2; no BN after the 768 conv)."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__(c_in, num_classes, pool_stride=2, bn_after_conv2=False)
