"""``bnao::gather_augment``: a training batch from a device-resident dataset in one kernel.

The tensor loader keeps the dataset on its device as uint8, zero-padded by the crop padding
(:func:`bnao.data.augment.pad_images`). A batch is then a gather of each image's randomly cropped and
flipped window, a per-channel normalisation and a cutout square: :func:`gather_augment_reference` does it
with about fifteen tensor expressions (45 aten ops), the compiled op (``csrc/data``) with one kernel, the normalisation as one
fused multiply-add so that the CPU and the GPU give the same bits.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import extension

__all__ = ["gather_augment", "gather_augment_reference"]

#: Columns of a params row (:func:`bnao.data.augment.sample_params`).
NUM_PARAMS = 5


def gather_augment_reference(data: torch.Tensor, index: torch.Tensor, params: Optional[torch.Tensor], height: int,
                             width: int, pad: int, cutout: int, scale: torch.Tensor,
                             shift: torch.Tensor) -> torch.Tensor:
    """The pure-PyTorch ``gather_augment`` (:func:`gather_augment`'s arguments and result).

    Crop and flip fold into one gather with no masks: output pixel ``(i, j)`` reads padded pixel
    ``(i + dy + p, (flip ? W-1-j : j) + dx + p)``, whose flat index is a row term plus a column term.
    """
    b = index.shape[0]
    wp = width + 2 * pad
    if params is None:  # data holds the plain images (pad is 0 without a random crop)
        pix = data.index_select(0, index)
    else:
        dev = data.device
        dy, dx, flip, cy, cx = params.unbind(1)
        ii = torch.arange(height, device=dev)
        jj = torch.arange(width, device=dev)
        row = (ii + (dy + pad)[:, None]) * wp  # [B, H]
        col = torch.where(flip[:, None].bool(), (width - 1) - jj, jj) + (dx + pad)[:, None]  # [B, W]
        # Absolute pixel numbers, so the gather is one index_select over pixel rows of ``data.view(-1, C)``.
        flat = (row[:, :, None] + (col + index[:, None] * data.shape[1])[:, None, :]).view(-1)
        pix = data.view(-1, data.shape[2]).index_select(0, flat).view(b, height * width, -1)
    out = torch.addcmul(shift, pix, scale)  # uint8 -> normalised float32 in one pass
    if params is not None and cutout:
        half = int(cutout) // 2
        in_r = (ii >= cy[:, None] - half) & (ii < cy[:, None] + half)
        in_c = (jj >= cx[:, None] - half) & (jj < cx[:, None] + half)
        out.masked_fill_((in_r[:, :, None] & in_c[:, None, :]).view(b, height * width, 1), 0.0)
    return out.view(b, height, width, -1)


def gather_augment(data: torch.Tensor, index: torch.Tensor, params: Optional[torch.Tensor], height: int, width: int,
                   pad: int, cutout: int, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Gathers images ``index`` of ``data`` and augments them: one kernel where the op is built for the device.

    Args:
        data: uint8 ``[N, (H+2p)*(W+2p), C]`` (:func:`bnao.data.augment.pad_images`).
        index: int64 ``[B]`` image indices.
        params: int64 ``[B, 5]`` ``(dy, dx, flip, cy, cx)`` from :func:`bnao.data.augment.sample_params`, or None
            (no augmentation: ``pad`` must be 0).
        height: H.
        width: W.
        pad: ``p``, the padding ``data`` was stored with.
        cutout: Side of the zeroed square centred on ``(cy, cx)`` (0: none).
        scale: float32 ``[C]``, ``1 / (255 * std)``.
        shift: float32 ``[C]``, ``-mean / std``.

    Returns:
        float32 ``[B, H, W, C]`` (contiguous, NHWC), normalised.
    """
    if extension.has_kernel("gather_augment", data.device.type):
        return torch.ops.bnao.gather_augment(data, index, params, int(height), int(width), int(pad), int(cutout),
                                             scale, shift)
    return gather_augment_reference(data, index, params, height, width, pad, cutout, scale, shift)


if extension.has_ops() and hasattr(torch.ops.bnao, "gather_augment"):

    @torch.library.register_fake("bnao::gather_augment")
    def _gather_augment_fake(data, index, params, height, width, pad, cutout, scale, shift):
        torch._check(data.dtype == torch.uint8 and data.dim() == 3,
                     lambda: "bnao::gather_augment: data must be uint8 [images, pixels, channels]")
        torch._check(index.dtype == torch.int64 and index.dim() == 1,
                     lambda: "bnao::gather_augment: index must be int64 [B]")
        torch._check(params is None or tuple(params.shape) == (index.shape[0], NUM_PARAMS),
                     lambda: "bnao::gather_augment: params must be [B, 5]")
        torch._check(data.shape[1] == (height + 2 * pad) * (width + 2 * pad),
                     lambda: "bnao::gather_augment: data's pixels per image must be (H + 2 pad) * (W + 2 pad)")
        for t in (scale, shift):
            torch._check(t.dtype == torch.float32 and tuple(t.shape) == (data.shape[2],),
                         lambda: "bnao::gather_augment: scale and shift must be float32 [C]")
        return data.new_empty((index.shape[0], height, width, data.shape[2]), dtype=torch.float32)
