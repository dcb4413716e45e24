"""Search spaces: the NAO cell space and its registry."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from ..registry import Registry
from .nao import Arch, ArchLike, InvalidArchError, NAOSpace
from .ops import OP_SETS

SEARCH_SPACES = Registry("search space")
SEARCH_SPACES.register("nao", NAOSpace)


def register_search_space(name: str, factory: Optional[Callable[..., Any]] = None):
    """Registers a search-space factory under ``name``; usable as a decorator, like the other registries.

    Returns:
        The factory, or (without one) the decorator that registers what it decorates.
    """
    return SEARCH_SPACES.register(name, factory)


def create_search_space(name: str = "nao", **kwargs: Any) -> NAOSpace:
    """Builds a registered search space, e.g. ``create_search_space("nao", op_set="middle")``."""
    return SEARCH_SPACES.create(name, **kwargs)


def list_search_spaces() -> List[str]:
    """Names of the registered search spaces."""
    return SEARCH_SPACES.names()


__all__ = [
    "Arch",
    "ArchLike",
    "InvalidArchError",
    "NAOSpace",
    "OP_SETS",
    "create_search_space",
    "list_search_spaces",
    "register_search_space",
]
