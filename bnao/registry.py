"""Name -> lazy factory registries.

Every pluggable part of bnao (search spaces, samplers, datasets, loaders) is
looked up by name through a :class:`Registry`. A factory is any callable that
builds the object; it may import heavy modules lazily, so that registering a
part costs nothing until it is used (DALI, for instance, is imported only when
the DALI loader is created).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List, Optional


class Registry:
    """A named collection of factories.

    Args:
        kind: What the registry holds, used in error messages ("sampler").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Optional[Callable[..., Any]] = None):
        """Registers ``factory`` under ``name``; usable as a decorator.

        Args:
            name: Lookup key (case sensitive).
            factory: Callable building the object. When omitted, returns a
                decorator.

        Raises:
            ValueError: ``name`` is already registered.
        """

        def _add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = fn
            return fn

        return _add(factory) if factory is not None else _add

    def get(self, name: str) -> Callable[..., Any]:
        """Returns the factory for ``name`` or raises a KeyError naming the choices."""
        try:
            return self._factories[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._factories, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}{hint} (available: {', '.join(sorted(self._factories))})"
            ) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Builds the object registered as ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> List[str]:
        """Sorted list of registered names."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
