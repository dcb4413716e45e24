"""The fallback: a ``torch.utils.data.DataLoader`` with torchvision-style per-image transforms.

Works for array and folder datasets, on any device (batches are built on the
host, in worker processes when ``num_workers > 0``, and copied over).

Exactly resumable: the batch sampler hands each image its parameters together
with its index -- for array datasets the same :func:`~bnao.data.augment.sample_params`
draw as the ``tensor`` loader (from a CPU generator seeded with
``(seed, epoch, batch)``), for folders a per-image seed -- so workers hold no
RNG state and the order of worker start-up does not matter.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.utils.data as tud

from ..augment import AugmentConfig, sample_params
from ..datasets import ArrayDataset, FolderDataset
from .base import Batch, Loader, epoch_permutation, mix_seed


def cutout_(img: torch.Tensor, cy: int, cx: int, length: int) -> torch.Tensor:
    """Zeroes a ``length``-square centred on ``(cy, cx)`` of a CHW tensor, clipped (DeVries)."""
    half = length // 2
    h, w = img.shape[-2:]
    img[..., max(cy - half, 0):min(cy + half, h), max(cx - half, 0):min(cx + half, w)] = 0
    return img


class _ArrayImages(tud.Dataset):
    """Items are ``(index, params-or-None)``; returns (normalised CHW float, label)."""

    def __init__(self, ds: ArrayDataset, cfg: AugmentConfig):
        self.images, self.labels, self.cfg = ds.images, ds.labels, cfg
        self.mean, self.std = list(ds.mean), list(ds.std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: Tuple[int, Optional[List[int]]]):
        import torchvision.transforms.functional as F

        i, p = item
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # HWC -> CHW uint8
        h, w = img.shape[1:]
        if p is not None:
            dy, dx, flip, cy, cx = p
            pad = self.cfg.crop_padding
            if pad:  # torchvision RandomCrop(size, padding=pad): offset dy -> top = pad + dy
                img = F.crop(F.pad(img, [pad] * 4, fill=0), pad + dy, pad + dx, h, w)
            if flip:
                img = F.hflip(img)
        x = F.normalize(img.float().div_(255.0), self.mean, self.std)
        if p is not None and self.cfg.cutout:
            cutout_(x, cy, cx, self.cfg.cutout)
        return x, int(self.labels[i])


def random_resized_crop_params(height: int, width: int, scale: Tuple[float, float],
                               ratio: Tuple[float, float], gen: torch.Generator) -> Tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, drawing from ``gen`` instead of global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            j = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return i, j, h, w
    in_ratio = width / height  # fallback: centre crop at the clamped ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _FolderImages(tud.Dataset):
    """Items are ``(index, per-image seed or None)``; decodes with PIL."""

    def __init__(self, ds: FolderDataset, cfg: AugmentConfig):
        self.paths, self.labels, self.cfg, self.size = ds.paths, ds.labels, cfg, ds.image_size
        self.mean, self.std = list(ds.mean), list(ds.std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: Tuple[int, Optional[int]]):
        import torchvision.transforms.functional as F
        from PIL import Image

        i, s = item
        with Image.open(self.paths[i]) as im:
            img = F.pil_to_tensor(im.convert("RGB"))
        cfg, size = self.cfg, self.size
        gen = torch.Generator().manual_seed(s) if s is not None else None
        if gen is not None and cfg.random_resized_crop:
            t, l, h, w = random_resized_crop_params(img.shape[1], img.shape[2], cfg.resize_scale,
                                                    cfg.resize_ratio, gen)
            img = F.resized_crop(img, t, l, h, w, [size, size], antialias=True)
        else:  # evaluation transform: resize the short side to size / 0.875, centre crop
            img = F.center_crop(F.resize(img, [int(round(size / 0.875))], antialias=True), [size, size])
        flip = cy = cx = 0
        if gen is not None:
            flip, cy, cx = (torch.rand(3, generator=gen) * torch.tensor([2.0, size, size])).long().tolist()
        if flip and cfg.flip:
            img = F.hflip(img)
        x = F.normalize(img.float().div_(255.0), self.mean, self.std)
        if s is not None and cfg.cutout:
            cutout_(x, cy, cx, cfg.cutout)
        return x, int(self.labels[i])


class _BatchSampler:
    """Yields the items of batches ``start..`` of one epoch (set before each ``iter``)."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return len(self.loader) - self.start

    def __iter__(self) -> Iterator[list]:
        ld = self.loader
        gen = torch.Generator()
        order = epoch_permutation(ld.seed, self.epoch, len(ld.dataset), ld.shuffle, gen).tolist()
        folder = isinstance(ld.dataset, FolderDataset)
        for b in range(self.start, len(ld)):
            lo, hi = ld.batch_range(b)
            idx = order[lo:hi]
            if folder:
                params: List[Any] = ([mix_seed(ld.seed, self.epoch, b, k) for k in range(len(idx))]
                                     if ld.augment.random or ld.augment.random_resized_crop else [None] * len(idx))
            elif ld.augment.random:
                gen.manual_seed(mix_seed(ld.seed, self.epoch, b))
                params = sample_params(len(idx), ld.height, ld.width, ld.augment, gen).tolist()
            else:
                params = [None] * len(idx)
            yield list(zip(idx, params))


class TorchLoader(Loader):
    """``torch.utils.data.DataLoader`` over per-image transforms.

    Args:
        dataset: An :class:`~bnao.data.ArrayDataset` or :class:`~bnao.data.FolderDataset`.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes (0: in the main process).
        **kw: See :class:`~bnao.data.loaders.base.Loader`.
    """

    name = "torch"
    exact_resume = True

    def __init__(self, dataset: Any, batch_size: int, *, num_workers: int = 0, **kw):
        super().__init__(dataset, batch_size, **kw)
        if isinstance(dataset, ArrayDataset):
            self.height, self.width = dataset.images.shape[1:3]
            items: tud.Dataset = _ArrayImages(dataset, self.augment)
        elif isinstance(dataset, FolderDataset):
            items = _FolderImages(dataset, self.augment)
        else:
            raise TypeError(f"unsupported dataset type {type(dataset).__name__}")
        self._sampler = _BatchSampler(self)
        self._loader = tud.DataLoader(
            items, batch_sampler=self._sampler, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
        )

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        self._sampler.epoch, self._sampler.start = epoch, start
        for x, y in self._loader:
            yield self._deliver(x, y)
