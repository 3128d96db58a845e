"""A store group of vectors written by hand for the codes and semantic-ID tests: clustered rows, a few
exact duplicates (which must share all their codes) and one item without a vector."""

from __future__ import annotations

import numpy as np

from data.dataset import PreparedDataset
from featurestore.store import STATUS_COMPLETE, FeatureGroup, FeatureStore
from featurestore.workspace import Workspace

ABSENT = 5  # the item whose encoder "could not read it"
DUPLICATES = 10  # the last items repeat the vectors of items 1..DUPLICATES


def clustered_rows(n_items: int, dim: int = 32, clusters: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    rows = np.zeros((n_items + 1, dim), dtype=np.float32)
    rows[1:] = centres[rng.integers(0, clusters, n_items)] + rng.normal(size=(n_items, dim))
    rows[n_items - DUPLICATES + 1:] = rows[1:DUPLICATES + 1]
    rows[ABSENT] = 0
    return rows


def write_vectors(ws: Workspace, dataset: PreparedDataset, name: str, rows: np.ndarray | None = None,
                  fingerprint: str | None = None, complete: bool = True, chunk_rows: int = 64) -> FeatureGroup:
    """Group ``name`` holding ``rows`` (default: :func:`clustered_rows`), as `featurestore extract` leaves one."""
    rows = clustered_rows(dataset.n_items) if rows is None else rows
    present = np.abs(rows).max(axis=1) > 0
    group = FeatureStore(ws.store).create(
        name, rows=len(rows), dim=rows.shape[1], dtype="float32", chunk_rows=chunk_rows,
        attrs={"dataset": dataset.name, "dataset_fingerprint": fingerprint or dataset.fingerprint,
               "encoder": name.split("/")[2].partition("@")[0], "state_sha256": "hand-written"})
    for chunk in range(group.n_chunks if complete else 1):
        start, stop = group.chunk_bounds(chunk)
        group.write_chunk(chunk, rows[start:stop], present[start:stop])
    if complete:
        group.write_flat()
        group.update_attrs(status=STATUS_COMPLETE)
    return group
