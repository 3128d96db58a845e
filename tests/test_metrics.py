"""HR/NDCG formulas, and evaluate() / popularity_metrics() against direct references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from eval.evaluate import evaluate, left_padded, popularity_metrics, subset_users
from eval.metrics import metrics_from_ranks, parse_ks
from featurestore.cliutil import UserError


def test_metrics_from_ranks_by_hand():
    got = metrics_from_ranks(np.array([1, 2, 10, 11, 51]), [10, 50])
    assert got["HR@10"] == pytest.approx(3 / 5)
    assert got["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert got["HR@50"] == pytest.approx(4 / 5)
    assert got["NDCG@50"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)) / 5)
    assert list(got) == ["HR@10", "NDCG@10", "HR@50", "NDCG@50"]
    assert metrics_from_ranks(np.array([], dtype=int), [10]) == {"HR@10": None, "NDCG@10": None}


def test_parse_ks():
    assert parse_ks("50,10, 20,10") == (10, 20, 50)
    for bad in ("", "ten", "0,10"):
        with pytest.raises(UserError, match="--k"):
            parse_ks(bad)


def test_left_padded_keeps_the_most_recent_items():
    indptr = np.array([0, 5, 6, 6])
    items = np.array([1, 2, 3, 4, 5, 9])
    got = left_padded(indptr, items, np.array([0, 1, 2]), 3)
    np.testing.assert_array_equal(got, [[3, 4, 5], [0, 0, 9], [0, 0, 0]])


class PositionWeightedBag(nn.Module):
    """A small real Recommender: user = position-weighted sum of history item vectors.

    Dropout makes train mode visibly different from eval mode, and the position
    weights make the left-padding and truncation observable.
    """

    def __init__(self, n_items: int, dim: int, max_seq_len: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        table = torch.randn(n_items + 1, dim, generator=generator)
        table[0] = 0
        self.table = nn.Parameter(table)
        self.max_seq_len = max_seq_len
        self.dropout = nn.Dropout(0.5)
        self.register_buffer("weights", torch.arange(1, max_seq_len + 1, dtype=torch.float32))

    def item_vectors(self, batch_size: int = 4096) -> torch.Tensor:
        return self.table

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        assert history.shape[1] == self.max_seq_len
        return self.dropout((self.table[history] * self.weights[:, None]).sum(dim=1))


def reference(model, dataset, split, exclude, rows, ks):
    """Numpy: user vectors from the last L history items, scores for every item, ranks."""
    table = model.table.detach().numpy().astype(np.float64)
    weights = np.arange(1, model.max_seq_len + 1)
    indptr, items = dataset.history(split)
    targets = dataset.targets(split)
    ranks = []
    for u in rows:
        seen = items[indptr[u] : indptr[u + 1]]
        recent = seen[-model.max_seq_len :]
        user = (table[recent] * weights[len(weights) - len(recent) :, None]).sum(axis=0)
        scores = table @ user
        keep = np.ones(len(table), dtype=bool)
        keep[0] = False
        if exclude:
            keep[seen] = False
        keep[targets[u]] = False
        ranks.append(1 + int(np.sum(scores[keep] >= scores[targets[u]])))
    return metrics_from_ranks(np.array(ranks), ks)


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("exclude", [True, False])
def test_evaluate_matches_numpy_reference(synth_dataset, split, exclude):
    ds = synth_dataset
    model = PositionWeightedBag(ds.n_items, 16, max_seq_len=4)
    model.train()
    ks = (5, 10, 20)
    got = evaluate(model, ds, split=split, ks=ks, exclude_history=exclude, batch_size=37)
    want = reference(model, ds, split, exclude, np.arange(ds.n_users), ks)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert got["users"] == ds.n_users
    assert (got["split"], got["subset"], got["exclude_history"]) == (split, "all", exclude)
    assert "below" in got["ties"]
    assert model.training  # restored after evaluation


def test_subsets_partition_users_and_match_reference(synth_dataset):
    ds = synth_dataset
    model = PositionWeightedBag(ds.n_items, 8, max_seq_len=6, seed=1)
    model.eval()
    cold = evaluate(model, ds, split="test", ks=(10,), subset="cold")
    warm = evaluate(model, ds, split="test", ks=(10,), subset="warm")
    everyone = evaluate(model, ds, split="test", ks=(10,), subset="all")
    assert cold["users"] > 0 and warm["users"] > 0
    assert cold["users"] + warm["users"] == everyone["users"] == ds.n_users
    pooled = (cold["HR@10"] * cold["users"] + warm["HR@10"] * warm["users"]) / ds.n_users
    assert pooled == pytest.approx(everyone["HR@10"])
    rows = subset_users(ds, "test", "cold")
    assert (ds.train_counts()[ds.targets("test")[rows]] < 10).all()
    assert cold["HR@10"] == pytest.approx(reference(model, ds, "test", True, rows, (10,))["HR@10"])
    assert not model.training


def test_return_vectors_recompute_the_metrics(synth_dataset):
    ds = synth_dataset
    model = PositionWeightedBag(ds.n_items, 8, max_seq_len=5, seed=2)
    result = evaluate(model, ds, split="valid", ks=(10,), subset="warm", return_vectors=True)
    v = result["vectors"]
    assert v.items.shape == (ds.n_items + 1, 8) and len(v.users) == len(v.targets) == result["users"]
    scores = v.users.astype(np.float64) @ v.items.astype(np.float64).T
    ranks = []
    for u, target in enumerate(v.targets):
        keep = np.ones(len(v.items), dtype=bool)
        keep[[0, *v.history_indices[v.history_indptr[u] : v.history_indptr[u + 1]], target]] = False
        ranks.append(1 + int(np.sum(scores[u, keep] >= scores[u, target])))
    assert metrics_from_ranks(np.array(ranks), (10,))["HR@10"] == pytest.approx(result["HR@10"])


@pytest.mark.parametrize("exclude", [True, False])
def test_popularity_matches_direct_count(synth_dataset, exclude):
    ds = synth_dataset
    counts = ds.train_counts()
    indptr, items = ds.history("valid")
    targets = ds.targets("valid")
    ranks = []
    for u, target in enumerate(targets):
        keep = np.ones(len(counts), dtype=bool)
        keep[0] = False
        if exclude:
            keep[items[indptr[u] : indptr[u + 1]]] = False
        keep[target] = False
        ranks.append(1 + int(np.sum(counts[keep] >= counts[target])))
    want = metrics_from_ranks(np.array(ranks), (10, 20))
    got = popularity_metrics(ds, "valid", (10, 20), exclude_history=exclude)
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name
    assert got["model"] == "popularity" and got["users"] == ds.n_users
    assert 0 < got["HR@20"] < 1
