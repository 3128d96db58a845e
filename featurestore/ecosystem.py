"""A store group and its dataset as the files MMRec and RecBole read (``featurestore export --format``).

Both tools index items differently from the store (row = item id 1..N, row 0 padding):

- **MMRec** (``mmrec``): ``image_feat.npy`` / ``text_feat.npy`` (by the group's modality) hold
  one row per MMRec item index 0..N-1 = our id - 1; ``DATASET.inter`` is a tab-separated file
  ``userID itemID rating timestamp x_label`` whose ``x_label`` (0 train, 1 validation, 2 test)
  is our leave-one-out split, so MMRec trains and tests on exactly our split.
- **RecBole** (``recbole``): atomic files ``DATASET.inter`` (``user_id:token item_id:token
  timestamp:float``; the timestamp is the position in the user's time-ordered sequence, so
  RecBole's own leave-one-out by time gives ours) and ``DATASET.item`` (``item_id:token
  text:token_seq``), plus ``DATASET.feat1CLS`` (image: ``.feat2CLS``): float32 rows in the raw
  binary layout its pretrained-text models (UniSRec) read with ``np.fromfile(...).reshape(-1,
  dim)``, row = item token (= our id, row 0 the padding row).

Exporting a text group and an image group into one folder writes both feature files next to
one interaction file (rewritten identically).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np

from data.dataset import PreparedDataset
from featurestore.errors import UserError
from featurestore.store import FeatureGroup

MMREC_FILES = {"image": "image_feat.npy", "text": "text_feat.npy"}
RECBOLE_SUFFIXES = {"text": "feat1CLS", "image": "feat2CLS"}


def _modality(group: FeatureGroup, files: dict[str, str], fmt: str) -> str:
    """The group's modality, when ``fmt`` has a feature file for it (a ``multimodal`` group has none)."""
    modality = group.attrs["modality"]
    if modality not in files:
        raise UserError(f"--format {fmt} has feature files for {' and '.join(files)} groups only; {group.name} is "
                        f"{modality}: export it with --format npy")
    return modality


def split_labels(dataset: PreparedDataset) -> np.ndarray:
    """Per sequence entry: 0 train, 1 validation (second-to-last), 2 test (last)."""
    labels = np.zeros(len(dataset.seq_items), dtype=np.int8)
    ends = dataset.indptr[1:]
    labels[ends - 1] = 2
    labels[ends - 2] = 1
    return labels


def _interactions(dataset: PreparedDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index, item id, position in the user's sequence) per sequence entry."""
    lengths = np.diff(dataset.indptr)
    users = np.repeat(np.arange(dataset.n_users), lengths)
    positions = np.arange(len(dataset.seq_items)) - np.repeat(dataset.indptr[:-1], lengths)
    return users, dataset.seq_items, positions


def _write_tsv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(rows)


def write_mmrec(group: FeatureGroup, dataset: PreparedDataset, out: Path) -> list[Path]:
    """MMRec's feature file for the group's modality and its ``.inter`` file with ``x_label``."""
    features = out / MMREC_FILES[_modality(group, MMREC_FILES, "mmrec")]
    np.save(features, np.asarray(group.read(), dtype=np.float32)[1:])
    users, items, positions = _interactions(dataset)
    inter = out / f"{dataset.name}.inter"
    _write_tsv(inter, ["userID", "itemID", "rating", "timestamp", "x_label"],
               zip(users.tolist(), (items - 1).tolist(), [1] * len(items), positions.tolist(),
                   split_labels(dataset).tolist()))
    return [features, inter]


def write_recbole(group: FeatureGroup, dataset: PreparedDataset, out: Path) -> list[Path]:
    """RecBole's atomic ``.inter`` / ``.item`` files and the group's rows as its binary feature file."""
    users, items, positions = _interactions(dataset)
    inter = out / f"{dataset.name}.inter"
    _write_tsv(inter, ["user_id:token", "item_id:token", "timestamp:float"],
               zip(users.tolist(), items.tolist(), positions.tolist()))
    item_file = out / f"{dataset.name}.item"
    _write_tsv(item_file, ["item_id:token", "text:token_seq"],
               ((item.id, " ".join((item.text or "").split())) for item in dataset.items))
    features = out / f"{dataset.name}.{RECBOLE_SUFFIXES[_modality(group, RECBOLE_SUFFIXES, 'recbole')]}"
    np.asarray(group.read(), dtype=np.float32).tofile(features)
    return [inter, item_file, features]


WRITERS: dict[str, Callable[[FeatureGroup, PreparedDataset, Path], list[Path]]] = {
    "mmrec": write_mmrec,
    "recbole": write_recbole,
}
