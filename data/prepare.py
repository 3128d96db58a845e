"""Raw files -> the canonical prepared dataset (``ROOT/datasets/NAME``).

The rules, in the order they are applied (the papers' protocol, made exact):

1. Read the catalogue, then stream the interactions in chunks, turning user and item
   ids into int codes chunk by chunk; the raw file is never held whole. Rows that
   cannot be read (too many fields, a missing id, an unparseable time) are counted
   as ``bad_rows``; rows naming an item absent from the catalogue as ``unknown_item_rows``.
2. Sort each user's interactions by timestamp, stably: ties keep file order.
3. Remove repeated (user, item) pairs, keeping the FIRST occurrence.
3b. Optional warm-N filter (``min_item_interactions=N``, 001 Table 3): remove the
   interactions of items with fewer than N distinct users (after step 3). With
   ``iterate`` steps 3b and 4 repeat until neither removes anything (a k-core:
   every item keeps N users and every user ``min_interactions`` items).
4. Drop users with fewer than ``min_interactions`` interactions (after step 3b).
5. Optional subsample (``users=N, seed=S``): N users drawn uniformly without
   replacement from those that passed step 4, by ``numpy.random.default_rng(S)`` over
   the users sorted by original id. Sampling after the filter means N is exactly the
   number of users you get (unless fewer qualify).
6. Keep each user's most recent ``max_seq_len`` items (default: 13 for image-first
   formats, 23 for text-first ones).
7. Keep only items that occur in the final sequences and number them 1..N in order
   of their original id (compared as strings); 0 is padding. Users are indexed
   0..U-1 in order of their original id. Both orders depend on nothing but the ids,
   so re-sorting a raw file cannot renumber anything.

The leave-one-out split (last = test, second-to-last = validation) is derived by
:class:`data.dataset.PreparedDataset`. Writing is atomic (:func:`write_prepared`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from data.dataset import Item, write_prepared
from data.formats import get_format
from data.formats.base import CHUNK_ROWS, Catalogue, RawFormat
from data.synth import synthesize
from featurestore.errors import UserError
from featurestore.progress import progress_bar
from featurestore.workspace import Workspace

MIN_SEQUENCE = 3  # leave-one-out needs one training item, one validation, one test


@dataclass
class InteractionLog:
    """All readable interactions as int codes, in file order."""

    users: np.ndarray  # int32 code into user_ids
    items: np.ndarray  # int32 index into the catalogue
    times: np.ndarray  # int64
    user_ids: list[str]
    stats: dict = field(default_factory=dict)


class UserCodes:
    """Original user id -> dense int code, assigned in order of first appearance."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def encode(self, values: np.ndarray) -> np.ndarray:
        inverse, uniques = pd.factorize(values)
        codes = self.codes
        table = np.fromiter((codes.setdefault(v, len(codes)) for v in uniques), dtype=np.int32, count=len(uniques))
        return table[inverse]

    @property
    def names(self) -> list[str]:
        return list(self.codes)


def read_interaction_log(reader: RawFormat, source: Path, catalogue: Catalogue,
                         chunk_rows: int = CHUNK_ROWS, progress: bool = True) -> InteractionLog:
    """Stream ``reader``'s interactions into int-coded arrays (O(rows) int32/int64 memory)."""
    item_index = pd.Index(catalogue.ids)
    users_codes = UserCodes()
    users, items, times = [], [], []
    rows = bad = unknown = 0
    with progress_bar(desc=f"reading {reader.name} interactions", unit=" rows", unit_scale=True, disable=not progress) as bar:
        for chunk in reader.read_interactions(source, chunk_rows):
            rows += chunk.rows
            bad += chunk.bad_rows
            item_codes = item_index.get_indexer(chunk.items)
            known = item_codes >= 0
            unknown += int((~known).sum())
            users.append(users_codes.encode(chunk.users[known]))
            items.append(item_codes[known].astype(np.int32))
            times.append(chunk.times[known].astype(np.int64))
            bar.update(chunk.rows)
    stats = {"rows_read": rows, "bad_rows": bad, "unknown_item_rows": unknown}
    return InteractionLog(_concat(users, np.int32), _concat(items, np.int32), _concat(times, np.int64),
                          users_codes.names, stats)


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


def warm_filter(users: np.ndarray, items: np.ndarray, min_item: int, min_user: int,
                iterate: bool) -> tuple[np.ndarray, dict]:
    """Step 3b: the mask of interactions kept by the warm-N item filter (and, with ``iterate``,
    the user filter, both repeated to a fixed point), with how many items it removed and in
    how many rounds."""
    keep = np.ones(len(items), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        item_counts = np.bincount(items[keep], minlength=int(items.max(initial=-1)) + 1)
        drop = keep & (item_counts[items] < min_item)
        if iterate:
            user_counts = np.bincount(users[keep & ~drop], minlength=int(users.max(initial=-1)) + 1)
            drop |= keep & (user_counts[users] < min_user)
        keep &= ~drop
        if not iterate or not drop.any():
            break
    before = np.unique(items).size
    return keep, {"items_below_min": int(before - np.unique(items[keep]).size), "warm_rounds": rounds}


def build_sequences(users: np.ndarray, items: np.ndarray, times: np.ndarray, *, min_interactions: int,
                    max_seq_len: int, subsample: int | None = None, seed: int = 0, min_item_interactions: int = 1,
                    iterate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Steps 2-6 of the module docstring on int arrays in file order.

    ``users`` must already be ranks in the final user order (0..U-1). Returns
    ``(kept_users, indptr, seq_items, stats)``: the user ranks kept (ascending), their
    CSR sequences of the input item codes, and counts of what each step removed.
    """
    order = np.argsort(times, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    users, items = users[order], items[order]
    del order

    key = users.astype(np.int64) * (int(items.max(initial=0)) + 1) + items
    _, first = np.unique(key, return_index=True)
    del key
    keep = np.zeros(len(users), dtype=bool)
    keep[first] = True
    duplicates = int(len(users) - len(first))
    users, items = users[keep], items[keep]
    n_users = int(users.max(initial=-1)) + 1
    users_before = np.unique(users).size
    warm = {}
    if min_item_interactions > 1 or iterate:
        keep, warm = warm_filter(users, items, min_item_interactions, min_interactions, iterate)
        users, items = users[keep], items[keep]

    counts = np.bincount(users, minlength=n_users)
    eligible = np.flatnonzero(counts >= min_interactions)
    below = int(users_before - len(eligible))  # users the item filter emptied count as below too
    sampled_out = 0
    if subsample is not None and subsample < len(eligible):
        pick = np.random.default_rng(seed).choice(len(eligible), size=subsample, replace=False)
        sampled_out = len(eligible) - subsample
        eligible = eligible[np.sort(pick)]
    chosen = np.zeros(n_users, dtype=bool)
    chosen[eligible] = True
    mask = chosen[users]
    users, items = users[mask], items[mask]

    starts = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=starts[1:])
    from_end = starts[users + 1] - np.arange(len(users))  # 1 = most recent
    recent = from_end <= max_seq_len
    truncated = int((~recent).sum())
    users, items = users[recent], items[recent]
    lengths = np.bincount(users, minlength=n_users)[eligible]
    indptr = np.zeros(len(eligible) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    stats = {"duplicates_removed": duplicates, **warm, "users_below_min": below,
             "users_sampled_out": sampled_out, "interactions_truncated": truncated}
    return eligible, indptr, items, stats


def prepare_dataset(fmt: str, source: Path, out: Path, *, name: str, max_seq_len: int | None = None,
                    min_interactions: int = 5, users: int | None = None, seed: int = 0,
                    text_fields: Sequence[str] | None = None, chunk_rows: int = CHUNK_ROWS,
                    progress: bool = False, min_item_interactions: int = 1, iterate: bool = False,
                    before_replace: Callable[[dict], None] | None = None) -> dict:
    """Prepare the raw dataset in ``source`` (layout ``fmt``) into the folder ``out``.

    Args:
        fmt: a registered format name (see :func:`data.formats.list_formats`).
        source: the raw folder.
        out: the prepared folder, normally ``Workspace(root).dataset_dir(name)``;
            replaced atomically, untouched on error.
        name: the dataset name recorded in the manifest.
        max_seq_len: most recent items kept per user (default: the format's, 13 or 23).
        min_interactions: users with fewer (after deduplication) are dropped; >= 3.
        min_item_interactions: warm-N: items with fewer distinct users are removed first.
        iterate: repeat the item and user filters to a fixed point (k-core).
        users, seed: optional deterministic subsample of N users (after the filter).
        text_fields: which catalogue fields make an item's text (format default if None).
        chunk_rows: interaction rows read per chunk.
        progress: show a tqdm bar while reading.
        before_replace: called with the new manifest before an existing ``out`` is replaced
            (it may refuse by raising; see ``featurestore dataset prepare --overwrite``).

    Returns:
        the written manifest (counts, options, stats, fingerprints).

    Example:
        >>> prepare_dataset("hm", Path("raw/HM"), ws.dataset_dir("HM"), name="HM")["counts"]
    """
    reader = get_format(fmt)
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"raw dataset folder {source} not found; check --source")
    if min_interactions < MIN_SEQUENCE:
        raise UserError(f"--min-interactions must be at least {MIN_SEQUENCE} (train, validation and test item)")
    if users is not None and users < 1:
        raise UserError(f"--users must be positive, got {users}")
    if min_item_interactions < 1:
        raise UserError(f"--min-item-interactions must be at least 1, got {min_item_interactions}")
    catalogue = reader.read_catalogue(source, text_fields)
    max_seq_len = max_seq_len or reader.default_max_seq_len(catalogue)
    if max_seq_len < MIN_SEQUENCE:
        raise UserError(f"--max-seq-len must be at least {MIN_SEQUENCE}, got {max_seq_len}")

    log = read_interaction_log(reader, source, catalogue, chunk_rows, progress)
    if len(log.users) == 0:
        raise UserError(f"no readable interactions in {source} ({log.stats['bad_rows']} unreadable rows, "
                        f"{log.stats['unknown_item_rows']} naming items missing from the catalogue)")
    user_names = np.asarray(log.user_ids, dtype=object)
    by_name = np.argsort(user_names, kind="stable")
    rank = np.empty(len(by_name), dtype=np.int32)
    rank[by_name] = np.arange(len(by_name), dtype=np.int32)
    kept, indptr, cat_items, stats = build_sequences(rank[log.users], log.items, log.times,
                                                     min_interactions=min_interactions, max_seq_len=max_seq_len,
                                                     subsample=users, seed=seed,
                                                     min_item_interactions=min_item_interactions, iterate=iterate)
    if len(kept) == 0:
        raise UserError(f"no users left in {source}: all {len(by_name)} users have fewer than "
                        f"{min_interactions} distinct interactions; lower --min-interactions or check the input")
    read_stats = log.stats
    del log

    used = np.unique(cat_items)
    used = used[np.argsort(np.asarray(catalogue.ids, dtype=object)[used], kind="stable")]
    new_id = np.zeros(len(catalogue.ids), dtype=np.int32)
    new_id[used] = np.arange(1, len(used) + 1, dtype=np.int32)
    items = [Item(k + 1, catalogue.ids[c], catalogue.texts[c], catalogue.images[c]) for k, c in enumerate(used)]

    stats = {"catalogue_items": len(catalogue.ids), "catalogue_bad_rows": catalogue.bad_rows,
             **read_stats, "users_read": int(len(by_name)), **stats,
             "items_missing_image": sum(it.image is None for it in items) if catalogue.has_images else 0}
    manifest = {
        "name": name,
        "format": fmt,
        "source": str(source.resolve()),
        "options": {"max_seq_len": int(max_seq_len), "min_interactions": int(min_interactions),
                    "min_item_interactions": int(min_item_interactions), "iterate": bool(iterate),
                    "users": users, "seed": int(seed), "text_fields": catalogue.text_fields},
        "has_images": catalogue.has_images,
        "stats": stats,
    }
    return write_prepared(Path(out), items, user_names[by_name[kept]].tolist(), indptr, new_id[cat_items], manifest,
                          before_replace)


def synthetic_dataset(root: Path, name: str = "synth", fmt: str = "hm", *, users: int = 2000, items: int = 500,
                      seed: int = 0, images: bool = True, clusters: int | None = None) -> Path:
    """Synthesize raw files into ``root/raw/NAME`` and prepare them as dataset NAME.

    The one-call fixture for tests and demos; returns the prepared folder
    (``Workspace(root).dataset_dir(name)``).

    Example:
        >>> PreparedDataset.load(synthetic_dataset(tmp_path, users=400, items=150))
    """
    raw = Path(root) / "raw" / name
    synthesize(fmt, raw, users=users, items=items, seed=seed, images=images, clusters=clusters)
    out = Workspace(Path(root)).dataset_dir(name)
    prepare_dataset(fmt, raw, out, name=name, seed=seed)
    return out
