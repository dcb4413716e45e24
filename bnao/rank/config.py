"""Configuration of ``bnao rank``: defaults, presets in ``configs/rank/``, ``key=value`` overrides.

The machinery (type checks, unknown keys refused with the closest valid one,
YAML presets) is the search's (:mod:`bnao.search.config`) with its own
:data:`RANK_SCHEMA`. :func:`check_config` adds what the types cannot say
(lists of epochs and seeds, names of samplers and modes).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

from ..search.config import ConfigError, ConfigSchema, list_presets, load_config

_OPTIONAL_TYPES: Dict[str, Tuple[type, ...]] = {
    "cache": (str,),
    "data.root": (str,),
    "data.train_limit": (int,),
    "data.test_limit": (int,),
    "supernet.steps_per_epoch": (int,),
}

RANK_DEFAULTS: Dict[str, Any] = {
    "device": "auto",  # auto | cpu | cuda | cuda:N
    # Folder of the ground-truth cache (None: ~/.cache/bnao/rank, or $BNAO_RANK_CACHE).
    "cache": None,
    "data": {
        "dataset": "fashion_mnist",
        "root": None,
        # Held out of the training split; the one-shot scores are measured on it.
        "dev_fraction": 0.1,
        "split_seed": 0,  # the train/dev split (fixed: every seed sees the same data)
        "train_limit": None,  # first N images of the training split only (quick runs)
        "test_limit": None,  # first N images of the test split only (quick runs)
        "loader": "auto",
        "augment": True,  # random crop (pad 4) and flip, for both the stand-alone nets and the supernet
        # Shape of `dataset: synthetic` (random images, for tests without real data).
        "synthetic_samples": 2000,
        "synthetic_size": 16,
        "synthetic_channels": 1,
        "synthetic_classes": 10,
    },
    "space": {"name": "nao", "op_set": "small", "num_nodes": 5},
    "archs": {
        "count": 50,
        "seed": 0,
        # diverse: plain random draws; similar: only archs within +-band (relative) of the median size
        # of `candidates` random draws.
        "mode": "diverse",
        "band": 0.1,
        "candidates": 5000,
    },
    "ground_truth": {
        "layers": 1,
        "channels": 8,
        "epochs": 3,
        "batch_size": 128,
        "lr_max": 0.025,
        "lr_min": 0.0,
        "momentum": 0.9,
        "weight_decay": 3e-4,
        "grad_clip": 5.0,
        "drop_path_keep_prob": 1.0,  # 1.0 = off
        "seed": 0,
        # Accuracy reported as ground truth: on the test split (never seen by the one-shot side) or on dev.
        "eval_split": "test",
        "workers": 2,  # processes training archs side by side, one CPU thread each
    },
    "supernet": {
        "layers": 1,
        "channels": 8,
        "batch_size": 64,
        # Scored after each of these epoch counts.
        "epochs": [1, 2, 4, 8],
        # shared: one run per (sampler, seed) to max(epochs), its schedule spanning max(epochs), scored at
        # every count on the way; separate: one run per count, its schedule spanning that count (the paper).
        "schedule": "shared",
        "steps_per_epoch": None,  # default: training images // batch size
        # Cosine lr constant within each epoch (the reference's per-epoch scheduler) or per step.
        "lr_schedule": "epoch",
        "lr_max": 0.025,
        "lr_min": 0.001,
        "momentum": 0.9,
        "weight_decay": 3e-4,
        "grad_clip": 5.0,
        "drop_path_keep_prob": 0.9,
        "eval_batch_size": 500,
        "eval_batches": 1,
        # Main results: "random" (a fresh random dev batch per arch, the reference) or "fixed".
        "eval_data": "random",
        "unused_slot_update": "decay",  # decay (the reference) | freeze
        "seeds": [0, 1, 2],
        "workers": 2,  # processes training supernets side by side, one CPU thread each
    },
    "sampler": {
        "names": ["uniform", "proportional"],
        "alpha": 1.0,
        "size_measure": "params",  # params | madds, of the stand-alone net at the supernet's N and C
    },
    # One extra comparison each, at the largest epoch count and the first seed:
    "variants": {
        # Also score every run with the other evaluation data (no extra training).
        "eval_data": True,
        # Also train one run per sampler with the other unused-slot update.
        "unused_slot_update": True,
    },
}

#: The schema of ``bnao rank`` configurations (presets in ``configs/rank/``).
RANK_SCHEMA = ConfigSchema(RANK_DEFAULTS, _OPTIONAL_TYPES, preset_subdir="rank")

_CHOICES = {
    "archs.mode": ("diverse", "similar"),
    "ground_truth.eval_split": ("test", "dev"),
    "supernet.schedule": ("shared", "separate"),
    "supernet.lr_schedule": ("epoch", "step"),
    "supernet.eval_data": ("random", "fixed"),
    "supernet.unused_slot_update": ("decay", "freeze"),
    "sampler.size_measure": ("params", "madds"),
}
_POSITIVE = ("archs.count", "archs.candidates", "ground_truth.layers", "ground_truth.channels",
             "ground_truth.epochs", "ground_truth.batch_size", "ground_truth.workers", "supernet.layers",
             "supernet.channels", "supernet.batch_size", "supernet.eval_batch_size", "supernet.eval_batches",
             "supernet.workers")


def _get(config: Dict[str, Any], key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _int_list(config: Dict[str, Any], key: str, minimum: int) -> None:
    values = _get(config, key)
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if (not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values)
            or len(set(values)) != len(values)):
        raise ConfigError(f"config key {key!r} expects a list of distinct integers >= {minimum}, got {values!r}")
    section, leaf = key.rsplit(".", 1)
    _get(config, section)[leaf] = sorted(values) if key == "supernet.epochs" else list(values)


def check_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Checks the values the key types cannot (lists, names, ranges); returns the config, lists normalised.

    Raises:
        ConfigError: With the key and what it accepts.
    """
    for key, allowed in _CHOICES.items():
        if _get(config, key) not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}; got {_get(config, key)!r}")
    for key in _POSITIVE:
        if _get(config, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {_get(config, key)!r}")
    _int_list(config, "supernet.epochs", 1)
    _int_list(config, "supernet.seeds", 0)
    names = config["sampler"]["names"]
    if isinstance(names, str):
        names = config["sampler"]["names"] = [names]
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"config key 'sampler.names' expects a list of distinct sampler names, got {names!r}")
    if config["archs"]["count"] < 3:
        raise ConfigError("config key 'archs.count' must be >= 3 (a ranking correlation over fewer means little)")
    if not 0.0 < config["archs"]["band"] < 1.0:
        raise ConfigError(f"config key 'archs.band' must be in (0, 1), got {config['archs']['band']!r}")
    for key in ("data.train_limit", "data.test_limit"):  # None: the whole split; 0 must not mean that too
        if _get(config, key) is not None and _get(config, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1 (or null for the whole split), got {_get(config, key)!r}")
    if not 0.0 < config["data"]["dev_fraction"] < 1.0:
        raise ConfigError(f"config key 'data.dev_fraction' must be in (0, 1), got {config['data']['dev_fraction']!r}")
    return config


def load_rank_config(preset: Optional[str] = None, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Defaults, then a preset (``configs/rank/<name>.yaml``) or YAML file, then ``key=value`` overrides.

    Raises:
        ConfigError: Unknown preset or key (the closest valid one named), wrong type or value.
    """
    return check_config(load_config(preset, overrides, schema=RANK_SCHEMA))


def list_rank_presets() -> list:
    """Names of the ``bnao rank`` presets."""
    return list_presets(RANK_SCHEMA)


__all__ = ["RANK_DEFAULTS", "RANK_SCHEMA", "check_config", "list_rank_presets", "load_rank_config"]
