"""Data: datasets by name, the train/dev split and the loaders that feed the GPU.

Typical use::

    from bnao.data import create_dataset, split_train_dev, create_loader, AugmentConfig

    train, dev = split_train_dev(create_dataset("cifar10", split="train"))  # 45k / 5k
    loader = create_loader("auto", train, 64, device="cuda", augment=AugmentConfig(cutout=16))
    for images, labels in loader:  # float32 [64, 3, 32, 32] and int64 [64] on the GPU
        ...
"""

from .augment import NO_AUGMENT, AugmentConfig
from .datasets import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    ArrayDataset,
    DatasetNotFoundError,
    FolderDataset,
    create_dataset,
    data_dirs,
    list_datasets,
    register_dataset,
)
from .loaders import (
    LOADERS,
    Loader,
    LoaderUnavailableError,
    available_loaders,
    choose_loader,
    create_loader,
    list_loaders,
    register_loader,
)
from .splits import split_train_dev

__all__ = [
    "AugmentConfig", "NO_AUGMENT", "ArrayDataset", "FolderDataset", "DatasetNotFoundError",
    "DATASETS", "DEBIAN_FASHION_MNIST", "create_dataset", "register_dataset", "list_datasets", "data_dirs",
    "split_train_dev", "LOADERS", "Loader", "LoaderUnavailableError", "create_loader", "register_loader",
    "list_loaders", "available_loaders", "choose_loader",
]
