"""Microsoft News (MIND) layout: ``news.tsv`` and ``behaviors.tsv``, tab-separated, no header.

``news.tsv``: news_id, category, subcategory, title, abstract, url, title_entities,
abstract_entities. ``behaviors.tsv``: impression_id, user_id, time
(``11/15/2019 8:55:22 AM``), click history (space-separated news ids), impressions
(``N123-1`` clicked, ``N456-0`` skipped). A user's interactions are every history item
and every clicked impression, each stamped with its row's time; within a row the
history comes before the clicks, so ties broken by file order keep that order. The
history is repeated on each of a user's rows; deduplication keeps its first copy.
No images: MIND is text-first (default truncation 23).
"""

from __future__ import annotations

import csv
from itertools import chain
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data.formats.base import (CHUNK_ROWS, Catalogue, InteractionChunk, RawFormat, choose_text_fields,
                               compose_text, parse_times, read_table, read_table_chunks, register_format, require_file,
                               unique_catalogue, valid_rows)

NEWS_COLUMNS = ["news_id", "category", "subcategory", "title", "abstract", "url", "title_entities",
                "abstract_entities"]
BEHAVIOR_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]
TEXT_FIELDS = ("category", "subcategory", "title", "abstract")
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
TSV = {"sep": "\t", "header": None, "quoting": csv.QUOTE_NONE}


@register_format
class MINDFormat(RawFormat):
    name = "mind"
    summary = "MIND news.tsv, behaviors.tsv (click history + clicked impressions)"
    text_first = True

    def read_catalogue(self, source: Path, text_fields: Sequence[str] | None) -> Catalogue:
        path = require_file(source / "news.tsv", "MIND news file")
        fields = choose_text_fields(text_fields, TEXT_FIELDS, ("title",), path)
        frame, skipped = read_table(path, names=NEWS_COLUMNS, **TSV)
        ok = valid_rows(frame["news_id"])
        frame = frame[ok]
        ids, texts, images, dupes = unique_catalogue(frame["news_id"].str.strip().tolist(),
                                                     compose_text(frame, fields), [None] * len(frame))
        return Catalogue(ids, texts, images, fields, has_images=False, bad_rows=skipped + int((~ok).sum()) + dupes)

    def read_interactions(self, source: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[InteractionChunk]:
        path = require_file(source / "behaviors.tsv", "MIND behaviors file")
        for frame, skipped in read_table_chunks(path, chunk_rows, names=BEHAVIOR_COLUMNS, **TSV):
            times = parse_times(frame["time"].fillna(""), TIME_FORMAT)
            ok = valid_rows(frame["user_id"], times)
            frame = frame[ok]
            history = frame["history"].fillna("").str.split()
            clicked = frame["impressions"].fillna("").str.split().map(
                lambda shown: [s[:-2] for s in shown if s.endswith("-1")])
            per_row = [h + c for h, c in zip(history, clicked)]
            counts = np.fromiter((len(r) for r in per_row), dtype=np.int64, count=len(per_row))
            items = np.fromiter(chain.from_iterable(per_row), dtype=object, count=int(counts.sum()))
            yield InteractionChunk(np.repeat(frame["user_id"].to_numpy(dtype=object), counts), items,
                                   np.repeat(times[ok], counts), bad_rows=skipped + int((~ok).sum()),
                                   rows=len(ok) + skipped)
