"""Range checks of a search configuration, run once before any work (:func:`check_config`).

The key types are checked when the config is read (:mod:`bnao.search.config`); these are the ranges the
types cannot say, each refused with the key, the bad value and what it accepts.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

from .config import ConfigError, flatten

__all__ = ["check_config"]


# Allowed ranges of the numeric keys: (low, high, low inclusive, high inclusive); None = unbounded. A key
# whose default is None is checked only when set. The types are already checked by :func:`_coerce`.
_AT_LEAST_1 = (1, None, True, False)
_AT_LEAST_0 = (0, None, True, False)
_POSITIVE = (0, None, False, False)
_FRACTION = (0, 1, True, True)  # [0, 1]
_PROBABILITY_OPEN_HIGH = (0, 1, True, False)  # [0, 1): 1 would drop or smooth everything
_KEEP_PROBABILITY = (0, 1, False, True)  # (0, 1]: 0 would drop every path
_RANGES: Dict[str, Tuple[Optional[float], Optional[float], bool, bool]] = {
    "seed": _AT_LEAST_0,
    "threads": _AT_LEAST_0,
    "data.dev_fraction": (0, 1, False, False),
    "data.cutout": _AT_LEAST_0,
    "data.train_limit": _AT_LEAST_1,
    "data.synthetic_samples": _AT_LEAST_1,
    "data.synthetic_size": _AT_LEAST_1,
    "data.synthetic_channels": _AT_LEAST_1,
    "data.synthetic_classes": _AT_LEAST_1,
    "space.num_nodes": _AT_LEAST_1,
    "supernet.layers": _AT_LEAST_1,
    "supernet.channels": _AT_LEAST_1,
    "supernet.batch_size": _AT_LEAST_1,
    "supernet.epochs": _AT_LEAST_1,
    "supernet.steps_per_epoch": _AT_LEAST_1,
    "supernet.lr_max": _POSITIVE,
    "supernet.lr_min": _AT_LEAST_0,
    "supernet.momentum": _FRACTION,
    "supernet.weight_decay": _AT_LEAST_0,
    "supernet.grad_clip": _AT_LEAST_0,
    "supernet.drop_path_keep_prob": _KEEP_PROBABILITY,
    "supernet.label_smoothing": _PROBABILITY_OPEN_HIGH,
    "supernet.eval_batch_size": _AT_LEAST_1,
    "supernet.eval_batches": _AT_LEAST_1,
    "supernet.checkpoint_every": _AT_LEAST_1,
    "sampler.alpha": (None, None, False, False),  # any finite number (negative favours small archs)
    "sampler.uniform_mix": _FRACTION,
    "sampler.size_layers": _AT_LEAST_1,
    "sampler.size_channels": _AT_LEAST_1,
    "controller.epochs": _AT_LEAST_1,
    "controller.batch_size": _AT_LEAST_1,
    "controller.lr": _POSITIVE,
    "controller.trade_off": _FRACTION,
    "controller.mlp_layers": _AT_LEAST_0,
    "controller.mlp_hidden": _AT_LEAST_1,
    "controller.embedding_size": _AT_LEAST_1,
    "controller.hidden_size": _AT_LEAST_1,
    "controller.expand": _AT_LEAST_1,
    "search.iterations": _AT_LEAST_0,
    "search.top_k": _AT_LEAST_1,
    "search.new_per_iteration": _AT_LEAST_1,
    "search.min_params": _POSITIVE,
    "search.max_params": _POSITIVE,
    "search.min_madds": _POSITIVE,
    "search.max_madds": _POSITIVE,
    "distributed.timeout_s": _POSITIVE,
    "final.rerank_top": _AT_LEAST_1,
    "final.epochs": _AT_LEAST_1,
    "final.layers": _AT_LEAST_1,
    "final.channels": _AT_LEAST_1,
    "final.batch_size": _AT_LEAST_1,
    "final.lr_max": _POSITIVE,
    "final.lr_min": _AT_LEAST_0,
    "final.weight_decay": _AT_LEAST_0,
    "final.auxiliary_weight": _AT_LEAST_0,
    "final.drop_path_keep_prob": _KEEP_PROBABILITY,
    "final.dropout": _PROBABILITY_OPEN_HIGH,
    "final.cutout": _AT_LEAST_0,
    "final.full_epochs": _AT_LEAST_0,
}

# What a value at the edge of its range means, said with the refusal so that the fix is clear.
_HINTS: Dict[str, str] = {
    "threads": "0 keeps torch's default",
    "data.train_limit": "leave it unset (null) to use every training image",
    "search.iterations": "0 runs one round without the controller",
    "search.pool_size": "or give an initial pool with --pool",
    "supernet.grad_clip": "0 turns clipping off; a negative norm would turn the step into gradient ascent",
    "final.full_epochs": "0 skips the winner's final training",
    "supernet.steps_per_epoch": "leave it unset (null) for training images // batch size",
}


def _describe_range(low: Optional[float], high: Optional[float], low_in: bool, high_in: bool) -> str:
    """``>= 1``, ``> 0`` or ``in (0, 1]``."""
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _check_range(key: str, value: Any, bounds: Tuple[Optional[float], Optional[float], bool, bool]) -> None:
    """Refuses ``value`` of ``key`` outside ``bounds`` (NaN and infinities too), naming the key and the fix."""
    low, high, low_in, high_in = bounds
    finite = math.isfinite(value)
    inside = finite and (low is None or (value >= low if low_in else value > low)) and (
        high is None or (value <= high if high_in else value < high))
    if inside:
        return
    want = _describe_range(low, high, low_in, high_in) if low is not None else "a finite number"
    hint = f" ({_HINTS[key]})" if key in _HINTS else ""
    raise ConfigError(f"config key {key!r} must be {want}, got {value!r}{hint}")


def check_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Checks the ranges the key types cannot say, before any work; returns ``config``.

    Every numeric key is checked here at once, so that a bad value is refused before the search runs and
    writes its run directory, not when the phase that reads it starts hours later.

    Args:
        config: A resolved search configuration (see :func:`load_config`).

    Returns:
        ``config`` (unchanged).

    Raises:
        ConfigError: Naming the key, the bad value and the allowed range.
    """
    flat = flatten(config)
    for key, bounds in _RANGES.items():
        if flat.get(key) is not None:
            _check_range(key, flat[key], bounds)
    if not flat["search.pool_file"]:  # the pool size counts only for a random first pool
        _check_range("search.pool_size", flat["search.pool_size"], _AT_LEAST_1)
    for section in ("supernet", "final"):
        low, high = flat[f"{section}.lr_min"], flat[f"{section}.lr_max"]
        if low > high:
            raise ConfigError(f"config key '{section}.lr_min' ({low!r}) must not exceed '{section}.lr_max' "
                              f"({high!r}): the cosine schedule goes from lr_max down to lr_min")
    return config
