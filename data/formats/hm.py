"""H&M Personalized Fashion Recommendations (Kaggle) layout.

``articles.csv`` (article_id, prod_name, product_type_name, colour_group_name,
detail_desc, ...), ``transactions_train.csv`` (t_dat, customer_id, article_id, price,
sales_channel_id), pictures ``images/0XX/0XXXXXXXXX.jpg``. Article ids are kept as
10-digit zero-padded strings whether or not a file wrote the leading zero; the
interaction timestamp is the day ``t_dat`` (many same-day ties, kept in file order):
``YYYY-MM-DD`` as Kaggle writes it, an ISO date-time, or a Unix time; any other form
(``01/02/2019``: day and month cannot be told apart) is refused with the row, never dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from data.formats.base import (CHUNK_ROWS, INVALID_TIME, Catalogue, InteractionChunk, RawFormat, choose_text_fields,
                               compose_text, csv_header, image_files, normalise_ids, parse_times, read_table,
                               read_table_chunks, register_format, require_columns, require_file, unique_catalogue,
                               valid_rows)
from featurestore.errors import UserError

ARTICLES = "articles.csv"
TRANSACTIONS = "transactions_train.csv"
DEFAULT_TEXT_FIELDS = ("prod_name", "product_type_name", "colour_group_name", "detail_desc")
ISO_DAY = r"\s*\d{4}-\d{1,2}-\d{1,2}(?:[ T][0-9:.]+)?\s*$"
SLASHED_DAY = r"\s*\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\s*$"


def day_times(values: pd.Series, path: Path) -> np.ndarray:
    """``t_dat`` as Unix seconds (an empty cell is a bad row); a date in another form stops the
    preparation naming the row, the value and the fix, rather than dropping every such row."""
    times = parse_times(values, "%Y-%m-%d")  # Kaggle's form: one fast vectorised parse
    other = (times == INVALID_TIME) & values.notna().to_numpy()
    if not other.any():
        return times
    rest = values[other]
    odd = pd.to_numeric(rest, errors="coerce").isna() & ~rest.str.match(ISO_DAY)
    if odd.any():
        row, value = odd.idxmax(), rest[odd.idxmax()]
        reason = "day and month cannot be told apart" if re.match(SLASHED_DAY, value) else "not a date"
        raise UserError(f"{path}, data row {row + 1}: t_dat {value!r} is not YYYY-MM-DD or a Unix time ({reason}); "
                        "write the column as YYYY-MM-DD and prepare again")
    times[other] = parse_times(rest)
    return times


def article_key(values: pd.Series) -> pd.Series:
    """Normalise article ids to the 10-digit zero-padded form the image files use."""
    return values.str.strip().str.zfill(10)


@register_format
class HMFormat(RawFormat):
    name = "hm"
    summary = "H&M Kaggle articles.csv, transactions_train.csv, images/0XX/0XXXXXXXXX.jpg"

    def read_catalogue(self, source: Path, text_fields: Sequence[str] | None) -> Catalogue:
        path = require_file(source / ARTICLES, "H&M articles file")
        header = csv_header(path)
        require_columns(path, header, ["article_id"])
        fields = choose_text_fields(text_fields, [c for c in header if c != "article_id"], DEFAULT_TEXT_FIELDS, path)
        frame, skipped = read_table(path, usecols=["article_id", *fields])
        ok = valid_rows(frame["article_id"])
        frame = frame[ok]
        ids = article_key(frame["article_id"]).tolist()
        pictures = image_files(source / "images", recursive=True)
        images = [pictures.get(a) for a in ids]
        ids, texts, images, dupes = unique_catalogue(ids, compose_text(frame, fields), images)
        return Catalogue(ids, texts, images, fields, has_images=True,
                         bad_rows=skipped + int((~ok).sum()) + dupes)

    def read_interactions(self, source: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[InteractionChunk]:
        path = require_file(source / TRANSACTIONS, "H&M transactions file")
        require_columns(path, csv_header(path), ["t_dat", "customer_id", "article_id"])
        for frame, skipped in read_table_chunks(path, chunk_rows, usecols=["t_dat", "customer_id", "article_id"]):
            times = day_times(frame["t_dat"], path)
            ok = valid_rows(frame["customer_id"], frame["article_id"], times)
            yield InteractionChunk(frame["customer_id"].to_numpy(dtype=object)[ok],
                                   normalise_ids(frame["article_id"][ok], article_key),
                                   times[ok], bad_rows=skipped + int((~ok).sum()))
