"""Loaders by name: ``tensor`` (GPU-resident), ``dali``, ``torch`` and ``auto``.

Every loader yields ``(images, labels)``: float32 ``[B, C, H, W]`` normalised
images on the loader's device (``torch.channels_last`` when asked) and int64
labels there; has ``len()`` (batches per epoch), ``set_epoch``, ``stream()``
(endless batches) and ``state_dict``/``load_state_dict`` (seed, epoch,
position). See :mod:`.base` for the shared semantics.

``auto`` picks, in this order (:func:`choose_loader`):

1. array dataset on CUDA whose resident copy fits in half the free GPU memory -> ``tensor``;
2. array dataset on CUDA that does not fit, or folder dataset on CUDA -> ``dali`` if DALI is installed;
3. array dataset on the CPU -> ``tensor`` (its batched ops beat per-image transforms there too);
4. anything else -> ``torch``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Union

import torch

from ...registry import Registry
from ..augment import AugmentConfig
from ..datasets import ArrayDataset
from .base import Loader, LoaderUnavailableError, mix_seed
from .dali import INSTALL_HINT, DaliLoader, dali_available
from .tensor import TensorLoader, resident_bytes
from .torch_loader import TorchLoader

LOADERS = Registry("loader")
LOADERS.register("tensor", TensorLoader)
LOADERS.register("dali", DaliLoader)
LOADERS.register("torch", TorchLoader)

# Share of the free GPU memory the resident dataset may take; the rest is for the model.
_RESIDENT_FRACTION = 0.5


def choose_loader(dataset: Any, device: Union[str, torch.device] = "cpu") -> str:
    """The loader ``auto`` uses for ``dataset`` on ``device`` (rule in the module docstring)."""
    dev = torch.device(device)
    is_array = isinstance(dataset, ArrayDataset)
    if dev.type == "cuda":
        if is_array:
            free, _ = torch.cuda.mem_get_info(dev)
            if resident_bytes(dataset) <= _RESIDENT_FRACTION * free:
                return "tensor"
        if dali_available():
            return "dali"
        return "torch"
    return "tensor" if is_array else "torch"


def _auto(dataset: Any, batch_size: int, **kw: Any) -> Loader:
    name = choose_loader(dataset, kw.get("device", "cpu"))
    if name != "torch":  # loader-specific options (num_workers, num_threads) only go where they belong
        kw.pop("num_workers", None)
    if name != "dali":
        kw.pop("num_threads", None)
        kw.pop("prefetch", None)
    return LOADERS.create(name, dataset, batch_size, **kw)


LOADERS.register("auto", _auto)


def create_loader(name: str, dataset: Any, batch_size: int, *, device: Union[str, torch.device] = "cpu",
                  augment: Union[bool, AugmentConfig] = True, shuffle: bool = True, drop_last: bool = True,
                  seed: int = 0, channels_last: bool = False, **kw: Any) -> Loader:
    """Builds a loader by name.

    Args:
        name: ``"tensor"``, ``"dali"``, ``"torch"`` or ``"auto"`` (see :func:`list_loaders`).
        dataset: An :class:`~bnao.data.ArrayDataset` or :class:`~bnao.data.FolderDataset`.
        batch_size: Images per batch.
        device: Where batches are delivered (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        augment: ``True`` (crop with padding 4 + flip), ``False`` (normalise
            only) or an :class:`~bnao.data.AugmentConfig` (cutout, ...).
        shuffle: New seeded order each epoch.
        drop_last: Drop each epoch's last incomplete batch.
        seed: Seed of the orders and augmentation.
        channels_last: Deliver images in ``torch.channels_last`` memory format.
        **kw: Loader options: ``num_workers`` (torch), ``num_threads``,
            ``prefetch`` (dali).

    Returns:
        A :class:`~bnao.data.loaders.base.Loader`.

    Raises:
        LoaderUnavailableError: ``dali`` without DALI installed.
        KeyError: Unknown loader name.
    """
    return LOADERS.create(name, dataset, batch_size, device=device, augment=augment, shuffle=shuffle,
                          drop_last=drop_last, seed=seed, channels_last=channels_last, **kw)


def register_loader(name: str, factory: Optional[Callable[..., Loader]] = None):
    """Registers a loader class/factory ``factory(dataset, batch_size, **kw)``."""
    return LOADERS.register(name, factory)


def list_loaders() -> List[str]:
    """Names of all registered loaders (available here or not)."""
    return LOADERS.names()


def available_loaders(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Loaders that can run on ``device`` in this environment (``auto`` excluded).

    ``tensor`` and ``torch`` run anywhere torch does (CUDA devices need
    ``torch.cuda.is_available()``); ``dali`` needs DALI installed.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return []
    names = ["tensor", "torch"]
    if dali_available():
        names.insert(1, "dali")
    return names


__all__ = [
    "LOADERS", "Loader", "LoaderUnavailableError", "TensorLoader", "DaliLoader", "TorchLoader",
    "create_loader", "register_loader", "list_loaders", "available_loaders", "choose_loader",
    "mix_seed", "INSTALL_HINT",
]
