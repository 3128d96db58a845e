"""``--mode id-init``: IDRec whose table starts from the items' content, then trains freely.

Harte et al. (RecSys 2023) start BERT4Rec's item table from LLM embeddings reduced by PCA and
report +15-20 % NDCG: the random start of an ID table wastes epochs learning which items are
alike, which the content already says. Here the table's row of every item with a stored vector
is that vector's PCA projection onto the top d directions (scikit-learn, fitted on the
catalogue), scaled as a whole to the spread of the Xavier start IDRec uses, so the learning rate
and weight decay mean what they mean for ``--mode id``; items without a vector keep their Xavier
row. After the first step it is an ordinary ID table: the run reloads without the store group,
and its cost is IDRec's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from featurestore.errors import UserError
from recommend.features import FeatureSource, open_source, resolve_groups
from recommend.item_towers import (ITEM_TOWERS, ContentOptions, IdEmbedding, ItemTower, StoreGroupsKind,
                                   content_groups, content_spec)
from recommend.options import TrainOptions

if TYPE_CHECKING:
    from data.dataset import PreparedDataset
    from featurestore.workspace import Workspace


def pca_start(source: FeatureSource, table: np.ndarray) -> np.ndarray:
    """``table`` (N + 1, d) with each present item's row replaced by its vector's PCA projection.

    Components beyond what the catalogue supports (fewer items or features than d) start at zero.
    """
    from sklearn.decomposition import PCA

    ids = np.flatnonzero(source.present)
    rows = source.gather(ids).astype(np.float64)
    k = min(table.shape[1], len(ids), rows.shape[1])
    scores = PCA(n_components=k, svd_solver="full").fit_transform(rows)
    xavier_std = math.sqrt(2.0 / sum(table.shape))
    start = table.copy()
    start[ids] = 0.0
    start[ids, :k] = scores * (xavier_std / (float(scores.std()) or 1.0))
    return start


class IdInitKind(StoreGroupsKind):
    """``id-init``: reads one store group once, to start the table."""

    options = ContentOptions
    summary = "IDRec table started from the PCA projection of stored vectors (Harte et al.)"
    reads_store_rows = True

    def __call__(self, spec: dict, sources: Sequence[FeatureSource], fit: bool) -> ItemTower:
        tower = IdEmbedding(spec["n_items"], spec["dim"])
        if fit:
            if len(sources) != 1:
                raise UserError("--mode id-init starts its table from one store group; name it with --encoder ENC "
                                "or --features GROUP")
            with torch.no_grad():
                start = pca_start(sources[0], tower.table.weight.numpy())
                tower.table.weight.copy_(torch.from_numpy(start))
        return tower

    def check(self, opts: TrainOptions) -> TrainOptions:
        if content_groups(opts) != 1 or opts.fusion or opts.whiten or opts.with_id:
            raise UserError("--mode id-init starts an ID table from one store group: give one --encoder ENC or "
                            "--features GROUP, and no --fusion/--whiten/--with-id")
        return opts

    def spec(self, opts: TrainOptions, dataset: str) -> dict:
        return content_spec(opts)

    def open(self, ws: Workspace, opts: TrainOptions, dataset: PreparedDataset) -> list[FeatureSource]:
        groups = resolve_groups(dataset.name, opts.encoders, opts.features)
        return [open_source(ws, g, dataset.fingerprint, dataset.n_items) for g in groups]

    def reopen(self, ws: Workspace, config: dict) -> list:
        return []  # the trained table is the whole tower

    def study_rows(self, mode: str, study: Any) -> list[tuple[str, dict]]:
        return [(mode, {"encoders": [study.encoder]})]

    def study_extraction(self, study: Any) -> tuple[None, str]:
        return None, f"features of {study.dataset} by {study.encoder}"


ITEM_TOWERS.register("id-init")(IdInitKind())
