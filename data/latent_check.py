"""Do pretrained encoders read a synthetic world's latents? Neighbour agreement.

Why: the generator claims that pictures and texts rendered from item latents let a
real image or text encoder recover latent *neighbourhoods*, not only coarse themes.
This measures it: for each item, the share of its ``k`` nearest neighbours by encoder
vector (cosine) that are also among its ``k`` nearest latent neighbours (Euclidean),
against ``k / (n - 1)`` for a random neighbour list. Used by the tests (small world)
and ``bench/synth_world.py`` (a random sample of the 87K catalogue).

Example:
    >>> agreement(text_vectors, world.latent[items], k=10)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from data.dataset import Item
from data.synth import World, description_of, render_image, title_of


def _neighbours(similarity: np.ndarray, k: int) -> np.ndarray:
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, k, axis=1)[:, :k]


def agreement(vectors: np.ndarray, latent: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k cosine neighbours among its k latent neighbours."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    by_vector = _neighbours(unit @ unit.T, k)
    latent = np.asarray(latent, dtype=np.float64)
    squared = (latent * latent).sum(axis=1)
    by_latent = _neighbours(-(squared[:, None] + squared[None, :] - 2 * latent @ latent.T), k)
    shared = (by_vector[:, :, None] == by_latent[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / k)


def chance(n: int, k: int = 10) -> float:
    return k / (n - 1)


def text_vectors(world: World, items: np.ndarray, encoder_name: str = "minilm-l6", batch: int = 64) -> np.ndarray:
    """Encoder vectors of the items' texts (title + description, as the hm reader joins them)."""
    from extract.registry import create_encoder

    encoder = create_encoder(encoder_name)
    texts = [f"{title_of(world, i)} {description_of(world, i)}" for i in items]
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            out.append(encoder(encoder.preprocessor.collate(texts[start:start + batch])).float().numpy())
    return np.concatenate(out)


def image_vectors(world: World, items: np.ndarray, encoder_name: str = "efficientnet-lite0",
                  batch: int = 64) -> np.ndarray:
    """Encoder vectors of the items' pictures, rendered as the generator renders them (JPEG)."""
    from extract.registry import create_encoder

    encoder = create_encoder(encoder_name)
    pre = encoder.preprocessor
    out = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        for start in range(0, len(items), batch):
            loaded = []
            for item in items[start:start + batch]:
                path = Path(folder) / f"{item}.jpg"
                render_image(world.latent[item], np.random.default_rng([world.seed, 7, int(item)])).save(
                    path, format="JPEG", quality=90)
                loaded.append(pre.load(Item(int(item) + 1, str(item), "", str(path))))
            out.append(encoder(pre.collate(loaded)).float().numpy())
    return np.concatenate(out)
