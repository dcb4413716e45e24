"""The GPU-resident loader: the whole array dataset on the device, augmented by batched ops.

The dataset is copied to the device once, as uint8 with the crop's zero
border already in place (``[N, (H+2p)*(W+2p), C]``, 1.56x the raw size for
CIFAR), so random crop and flip are a single gather with no masks (see
:func:`~bnao.data.augment.gather_augment`). A batch is then a few kernel
launches: the augmentation parameters (one ``torch.rand`` and its scaling) and
one ``bnao::gather_augment`` kernel that gathers, crops, flips, normalises and
cuts out (about fifteen tensor expressions, 45 aten ops, in its pure-PyTorch
reference, used where ``bnao._C`` lacks the op). The host does no per-image work and never
synchronises with the device.

Exactly resumable, and the same batches on every device: the epoch order comes
from a CPU generator seeded with ``(seed, epoch)`` and batch ``b``'s
augmentation parameters (``[B, 5]`` integers) from one seeded with
``(seed, epoch, b)``; on a GPU they travel in one non-blocking copy from pinned
memory (an order once per epoch, a few hundred bytes per batch), so CPU and
CUDA runs of a seed see the same images, crops, flips and cutouts.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ...device import upload
from ..augment import gather_augment, normalisation, pad_images, sample_params
from ..datasets import ArrayDataset
from .base import Batch, Loader, epoch_permutation, mix_seed


def resident_bytes(dataset: ArrayDataset, pad: int = 4) -> int:
    """Device memory the ``tensor`` loader keeps for ``dataset`` (images padded by ``pad``)."""
    n, h, w, c = dataset.images.shape
    return n * (h + 2 * pad) * (w + 2 * pad) * c + n * 8


class TensorLoader(Loader):
    """Batches gathered and augmented on the device from a resident copy of the dataset.

    Args:
        dataset: An :class:`~bnao.data.ArrayDataset`.
        batch_size: Images per batch.
        **kw: See :class:`~bnao.data.loaders.base.Loader`.

    Raises:
        TypeError: ``dataset`` is not an array dataset.
    """

    name = "tensor"
    exact_resume = True

    def __init__(self, dataset: ArrayDataset, batch_size: int, **kw):
        if not isinstance(dataset, ArrayDataset):
            raise TypeError("the tensor loader needs an ArrayDataset (use 'dali' or 'torch' for folders)")
        super().__init__(dataset, batch_size, **kw)
        n, h, w, c = dataset.images.shape
        self.height, self.width = h, w
        self.pad = int(self.augment.crop_padding)
        # Copy first, pad on the device: the host never holds a second padded copy.
        self._data = pad_images(torch.from_numpy(dataset.images).to(self.device), self.pad)
        self._labels = torch.from_numpy(dataset.labels).to(self.device)
        self._scale, self._shift = normalisation(dataset.mean, dataset.std, self.device)
        # On the CPU whatever the device: one stream of orders and parameters for CPU and CUDA runs.
        self._gen = torch.Generator()


    def _batch(self, index: torch.Tensor, epoch: int, b: int) -> Batch:
        params = None
        if self.augment.random:
            self._gen.manual_seed(mix_seed(self.seed, epoch, b))
            params = upload(sample_params(index.shape[0], self.height, self.width, self.augment, self._gen),
                            self.device)
        x = gather_augment(self._data, index, params, self.height, self.width, self.pad, self.augment,
                           self._scale, self._shift)
        x = x.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: already channels_last
        if not self.channels_last:
            x = x.contiguous()
        return x, self._labels[index]

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        order = upload(epoch_permutation(self.seed, epoch, len(self.dataset), self.shuffle, self._gen), self.device)
        for b in range(start, len(self)):
            lo, hi = self.batch_range(b)
            yield self._batch(order[lo:hi], epoch, b)
