"""Datasets by name: CIFAR-10/100, Fashion-MNIST, ImageNet-style folders, synthetic.

Two kinds of dataset come out of :func:`create_dataset`:

* :class:`ArrayDataset` -- the whole split decoded into one uint8 array
  ``[N, H, W, C]`` (CIFAR, Fashion-MNIST, synthetic). Small enough to live on
  the GPU, which is what the ``tensor`` loader does.
* :class:`FolderDataset` -- file paths and labels (ImageNet-style class
  folders); images are decoded by the loader (DALI on the GPU, PIL otherwise).

Datasets are looked up in the data directories returned by :func:`data_dirs`
(``root``, then ``$BNAO_DATA``, then ``./data``); Fashion-MNIST is also found
where Debian's ``dataset-fashion-mnist`` package installs it. A dataset that
cannot be found raises :class:`DatasetNotFoundError` listing every place that
was searched and how to get the data.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..registry import Registry

DATASETS = Registry("dataset")

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# Per-channel statistics of the training splits on the [0, 1] scale; the
# CIFAR values are the ones the NAO reference normalises with.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Uniform uint8 noise: mean 127.5/255, std sqrt((256^2 - 1) / 12) / 255.
UNIFORM_U8_MEAN, UNIFORM_U8_STD = 0.5, float(np.sqrt((256**2 - 1) / 12.0) / 255.0)

_SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found; the message lists where and how to get them."""


@dataclasses.dataclass
class ArrayDataset:
    """A whole dataset split held in memory.

    Attributes:
        images: uint8 array ``[N, H, W, C]``.
        labels: int64 array ``[N]``.
        num_classes: Number of classes.
        mean: Per-channel mean on the [0, 1] scale, used for normalisation.
        std: Per-channel standard deviation on the [0, 1] scale.
        name: Dataset name (``"cifar10"``, ...), with the split.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    name: str = "array"

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N={self.images.shape[0]}], got {self.labels.shape}")
        c = self.images.shape[3]
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} values (one per channel)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: np.ndarray, name: Optional[str] = None) -> "ArrayDataset":
        """A new dataset with the images at ``indices`` (copied)."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx], name=name or self.name)


@dataclasses.dataclass
class FolderDataset:
    """Image files with labels (decoded by the loader).

    Attributes:
        paths: Image file paths.
        labels: int64 array ``[N]``.
        classes: Class (folder) names; label ``i`` is ``classes[i]``.
        mean: Per-channel mean on the [0, 1] scale.
        std: Per-channel standard deviation on the [0, 1] scale.
        image_size: Side of the square images the loaders produce.
        name: Dataset name with the split.
    """

    paths: List[str]
    labels: np.ndarray
    classes: List[str]
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    image_size: int = 224
    name: str = "folder"

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.paths),):
            raise ValueError("paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def subset(self, indices: np.ndarray, name: Optional[str] = None) -> "FolderDataset":
        """A new dataset with the files at ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self, paths=[self.paths[i] for i in idx], labels=self.labels[idx], name=name or self.name
        )


def data_dirs(root: Optional[str] = None) -> List[Path]:
    """Data directories searched, in order: ``root``, ``$BNAO_DATA``, ``./data``."""
    out: List[Path] = []
    for d in (root, os.environ.get("BNAO_DATA"), "data"):
        # Absolute, so that an error message says exactly where it looked.
        if d and Path(d).expanduser().absolute() not in out:
            out.append(Path(d).expanduser().absolute())
    return out


#: Where a data dir is given, for the "To get it" hints: the CLI's flag, the config key, the Python argument.
_DATA_DIR_HOW = "--data-dir DIR, the config key data.root, root= in Python, $BNAO_DATA, or ./data"


def _not_found(what: str, searched: Sequence[Path], how: str) -> DatasetNotFoundError:
    places = "\n".join(f"  - {p}" for p in searched)
    return DatasetNotFoundError(f"{what} not found. Searched:\n{places}\nTo get it: {how}")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def register_dataset(name: str, factory: Optional[Callable[..., Any]] = None):
    """Registers a dataset factory ``factory(root=None, split="train", **kw)``; usable as a decorator."""
    return DATASETS.register(name, factory)


def create_dataset(name: str, root: Optional[str] = None, split: str = "train", **kw: Any):
    """Builds a dataset split by name.

    Args:
        name: A registered dataset (see :func:`list_datasets`).
        root: Data directory searched first (then ``$BNAO_DATA``, ``./data``).
        split: ``"train"`` or ``"test"``.
        **kw: Dataset options (``download=True`` for CIFAR; ``num_samples``,
            ``image_shape``, ``num_classes``, ``seed`` for ``synthetic``).

    Returns:
        An :class:`ArrayDataset` or :class:`FolderDataset`.

    Raises:
        DatasetNotFoundError: The files are not where they were searched for.
        KeyError: Unknown dataset name.
    """
    _check_split(split)
    return DATASETS.create(name, root=root, split=split, **kw)


def list_datasets() -> List[str]:
    """Names of the registered datasets."""
    return DATASETS.names()


# ----------------------------------------------------------------------------- CIFAR


def _read_cifar(folder: Path, files: Sequence[str], label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    # Stored planar (N, C, H, W); the dataset convention is NHWC.
    return np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)), np.concatenate(labels)


def _cifar(variant: str, root: Optional[str], split: str, download: bool = False) -> ArrayDataset:
    if variant == "cifar10":
        sub, files = "cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
        label_key, classes, mean, std = "labels", 10, CIFAR10_MEAN, CIFAR10_STD
    else:
        sub, files = "cifar-100-python", (["train"], ["test"])
        label_key, classes, mean, std = "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD
    wanted = files[0] if split == "train" else files[1]
    searched: List[Path] = []
    for d in data_dirs(root):
        # Accept both the data dir (torchvision layout) and the batch folder itself.
        for folder in (d / sub, d):
            searched.append(folder)
            if all((folder / f).is_file() for f in wanted):
                images, labels = _read_cifar(folder, wanted, label_key)
                return ArrayDataset(images, labels, classes, mean, std, name=f"{variant}-{split}")
    if download:
        import torchvision  # lazily: only needed to download

        target = data_dirs(root)[0]
        cls = torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(str(target), train=split == "train", download=True)
        except Exception as e:  # offline, proxy, disk full: say what was tried
            raise _not_found(variant, searched, f"download into {target} failed ({e}); copy the torchvision layout there") from e
        return _cifar(variant, str(target), split, download=False)
    raise _not_found(
        variant,
        searched,
        f"put torchvision's '{sub}/' folder ({', '.join(files[0] + files[1])}) under a data dir "
        f"({_DATA_DIR_HOW}). With internet, torchvision fetches it: `python -c \"import torchvision; "
        f"torchvision.datasets.{'CIFAR10' if variant == 'cifar10' else 'CIFAR100'}('DIR', download=True)\"`, "
        f"then pass --data-dir DIR (in Python: {variant}(download=True)).",
    )


@register_dataset("cifar10")
def cifar10(root: Optional[str] = None, split: str = "train", download: bool = False) -> ArrayDataset:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` pickles."""
    return _cifar("cifar10", root, split, download)


@register_dataset("cifar100")
def cifar100(root: Optional[str] = None, split: str = "train", download: bool = False) -> ArrayDataset:
    """CIFAR-100 (fine labels) from torchvision's ``cifar-100-python`` pickles."""
    return _cifar("cifar100", root, split, download)


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (optionally gzip-compressed) into a numpy array.

    Raises:
        ValueError: The file is not a uint8 IDX file.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    # A copy: frombuffer views are read-only, which torch.from_numpy warns about.
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


@register_dataset("fashion_mnist")
def fashion_mnist(root: Optional[str] = None, split: str = "train") -> ArrayDataset:
    """Fashion-MNIST from IDX files (``.gz`` or raw), 28x28x1.

    Searched in each data dir (as ``fashion-mnist/``, ``fashion_mnist/``,
    torchvision's ``FashionMNIST/raw/`` or the dir itself), then in
    :data:`DEBIAN_FASHION_MNIST`.
    """
    prefix = "train" if split == "train" else "t10k"
    img_stem, lab_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    candidates: List[Path] = []
    for d in data_dirs(root):
        candidates += [d / "fashion-mnist", d / "fashion_mnist", d / "FashionMNIST" / "raw", d]
    candidates.append(Path(DEBIAN_FASHION_MNIST))
    for folder in candidates:
        img, lab = _find_idx(folder, img_stem), _find_idx(folder, lab_stem)
        if img and lab:
            images, labels = read_idx(img), read_idx(lab)
            return ArrayDataset(
                np.ascontiguousarray(images[..., None]), labels.astype(np.int64), 10,
                FASHION_MNIST_MEAN, FASHION_MNIST_STD, name=f"fashion_mnist-{split}",
            )
    raise _not_found(
        "fashion_mnist",
        candidates,
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs {DEBIAN_FASHION_MNIST}) or put "
        f"{img_stem}[.gz] and {lab_stem}[.gz] in <data dir>/fashion-mnist/.",
    )


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def _scan_folder(split_dir: Path, classes: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    paths, labels = [], []
    for label, cls in enumerate(classes):
        cls_dir = split_dir / cls
        if not cls_dir.is_dir():
            continue
        for f in sorted(cls_dir.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                paths.append(str(f))
                labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64)


@register_dataset("imagenet")
def image_folder(
    root: Optional[str] = None, split: str = "train", image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
) -> FolderDataset:
    """ImageNet-style class folders: ``<dir>/train/<class>/*.JPEG`` and ``<dir>/val/<class>/...``.

    ``<dir>`` is ``root`` itself or ``imagenet/`` under a data dir. The test
    split reads ``val/`` (or ``test/``). Classes are the sorted folder names of
    ``train/``, so labels agree between splits.
    """
    searched: List[Path] = []
    for d in data_dirs(root):
        for base in (d, d / "imagenet"):
            searched.append(base / "train")
            train_dir = base / "train"
            if not train_dir.is_dir():
                continue
            classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
            split_dirs = [train_dir] if split == "train" else [base / "val", base / "test"]
            for split_dir in split_dirs:
                searched.append(split_dir)
                if split_dir.is_dir():
                    paths, labels = _scan_folder(split_dir, classes)
                    if paths:
                        return FolderDataset(paths, labels, classes, tuple(mean), tuple(std), image_size,
                                             name=f"imagenet-{split}")
    raise _not_found(
        "imagenet",
        searched,
        "download ImageNet (image-net.org, needs an account) and lay it out as "
        "<dir>/train/<class>/*.JPEG and <dir>/val/<class>/*.JPEG, with <dir> a data dir or "
        f"<data dir>/imagenet (a data dir: {_DATA_DIR_HOW}).",
    )


# ----------------------------------------------------------------------------- synthetic


@register_dataset("synthetic")
def synthetic(
    root: Optional[str] = None, split: str = "train", num_samples: int = 50000,
    image_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, seed: int = 0,
) -> ArrayDataset:
    """Uniform random uint8 images and labels from a seed (for benchmarks and tests).

    Args:
        root: Ignored (nothing is read).
        split: ``"train"`` or ``"test"``; the test split uses a different stream.
        num_samples: Number of images.
        image_shape: ``(H, W, C)``.
        num_classes: Labels are uniform in ``[0, num_classes)``.
        seed: Generator seed.
    """
    h, w, c = (int(v) for v in image_shape)
    rng = np.random.default_rng([int(seed), _SPLITS.index(split)])
    images = rng.integers(0, 256, size=(num_samples, h, w, c), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    return ArrayDataset(images, labels, num_classes, (UNIFORM_U8_MEAN,) * c, (UNIFORM_U8_STD,) * c,
                        name=f"synthetic-{split}")
