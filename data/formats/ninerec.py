"""NineRec / Bili layout: ``NAME_pair.csv``, ``NAME_item.csv``, covers ``NAME_cover/<item>.jpg``.

Columns are positional, with or without a header line: the pair file is
(item, user[, timestamp]) and the item file (item, text[, English text]). A pair file
without timestamps (NineRec's TN and QB) is in interaction order, so the row number is
the timestamp. Text defaults to the English column when the item file has one
(the encoders here are English), else the original text; ``--text-fields text,text_en``
picks explicitly. Covers may be .jpg, .jpeg or .png; a missing cover is flagged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data.formats.base import (CHUNK_ROWS, Catalogue, InteractionChunk, RawFormat, choose_text_fields,
                               compose_text, image_files, normalise_ids, parse_times, positional_columns,
                               read_table, read_table_chunks, register_format, unique_catalogue, valid_rows)
from featurestore.errors import UserError

PAIR_COLUMNS = ("item", "user", "timestamp")
ITEM_COLUMNS = ("item", "text", "text_en")
HEADER_WORDS = {"item", "item_id", "itemid", "id", "user", "user_id", "userid", "timestamp", "time", "title",
                "text", "text_en", "title_en"}


def find_prefix(source: Path) -> str:
    """The NAME of the single ``NAME_pair.csv`` in ``source``."""
    pairs = sorted(source.glob("*_pair.csv"))
    if not pairs:
        raise UserError(f"missing NineRec pair file: no *_pair.csv in {source}; check --source")
    if len(pairs) > 1:
        raise UserError(f"several NineRec pair files in {source} ({', '.join(p.name for p in pairs)}); "
                        f"point --source at a folder holding one dataset")
    return pairs[0].name[: -len("_pair.csv")]


@register_format
class NineRecFormat(RawFormat):
    name = "ninerec"
    summary = "NineRec/Bili NAME_pair.csv (item,user[,timestamp]), NAME_item.csv (item,text[,text_en]), NAME_cover/ITEM.jpg"

    def read_catalogue(self, source: Path, text_fields: Sequence[str] | None) -> Catalogue:
        prefix = find_prefix(source)
        path = source / f"{prefix}_item.csv"
        if not path.is_file():
            raise UserError(f"missing NineRec item file: {path} not found; check --source")
        frame, skipped = read_table(path, **positional_columns(path, ITEM_COLUMNS, HEADER_WORDS))
        available = [c for c in ITEM_COLUMNS[1:] if c in frame.columns]
        fields = choose_text_fields(text_fields, available, [available[-1]], path)
        ok = valid_rows(frame["item"])
        frame = frame[ok]
        ids = frame["item"].str.strip().tolist()
        covers = image_files(source / f"{prefix}_cover")
        ids, texts, images, dupes = unique_catalogue(ids, compose_text(frame, fields), [covers.get(i) for i in ids])
        return Catalogue(ids, texts, images, fields, has_images=True, bad_rows=skipped + int((~ok).sum()) + dupes)

    def read_interactions(self, source: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[InteractionChunk]:
        path = source / f"{find_prefix(source)}_pair.csv"
        options = positional_columns(path, PAIR_COLUMNS, HEADER_WORDS)
        row = 0
        for frame, skipped in read_table_chunks(path, chunk_rows, **options):
            if "timestamp" in frame.columns:
                times = parse_times(frame["timestamp"].fillna(""))
            else:
                times = np.arange(row, row + len(frame), dtype=np.int64)
            row += len(frame)
            ok = valid_rows(frame["item"], frame["user"], times)
            yield InteractionChunk(normalise_ids(frame["user"][ok]),
                                   normalise_ids(frame["item"][ok]),
                                   times[ok], bad_rows=skipped + int((~ok).sum()))
