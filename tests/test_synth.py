"""The synthetic generator: real layouts, determinism, and planted structure that can be found.

The structure checks are independent of the generator's internals: they read only the
written files (pictures, texts, truth.json) and the prepared dataset, with plain numpy.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.dataset import PreparedDataset
from data.prepare import prepare_dataset, synthetic_dataset
from data.synth import list_synth_formats, synthesize
from featurestore.cliutil import UserError
from featurestore.workspace import Workspace


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def clusters_of(ds: PreparedDataset, raw: Path) -> np.ndarray:
    """Cluster of each item id (index 0 = padding = -1), from truth.json."""
    truth = json.loads((raw / "truth.json").read_text())["item_cluster"]
    return np.array([-1] + [int(truth[it.orig_id]) for it in ds.items])


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    trees = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        synthesize("hm", tmp_path / name, users=60, items=40, seed=seed)
        trees.append(digest_tree(tmp_path / name))
    assert trees[0] == trees[1]
    assert trees[0]["transactions_train.csv"] != trees[2]["transactions_train.csv"]


def test_hm_layout_real_jpegs_and_missing_images(tmp_path: Path) -> None:
    summary = synthesize("hm", tmp_path, users=50, items=200, seed=0)
    header = (tmp_path / "articles.csv").read_text().splitlines()[0].split(",")
    assert {"article_id", "prod_name", "product_type_name", "colour_group_name", "detail_desc"} <= set(header)
    assert (tmp_path / "transactions_train.csv").read_text().startswith(
        "t_dat,customer_id,article_id,price,sales_channel_id\n")
    images = sorted((tmp_path / "images").rglob("*.jpg"))
    assert 0 < len(images) < 200 and summary["images"] == len(images)  # some articles have no picture
    for path in images:
        assert re.fullmatch(r"0\d{9}", path.stem) and path.parent.name == path.stem[:3]
    with Image.open(images[0]) as picture:
        assert picture.format == "JPEG" and picture.mode == "RGB" and picture.size == (96, 96)


@pytest.mark.parametrize("fmt", list_synth_formats())
def test_every_synthetic_format_prepares(fmt: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    summary = synthesize(fmt, raw, users=120, items=50, seed=3)
    manifest = prepare_dataset(fmt, raw, tmp_path / "ds", name=fmt, min_interactions=3)
    ds = PreparedDataset.load(tmp_path / "ds")
    truth = json.loads((raw / "truth.json").read_text())["item_cluster"]
    assert len(truth) == summary["items"] == 50
    assert {it.orig_id for it in ds.items} <= set(truth)
    assert all(it.text for it in ds.items)
    assert manifest["stats"]["bad_rows"] == 0 and manifest["stats"]["unknown_item_rows"] == 0
    if fmt == "mind":
        assert manifest["counts"]["items_with_image"] == 0
    else:
        assert manifest["counts"]["items_with_image"] > 0.8 * ds.n_items
        with Image.open(next(it.image for it in ds.items if it.image)) as picture:
            picture.load()


def test_unknown_synthetic_format_and_bad_sizes() -> None:
    with pytest.raises(UserError, match="unknown synthetic format 'xyz'; choose one of generic, hm"):
        synthesize("xyz", Path("unused"))
    with pytest.raises(UserError, match="--clusters must be between 2 and 16"):
        synthesize("hm", Path("unused"), clusters=40)


def hit_rate(ds: PreparedDataset, score, k: int = 10) -> float:
    """Validation HR@k of a scoring rule over the full item pool, history excluded."""
    indptr, hist = ds.history("valid")
    targets = ds.targets("valid")
    hits = 0
    for user in range(ds.n_users):
        seen = hist[indptr[user]: indptr[user + 1]]
        scores = score(seen).astype(float)
        scores[0] = -np.inf
        scores[seen] = -np.inf
        hits += targets[user] in np.argsort(-scores, kind="stable")[:k]
    return hits / ds.n_users


def test_planted_structure_beats_popularity(tmp_path: Path) -> None:
    """Knowing the last item's cluster beats global popularity; knowing nothing else
    (random items of that cluster, what a content-only model can at least learn) does too."""
    path = synthetic_dataset(tmp_path, "s", "hm", users=2000, items=500, seed=0, images=False)
    ds = PreparedDataset.load(path)
    cluster = clusters_of(ds, tmp_path / "raw" / "s")
    popularity = ds.train_counts().astype(float)
    rng = np.random.default_rng(0)
    popular = hit_rate(ds, lambda seen: popularity)
    same_cluster_popular = hit_rate(ds, lambda seen: popularity + 1e6 * (cluster == cluster[seen[-1]]))
    same_cluster_random = hit_rate(ds, lambda seen: rng.random(len(cluster)) + 1e6 * (cluster == cluster[seen[-1]]))
    random = hit_rate(ds, lambda seen: rng.random(len(cluster)))
    assert same_cluster_popular > 2.5 * popular
    assert same_cluster_random > 1.3 * popular
    assert popular > 3 * random


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class centroids on even rows, classify odd rows by cosine similarity."""
    features = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-9)
    train, test = np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)
    classes = np.unique(labels[train])
    centroids = np.stack([features[train][labels[train] == c].mean(axis=0) for c in classes])
    predicted = classes[np.argmax(features[test] @ centroids.T, axis=1)]
    return float((predicted == labels[test]).mean())


def test_pictures_alone_and_words_alone_reveal_the_cluster(synth_ws: tuple[Workspace, str],
                                                           synth_dataset: PreparedDataset) -> None:
    ws, name = synth_ws
    cluster = clusters_of(synth_dataset, ws.root / "raw" / name)[1:]
    with_image = [k for k, it in enumerate(synth_dataset.items) if it.image]
    pixels = []
    for k in with_image:
        with Image.open(synth_dataset.items[k].image) as picture:
            rgb = np.asarray(picture.convert("RGB")).reshape(-1, 3) // 64  # 4 levels per channel
        pixels.append(np.bincount(rgb[:, 0] * 16 + rgb[:, 1] * 4 + rgb[:, 2], minlength=64))  # colour histogram
    image_accuracy = nearest_centroid_accuracy(np.sqrt(np.stack(pixels)), cluster[with_image])

    vocabulary = Counter(w for it in synth_dataset.items for w in re.findall(r"[a-z]+", it.text.lower()))
    words = sorted(vocabulary)
    index = {w: k for k, w in enumerate(words)}
    bags = np.zeros((synth_dataset.n_items, len(words)))
    for row, it in enumerate(synth_dataset.items):
        for w in re.findall(r"[a-z]+", it.text.lower()):
            bags[row, index[w]] += 1
    text_accuracy = nearest_centroid_accuracy(bags, cluster)

    chance = 1 / len(np.unique(cluster))
    print(f"nearest-centroid cluster accuracy: images {image_accuracy:.2f}, words {text_accuracy:.2f}")
    assert image_accuracy > 0.8 > 5 * chance
    assert text_accuracy > 0.8
