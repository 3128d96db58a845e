"""The anchors' preprocessed form: ``users.tsv`` plus ``items.tsv``, tab-separated, no header.

``users.tsv``: one line per user, ``user_id \\t item item item ...`` (space-separated,
oldest first). There are no timestamps: the position in the file is the time, so
the order is kept exactly (a user on several lines continues in file order). ``items.tsv``: ``item_id \\t text [\\t image]`` with the image
path relative to the raw folder; missing images are flagged, paths outside it refused. Text-first (default
truncation 23), as the anchors' MIND-style files are.
"""

from __future__ import annotations

import csv
from itertools import chain
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data.formats.base import (CHUNK_ROWS, Catalogue, InteractionChunk, RawFormat, choose_text_fields,
                               compose_text, normalise_ids, positional_columns, read_table, read_table_chunks,
                               register_format, require_file, unique_catalogue, valid_rows)
from data.formats.generic import catalogue_images

ITEM_COLUMNS = ("item_id", "text", "image")
USER_COLUMNS = ("user_id", "items")


@register_format
class SeqTSVFormat(RawFormat):
    name = "seqtsv"
    summary = "users.tsv (user TAB items in time order), items.tsv (item TAB text [TAB image])"
    text_first = True

    def read_catalogue(self, source: Path, text_fields: Sequence[str] | None) -> Catalogue:
        path = require_file(source / "items.tsv", "items file")
        fields = choose_text_fields(text_fields, ["text"], ["text"], path)
        frame, skipped = read_table(path, quoting=csv.QUOTE_NONE, **positional_columns(path, ITEM_COLUMNS, sep="\t"))
        if "image" not in frame.columns:
            frame["image"] = None
        ok = valid_rows(frame["item_id"])
        frame = frame[ok]
        images = catalogue_images(source, frame, path)
        ids, texts, images, dupes = unique_catalogue(frame["item_id"].str.strip().tolist(),
                                                     compose_text(frame, fields), images)
        return Catalogue(ids, texts, images, fields, has_images=bool(frame["image"].notna().any()),
                         bad_rows=skipped + int((~ok).sum()) + dupes)

    def read_interactions(self, source: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[InteractionChunk]:
        path = require_file(source / "users.tsv", "users file")
        offset = 0
        for frame, skipped in read_table_chunks(path, chunk_rows, quoting=csv.QUOTE_NONE,
                                                     **positional_columns(path, USER_COLUMNS, sep="\t")):
            ok = valid_rows(frame["user_id"], frame["items"])
            frame = frame[ok]
            sequences = frame["items"].str.split().tolist()
            counts = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
            total = int(counts.sum())
            yield InteractionChunk(np.repeat(normalise_ids(frame["user_id"]), counts),
                                   np.fromiter(chain.from_iterable(sequences), dtype=object, count=total),
                                   np.arange(offset, offset + total, dtype=np.int64),
                                   bad_rows=skipped + int((~ok).sum()), rows=len(ok) + skipped)
            offset += total
