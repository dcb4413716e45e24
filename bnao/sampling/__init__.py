"""Architecture samplers: which pool member trains the supernet at each step.

``create_sampler("proportional", sizes)`` gives Balanced NAO's size-proportional
sampling; ``create_sampler("uniform", sizes)`` the NAO-WS baseline. Both draw in
O(1) from an alias table with a reproducible counter-based random stream (see
:mod:`bnao.sampling.base`). New samplers register with :func:`register_sampler`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch

from ..registry import Registry
from .base import Sampler, validate_weights
from .samplers import ProportionalSampler, UniformSampler

__all__ = [
    "SAMPLERS",
    "Sampler",
    "UniformSampler",
    "ProportionalSampler",
    "create_sampler",
    "register_sampler",
    "list_samplers",
    "validate_weights",
]

#: Name -> factory ``factory(weights, *, alpha, uniform_mix, seed, device) -> Sampler``.
SAMPLERS = Registry("sampler")
SAMPLERS.register("uniform", UniformSampler)
SAMPLERS.register("proportional", ProportionalSampler)


def register_sampler(name: str, factory: Optional[Callable[..., Sampler]] = None):
    """Registers a sampler factory under ``name``; usable as a decorator (``@register_sampler("mine")``).

    Args:
        name: Name used with :func:`create_sampler`.
        factory: Callable ``factory(weights, *, alpha, uniform_mix, seed, device)``
            returning a :class:`Sampler`. When omitted, returns a decorator that registers what it decorates.

    Returns:
        The factory, or the decorator.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return SAMPLERS.register(name, factory)


def create_sampler(
    name: str,
    weights,
    *,
    alpha: float = 1.0,
    uniform_mix: float = 0.0,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> Sampler:
    """Builds the sampler registered as ``name`` over a pool.

    Args:
        name: "uniform", "proportional" or a name given to :func:`register_sampler`.
        weights: One non-negative weight per pool item (model sizes for Balanced NAO).
        alpha: Exponent on the weights (proportional sampler).
        uniform_mix: Share of the uniform distribution mixed in (proportional sampler).
        seed: Key of the random stream; equal seeds give equal sequences everywhere.
        device: "cpu" or "cuda": where the table lives and ``draw(n)`` returns indices.

    Returns:
        The sampler.

    Raises:
        KeyError: Unknown name.
        ValueError: Bad weights or options (the message says how to fix them).
    """
    return SAMPLERS.create(name, weights, alpha=alpha, uniform_mix=uniform_mix, seed=seed, device=device)


def list_samplers() -> List[str]:
    """Names of the registered samplers."""
    return SAMPLERS.names()
