"""The Recommender: one item tower + one user encoder, scored by inner product.

This is the object ``eval`` ranks with (the contract in ARCHITECTURE.md):
``item_vectors()`` for the whole catalogue, ``user_vectors(history)`` for users,
and ``max_seq_len``. Which tower or backbone is inside is the spec's business.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recommend.features import FeatureSource
from recommend.item_towers import ITEM_TOWERS, ItemTower, create_item_tower
from recommend.user_encoders import EncoderConfig, UserEncoder, create_user_encoder


class Recommender(nn.Module):
    """Item tower + user encoder.

    Histories are left-padded with 0; only the most recent ``max_seq_len`` items of
    a history are used (the longest input seen in training).
    """

    def __init__(self, item_tower: ItemTower, user_encoder: UserEncoder, max_seq_len: int) -> None:
        super().__init__()
        self.item_tower = item_tower
        self.user_encoder = user_encoder
        self.max_seq_len = max_seq_len

    @property
    def dim(self) -> int:
        return self.item_tower.dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors for ids of any shape; padding (id 0) is the zero vector."""
        return self.item_tower(ids) * (ids > 0).unsqueeze(-1)

    def encode(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """User-encoder hidden states ``(B, L, d)``; the last position is the user."""
        return self.user_encoder(item_vectors, mask)

    def hidden(self, history: torch.Tensor) -> torch.Tensor:
        history = history[:, -self.max_seq_len:].to(self.device)
        return self.encode(self.embed(history), history > 0)

    @torch.no_grad()
    def item_vectors(self, batch_size: int = 4096) -> torch.Tensor:
        """``(N + 1, d)`` vectors of every item id; row 0 (padding) is zero."""
        vectors = self.item_tower.all_vectors(batch_size)
        vectors[0] = 0
        return vectors

    @torch.no_grad()
    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` user vectors from left-padded histories ``(B, L)``."""
        return self.hidden(torch.as_tensor(history, dtype=torch.long))[:, -1]


def build_recommender(spec: dict, sources: Sequence[FeatureSource] = (), fit: bool = True) -> Recommender:
    """Rebuild a Recommender from plain data (a run config's ``model`` section).

    Args:
        spec: ``{"n_items", "dim", "max_seq_len", "item_tower": {...}, "user_encoder": {...}}``.
        sources: the opened store groups named by the item tower, in order.
        fit: compute data-derived state (whitening); False when a checkpoint follows.

    Example:
        >>> model = build_recommender({"n_items": 50, "dim": 32, "max_seq_len": 10,
        ...     "item_tower": {"name": "id"}, "user_encoder": {"name": "sasrec"}})
    """
    tower_spec = {**spec["item_tower"], "n_items": spec["n_items"], "dim": spec["dim"]}
    tower = create_item_tower(tower_spec, sources, fit)
    enc = dict(spec["user_encoder"])
    cfg = EncoderConfig(dim=spec["dim"], max_seq_len=spec["max_seq_len"],
                        **{k: v for k, v in enc.items() if k != "name"})
    model = Recommender(tower, create_user_encoder(enc["name"], cfg), spec["max_seq_len"])
    model.user_encoder.initialise(model)  # e.g. sasrec's --init-std reaches the ID table
    ITEM_TOWERS.get(spec["item_tower"]["name"]).finish(model, spec)  # e.g. adapters in the user encoder
    return model
