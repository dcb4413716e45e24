"""The built-in samplers: uniform and size-proportional (Balanced NAO)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Union

import torch

from .base import Sampler, WeightsLike


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


class UniformSampler(Sampler):
    """Every item of the pool with the same probability 1/n (the NAO-WS baseline).

    The weights only define the pool: their values are validated like any
    weights but do not change the distribution (zero-weight items are drawn
    too). An int ``n`` is accepted as a pool of n items.

    Args:
        weights: One weight per item, or the number of items.
        alpha: Must stay 1.0 (it has no meaning for a uniform sampler).
        uniform_mix: Must stay 0.0 (idem).
        seed: Key of the random stream.
        device: Where the table lives and where ``draw(n)`` returns indices.
    """

    name = "uniform"

    def __init__(
        self,
        weights: Union[WeightsLike, int],
        *,
        alpha: float = 1.0,
        uniform_mix: float = 0.0,
        seed: int = 0,
        device: Union[str, torch.device] = "cpu",
    ):
        if _check_real("alpha", alpha) != 1.0 or _check_real("uniform_mix", uniform_mix) != 0.0:
            raise ValueError(
                "alpha and uniform_mix have no effect on the uniform sampler; "
                "use create_sampler('proportional', ..., alpha=..., uniform_mix=...) instead"
            )
        if isinstance(weights, numbers.Integral) and not isinstance(weights, bool):
            if weights < 1:
                raise ValueError(f"the pool needs at least one item, got {weights}")
            weights = torch.ones(int(weights), dtype=torch.float64)
        super().__init__(weights, seed=seed, device=device)

    def _target_weights(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(weights)


class ProportionalSampler(Sampler):
    """Item i with probability proportional to ``weights[i] ** alpha`` (Balanced NAO).

    With ``weights`` = model sizes and ``alpha = 1`` this is the paper's
    ``P(x_i) = size(x_i) / sum_j size(x_j)``. ``uniform_mix`` blends in the
    uniform distribution, ``p = (1 - mix) * w**alpha / sum(w**alpha) + mix / n``,
    which keeps every item (even a zero-weight one) reachable.

    Args:
        weights: One non-negative weight per item (e.g. parameter counts).
        alpha: Exponent on the weights, >= 0 (0 = uniform over the positive
            items, 1 = proportional, > 1 favours big items further). Items of
            weight 0 keep probability 0 for every alpha.
        uniform_mix: Share of the uniform distribution, in [0, 1].
        seed: Key of the random stream.
        device: Where the table lives and where ``draw(n)`` returns indices.
    """

    name = "proportional"

    def __init__(
        self,
        weights: WeightsLike,
        *,
        alpha: float = 1.0,
        uniform_mix: float = 0.0,
        seed: int = 0,
        device: Union[str, torch.device] = "cpu",
    ):
        self._set_options(alpha, uniform_mix)
        super().__init__(weights, seed=seed, device=device)

    def _set_options(self, alpha: Any, uniform_mix: Any) -> None:
        alpha = _check_real("alpha", alpha)
        uniform_mix = _check_real("uniform_mix", uniform_mix)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}; use 0 for uniform over the positive items")
        if not 0.0 <= uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
        self.alpha = alpha
        self.uniform_mix = uniform_mix

    def _options(self) -> Dict[str, Any]:
        return {"alpha": self.alpha, "uniform_mix": self.uniform_mix}

    def _load_options(self, options: Dict[str, Any]) -> None:
        unknown = set(options) - {"alpha", "uniform_mix"}
        if unknown:
            raise ValueError(f"unknown proportional sampler options in the state: {sorted(unknown)}")
        self._set_options(options.get("alpha", 1.0), options.get("uniform_mix", 0.0))

    def _target_weights(self, weights: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:
            # The raw weights go to the table build unchanged: nothing rounds them.
            powered = weights
        else:
            # Dividing by the maximum first keeps w**alpha in [0, 1]: no overflow
            # for big sizes and large alpha, and the largest item stays at 1.
            relative = weights / weights.max()
            powered = torch.where(weights > 0, relative.pow(self.alpha), torch.zeros_like(relative))
        if self.uniform_mix == 0.0:
            return powered
        n = weights.numel()
        return (1.0 - self.uniform_mix) * (powered / powered.sum()) + self.uniform_mix / n
