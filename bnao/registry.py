"""Name -> lazy factory registries.

Every pluggable part of bnao (search spaces, samplers, datasets, loaders) is
looked up by name through a :class:`Registry`. A factory is any callable that
builds the object; it may import heavy modules lazily, so that registering a
part costs nothing until it is used (DALI, for instance, is imported only when
the DALI loader is created).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterable, List, Optional


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """The "did you mean" hint for a name that is not one of ``choices``.

    Args:
        name: The unknown name (not necessarily a string: it may come from a config file).
        choices: The valid names.

    Returns:
        ``"; did you mean 'closest'?"``, or ``""`` when no valid name is close; meant to follow the
        sentence that says the name is unknown.
    """
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


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

    def suggest(self, name: object) -> str:
        """The "did you mean" hint for ``name`` among the registered names (see :func:`did_you_mean`)."""
        return did_you_mean(name, self._factories)

    def unknown_name_message(self, name: object) -> str:
        """The message that refuses an unregistered ``name``: what it is, the closest name, every choice.

        Shared by :meth:`get` and by the callers that check a name up front and raise their own exception
        type (a command's usage error), so every refusal of a name reads the same.
        """
        return f"unknown {self.kind} {name!r}{self.suggest(name)} (available: {', '.join(self.names())})"

    def get(self, name: str) -> Callable[..., Any]:
        """Returns the factory for ``name`` or raises a KeyError naming the choices."""
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(self.unknown_name_message(name)) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Builds the object registered as ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> List[str]:
        """Sorted list of registered names."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
