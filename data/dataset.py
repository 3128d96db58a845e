"""The canonical prepared dataset every later stage reads.

A prepared dataset is a folder ``ROOT/datasets/NAME`` holding:

- ``manifest.json``: counts, the options used, ``fingerprint`` (items and their
  content) and ``interactions_fingerprint`` (the sequences).
- ``items.jsonl``: one line per item id 1..N, in id order:
  ``{"id", "orig_id", "text", "image", "image_size", "image_mtime_ns", "image_sha256"}``;
  ``image`` is an absolute path or null, the rest what prepare read there (:mod:`data.images`).
  Id 0 is padding and has no line.
- ``users.txt``: the original user id of user index 0..U-1, one per line.
- ``seq_indptr.npy`` / ``seq_items.npy``: each user's full (filtered, deduplicated,
  truncated) sequence in time order, as CSR over int32 item ids.

The leave-one-out split is derived, never stored: the last item is the test
target, the second-to-last the validation target, the rest is training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from data.images import record_images
from featurestore.runtime.files import naming

FORMAT_VERSION = 1
COLD_THRESHOLD = 10
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Item:
    """One catalogue item after preparation."""

    id: int
    orig_id: str
    text: str
    image: str | None
    image_size: int | None = None  # the image file as prepare read it (data.images)
    image_mtime_ns: int | None = None
    image_sha256: str | None = None

    @property
    def image_ok(self) -> bool:
        return self.image is not None


def item_fingerprint(items: Sequence[Item]) -> str:
    """sha256 over every item's original id, text, image name, image size and image sha256
    (recorded by :func:`data.images.record_images`): a store built from other pictures is stale."""
    digest = hashlib.sha256()
    for item in items:
        size = os.path.getsize(item.image) if item.image and os.path.exists(item.image) else -1
        image_name = os.path.basename(item.image) if item.image else ""
        content = f"\t{item.image_sha256}" if item.image_sha256 else ""
        digest.update(f"{item.id}\t{item.orig_id}\t{item.text}\t{image_name}\t{size}{content}\n".encode())
    return digest.hexdigest()[:16]


def sequences_fingerprint(indptr: np.ndarray, items: np.ndarray) -> str:
    """sha256 of the CSR sequences: changes when any user's history changes."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(indptr, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(items, dtype=np.int32).tobytes())
    return digest.hexdigest()[:16]


class PreparedDataset:
    """Read-only view of a prepared dataset folder.

    Example:
        >>> ds = PreparedDataset.load(Workspace(root).dataset_dir("HM"))
        >>> ds.targets("test")[:3], ds.n_items
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.manifest: dict = json.loads((self.path / "manifest.json").read_text())
        self.indptr: np.ndarray = np.load(self.path / "seq_indptr.npy")
        self.seq_items: np.ndarray = np.load(self.path / "seq_items.npy")

    @classmethod
    def load(cls, path: Path | str) -> "PreparedDataset":
        path = Path(path)
        if not (path / "manifest.json").exists():
            from featurestore.errors import UserError

            raise UserError(
                f"no prepared dataset at {path}; run `featurestore dataset prepare "
                f"--name {path.name} ...` (or `featurestore dataset synth` for a demo)"
            )
        return cls(path)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def n_items(self) -> int:
        """N: item ids run 1..N; arrays indexed by item id have N + 1 rows."""
        return int(self.manifest["counts"]["items"])

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["options"]["max_seq_len"])

    @cached_property
    def items(self) -> list[Item]:
        with open(self.path / "items.jsonl", encoding="utf-8") as fh:
            return [Item(**json.loads(line)) for line in fh]

    @cached_property
    def user_ids(self) -> list[str]:
        return (self.path / "users.txt").read_text(encoding="utf-8").splitlines()

    def sequence(self, user: int) -> np.ndarray:
        """The full sequence of user index ``user`` (train + valid + test)."""
        return self.seq_items[self.indptr[user] : self.indptr[user + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def history(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """CSR (indptr, items) of what each user has seen before ``split``'s target.

        ``train``: all but the last two items; ``valid``: all but the last one dropped
        twice (= train); ``test``: all but the last item.
        """
        drop = {"train": 2, "valid": 2, "test": 1}[split]
        lengths = self.lengths() - drop
        indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        keep = np.ones(len(self.seq_items), dtype=bool)
        ends = self.indptr[1:]
        for k in range(1, drop + 1):
            keep[ends - k] = False
        return indptr, self.seq_items[keep]

    def targets(self, split: str) -> np.ndarray:
        """One target item id per user: second-to-last (valid) or last (test)."""
        offset = {"valid": 2, "test": 1}[split]
        return self.seq_items[self.indptr[1:] - offset]

    def train_counts(self) -> np.ndarray:
        """Interactions per item id in the training split (length N + 1)."""
        _, items = self.history("train")
        return np.bincount(items, minlength=self.n_items + 1)

    def cold_items(self, threshold: int = COLD_THRESHOLD) -> np.ndarray:
        """Boolean mask over item ids: fewer than ``threshold`` training interactions."""
        cold = self.train_counts() < threshold
        cold[0] = False
        return cold


def write_prepared(
    path: Path,
    items: Iterable[Item],
    user_ids: Sequence[str],
    indptr: np.ndarray,
    seq_items: np.ndarray,
    manifest: dict,
    before_replace: Callable[[dict], None] | None = None,
) -> dict:
    """Write a prepared dataset atomically: a temporary folder renamed into place.

    ``manifest`` gets ``counts``, ``fingerprint``, ``interactions_fingerprint`` and
    ``format_version`` filled in; the completed manifest is returned. A crash leaves
    either the old folder or the new one, never half of one. ``before_replace`` sees the
    completed manifest before an existing folder is replaced; raising there keeps the old one.
    """
    path = Path(path)
    items = record_images(items, previous=path)
    if [it.id for it in items] != list(range(1, len(items) + 1)):
        raise ValueError("items must carry ids 1..N in order")
    lengths = np.diff(indptr)
    if len(lengths) and lengths.min() < 3:
        raise ValueError("every user needs at least 3 items for a leave-one-out split")
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["counts"] = {
        "users": int(len(user_ids)),
        "items": int(len(items)),
        "interactions": int(len(seq_items)),
        "train": int(len(seq_items) - 2 * len(user_ids)),
        "valid": int(len(user_ids)),
        "test": int(len(user_ids)),
        "items_with_image": int(sum(it.image_ok for it in items)),
    }
    manifest["fingerprint"] = item_fingerprint(items)
    manifest["interactions_fingerprint"] = sequences_fingerprint(indptr, seq_items)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    files: dict[str, Callable[[Path], object]] = {
        "items.jsonl": lambda file: file.write_text(
            "".join(json.dumps(it.__dict__, ensure_ascii=False) + "\n" for it in items), encoding="utf-8"),
        "users.txt": lambda file: file.write_text("".join(f"{u}\n" for u in user_ids), encoding="utf-8"),
        "seq_indptr.npy": lambda file: np.save(file, np.asarray(indptr, dtype=np.int64)),
        "seq_items.npy": lambda file: np.save(file, np.asarray(seq_items, dtype=np.int32)),
        "manifest.json": lambda file: file.write_text(json.dumps(manifest, indent=2)),
    }
    try:
        for name, write in files.items():
            with naming(path / name):  # a full disk names the file the user will look for, not tmp's
                write(tmp / name)
        if path.exists() and before_replace is not None:
            before_replace(manifest)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
