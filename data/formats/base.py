"""What every raw-format reader hands to preparation, and the helpers they share.

A reader answers two questions about a raw folder: what the catalogue is
(:class:`Catalogue`: original id, text, image path per item) and what happened
(:class:`InteractionChunk` batches of user, item, timestamp in file order).
Interactions come in chunks so a 31M-row transactions file is never held whole;
preparation turns each chunk into int codes before reading the next.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Sequence

import numpy as np
import pandas as pd

from featurestore.errors import UserError
from featurestore.registry import Registry

CHUNK_ROWS = 1_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TEXT_FIRST_MAX_SEQ_LEN = 23
IMAGE_FIRST_MAX_SEQ_LEN = 13
# Excel and many exporters start a UTF-8 file with a byte-order mark; it is not part of the
# first column's name (or the first id), so every reader decodes with "utf-8-sig".
ENCODING = "utf-8-sig"
SEPARATOR_NAMES = {",": "commas", "\t": "tabs", ";": "semicolons", "|": "bars"}


@dataclass
class Catalogue:
    """Items as the raw files describe them, in file order, ids unique.

    ``images[i]`` is an absolute path to an existing file, or None when the item has
    no image; ``has_images`` says whether the format carries images at all.
    """

    ids: list[str]
    texts: list[str]
    images: list[str | None]
    text_fields: list[str]
    has_images: bool
    bad_rows: int = 0

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.texts) == len(self.images)):
            raise ValueError("catalogue columns differ in length")


@dataclass
class InteractionChunk:
    """A batch of interactions in file order; ``bad_rows`` counts unreadable rows skipped."""

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    bad_rows: int = 0
    rows: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.rows < 0:
            self.rows = len(self.users) + self.bad_rows


class RawFormat(ABC):
    """One raw dataset layout. Subclasses register with ``@register_format``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    text_first: ClassVar[bool] = False

    @abstractmethod
    def read_catalogue(self, source: Path, text_fields: Sequence[str] | None) -> Catalogue:
        """Every item's original id, text (``text_fields`` joined) and image path."""

    @abstractmethod
    def read_interactions(self, source: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[InteractionChunk]:
        """Interactions in file order, in chunks of about ``chunk_rows`` rows."""

    def default_max_seq_len(self, catalogue: Catalogue) -> int:
        """The papers' truncation: 23 for text-first datasets, 13 for image-first ones."""
        return TEXT_FIRST_MAX_SEQ_LEN if self.text_first else IMAGE_FIRST_MAX_SEQ_LEN


FORMATS: Registry[RawFormat] = Registry("dataset format", unknown="known formats: {names}", sort=True)


def register_format(cls: type[RawFormat]) -> type[RawFormat]:
    """Class decorator: make ``cls.name`` available to :func:`data.formats.get_format`."""
    FORMATS.add(cls.name, cls())
    return cls


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"missing {what}: {path} not found; check --source")
    return path


def require_columns(path: Path, present: Sequence[str], needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)} in its header (line 1); found {', '.join(map(str, present))}; "
                        f"the header line must name {', '.join(needed)}")


def not_utf8(path: Path) -> UserError:
    """The error for a file that is not UTF-8 text, naming the first bad line (scanned only
    after a decoder failed, so a good file is never read twice)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return UserError(f"{path} line {number}: byte 0x{raw[err.start]:02x} at column {err.start + 1} is "
                                 f"not UTF-8 text; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) "
                                 "and prepare again")
    return UserError(f"{path} is not UTF-8 text; save it as UTF-8 and prepare again")


def first_line(path: Path, sep: str) -> str:
    """The first line (BOM and line ending removed), refusing an empty file, text that is
    not UTF-8 and a line separated by something other than ``sep``."""
    try:
        with open(path, encoding=ENCODING, newline="") as fh:
            line = fh.readline().rstrip("\r\n")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not line.strip():
        raise UserError(f"{path} is empty (or its line 1 is blank); expected rows separated by "
                        f"{SEPARATOR_NAMES[sep]}, see `featurestore dataset prepare --help` for the layout")
    if sep not in line:
        other = next((s for s in SEPARATOR_NAMES if s != sep and s in line), None)
        if other is not None:
            raise UserError(f"{path} line 1 is separated by {SEPARATOR_NAMES[other]}, but this format uses "
                            f"{SEPARATOR_NAMES[sep]}; re-export the file with {SEPARATOR_NAMES[sep]}")
    return line


def csv_header(path: Path, sep: str = ",") -> list[str]:
    return next(csv.reader([first_line(path, sep)], delimiter=sep), [])


def _parse_error(path: Path, err: Exception) -> UserError:
    """A pandas tokenizer error as one line naming the file and the line."""
    text = str(err).strip()
    row = re.search(r"(?:row|line) (\d+)", text)
    where = f" line {int(row.group(1)) + 1}" if row and "row" in row.group(0) else f" line {row.group(1)}" if row else ""
    fix = ("a quote opened there is never closed; close or remove it" if "inside string" in text
           else "fix that line or remove it")
    return UserError(f"{path}{where}: cannot parse ({text.splitlines()[-1]}); {fix}, then prepare again")


def read_table_chunks(path: Path, chunk_rows: int, **kwargs) -> Iterator[tuple[pd.DataFrame, int]]:
    """``pandas.read_csv`` in chunks, every column a string, yielding ``(frame, skipped)``.

    ``skipped`` counts malformed lines (too many fields) that the C parser dropped; they
    are reported, not fatal. Short lines come through with NaN and the caller counts them.
    """
    kwargs.setdefault("dtype", str)
    kwargs.setdefault("keep_default_na", False)
    kwargs.setdefault("na_values", [""])
    kwargs.setdefault("encoding", ENCODING)
    first_line(path, kwargs.get("sep", ","))
    try:
        reader = pd.read_csv(path, chunksize=chunk_rows, on_bad_lines="warn", **kwargs)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except pd.errors.ParserError as err:
        raise _parse_error(path, err) from None
    frame = None
    with reader:
        while True:
            done = False
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", pd.errors.ParserWarning)
                try:
                    frame = next(reader)
                except StopIteration:
                    done = True  # a bad last line is only reported now
                except UnicodeDecodeError:
                    raise not_utf8(path) from None
                except pd.errors.ParserError as err:
                    raise _parse_error(path, err) from None
            skipped = sum(str(w.message).count("Skipping line") for w in caught)
            if done:
                if skipped and frame is not None:
                    yield frame.iloc[0:0], skipped
                return
            yield frame, skipped


def read_table(path: Path, **kwargs) -> tuple[pd.DataFrame, int]:
    """A whole (catalogue-sized) table as strings, and the count of malformed lines skipped."""
    chunks = list(read_table_chunks(path, CHUNK_ROWS, **kwargs))
    if not chunks or not sum(len(frame) for frame, _ in chunks):
        raise UserError(f"{path} has no rows below line 1; add the catalogue's rows (one item per line)")
    return pd.concat([frame for frame, _ in chunks], ignore_index=True), sum(s for _, s in chunks)


def positional_columns(path: Path, names: Sequence[str], header_words: set[str] = frozenset(),
                       sep: str = ",") -> dict:
    """read_csv arguments naming columns by position: ``names`` for the first columns,
    ``extraK`` for any beyond, and the first line skipped when it is a header (its first
    cell is one of ``header_words``). At least two columns are required."""
    first = first_line(path, sep).split(sep)
    if len(first) < 2:
        raise UserError(f"{path} line 1 has {len(first)} column; this file needs at least {names[0]} and "
                        f"{names[1]}, separated by {SEPARATOR_NAMES[sep]}")
    columns = [*names, *(f"extra{k}" for k in range(len(first) - len(names)))][: len(first)]
    header = 0 if first[0].strip().lower() in header_words else None
    return {"header": header, "names": columns, "usecols": columns[: len(names)], "sep": sep}


def normalise_ids(values: pd.Series, normalise: Callable[[pd.Series], pd.Series] = lambda s: s.str.strip()
                  ) -> np.ndarray:
    """Apply a string normalisation to each distinct id once, not once per row.

    Interaction files repeat ids many times (31M H&M rows name 105k articles), so
    normalising the uniques and broadcasting back is several times faster.
    """
    codes, uniques = pd.factorize(values.to_numpy(dtype=object))
    return normalise(pd.Series(uniques, dtype=object)).to_numpy(dtype=object)[codes]


def compose_text(frame: pd.DataFrame, fields: Sequence[str]) -> list[str]:
    """Join the chosen text columns of each row with ". ", skipping empty values."""
    columns = [frame[f].fillna("").astype(str).str.strip().str.rstrip(".").tolist() for f in fields]
    return [". ".join(part for part in parts if part) for parts in zip(*columns)]


def choose_text_fields(requested: Sequence[str] | None, available: Sequence[str],
                       default: Sequence[str], path: Path) -> list[str]:
    fields = list(requested) if requested else list(default)
    unknown = [f for f in fields if f not in available]
    if unknown:
        raise UserError(f"unknown text field(s) {', '.join(unknown)} for {path.name}; "
                        f"choose --text-fields from {', '.join(available)}")
    return fields


def image_files(folder: Path, recursive: bool = False) -> dict[str, str]:
    """Map an image file's stem to its absolute path, listing folders once (no per-item stat)."""
    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir() and recursive:
                    stack.append(Path(entry.path))
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    found.setdefault(os.path.splitext(entry.name)[0], os.path.abspath(entry.path))
    return found


def unique_catalogue(ids: list[str], texts: list[str], images: list[str | None]) -> tuple[list, list, list, int]:
    """Keep the first row of each id; return the columns and how many rows were dropped."""
    seen: set[str] = set()
    keep = []
    for k, item in enumerate(ids):
        if item not in seen:
            seen.add(item)
            keep.append(k)
    return [ids[k] for k in keep], [texts[k] for k in keep], [images[k] for k in keep], len(ids) - len(keep)


def parse_times(values: pd.Series, fmt: str | None = None) -> np.ndarray:
    """Timestamps as int64: numbers as given, otherwise dates/datetimes as Unix seconds
    (``fmt``: a strptime format, else any ISO-like form). Unparseable values become
    ``INVALID_TIME``, which :func:`valid_rows` counts as a bad row."""
    numeric = pd.to_numeric(values, errors="coerce") if fmt is None else pd.Series(np.nan, index=values.index)
    if fmt is None and numeric.notna().all():
        return numeric.to_numpy(dtype=np.float64).astype(np.int64)
    text = numeric.isna()
    stamps = pd.to_datetime(values[text], errors="coerce", format=fmt or "mixed", utc=True)
    # whole seconds in the stamps' own resolution: dates before 1677 or after 2262 (e.g. year 1)
    # overflow nanoseconds, and are still valid times
    seconds = stamps.dt.as_unit("s").dt.tz_localize(None).to_numpy().astype(np.int64).astype(np.float64)
    numeric[text] = np.where(stamps.isna().to_numpy(), np.nan, seconds)
    return numeric.fillna(INVALID_TIME).to_numpy(dtype=np.float64).astype(np.int64)


INVALID_TIME = np.iinfo(np.int64).min


def valid_rows(*columns: pd.Series | np.ndarray) -> np.ndarray:
    """Rows where every column is present (not NaN / not INVALID_TIME)."""
    ok = np.ones(len(columns[0]), dtype=bool)
    for col in columns:
        if isinstance(col, pd.Series):
            ok &= col.notna().to_numpy()
        else:
            ok &= col != INVALID_TIME
    return ok
