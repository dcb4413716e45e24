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
import functools
from typing import Any, Optional, Tuple, Union

import torch

from ..ops.augment import gather_augment as augment_op


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
    span, shift = _param_ranges(int(cfg.crop_padding), bool(cfg.flip), height, width, u.device)
    # floor(u * k) is uniform on {0..k-1}; float32 rounding keeps it < k.
    return (u * span).long() - shift


@functools.lru_cache(maxsize=64)
def _param_ranges(p: int, flip: bool, height: int, width: int, device: torch.device):
    # Cached: building them per batch would be a blocking host-to-device copy each time.
    span = torch.tensor([2 * p + 1, 2 * p + 1, 2 if flip else 1, height, width], dtype=torch.float32)
    shift = torch.tensor([p, p, 0, 0, 0], dtype=torch.int64)
    return span.to(device), shift.to(device)


def pad_images(images: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> ``[N, (H+2p)*(W+2p), C]`` with a zero border of ``pad`` pixels."""
    n, h, w, c = images.shape
    if not pad:
        return images.reshape(n, h * w, c)
    out = images.new_zeros((n, h + 2 * pad, w + 2 * pad, c))
    out[:, pad:pad + h, pad:pad + w] = images
    return out.view(n, -1, c)


def gather_augment(data: torch.Tensor, index: torch.Tensor, params: Optional[torch.Tensor],
                   height: int, width: int, pad: int, cfg: AugmentConfig, scale: torch.Tensor,
                   shift: torch.Tensor) -> torch.Tensor:
    """Gathers a batch from the resident dataset and augments it, with no per-image loop.

    The dataset is stored with its zero padding (:func:`pad_images`), so crop and flip fold into the
    gather: :func:`bnao.ops.augment.gather_augment` (one kernel where ``bnao._C`` has it for the device,
    else its pure-PyTorch reference).

    Args:
        data: uint8 ``[N, (H+2p)*(W+2p), C]`` from :func:`pad_images`.
        index: int64 ``[B]`` image indices.
        params: ``[B, 5]`` from :func:`sample_params`, or None (no augmentation).
        height: H.
        width: W.
        pad: ``p``, the padding ``data`` was stored with (``cfg.crop_padding`` or 0).
        cfg: Augmentation config (for the cutout length).
        scale: float32 ``[C]``, ``1 / (255 * std)``.
        shift: float32 ``[C]``, ``-mean / std``.

    Returns:
        float32 ``[B, H, W, C]`` (contiguous, NHWC), normalised.
    """
    cutout = int(cfg.cutout) if params is not None and cfg.cutout else 0
    return augment_op(data, index, params, height, width, pad, cutout, scale, shift)


def normalisation(mean: Any, std: Any, device: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``x_norm = x_uint8 * scale + shift``."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    return (1.0 / (255.0 * s)).float().to(device), (-m / s).float().to(device)
