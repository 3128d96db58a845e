"""A name -> entry registry, in the style of timm's ``register_model``.

Every variant of a piece (an encoder, a raw format, an item tower, a loss, ...) is one
entry registered under a name; ``get``/``create`` is the one door in and ``names``
lists what exists. Adding a variant touches one place, a name is never silently
replaced, and an unknown name fails with the nearest and the known names instead of
falling through an ``if/else``.

This module is a leaf (it imports only :mod:`featurestore.errors`), so any package can
hold a registry without importing anything else of the project.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from typing import Callable, Generic, Sequence, TypeVar

from featurestore.errors import UserError

T = TypeVar("T")


def suggest(name: str, known: list[str]) -> str:
    """``"did you mean minilm-l6? "`` for the nearest known names (difflib), or ``""``."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    close += [k for k in known if name and k.startswith(name) and k not in close][: 3 - len(close)]
    return f"did you mean {' or '.join(close)}? " if close else ""


class Registry(Generic[T]):
    """Entries of one kind of piece, by name.

    Args:
        kind: what an entry is, for messages (``"loss"``, ``"dataset format"``).
        unknown: what the unknown-name error says after ``unknown KIND 'NAME';``: a
            template of ``{suggestion}`` (the nearest names, or nothing) and ``{names}``.
        sort: list names sorted instead of in registration order.
        plugins: modules registering the built-in entries, imported on the first
            lookup (a lazy plugin list: registering never creates an import cycle,
            and listing names needs no import until it is asked for).

    Example:
        >>> LOSSES = Registry("loss")
        >>> @LOSSES.register("bce")
        ... def bce(**kwargs): ...
        >>> LOSSES.names()
        ['bce']
    """

    def __init__(self, kind: str, unknown: str = "{suggestion}known: {names}", sort: bool = False,
                 plugins: Sequence[str] = ()) -> None:
        self.kind = kind
        self._unknown = unknown
        self._sort = sort
        self._plugins = tuple(plugins)
        self._loaded = not self._plugins
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """File ``entry`` under ``name``; a name already taken is a programming error (ValueError)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: file the decorated builder under ``name`` (names are unique)."""
        return lambda entry: self.add(name, entry)

    def pop(self, name: str, default: T | None = None) -> T | None:
        """Take ``name`` out again (a test's temporary variant), returning its entry."""
        return self._entries.pop(name, default)

    def get(self, name: str) -> T:
        """The entry for ``name``; an unknown name is the user's to fix (UserError)."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = self.names()
            hint = self._unknown.format(suggestion=suggest(name, known), names=", ".join(known))
            raise UserError(f"unknown {self.kind} {name!r}; {hint}") from None

    def create(self, name: str, *args, **kwargs):
        """Call the builder registered as ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard (registration order unless ``sort``)."""
        self._load()
        found = [n for n in self._entries if fnmatch.fnmatch(n, pattern)]
        return sorted(found) if self._sort else found

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a plugin looking names up while it registers must not recurse
            for module in self._plugins:
                importlib.import_module(module)
