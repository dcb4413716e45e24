"""Searches under a size budget (``search.max_params``, ``search.max_madds`` and their ``min_`` twins).

A budget is measured on the network the user will train: the final
network's ``N`` and ``C`` (``final.layers`` / ``final.channels``, default the
supernet's), at the data's image size for multiply-adds, with exact sizes from
:func:`bnao.model_size`. The search keeps every arch of its pool inside the
budget: the initial pool is drawn by rejection sampling, and generated or
mutated archs outside it are not accepted, so the sampler's weights, the
top-K seeds, the re-rank and the final pick all see in-budget archs only.

A budget no arch of the space can meet is refused before any training, with
the smallest and largest sizes of the space at that network shape
(:func:`bnao.size.extremes.size_extremes`, exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..extension import has_kernel
from ..size import model_size
from ..size.extremes import size_extremes
from ..space import NAOSpace

BUDGET_KEYS = ("min_params", "max_params", "min_madds", "max_madds")
_UNITS = {"params": "parameters", "madds": "multiply-adds"}


class BudgetError(ValueError):
    """A budget is malformed, cannot be met by the space, or too tight to fill the pool."""


def _human(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:g}"


@dataclass(frozen=True)
class Budget:
    """Bounds on the final network's parameters and multiply-adds (None: unbounded).

    Attributes:
        space: The search space.
        skeleton, layers, channels, classes, in_channels, image_size: The final network's shape.
        min_params, max_params, min_madds, max_madds: Inclusive bounds.
    """

    space: NAOSpace
    skeleton: str
    layers: int
    channels: int
    classes: int
    in_channels: int
    image_size: int
    min_params: Optional[float] = None
    max_params: Optional[float] = None
    min_madds: Optional[float] = None
    max_madds: Optional[float] = None

    @classmethod
    def from_config(cls, config: Dict[str, Any], space: NAOSpace, classes: int, in_channels: int,
                    image_size: int) -> "Budget":
        """The budget of a search configuration (``search.*`` bounds, shape of ``final.*``).

        Raises:
            BudgetError: A bound is not a positive finite number, or a minimum exceeds its maximum.
        """
        search = config["search"]
        bounds = {}
        for key in BUDGET_KEYS:
            value = search.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise BudgetError(f"search.{key} must be a positive number such as 3.5e6, got {value!r}")
            bounds[key] = None if value is None else float(value)
        for measure in _UNITS:
            low, high = bounds[f"min_{measure}"], bounds[f"max_{measure}"]
            if low is not None and high is not None and low > high:
                raise BudgetError(f"search.min_{measure}={low:g} is above search.max_{measure}={high:g}; "
                                  "swap them or drop one")
        return cls(space, config["supernet"]["skeleton"], int(config["final"]["layers"] or config["supernet"]["layers"]),
                   int(config["final"]["channels"] or config["supernet"]["channels"]), int(classes), int(in_channels),
                   int(image_size), **bounds)

    # ------------------------------------------------------------- queries
    @property
    def active(self) -> bool:
        """Whether any bound is set."""
        return any(getattr(self, key) is not None for key in BUDGET_KEYS)

    @property
    def measure(self) -> str:
        """The size the Pareto front uses: multiply-adds when only they are bounded, else parameters."""
        if self.min_params is None and self.max_params is None and (self.min_madds or self.max_madds):
            return "madds"
        return "params"

    def bounds(self, measure: str) -> Tuple[Optional[float], Optional[float]]:
        """``(min, max)`` of one measure."""
        return getattr(self, f"min_{measure}"), getattr(self, f"max_{measure}")

    def shape_text(self) -> str:
        """The network the budget is measured on, in words."""
        return (f"{self.skeleton} skeleton, N={self.layers}, C={self.channels}, {self.classes} classes, "
                f"{self.image_size}x{self.image_size} images")

    def describe(self) -> str:
        """E.g. ``params <= 3.5M and madds <= 600M``."""
        parts = []
        for measure in _UNITS:
            low, high = self.bounds(measure)
            if low is not None and high is not None:
                parts.append(f"{_human(low)} <= {measure} <= {_human(high)}")
            elif high is not None:
                parts.append(f"{measure} <= {_human(high)}")
            elif low is not None:
                parts.append(f"{measure} >= {_human(low)}")
        return " and ".join(parts) if parts else "no budget"

    def sizes(self, archs: np.ndarray) -> np.ndarray:
        """``int64 [n, 2]``: (parameters, multiply-adds) of the final network of every arch."""
        return model_size(np.asarray(archs, dtype=np.int64).reshape(-1, self.space.length), space=self.space,
                          skeleton=self.skeleton, layers=self.layers, channels=self.channels, classes=self.classes,
                          in_channels=self.in_channels, image_size=self.image_size, measure="both")

    def within(self, sizes: np.ndarray) -> np.ndarray:
        """Which rows of :meth:`sizes` output are inside the budget."""
        sizes = np.asarray(sizes).reshape(-1, 2)
        keep = np.ones(sizes.shape[0], dtype=bool)
        for column, measure in enumerate(_UNITS):
            low, high = self.bounds(measure)
            if low is not None:
                keep &= sizes[:, column] >= low
            if high is not None:
                keep &= sizes[:, column] <= high
        return keep

    def mask(self, archs: np.ndarray) -> np.ndarray:
        """Which archs are inside the budget (all of them when no bound is set)."""
        archs = np.asarray(archs, dtype=np.int64).reshape(-1, self.space.length)
        if not self.active:
            return np.ones(archs.shape[0], dtype=bool)
        return self.within(self.sizes(archs))

    def columns(self, archs: np.ndarray) -> Dict[str, np.ndarray]:
        """The ``pool.jsonl`` columns of the final network's sizes."""
        sizes = self.sizes(archs)
        return {"final_params": sizes[:, 0], "final_madds": sizes[:, 1]}

    # ------------------------------------------------------------ checks
    def check_feasible(self) -> None:
        """Refuses a budget that no arch of the space meets, naming the sizes the space covers.

        Raises:
            BudgetError: A maximum below the space's smallest size or a minimum above its largest.
        """
        if not self.active:
            return
        extremes = size_extremes(self.space, skeleton=self.skeleton, layers=self.layers, channels=self.channels,
                                 classes=self.classes, in_channels=self.in_channels, image_size=self.image_size)
        for measure, unit in _UNITS.items():
            low, high = self.bounds(measure)
            smallest, largest = extremes[measure].smallest, extremes[measure].largest
            covered = (f"the archs of this space ({self.space.op_set} ops, B={self.space.num_nodes}) have "
                       f"{smallest:,} to {largest:,} {unit} ({_human(smallest)} to {_human(largest)}) at the final "
                       f"network ({self.shape_text()})")
            if high is not None and high < smallest:
                raise BudgetError(f"search.max_{measure}={high:g} cannot be met: {covered}. Raise search.max_{measure} "
                                  f"to at least {smallest:,}, or lower final.layers / final.channels.")
            if low is not None and low > largest:
                raise BudgetError(f"search.min_{measure}={low:g} cannot be met: {covered}. Lower search.min_{measure} "
                                  f"to at most {largest:,}, or raise final.layers / final.channels.")

    def filter(self, archs: np.ndarray) -> Tuple[np.ndarray, int]:
        """``(archs inside the budget, number dropped)``."""
        archs = np.asarray(archs, dtype=np.int64).reshape(-1, self.space.length)
        keep = self.mask(archs)
        return archs[keep], int((~keep).sum())

    def draw(self, count: int, rng: np.random.Generator, max_draws: Optional[int] = None) -> np.ndarray:
        """``count`` distinct uniformly random archs inside the budget, by rejection sampling.

        Args:
            count: Archs wanted (distinct canonical hashes).
            rng: Random generator (seeded by the caller, so the pool is reproducible).
            max_draws: Random archs tried at most (default 10 million with the compiled size kernel,
                200,000 with the pure-Python reference).

        Raises:
            BudgetError: Fewer than ``count`` archs fit in ``max_draws`` tries (says how many of how many fit).
        """
        if max_draws is None:
            max_draws = 10_000_000 if has_kernel("model_size", "cpu") else 200_000
        batch = int(min(max(16 * count, 4096), 1_000_000, max_draws))
        found, hashes, tried, fitting = [], np.zeros(0, dtype=np.uint64), 0, 0
        while len(hashes) < count and tried < max_draws:
            archs = self.space.sample_array(min(batch, max_draws - tried), rng=rng)
            tried += archs.shape[0]
            archs = archs[self.mask(archs)]
            fitting += archs.shape[0]
            new_hashes = self.space.hash_array(archs)
            _, first = np.unique(new_hashes, return_index=True)
            first = np.sort(first)
            first = first[~np.isin(new_hashes[first], hashes)][: count - len(hashes)]
            found.append(archs[first])
            hashes = np.concatenate([hashes, new_hashes[first]])
        if len(hashes) < count:
            raise BudgetError(
                f"the budget ({self.describe()}, measured at the final network: {self.shape_text()}) is too tight to "
                f"fill the initial pool: {fitting:,} of {tried:,} random archs fit ({len(hashes):,} distinct), but "
                f"search.pool_size is {count:,}. Loosen the budget, lower search.pool_size, or give the archs in "
                "search.pool_file.")
        return np.concatenate(found)

    def restrict(self, archs: np.ndarray, source: str) -> Tuple[np.ndarray, Optional[str]]:
        """Leaves out the archs of ``source`` (e.g. ``search.pool_file``) outside the budget.

        Returns:
            ``(archs inside, a line saying how many were left out or None)``.

        Raises:
            BudgetError: None of them is inside the budget.
        """
        if not self.active:
            return archs, None
        kept, dropped = self.filter(archs)
        if not len(kept):
            raise BudgetError(f"none of the {dropped:,} archs of {source} is inside the budget ({self.describe()}, "
                              f"measured at {self.shape_text()}); loosen the budget or give other archs")
        note = f"{source}: {dropped:,} of {dropped + len(kept):,} archs are outside the budget and left out" if dropped else None
        return kept, note

    def summary(self) -> str:
        """One line for the search log: the budget, where it is measured and what the space covers."""
        extremes = size_extremes(self.space, skeleton=self.skeleton, layers=self.layers, channels=self.channels,
                                 classes=self.classes, in_channels=self.in_channels, image_size=self.image_size)
        covered = ", ".join(f"{measure} {_human(extremes[measure].smallest)} to {_human(extremes[measure].largest)}"
                            for measure in _UNITS)
        return f"budget: {self.describe()} at the final network ({self.shape_text()}); the space covers {covered}"
