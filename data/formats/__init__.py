"""Raw dataset formats: a name -> reader registry (``hm``, ``mind``, ``ninerec``, ``seqtsv``, ``generic``).

Adding a layout is one module with one ``@register_format`` class; preparation,
the CLI's ``--format`` choices and the tests pick it up from here.

Example:
    >>> reader = get_format("hm")
    >>> catalogue = reader.read_catalogue(Path("raw/HM"), text_fields=None)
"""

from __future__ import annotations

# The plugin list: one module per layout, each registering its reader with @register_format.
from data.formats import generic, hm, mind, ninerec, seqtsv  # noqa: F401
from data.formats.base import FORMATS, Catalogue, InteractionChunk, RawFormat, register_format

__all__ = ["Catalogue", "InteractionChunk", "RawFormat", "get_format", "list_formats", "register_format"]


def get_format(name: str) -> RawFormat:
    """The reader registered as ``name``; a :class:`UserError` lists the known names."""
    return FORMATS.get(name)


def list_formats() -> list[str]:
    return FORMATS.names()
