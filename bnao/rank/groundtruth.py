"""Ground truth: each arch trained stand-alone, its accuracy cached.

A cache entry is one small JSON file, ``<cache>/ground_truth/<arch hash>-<settings hash>.json``,
written atomically (temporary file, then rename) as soon as its arch finishes,
so an interrupted run loses only the archs still training. The settings hash
covers everything the accuracy depends on: the training settings, the search
space, and the data (dataset, split, limits, and a content hash of the
training and evaluation images). The arch hash is the space's canonical hash,
so an arch written with its node branches swapped hits the same entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..device import resolve_device
from ..train.api import train_standalone
from .common import RankData, fingerprint
from .workers import run_jobs

#: Cache format; bump when the meaning of an entry changes.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$BNAO_RANK_CACHE``, else ``~/.cache/bnao/rank``."""
    env = os.environ.get("BNAO_RANK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bnao" / "rank"


def training_settings(config: Dict[str, Any], data: RankData) -> Dict[str, Any]:
    """The :func:`~bnao.train.train_standalone` settings of every ground-truth net."""
    gt = config["ground_truth"]
    keep = float(gt["drop_path_keep_prob"])
    device = resolve_device(config["device"])
    return dict(
        skeleton="cifar", layers=int(gt["layers"]), channels=int(gt["channels"]), num_classes=data.num_classes,
        in_channels=data.in_channels, epochs=int(gt["epochs"]), batch_size=int(gt["batch_size"]),
        lr_max=float(gt["lr_max"]), lr_min=float(gt["lr_min"]), momentum=float(gt["momentum"]),
        weight_decay=float(gt["weight_decay"]), grad_clip=float(gt["grad_clip"]) or None,
        drop_path_keep_prob=None if keep >= 1.0 else keep, augment=bool(config["data"]["augment"]),
        # Channels-last halves the CPU cost of these nets' depthwise convs (measured); it is part of the key.
        channels_last=device.type == "cpu", seed=int(gt["seed"]), eval_every=0, loader=config["data"]["loader"],
    )


def settings_key(config: Dict[str, Any], data: RankData, space_config: Dict[str, Any]) -> Dict[str, Any]:
    """Everything a ground-truth accuracy depends on besides the arch."""
    settings = training_settings(config, data)
    settings.pop("loader")  # how batches are delivered, not which: every loader yields the same batches
    dc = config["data"]
    return {
        "version": CACHE_VERSION,
        "training": settings,
        "space": space_config,
        "data": {
            "dataset": dc["dataset"], "split_seed": int(dc["split_seed"]), "dev_fraction": float(dc["dev_fraction"]),
            "eval_split": config["ground_truth"]["eval_split"], "train": fingerprint(data.train),
            "eval": fingerprint(data.ground_truth_eval), "train_images": len(data.train),
            "eval_images": len(data.ground_truth_eval),
        },
        "device": resolve_device(config["device"]).type,
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class GroundTruthCache:
    """Ground-truth accuracies on disk, one atomic JSON file per (arch, settings).

    Args:
        folder: The cache folder (``ground_truth/`` is created inside).
        key: :func:`settings_key` of the experiment.
    """

    def __init__(self, folder: os.PathLike, key: Dict[str, Any]):
        self.folder = Path(folder) / "ground_truth"
        self.key = key
        self.key_hash = _digest(key)

    def path(self, arch_hash: str) -> Path:
        """The entry file of an arch."""
        return self.folder / f"{arch_hash}-{self.key_hash}.json"

    def get(self, arch_hash: str) -> Optional[Dict[str, Any]]:
        """The entry of an arch, or None (a damaged entry counts as missing and is retrained)."""
        try:
            entry = json.loads(self.path(arch_hash).read_text())
        except (OSError, ValueError):
            return None
        return entry if entry.get("key") == self.key and entry.get("accuracy") is not None else None

    def put(self, arch_hash: str, entry: Dict[str, Any]) -> None:
        """Writes an entry atomically: a reader sees the old file or the whole new one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = dict(entry, key=self.key)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(arch_hash))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def train_one(state: Dict[str, Any], job: Dict[str, Any]) -> Dict[str, Any]:
    """Trains one arch stand-alone (a :func:`~bnao.rank.workers.run_jobs` job)."""
    config, data, space = state["config"], state["data"], state["space"]
    result = train_standalone(job["arch"], space, data.train, data.ground_truth_eval,
                              device=resolve_device(config["device"]), **training_settings(config, data))
    return {"accuracy": float(result["eval_acc"]), "loss": float(result["eval_loss"]),
            "train_loss": float(result["train_loss"]), "params": int(result["params"]),
            "epochs": int(result["epochs"]), "seconds": float(result["seconds"])}


def ground_truth(archs: Sequence[str], hashes: Sequence[str], state: Dict[str, Any], cache: GroundTruthCache, *,
                 echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Ground-truth accuracy of every arch: from the cache, or trained (in parallel) and cached.

    Returns:
        ``{"entries": [per arch: accuracy, params, ...], "trained": archs trained now, "cache_hits": n,
        "seconds": wall time of the training, "arch_epochs_per_s": throughput (None when nothing trained)}``.
    """
    config = state["config"]
    entries: List[Optional[Dict[str, Any]]] = [cache.get(h) for h in hashes]
    hits = sum(e is not None for e in entries)
    jobs = [{"index": i, "arch": archs[i]} for i, e in enumerate(entries) if e is None]
    epochs = int(config["ground_truth"]["epochs"])
    workers = int(config["ground_truth"]["workers"])
    echo(f"ground truth: {hits} of {len(archs)} archs cached; training {len(jobs)} for {epochs} epochs "
         f"on {len(state['data'].train):,} images ({workers} workers)")
    start = time.perf_counter()
    device = resolve_device(config["device"])
    for done, (job, result) in enumerate(run_jobs(train_one, jobs, state, workers, device), 1):
        entry = dict(result, arch=job["arch"], hash=hashes[job["index"]])
        cache.put(hashes[job["index"]], entry)
        entries[job["index"]] = entry
        elapsed = time.perf_counter() - start
        echo(f"  [{done}/{len(jobs)}] acc {result['accuracy']:.4f}  {result['params']:,} params  "
             f"{result['seconds']:.0f} s  ({done * epochs / elapsed:.3f} arch-epochs/s overall)")
    seconds = time.perf_counter() - start
    rate = len(jobs) * epochs / seconds if jobs else None
    if jobs:
        echo(f"ground truth: {len(jobs)} archs x {epochs} epochs in {seconds:.0f} s = {rate:.3f} arch-epochs/s")
    return {"entries": entries, "trained": len(jobs), "cache_hits": hits, "seconds": seconds,
            "arch_epochs_per_s": rate, "accuracy": np.asarray([e["accuracy"] for e in entries])}


__all__ = ["CACHE_VERSION", "GroundTruthCache", "default_cache_dir", "ground_truth", "settings_key",
           "train_one", "training_settings"]
