"""What every part of the ranking experiment shares: the data, the archs and their sizes.

Everything here is a pure function of the configuration, so the worker
processes that train ground-truth nets and supernets rebuild the same data
from the config instead of receiving it through a pipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Dict, Optional

import numpy as np

from ..data import create_dataset, split_train_dev
from ..size import image_side, model_size
from ..space import NAOSpace, create_search_space


@dataclasses.dataclass
class RankData:
    """The splits of one experiment.

    Attributes:
        train: What the stand-alone nets and the supernet train on.
        dev: Held out of the training split; the one-shot scores are measured on it.
        test: The test split (None when the ground truth is measured on dev).
        num_classes: Classes of the dataset.
        in_channels: Image channels.
        image_size: Image side (for multiply-adds).
    """

    train: Any
    dev: Any
    test: Optional[Any]
    num_classes: int
    in_channels: int
    image_size: int

    @property
    def ground_truth_eval(self) -> Any:
        """The split the ground-truth accuracy is measured on."""
        return self.test if self.test is not None else self.dev


def make_space(config: Dict[str, Any]) -> NAOSpace:
    """The search space of the config."""
    sc = config["space"]
    return create_search_space(sc["name"], op_set=sc["op_set"], num_nodes=sc["num_nodes"])


def _limit(dataset: Any, limit: Optional[int]) -> Any:
    if limit is None:
        return dataset
    return dataset.subset(np.arange(min(int(limit), len(dataset))), dataset.name)


def load_data(config: Dict[str, Any]) -> RankData:
    """Training split cut into train and dev by ``data.split_seed``; the test split when the ground truth uses it.

    Raises:
        bnao.data.DatasetNotFoundError: The dataset is not on this machine (the message says how to get it).
    """
    dc = config["data"]
    options: Dict[str, Any] = {}
    if dc["dataset"] == "synthetic":
        side, channels = int(dc["synthetic_size"]), int(dc["synthetic_channels"])
        options = dict(num_samples=int(dc["synthetic_samples"]), image_shape=(side, side, channels),
                       num_classes=int(dc["synthetic_classes"]), seed=int(dc["split_seed"]))
    full = _limit(create_dataset(dc["dataset"], root=dc["root"], split="train", **options), dc["train_limit"])
    train, dev = split_train_dev(full, dev_fraction=float(dc["dev_fraction"]), seed=int(dc["split_seed"]))
    test = None
    if config["ground_truth"]["eval_split"] == "test":
        test = _limit(create_dataset(dc["dataset"], root=dc["root"], split="test", **options), dc["test_limit"])
    shape = getattr(full, "image_shape", None)
    in_channels = int(shape[-1]) if shape is not None and not isinstance(shape, int) else 3
    # The rank study's networks use the cifar skeleton (model_size, the ground truth and the supernet below).
    return RankData(train, dev, test, int(full.num_classes), in_channels, image_side(full, "cifar"))


def fingerprint(dataset: Any) -> str:
    """A short content hash of a dataset (images and labels), part of the ground-truth cache key."""
    digest = hashlib.sha256()
    digest.update(str(getattr(dataset, "name", "")).encode())
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if images is not None:
        digest.update(np.ascontiguousarray(images).tobytes())
    else:  # folder datasets: the file list stands for the content
        digest.update("\n".join(map(str, getattr(dataset, "files", []))).encode())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels).tobytes())
    digest.update(str(len(dataset)).encode())
    return digest.hexdigest()[:16]


def draw_archs(config: Dict[str, Any], space: NAOSpace, data: RankData) -> np.ndarray:
    """The experiment's archs (``int64 [n, 8B]``), distinct, drawn from ``archs.seed``.

    ``diverse``: plain uniform draws from the space. ``similar``: ``archs.candidates``
    uniform draws, of which the first ``count`` whose size (at the supernet's N
    and C) lies within ``+-band`` of the candidates' median size.

    Raises:
        ValueError: ``similar`` found fewer than ``count`` archs in the band (the message says what to raise).
    """
    ac = config["archs"]
    count = int(ac["count"])
    rng = np.random.default_rng(int(ac["seed"]))
    pool = space.sample_array(max(int(ac["candidates"]), 4 * count), rng=rng)
    _, first = np.unique(space.hash_array(pool), return_index=True)
    pool = pool[np.sort(first)]  # distinct archs, in draw order
    if ac["mode"] == "similar":
        sizes = sampling_sizes(config, space, pool, data)
        median = float(np.median(sizes))
        keep = np.abs(sizes / median - 1.0) <= float(ac["band"])
        pool = pool[keep]
        if len(pool) < count:
            raise ValueError(f"only {len(pool)} of {ac['candidates']} candidate archs lie within +-{ac['band']:.0%} of "
                             f"the median size {median:,.0f}; raise archs.candidates or archs.band")
    return pool[:count].astype(np.int64)


def sampling_sizes(config: Dict[str, Any], space: NAOSpace, archs: np.ndarray, data: RankData) -> np.ndarray:
    """Model size of each arch's stand-alone net at the supernet's N and C (the proportional sampler's weights)."""
    sn = config["supernet"]
    return model_size(archs, space=space, skeleton="cifar", layers=int(sn["layers"]), channels=int(sn["channels"]),
                      classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size,
                      measure=config["sampler"]["size_measure"]).astype(np.float64)


__all__ = ["RankData", "draw_archs", "fingerprint", "load_data", "make_space", "sampling_sizes"]
