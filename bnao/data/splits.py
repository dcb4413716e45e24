"""The reference's train/dev split (45k/5k of CIFAR-10's 50k training images)."""

from __future__ import annotations

from typing import Optional, Tuple, TypeVar

import numpy as np

D = TypeVar("D")


def split_train_dev(dataset: D, dev_size: Optional[int] = None, dev_fraction: float = 0.1,
                    seed: int = 0) -> Tuple[D, D]:
    """Splits a training set into (train, dev) by a seeded permutation.

    The dev set is the first ``dev_size`` indices of a permutation drawn from
    ``seed`` (5,000 of CIFAR-10's 50,000 by default, leaving the reference's
    45,000 for training); the same seed always gives the same split. Both
    parts keep the original order of their images, which keeps reads local.

    Args:
        dataset: An :class:`~bnao.data.ArrayDataset` or
            :class:`~bnao.data.FolderDataset` (anything with ``len`` and
            ``subset(indices, name)``).
        dev_size: Number of dev images; overrides ``dev_fraction``.
        dev_fraction: Fraction of the images held out (rounded to the nearest
            integer) when ``dev_size`` is None.
        seed: Permutation seed.

    Returns:
        ``(train, dev)`` datasets, disjoint, together covering ``dataset``.

    Raises:
        ValueError: The split would leave either part empty.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if dev_size is None and not 0.0 < dev_fraction < 1.0:  # also NaN, which int(round(...)) cannot take
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    k = int(round(n * dev_fraction)) if dev_size is None else int(dev_size)
    if not 0 < k < n:
        raise ValueError(f"dev size must be in (0, {n}), got {k}")
    perm = np.random.default_rng(seed).permutation(n)
    dev_idx, train_idx = np.sort(perm[:k]), np.sort(perm[k:])
    name = getattr(dataset, "name", "data")
    return (dataset.subset(train_idx, name=f"{name}/train"),  # type: ignore[attr-defined]
            dataset.subset(dev_idx, name=f"{name}/dev"))  # type: ignore[attr-defined]
