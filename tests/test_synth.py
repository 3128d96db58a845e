"""The synthetic generator: real layouts, determinism, and planted structure that can be found.

The structure checks are independent of the generator's internals: they read only the
written files (pictures, texts, truth.json, world.npz) and the prepared dataset, with plain numpy.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.dataset import PreparedDataset
from data.prepare import prepare_dataset, synthetic_dataset
from data.latent_check import agreement, chance, image_vectors, text_vectors
from data.synth import Signals, build_world, list_synth_formats, synthesize
from featurestore.cliutil import UserError
from featurestore.workspace import Workspace


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
    with pytest.raises(UserError, match="--clusters must be at least 2"):
        synthesize("hm", Path("unused"), clusters=1)
    with pytest.raises(UserError, match="need at least 80 items"):
        synthesize("hm", Path("unused"), items=50, clusters=40)
    with pytest.raises(UserError, match="--content-signal, --id-signal and --popularity must be >= 0"):
        Signals(content=0, id=0, popularity=0)
    with pytest.raises(UserError, match="links alone run out"):  # would loop forever in the sampler
        Signals(content=0, id=1, popularity=0)


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


def world_arrays(ds: PreparedDataset, raw: Path) -> dict[str, np.ndarray]:
    """Latents and links of each item id (row 0 = padding), read from world.npz; links are
    mapped to item ids (0 where the follow-up did not survive preparation)."""
    with np.load(raw / "world.npz") as world:
        raw_index = {k.decode(): n for n, k in enumerate(world["item_ids"])}
        rows = np.array([raw_index[it.orig_id] for it in ds.items])
        to_id = np.zeros(len(world["item_ids"]), dtype=np.int64)
        to_id[rows] = np.arange(1, len(rows) + 1)
        latent = np.vstack([np.zeros((1, world["latent"].shape[1])), world["latent"][rows]])
        links = np.vstack([np.zeros((1, world["links"].shape[1]), dtype=np.int64), to_id[world["links"][rows]]])
    return {"latent": latent, "links": links}


def test_planted_structure_beats_popularity(tmp_path: Path) -> None:
    """Items near the recent items in latent space beat global popularity, and so do the
    last item's follow-up links: the content signal and the ID signal are both there."""
    path = synthetic_dataset(tmp_path, "s", "hm", users=2000, items=500, seed=0, images=False)
    ds = PreparedDataset.load(path)
    world = world_arrays(ds, tmp_path / "raw" / "s")
    latent, links = world["latent"], world["links"]
    popularity = ds.train_counts().astype(float)
    rng = np.random.default_rng(0)

    def near_recent(seen):
        centre = latent[seen[-3:]].mean(axis=0)
        return np.log1p(popularity) - 0.5 * ((latent - centre) ** 2).sum(axis=1)

    popular = hit_rate(ds, lambda seen: popularity)
    content = hit_rate(ds, near_recent)
    linked = hit_rate(ds, lambda seen: popularity + 1e6 * np.isin(np.arange(len(popularity)), links[seen[-1]]))
    random = hit_rate(ds, lambda seen: rng.random(len(popularity)))
    print(f"HR@10 popularity {popular:.3f}, near recent {content:.3f}, links {linked:.3f}, random {random:.3f}")
    assert content > 2 * popular
    assert linked > 2 * popular
    assert popular > 2 * random


def bag_of_words(texts: list[str]) -> np.ndarray:
    tokens = [re.findall(r"[a-z]+", text.lower()) for text in texts]
    index = {w: k for k, w in enumerate(sorted({w for row in tokens for w in row}))}
    bags = np.zeros((len(texts), len(index)))
    for row, words in enumerate(tokens):
        for w in words:
            bags[row, index[w]] += 1
    return bags


def test_pictures_alone_and_words_alone_reveal_latent_neighbours(synth_ws: tuple[Workspace, str],
                                                                 synth_dataset: PreparedDataset) -> None:
    """Colour histograms of the written JPEGs and bags of words of the prepared texts: an
    item's nearest neighbours by either are its latent neighbours far more often than chance."""
    ws, name = synth_ws
    latent = world_arrays(synth_dataset, ws.root / "raw" / name)["latent"][1:]
    with_image = [k for k, it in enumerate(synth_dataset.items) if it.image]
    pixels = []
    for k in with_image:
        with Image.open(synth_dataset.items[k].image) as picture:
            rgb = np.asarray(picture.convert("RGB")).reshape(-1, 3) // 64  # 4 levels per channel
        pixels.append(np.bincount(rgb[:, 0] * 16 + rgb[:, 1] * 4 + rgb[:, 2], minlength=64))  # colour histogram
    image = agreement(np.sqrt(np.stack(pixels)), latent[with_image], k=10)
    words = agreement(bag_of_words([it.text for it in synth_dataset.items]), latent, k=10)
    base = chance(synth_dataset.n_items, 10)
    print(f"latent-neighbour agreement@10: colour histograms {image:.3f}, words {words:.3f}, chance {base:.3f}")
    assert image > 3 * base
    assert words > 4 * base


@pytest.mark.slow
def test_real_encoders_recover_latent_neighbours() -> None:
    """MiniLM-L6 text vectors and EfficientNet-Lite0 picture vectors (the real offline
    weights): nearest neighbours share latent neighbours far above chance."""
    world = build_world(users=50, items=300, seed=0)
    items = np.arange(world.n_items)
    base = chance(len(items), 10)
    text = agreement(text_vectors(world, items), world.latent, k=10)
    image = agreement(image_vectors(world, items), world.latent, k=10)
    print(f"latent-neighbour agreement@10 over {len(items)} items: MiniLM-L6 {text:.3f}, "
          f"EfficientNet-Lite0 {image:.3f}, chance {base:.3f}")
    assert text > 5 * base
    assert image > 3 * base


def test_length_and_popularity_skew_are_generator_settings() -> None:
    """The parity panel's worlds (issue 28): longer sequences and a heavier head than the demo's, the
    defaults drawing the demo's world exactly."""
    base = build_world(users=400, items=300, seed=0)
    same = build_world(users=400, items=300, seed=0, mean_length=11.0, popularity_spread=1.0)
    assert np.array_equal(base.seq_items, same.seq_items) and np.array_equal(base.popularity, same.popularity)
    longer = build_world(users=400, items=300, seed=0, mean_length=25.0)
    assert np.diff(longer.indptr).mean() > 1.5 * np.diff(base.indptr).mean()
    skewed = build_world(users=400, items=300, seed=0, popularity_spread=2.0)
    top = lambda world: np.sort(world.popularity)[::-1][:30].sum()  # noqa: E731  (the top 10 % of items)
    assert top(skewed) > top(base) + 0.15
