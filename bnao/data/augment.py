"""Training augmentation as batched tensor ops, and its random parameters.

The CIFAR augmentation of the NAO reference, per image and in this order:
random crop with zero padding (``crop_padding`` pixels each side, offset
uniform in ``[-p, p]`` on both axes), horizontal flip with probability 1/2,
normalisation with the dataset's mean/std, then cutout (DeVries & Taylor,
2017): one ``L x L`` square (``2 * (L // 2)`` for odd ``L``) centred on a
uniformly drawn pixel, clipped at the border, set to 0 *after*
normalisation, as in the reference code.

All three loaders share :func:`sample_params`, so that given the same
generator state they draw the same crops, flips and cutout squares; on the CPU
the ``tensor``, ``torch`` and ``dali`` loaders yield the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import torch


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What training augmentation a loader applies.

    Attributes:
        crop_padding: Zero padding of the random crop (array datasets); 0 disables.
        flip: Random horizontal flip with probability 1/2.
        cutout: Cutout square side ``L``; 0 disables.
        random_resized_crop: Folder datasets: random-resized crop to the
            dataset's ``image_size`` (else resize + centre crop, as for evaluation).
        resize_scale: Area fraction range of the random-resized crop.
        resize_ratio: Aspect-ratio range of the random-resized crop.
    """

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    random_resized_crop: bool = True
    resize_scale: Tuple[float, float] = (0.08, 1.0)
    resize_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    @property
    def random(self) -> bool:
        """Whether any random transform is on (array datasets)."""
        return bool(self.crop_padding or self.flip or self.cutout)


#: No augmentation: normalisation only (resize + centre crop for folders).
NO_AUGMENT = AugmentConfig(crop_padding=0, flip=False, cutout=0, random_resized_crop=False)


def resolve_augment(augment: Union[bool, None, dict, AugmentConfig]) -> AugmentConfig:
    """``True`` -> defaults (crop 4 + flip), ``False``/``None`` -> :data:`NO_AUGMENT`,
    a dict -> ``AugmentConfig(**dict)``, an :class:`AugmentConfig` -> itself."""
    if isinstance(augment, AugmentConfig):
        return augment
    if isinstance(augment, dict):
        return AugmentConfig(**augment)
    if augment is True:
        return AugmentConfig()
    if augment in (False, None):
        return NO_AUGMENT
    raise TypeError(f"augment must be a bool, dict or AugmentConfig, got {augment!r}")


def sample_params(n: int, height: int, width: int, cfg: AugmentConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Draws per-image augmentation parameters in one kernel.

    Args:
        n: Batch size.
        height: Image height.
        width: Image width.
        cfg: Which transforms are on (off ones get neutral values).
        generator: Seeded generator; the tensor lives on its device.

    Returns:
        int64 ``[n, 5]``: crop offsets ``dy, dx`` in ``[-p, p]``, ``flip`` in
        {0, 1}, cutout centre ``cy`` in ``[0, H)`` and ``cx`` in ``[0, W)``.
    """
    u = torch.rand(n, 5, generator=generator, device=generator.device)
    p = int(cfg.crop_padding)
    span = torch.tensor([2 * p + 1, 2 * p + 1, 2 if cfg.flip else 1, height, width],
                        dtype=torch.float32, device=u.device)
    shift = torch.tensor([p, p, 0, 0, 0], dtype=torch.int64, device=u.device)
    # floor(u * k) is uniform on {0..k-1}; float32 rounding keeps it < k.
    return (u * span).long() - shift


def gather_augment(data: torch.Tensor, index: torch.Tensor, params: Optional[torch.Tensor],
                   height: int, width: int, cfg: AugmentConfig, scale: torch.Tensor,
                   shift: torch.Tensor) -> torch.Tensor:
    """Gathers a batch from the resident dataset and augments it, with no per-image loop.

    Crop and flip are folded into one gather: every output pixel reads source
    pixel ``(i + dy, flip ? W-1-j+dx : j+dx)``, and out-of-image reads are
    redirected to an extra all-zero pixel stored after each image (the
    "padded index" trick), so zero padding costs no mask pass.

    Args:
        data: uint8 ``[N, H*W + 1, C]``; pixel ``H*W`` of every image is 0.
        index: int64 ``[B]`` image indices.
        params: ``[B, 5]`` from :func:`sample_params`, or None (no augmentation).
        height: H.
        width: W.
        cfg: Augmentation config (for the cutout length).
        scale: float32 ``[C]``, ``1 / (255 * std)``.
        shift: float32 ``[C]``, ``-mean / std``.

    Returns:
        float32 ``[B, H, W, C]`` (contiguous, NHWC), normalised.
    """
    b, hw = index.shape[0], height * width
    if params is None:
        pix = data.index_select(0, index)[:, :hw]
        return (pix * scale + shift).view(b, height, width, -1)
    dev = data.device
    dy, dx, flip, cy, cx = params.unbind(1)
    ii = torch.arange(height, device=dev)
    jj = torch.arange(width, device=dev)
    rows = ii + dy[:, None]  # [B, H] source row of each output row
    cols = torch.where(flip[:, None].bool(), (width - 1) - jj, jj) + dx[:, None]  # [B, W]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    flat = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]
    flat = torch.where(inside, flat, hw).view(b, hw)
    pix = data[index[:, None], flat]  # [B, H*W, C] uint8, one gather kernel
    out = pix * scale + shift  # uint8 * float32 -> float32
    if cfg.cutout:
        half = int(cfg.cutout) // 2
        in_r = (ii >= cy[:, None] - half) & (ii < cy[:, None] + half)
        in_c = (jj >= cx[:, None] - half) & (jj < cx[:, None] + half)
        out.masked_fill_((in_r[:, :, None] & in_c[:, None, :]).view(b, hw, 1), 0.0)
    return out.view(b, height, width, -1)


def normalisation(mean: Any, std: Any, device: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``x_norm = x_uint8 * scale + shift``."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    return (1.0 / (255.0 * s)).float().to(device), (-m / s).float().to(device)
