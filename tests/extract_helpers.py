"""Tiny prepared datasets for the extraction and store tests (real JPEGs, controlled defects)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.dataset import Item, PreparedDataset, write_prepared
from featurestore.workspace import Workspace

SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def photo(name: str) -> Path:
    """A real photograph shipped with scikit-learn (a Chinese palace, a flower)."""
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / name


def draw_picture(path: Path, seed: int, size: int = 96) -> Path:
    """A small JPEG: a coloured shape on a coloured background, different per seed."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    box = sorted(rng.integers(0, size, 2).tolist()) + sorted(rng.integers(0, size, 2).tolist())
    draw.ellipse((box[0], box[2], box[1] + 8, box[3] + 8), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)
    return path


def write_dataset(ws: Workspace, name: str, texts: list[str], images: list[Path | None]) -> PreparedDataset:
    """A prepared dataset over the given items (ids 1..N in order) with a few users covering them."""
    items = [Item(i + 1, f"a{i + 1:04d}", text, str(image) if image else None)
             for i, (text, image) in enumerate(zip(texts, images))]
    n = len(items)
    sequences = [[(u + k) % n + 1 for k in range(4)] for u in range(max(n, 3))]
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
    write_prepared(ws.dataset_dir(name), items, [f"u{u}" for u in range(len(sequences))], indptr,
                   np.concatenate(sequences), {"name": name, "options": {"max_seq_len": 4}})
    return PreparedDataset.load(ws.dataset_dir(name))


def titles(n: int) -> list[str]:
    """n distinct product titles of varying length."""
    words = ["red", "summer", "dress", "wool", "coat", "denim", "jacket", "linen", "shirt", "striped",
             "leather", "boots", "silk", "scarf", "cotton", "hoodie", "slim", "fit", "trousers", "knit"]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=2 + i % 9)) + f" no {i}" for i in range(n)]


def image_dataset(ws: Workspace, name: str, n_good: int = 10) -> PreparedDataset:
    """n_good drawn JPEGs, then a corrupt JPEG, a missing file, and an item with no image."""
    folder = ws.root / "raw" / name
    images: list[Path | None] = [draw_picture(folder / f"{i}.jpg", seed=i) for i in range(n_good)]
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(images[0].read_bytes()[:200])  # a JPEG cut short: header only
    images += [corrupt, folder / "missing.jpg", None]
    return write_dataset(ws, name, titles(len(images)), images)


def copy_dataset(src: Workspace, dst: Workspace, name: str) -> None:
    shutil.copytree(src.dataset_dir(name), dst.dataset_dir(name))

