"""What a prepared dataset records about each image file, so a picture changed since is noticed.

``write_prepared`` stores every item's image size, mtime and sha256. Hashing reads each
file once, in threads (reading is I/O bound and hashlib releases the GIL), and a re-prepare
reuses the previous hash of a file whose path, size and mtime are unchanged, so preparing
again stays as fast as a stat per image. Later stages check twice, each where it is cheap:
extraction stats every image before it starts (:func:`refuse_changed`: a rewritten or
regenerated file has a new mtime) and the decoder compares the sha256 of the bytes it reads
anyway (:func:`content_changed`: a file swapped with its size and mtime kept).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from featurestore.errors import UserError

if TYPE_CHECKING:  # data.dataset imports this module to record the images it writes
    from data.dataset import Item, PreparedDataset

HASH_THREADS = 8


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _recorded(item: Item) -> tuple[int, int] | None:
    return (item.image_size, item.image_mtime_ns) if item.image_sha256 else None


def _with_record(item: Item, known: dict[tuple[str, int, int], str]) -> Item:
    """``item`` with its image's size, mtime and sha256 (reused from ``known`` when unchanged)."""
    stat = _stat(item.image) if item.image else None
    if stat is None:
        return item
    sha = known.get((item.image, *stat))
    if sha is None:
        try:
            sha = hashlib.sha256(Path(item.image).read_bytes()).hexdigest()
        except OSError:
            return item
        if _stat(item.image) != stat:  # rewritten while hashing: record nothing rather than a mix
            return item
    return dataclasses.replace(item, image_size=stat[0], image_mtime_ns=stat[1], image_sha256=sha)


def _known_hashes(previous: Path) -> dict[tuple[str, int, int], str]:
    """(path, size, mtime) -> sha256 from an earlier preparation's items.jsonl, if readable."""
    try:
        with open(previous / "items.jsonl", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        return {(r["image"], r["image_size"], r["image_mtime_ns"]): r["image_sha256"]
                for r in rows if r.get("image_sha256")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no usable earlier preparation: hash everything


def record_images(items: Iterable[Item], previous: Path) -> list[Item]:
    """Every item with its image record; ``previous`` is the prepared folder being replaced."""
    known = _known_hashes(previous)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(lambda item: _with_record(item, known), items))


def refuse_changed(dataset: PreparedDataset) -> None:
    """Refuse, naming the first file and the prepare command, when any recorded image's size
    or mtime differs now."""
    changed = [item for item in dataset.items if (rec := _recorded(item)) is not None and _stat(item.image) != rec]
    if changed:
        more = f" (and {len(changed) - 1} other images)" if len(changed) > 1 else ""
        manifest = dataset.manifest
        command = (f"featurestore dataset prepare --format {manifest.get('format', 'FORMAT')} --source "
                   f"{manifest.get('source', 'RAW')} --name {dataset.name} --overwrite")
        raise UserError(f"image {changed[0].image}{more} changed since dataset {dataset.name} was prepared; "
                        f"prepare it again (`{command}`), then rerun this command")


def content_changed(item: Item, data: bytes) -> bool:
    """Whether ``data`` (the bytes just read from ``item.image``) differ from what prepare hashed."""
    return bool(item.image_sha256) and hashlib.sha256(data).hexdigest() != item.image_sha256
