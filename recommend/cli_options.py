"""Click options made from option fields: a plugin's options become flags without being retyped.

Each field made with :func:`recommend.options.option` carries its flag, help, range and
choices; :func:`click_options` turns a list of them into click options (ranges as
``click.IntRange`` / ``FloatRange``, shown in ``--help``; choices as ``click.Choice``;
lists as comma-separated names), and :func:`parse_lists` turns those back into lists.
"""

from __future__ import annotations

from dataclasses import Field
from typing import Any, Callable, Iterable

import click

from featurestore.cliutil import FloatRange
from recommend.options import choices_of, unset


def _annotated(f: Field) -> type | None:
    """``int`` or ``float`` when the field is annotated ``int | None`` / ``float | None`` (a string under
    ``from __future__ import annotations``): an unset-by-default number keeps its type on the command line."""
    names = {part.strip() for part in str(f.type).split("|")} - {"None"}
    return {"int": int, "float": float}.get(names.pop()) if len(names) == 1 else None


def _type(f: Field) -> Any:
    meta = f.metadata
    known = choices_of(f)
    if known is not None:
        return click.Choice([str(c) for c in known])
    kind = meta["type"] or (type(f.default) if f.default is not None and not meta["multiple"] else None) \
        or _annotated(f) or str
    if meta["min"] is None and meta["max"] is None:
        return kind
    ranged = click.IntRange if kind is int else FloatRange
    return ranged(meta["min"], meta["max"], min_open=meta["min_open"], max_open=meta["max_open"])


def click_option(f: Field) -> Callable:
    """One click option for one option field (``--encoder`` for ``encoders``: the flag names the parameter)."""
    meta = f.metadata
    name = meta["flag"].lstrip("-").replace("-", "_")
    text = meta["help"]() if callable(meta["help"]) else meta["help"]
    if meta["is_flag"]:
        return click.option(meta["flag"], name, is_flag=True, help=text)
    default = None if meta["multiple"] else unset(f)
    return click.option(meta["flag"], name, type=_type(f), default=default, show_default=meta["show_default"],
                        metavar=meta["metavar"], help=text)


def click_options(fields: Iterable[Field]) -> Callable:
    """Decorator adding a click option per field, in the given order."""
    fields = list(fields)

    def decorate(command: Callable) -> Callable:
        for f in reversed(fields):
            command = click_option(f)(command)
        return command

    return decorate


def parse_lists(fields: Iterable[Field], values: dict) -> dict:
    """``values`` (click's, by parameter name) as option values by field name: comma-separated
    names split into lists, flags renamed to their fields (``encoder`` -> ``encoders``)."""
    out = dict(values)
    for f in fields:
        param = f.metadata["flag"].lstrip("-").replace("-", "_")
        if param in out:
            value = out.pop(param)
            out[f.name] = [v.strip() for v in (value or "").split(",") if v.strip()] if f.metadata["multiple"] else value
    return out
