"""A name -> builder registry, in the style of timm's ``register_model``.

Every variant of a recommender piece (item tower, user encoder, loss, fusion) is a
small builder registered under a name; ``create`` is the one door in and ``names``
lists what exists. Adding a variant touches one place, and an unknown name fails
with the list of known ones instead of falling through an ``if/else``.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, TypeVar

from featurestore.cliutil import UserError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """Builders of one kind of piece, by name.

    Example:
        >>> LOSSES = Registry("loss")
        >>> @LOSSES.register("bce")
        ... def bce(**kwargs): ...
        >>> LOSSES.names()
        ['bce']
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: file ``builder`` under ``name`` (names are unique)."""

        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = builder
            return builder

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        """The builder for ``name``; an unknown name is the user's to fix."""
        try:
            return self._builders[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; {suggest(name, self.names())}known: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, in registration order."""
        return [n for n in self._builders if fnmatch.fnmatch(n, pattern)]

    def __contains__(self, name: str) -> bool:
        return name in self._builders
