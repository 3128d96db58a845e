"""Raw dataset formats: a name -> reader registry (``hm``, ``mind``, ``ninerec``, ``seqtsv``, ``generic``).

Adding a layout is one module with one ``@register_format`` class; preparation,
the CLI's ``--format`` choices and the tests pick it up from here.

Example:
    >>> reader = get_format("hm")
    >>> catalogue = reader.read_catalogue(Path("raw/HM"), text_fields=None)
"""

from __future__ import annotations

from data.formats.base import Catalogue, InteractionChunk, RawFormat
from featurestore.cliutil import UserError

_FORMATS: dict[str, RawFormat] = {}

def register_format(cls: type[RawFormat]) -> type[RawFormat]:
    """Class decorator: make ``cls.name`` available to :func:`get_format`."""
    _FORMATS[cls.name] = cls()
    return cls

def get_format(name: str) -> RawFormat:
    """The reader registered as ``name``; a :class:`UserError` lists the known names."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise UserError(f"unknown dataset format {name!r}; known formats: {', '.join(list_formats())}") from None

def list_formats() -> list[str]:
    return sorted(_FORMATS)

# Importing the reader modules registers them.
from data.formats import generic, hm, mind, ninerec, seqtsv  # noqa: E402,F401

__all__ = ["Catalogue", "InteractionChunk", "RawFormat", "get_format", "list_formats", "register_format"]
