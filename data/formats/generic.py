"""The generic layout for anything else: two CSV files with a header line.

``interactions.csv``: user_id, item_id, timestamp (a number, or a date/datetime
string). ``items.csv``: item_id, text[, image][, more columns usable as text fields];
``image`` is a path relative to the raw folder; an empty or missing file is flagged,
not fatal; an absolute path or one climbing out of the folder (``../``) is refused, so
nothing outside the raw folder is ever opened. With an image column the dataset counts as image-first
(default truncation 13), otherwise text-first (23).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

from data.formats.base import (CHUNK_ROWS, IMAGE_FIRST_MAX_SEQ_LEN, TEXT_FIRST_MAX_SEQ_LEN, Catalogue,
                               InteractionChunk, RawFormat, choose_text_fields, compose_text, csv_header,
                               normalise_ids, parse_times, read_table, read_table_chunks, register_format,
                               require_columns, require_file, unique_catalogue, valid_rows)
from featurestore.errors import UserError

INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp"]


@register_format
class GenericFormat(RawFormat):
    name = "generic"
    summary = "interactions.csv (user_id,item_id,timestamp), items.csv (item_id,text[,image])"

    def read_catalogue(self, source: Path, text_fields: Sequence[str] | None) -> Catalogue:
        path = require_file(source / "items.csv", "items file")
        header = csv_header(path)
        require_columns(path, header, ["item_id"])
        available = [c for c in header if c not in ("item_id", "image")]
        fields = choose_text_fields(text_fields, available, ["text"], path)
        has_images = "image" in header
        frame, skipped = read_table(path, usecols=["item_id", *fields, *(["image"] if has_images else [])])
        ok = valid_rows(frame["item_id"])
        frame = frame[ok]
        images = catalogue_images(source, frame, path) if has_images else [None] * len(frame)
        ids, texts, images, dupes = unique_catalogue(frame["item_id"].str.strip().tolist(),
                                                     compose_text(frame, fields), images)
        return Catalogue(ids, texts, images, fields, has_images=has_images,
                         bad_rows=skipped + int((~ok).sum()) + dupes)

    def read_interactions(self, source: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[InteractionChunk]:
        path = require_file(source / "interactions.csv", "interactions file")
        require_columns(path, csv_header(path), INTERACTION_COLUMNS)
        for frame, skipped in read_table_chunks(path, chunk_rows, usecols=INTERACTION_COLUMNS):
            times = parse_times(frame["timestamp"].fillna(""))
            ok = valid_rows(frame["user_id"], frame["item_id"], times)
            yield InteractionChunk(normalise_ids(frame["user_id"][ok]),
                                   normalise_ids(frame["item_id"][ok]),
                                   times[ok], bad_rows=skipped + int((~ok).sum()))

    def default_max_seq_len(self, catalogue: Catalogue) -> int:
        return IMAGE_FIRST_MAX_SEQ_LEN if catalogue.has_images else TEXT_FIRST_MAX_SEQ_LEN


def catalogue_images(source: Path, frame: pd.DataFrame, listing: Path) -> list[str | None]:
    """The ``image`` column of a catalogue read from ``listing``, each resolved by :func:`resolve_image`."""
    return [resolve_image(source, p, listing, item) for p, item in zip(frame["image"].tolist(), frame["item_id"])]


def resolve_image(source: Path, relative: object, listing: Path, item: object) -> str | None:
    """Absolute path of an existing image file inside ``source``, else None; a path that is
    absolute or climbs out of ``source`` is refused, naming the item and the path."""
    if not isinstance(relative, str) or not relative.strip():
        return None
    name = relative.strip()
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise UserError(f"{listing}: item {str(item).strip()} has image path {name!r} outside the raw folder "
                        f"{source}; give a path relative to that folder (copy or link the file into it)")
    path = source / name
    return os.path.abspath(path) if path.is_file() else None
