"""Progress bars that suit where stderr goes.

On a terminal, tqdm's bar. Anywhere else (a log file, a pipe, a CI job) tqdm would
still redraw its bar with carriage returns, about 86 KB of them per training run;
there :func:`progress_bar` prints one plain line every :data:`PLAIN_INTERVAL` seconds
and one at the end instead.

Example:
    >>> with progress_bar(total=len(items), unit="item", desc="HM/image/efficientnet-lite0") as bar:
    ...     bar.update(64)
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm

PLAIN_INTERVAL = 30.0  # seconds between two plain progress lines


class PlainProgress(tqdm):
    """tqdm's counters, printed as whole lines at most every :data:`PLAIN_INTERVAL` seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0), PLAIN_INTERVAL)
        kwargs["maxinterval"] = float("inf")  # no monitor thread forcing redraws
        kwargs.update(ascii=True, dynamic_ncols=False, ncols=100)
        super().__init__(*args, **kwargs)
        self.fp = _WholeLines(self.fp)

    # tqdm redraws on every postfix or description change; here only the interval decides
    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = str(self) if msg is None else msg
        if text.strip():  # a closing bar with leave=False asks to erase itself: print nothing
            self.fp.write(text.strip() + "\n")
            self.fp.flush()
        return True


class _WholeLines:
    """The bar's stream, minus the bare newline or carriage return tqdm writes after a finished
    bar (each plain line already ends in a newline)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip(" \r\n"):
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal, else a :class:`PlainProgress` (same arguments as tqdm)."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if kwargs.get("disable") or (isatty is not None and isatty()):
        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)
