"""The NVIDIA DALI loader (optional extra: ``pip install .[dali]``).

Two pipelines:

* Array datasets: one ``fn.external_source`` in batch mode is fed whole
  batches -- a numpy gather from the preloaded array plus the batch's
  augmentation parameters -- from Python, once per batch (no per-sample
  callbacks). Then ``fn.slice`` with the crop offsets as anchors and
  ``out_of_bounds_policy="pad"`` (random crop with zero padding),
  ``fn.crop_mirror_normalize`` (flip, normalise, layout) and ``fn.erase``
  (cutout). The parameters are drawn on the host by
  :func:`~bnao.data.augment.sample_params` from ``(seed, epoch, batch)`` rather
  than by ``fn.random.coin_flip``/``fn.random.uniform``, whose RNG state
  cannot be restored mid-epoch: this makes the array pipeline exactly
  resumable and on the CPU identical to the ``tensor`` and ``torch`` loaders.
* Folder datasets: ``fn.external_source`` fed whole batches of encoded files
  in our seeded order (read by a thread pool), ``fn.decoders.image_random_crop``
  (``device="mixed"``: nvJPEG on the GPU; ``"cpu"`` without one),
  ``fn.resize``, flip by ``fn.random.coin_flip``, ``fn.crop_mirror_normalize``
  and optional cutout. The pipeline (with its GPU decoder) is built once and
  runs across epochs; it is rebuilt only when training jumps (a resume).
  Resume is exact in order but not in augmentation: DALI's random ops are
  seeded with ``(seed, epoch, start batch)`` of the position the pipeline was
  built at and their state cannot be saved, so a resumed run draws other crops
  and flips from then on than an uninterrupted one.

``device="cpu"`` builds CPU-only pipelines (``device_id=None``), which is what
CI tests; ``"cuda:i"`` runs the ops on GPU ``i`` and returns CUDA tensors.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch

from ..augment import sample_params
from ..datasets import ArrayDataset, FolderDataset
from .base import Batch, Loader, LoaderUnavailableError, epoch_permutation, mix_seed

INSTALL_HINT = "pip install .[dali]  (NVIDIA DALI, e.g. nvidia-dali-cuda130 for CUDA 13)"


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA runtime underneath it
        return False
    return True


def _import_dali():
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except Exception as e:
        raise LoaderUnavailableError(f"the 'dali' loader needs NVIDIA DALI, which is not importable ({e}): "
                                     f"{INSTALL_HINT}") from e
    return Pipeline, fn, types, DALIGenericIterator


class DaliLoader(Loader):
    """Batches from an NVIDIA DALI pipeline, as torch tensors on the loader's device.

    Args:
        dataset: An :class:`~bnao.data.ArrayDataset` or :class:`~bnao.data.FolderDataset`.
        batch_size: Images per batch.
        num_threads: DALI CPU worker threads (default: up to 4).
        prefetch: DALI prefetch queue depth.
        **kw: See :class:`~bnao.data.loaders.base.Loader`.

    Raises:
        LoaderUnavailableError: DALI is not installed.
    """

    name = "dali"

    def __init__(self, dataset: Any, batch_size: int, *, num_threads: Optional[int] = None,
                 prefetch: int = 2, **kw):
        self._dali = _import_dali()
        super().__init__(dataset, batch_size, **kw)
        if not isinstance(dataset, (ArrayDataset, FolderDataset)):
            raise TypeError(f"unsupported dataset type {type(dataset).__name__}")
        self.exact_resume = isinstance(dataset, ArrayDataset)
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self.num_threads = int(num_threads or max(1, min(4, os.cpu_count() or 1)))
        self.prefetch = int(prefetch)
        self._iter: Any = None
        # (seed, epoch, batch) the pipeline gives next: the seed too, since load_state_dict may change it.
        self._next: Optional[Tuple[int, int, int]] = None
        self.pipelines_built = 0  # a pipeline runs across epochs; rebuilt only when training jumps

    # ------------------------------------------------------------------ array pipeline
    def _array_feed(self, epoch: int, start: int) -> Iterator[tuple]:
        """Endless full batches from ``(epoch, start)`` on; short last batches are padded."""
        ds, cfg, bsz = self.dataset, self.augment, self.batch_size
        h, w = ds.images.shape[1:3]
        half = cfg.cutout // 2
        gen = torch.Generator()
        while True:
            order = epoch_permutation(self.seed, epoch, len(ds), self.shuffle, gen).numpy()
            for b in range(start, len(self)):
                lo, hi = self.batch_range(b)
                idx = order[lo:hi]
                if cfg.random:
                    gen.manual_seed(mix_seed(self.seed, epoch, b))
                    p = sample_params(len(idx), h, w, cfg, gen).numpy()
                else:
                    p = np.zeros((len(idx), 5), dtype=np.int64)
                if len(idx) < bsz:  # DALI batches are full: pad, trimmed after the pipeline
                    pad = bsz - len(idx)
                    idx = np.concatenate([idx, np.repeat(idx[-1:], pad)])
                    p = np.concatenate([p, np.repeat(p[-1:], pad, axis=0)])
                # Only the parameters that the graph uses (DALI warns about unused outputs).
                out = [ds.images[idx], ds.labels[idx]]
                if cfg.crop_padding:
                    out.append(p[:, 0:2].astype(np.int32))
                if cfg.flip:
                    out.append(p[:, 2].astype(np.int32))
                if cfg.cutout:
                    out.append((p[:, 3:5] - half).astype(np.float32))
                yield tuple(out)
            epoch, start = epoch + 1, 0

    def _array_pipeline(self, epoch: int, start: int):
        Pipeline, fn, types, _ = self._dali
        ds, cfg = self.dataset, self.augment
        h, w = ds.images.shape[1:3]
        feed = self._array_feed(epoch, start)
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                        prefetch_queue_depth=self.prefetch, seed=mix_seed(self.seed, epoch, start) % (2**31))
        with pipe:
            n_out = 2 + bool(cfg.crop_padding) + bool(cfg.flip) + bool(cfg.cutout)
            images, labels, *params = fn.external_source(
                source=lambda: next(feed), batch=True, num_outputs=n_out, layout=["HWC"] + [""] * (n_out - 1))
            anchor = params.pop(0) if cfg.crop_padding else None
            mirror = params.pop(0) if cfg.flip else 0
            erase_at = params.pop(0) if cfg.cutout else None
            if self.device_id is not None:
                images = images.gpu()
            if cfg.crop_padding:
                # Per-image start (argument input, on the CPU for either backend), fixed
                # shape; the window leaves the image by up to p pixels -> zero padding.
                images = fn.slice(images, start=anchor, shape=[h, w], axis_names="HW",
                                  out_of_bounds_policy="pad", fill_values=0)
            x = self._normalise(fn, types, images, mirror)
            if cfg.cutout:
                side = float(2 * (cfg.cutout // 2))
                x = fn.erase(x, anchor=erase_at, shape=[side, side], axis_names="HW", fill_value=0.0)
            pipe.set_outputs(x, labels)
        return pipe

    # ------------------------------------------------------------------ folder pipeline
    def _folder_feed(self, epoch: int, start: int) -> Iterator[tuple]:
        """Endless full batches of encoded files from ``(epoch, start)`` on; short last batches are padded."""
        ds, bsz = self.dataset, self.batch_size
        gen = torch.Generator()
        with ThreadPoolExecutor(self.num_threads) as pool:
            while True:
                order = epoch_permutation(self.seed, epoch, len(ds), self.shuffle, gen).numpy()
                for b in range(start, len(self)):
                    lo, hi = self.batch_range(b)
                    idx = order[lo:hi]
                    if len(idx) < bsz:  # DALI batches are full: pad, trimmed after the pipeline
                        idx = np.concatenate([idx, np.repeat(idx[-1:], bsz - len(idx))])
                    files = list(pool.map(lambda i: np.fromfile(ds.paths[i], dtype=np.uint8), idx))
                    yield files, np.asarray(ds.labels[idx], dtype=np.int64)
                epoch, start = epoch + 1, 0

    def _folder_pipeline(self, epoch: int, start: int):
        Pipeline, fn, types, _ = self._dali
        ds, cfg, bsz = self.dataset, self.augment, self.batch_size
        feed = self._folder_feed(epoch, start)
        size = ds.image_size
        decoder = "mixed" if self.device_id is not None else "cpu"
        pipe = Pipeline(batch_size=bsz, num_threads=self.num_threads, device_id=self.device_id,
                        prefetch_queue_depth=self.prefetch, seed=mix_seed(self.seed, epoch, start) % (2**31))
        with pipe:
            jpegs, labels = fn.external_source(source=lambda: next(feed), batch=True, num_outputs=2)
            if cfg.random_resized_crop:
                images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                       random_area=list(cfg.resize_scale),
                                                       random_aspect_ratio=list(cfg.resize_ratio))
                images = fn.resize(images, resize_x=size, resize_y=size)
                crop = None
            else:  # evaluation: short side to size / 0.875, centre crop
                images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=float(round(size / 0.875)))
                crop = (size, size)
            mirror = fn.random.coin_flip(probability=0.5) if cfg.flip and cfg.random_resized_crop else 0
            x = self._normalise(fn, types, images, mirror, crop=crop)
            if cfg.cutout and cfg.random_resized_crop:
                half = cfg.cutout // 2
                from nvidia.dali import math as dmath

                centre = fn.random.uniform(range=[0.0, float(size)], shape=[2])
                x = fn.erase(x, anchor=dmath.floor(centre) - float(half), shape=[2.0 * half] * 2,
                             axis_names="HW", fill_value=0.0)
            pipe.set_outputs(x, labels)
        return pipe

    # ------------------------------------------------------------------ common
    def _normalise(self, fn, types, images, mirror, crop=None):
        kw = {"crop": crop} if crop else {}
        return fn.crop_mirror_normalize(
            images, mirror=mirror, dtype=types.FLOAT,
            mean=[255.0 * m for m in self.dataset.mean], std=[255.0 * s for s in self.dataset.std],
            output_layout="HWC" if self.channels_last else "CHW", **kw)

    def _start(self, epoch: int, start: int) -> None:
        *_, DALIGenericIterator = self._dali
        self._iter = None  # drop the old pipeline (and its prefetched batches) first
        build = self._array_pipeline if isinstance(self.dataset, ArrayDataset) else self._folder_pipeline
        pipe = build(epoch, start)
        pipe.build()
        self.pipelines_built += 1
        self._iter = DALIGenericIterator([pipe], ["images", "labels"], size=-1, auto_reset=False)
        self._next = (self.seed, epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        if self._next != (self.seed, epoch, start):
            self._start(epoch, start)
        for b in range(start, len(self)):
            out = next(self._iter)[0]
            self._next = (self.seed, epoch, b + 1) if b + 1 < len(self) else (self.seed, epoch + 1, 0)
            lo, hi = self.batch_range(b)
            x, y = out["images"][: hi - lo], out["labels"][: hi - lo].reshape(-1).long()
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)  # HWC output viewed as NCHW: channels_last strides
            yield self._deliver(x, y)
