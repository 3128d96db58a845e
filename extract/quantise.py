"""Residual quantisation: each item's frozen content vector -> L codes (its semantic ID).

TIGER (Rajput et al., NeurIPS 2023) and Singh et al. ("Better Generalization with Semantic
IDs", RecSys 2024) give every item a short tuple of codes: level 1 quantises the vector, level
2 the residual level 1 leaves, and so on. Items with similar content share a code prefix, so a
recommender that embeds the codes instead of the item id shares parameters between them: a
cold or long-tail item inherits what its neighbours learned.

A quantiser is ``(x (n, dim) float32, levels, codebook, seed, iterations) -> Quantised``:

- ``rq-kmeans``: faiss k-means on each level's residual (TIGER's RQ-KMeans baseline), here;
- ``rq-vae``: an MLP auto-encoder with residual codebooks trained in torch (TIGER's RQ-VAE),
  in :mod:`extract.rq_vae`.

The helpers below summarise any code array the same way for the store group's provenance:
code usage per level and collisions (items sharing all L codes), and TIGER's extra
disambiguation level.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from featurestore.errors import UserError
from featurestore.registry import Registry


@dataclass
class Quantised:
    """What a quantiser returns.

    Attributes:
        codes: ``(n, levels)`` int64, each in ``0..codebook-1``.
        errors: after each level, the squared reconstruction error over the catalogue relative to its
            variance (1.0 = no better than the mean vector); measured in the input space.
        settings: the method's own settings as used (recorded in the provenance).
        state_sha256: sha256 of the fitted codebooks (and networks): which quantiser made the codes.
    """

    codes: np.ndarray
    errors: list[float]
    settings: dict = field(default_factory=dict)
    state_sha256: str = ""


Quantiser = Callable[..., Quantised]
# --method -> quantiser; extract.rq_vae registers the torch one on first lookup
QUANTISERS: Registry[Quantiser] = Registry("--method", plugins=("extract.rq_vae",))

DEFAULT_KMEANS_ITERATIONS = 20


def relative_error(x: np.ndarray, approx: np.ndarray) -> float:
    """``sum ||x - approx||^2 / sum ||x - mean(x)||^2``, in float64."""
    x = x.astype(np.float64)
    variance = float(((x - x.mean(axis=0)) ** 2).sum())
    return float(((x - approx) ** 2).sum()) / max(variance, 1e-30)


def check_sizes(n: int, levels: int, codebook: int) -> None:
    if levels < 1 or codebook < 2:
        raise UserError(f"--levels must be >= 1 and --codebook >= 2, got {levels} and {codebook}")
    if codebook > n:
        raise UserError(f"--codebook {codebook} is larger than the {n} items with a vector; "
                        f"use --codebook {max(2, n // 4)} or fewer")


@QUANTISERS.register("rq-kmeans")
def rq_kmeans(x: np.ndarray, levels: int, codebook: int, seed: int, iterations: int | None = None) -> Quantised:
    """Greedy residual k-means with faiss: level l clusters what levels 1..l-1 left over.

    ``faiss.Kmeans`` per level (seeded with ``seed + level``; faiss samples at most 256 points
    per centroid and splits empty clusters). The error cannot rise from one level to the next:
    each centroid is the mean of its points, which is never further from them than zero.
    """
    import faiss

    check_sizes(len(x), levels, codebook)
    iterations = iterations or DEFAULT_KMEANS_ITERATIONS
    residual = np.ascontiguousarray(x, dtype=np.float32).copy()
    codes = np.empty((len(x), levels), dtype=np.int64)
    errors, digest = [], hashlib.sha256()
    for level in range(levels):
        kmeans = faiss.Kmeans(x.shape[1], codebook, niter=iterations, seed=seed + level, verbose=False)
        kmeans.train(residual)
        _, assigned = kmeans.index.search(residual, 1)
        codes[:, level] = assigned[:, 0]
        residual -= kmeans.centroids[assigned[:, 0]]
        errors.append(relative_error(x, x - residual))
        digest.update(kmeans.centroids.tobytes())
    return Quantised(codes, errors, {"iterations": iterations, "faiss": faiss.__version__}, digest.hexdigest())


def collisions(codes: np.ndarray) -> dict:
    """How many items share all their codes with another item.

    Returns:
        ``collisions``: items beyond the first of each shared tuple (what a disambiguation level
        must tell apart), ``colliding_items``: items in a tuple shared by two or more,
        ``largest``: the most items sharing one tuple.
    """
    if len(codes) == 0:
        return {"collisions": 0, "colliding_items": 0, "largest": 0}
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return {"collisions": int(len(codes) - len(counts)), "colliding_items": int(counts[counts > 1].sum()),
            "largest": int(counts.max())}


def disambiguate(codes: np.ndarray) -> np.ndarray:
    """TIGER's extra level: each item's position (0, 1, ...) among the items sharing its codes, in
    id order, so every item's tuple is unique."""
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], inverse[order], side="left")
    position = np.empty(len(codes), dtype=np.int64)
    position[order] = np.arange(len(codes)) - starts
    return np.concatenate([codes, position[:, None]], axis=1)


def code_usage(codes: np.ndarray) -> list[int]:
    """Distinct codes used at each level."""
    return [int(len(np.unique(codes[:, level]))) for level in range(codes.shape[1])]
