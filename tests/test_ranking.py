"""rank_targets against a brute-force numpy reference: exact ranks, ties, exclusion.

Every CPU ranker (faiss flat, torch matmul + top-k, the bf16 two-pass) must give the
reference's ranks on every test.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from eval.ranking import csr_rows, popularity_ranks, rank_targets
from featurestore.cliutil import UserError


def reference_ranks(users, items, targets, indptr, indices, exclude_history, max_k):
    """Score every item, count those ranked above the target (ties above), per user."""
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    ranks = []
    for u, target in enumerate(targets):
        competitors = np.ones(len(items), dtype=bool)
        competitors[0] = False
        if exclude_history:
            competitors[indices[indptr[u] : indptr[u + 1]]] = False
        competitors[target] = False
        rank = 1 + int(np.sum(scores[u, competitors] >= scores[u, target]))
        ranks.append(min(rank, max_k + 1))
    return np.array(ranks)


def random_histories(rng, n_users, n_items, max_len):
    lengths = rng.integers(0, max_len + 1, size=n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(
        [rng.choice(np.arange(1, n_items + 1), size=n, replace=False) for n in lengths]
    ).astype(np.int64)
    return indptr, indices


CPU_INDEXES = ("flat", "torch", "torch-twopass")


def check(users, items, targets, indptr, indices, max_k, batch_size=64):
    for exclude in (True, False):
        want = reference_ranks(users, items, targets, indptr, indices, exclude, max_k)
        for index in CPU_INDEXES:
            got = rank_targets(users, items, targets, indptr, indices, exclude_history=exclude,
                               max_k=max_k, batch_size=batch_size, progress=False, index=index)
            np.testing.assert_array_equal(got, want, err_msg=f"index={index}, exclude_history={exclude}")


@pytest.mark.parametrize("max_k", [1, 10, 50])
def test_gaussian_embeddings_match_reference(max_k):
    rng = np.random.default_rng(max_k)
    n_users, n_items, dim = 300, 400, 16
    users = rng.normal(size=(n_users, dim)).astype(np.float32)
    items = rng.normal(size=(n_items + 1, dim)).astype(np.float32)
    targets = rng.integers(1, n_items + 1, size=n_users)
    indptr, indices = random_histories(rng, n_users, n_items, 20)
    check(users, items, targets, indptr, indices, max_k)


def test_exact_ties_rank_target_below_equal_scores():
    """Small-integer vectors make scores exact integers: many ties, duplicated rows."""
    rng = np.random.default_rng(1)
    n_users, dim = 200, 4
    base = rng.integers(-2, 3, size=(60, dim))
    items = np.concatenate([np.zeros((1, dim)), base, base, base[:20]]).astype(np.float32)
    n_items = len(items) - 1
    users = rng.integers(-2, 3, size=(n_users, dim)).astype(np.float32)
    targets = rng.integers(1, n_items + 1, size=n_users)
    indptr, indices = random_histories(rng, n_users, n_items, 8)
    check(users, items, targets, indptr, indices, max_k=20)
    # a user scoring every item equally: the target is last among the N items
    flat = np.zeros((1, dim), dtype=np.float32)
    for index in CPU_INDEXES:
        rank = rank_targets(flat, items, np.array([5]), np.array([0, 0]), np.array([], dtype=np.int64),
                            max_k=500, progress=False, index=index)
        assert rank[0] == n_items, index


def test_history_holding_the_top_items_is_skipped_exactly():
    """Each history is the user's top-h items, so only an exact deep search finds the rank."""
    rng = np.random.default_rng(2)
    n_users, n_items, dim, h = 120, 300, 8, 25
    users = rng.normal(size=(n_users, dim)).astype(np.float32)
    items = rng.normal(size=(n_items + 1, dim)).astype(np.float32)
    order = np.argsort(-(users @ items[1:].T), axis=1) + 1
    indices = order[:, :h].reshape(-1).astype(np.int64)
    indptr = np.arange(0, n_users * h + 1, h)
    # targets just below the history, and some targets inside their own history
    targets = order[np.arange(n_users), rng.integers(h, h + 15, size=n_users)]
    targets[::4] = order[::4, 3]
    check(users, items, targets, indptr, indices, max_k=10)
    got = rank_targets(users, items, targets, indptr, indices, max_k=10, progress=False)
    assert (got[1::4] <= 15).all()  # targets at positions h..h+14 rank 1..15 once history is gone


def test_k_larger_than_pool_and_tiny_pools():
    rng = np.random.default_rng(3)
    for n_items in (1, 2, 5):
        users = rng.normal(size=(40, 3)).astype(np.float32)
        items = rng.normal(size=(n_items + 1, 3)).astype(np.float32)
        targets = rng.integers(1, n_items + 1, size=40)
        indptr, indices = random_histories(rng, 40, n_items, n_items)
        check(users, items, targets, indptr, indices, max_k=50, batch_size=7)
    one = rank_targets(users[:3], items[:2], np.array([1, 1, 1]), np.zeros(4, dtype=np.int64),
                       np.zeros(0, dtype=np.int64), max_k=50, progress=False)
    assert (one == 1).all()


def test_padding_row_never_ranked_and_batches_do_not_matter():
    rng = np.random.default_rng(4)
    users = rng.normal(size=(100, 8)).astype(np.float32)
    items = rng.normal(size=(201, 8)).astype(np.float32)
    items[0] = 1e6  # would outrank everything if it were in the pool
    targets = rng.integers(1, 201, size=100)
    indptr, indices = random_histories(rng, 100, 200, 10)
    check(users, items, targets, indptr, indices, max_k=20)
    a = rank_targets(users, items, targets, indptr, indices, max_k=20, batch_size=3, progress=False)
    b = rank_targets(users, items, targets, indptr, indices, max_k=20, batch_size=1000, progress=False)
    np.testing.assert_array_equal(a, b)


def test_csr_rows_selects_rows_in_order():
    indptr = np.array([0, 2, 2, 5])
    indices = np.array([1, 2, 7, 8, 9])
    new_indptr, new_indices = csr_rows(indptr, indices, np.array([2, 0, 1]))
    np.testing.assert_array_equal(new_indptr, [0, 3, 5, 5])
    np.testing.assert_array_equal(new_indices, [7, 8, 9, 1, 2])


def test_missing_faiss_and_gpu_index_are_user_errors(monkeypatch):
    users = np.ones((2, 2), dtype=np.float32)
    items = np.ones((3, 2), dtype=np.float32)
    args = (users, items, np.array([1, 2]), np.zeros(3, dtype=np.int64), np.zeros(0, dtype=np.int64))
    import faiss

    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        with pytest.raises(UserError, match="morec-store\\[gpu\\]"):
            rank_targets(*args, index="flat-gpu", progress=False)
    with pytest.raises(UserError, match="unknown index"):
        rank_targets(*args, index="hnsw", progress=False)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(UserError, match="morec-store\\[cpu\\]"):
        rank_targets(*args, progress=False)


@pytest.mark.parametrize("max_k", [1, 10])
def test_popularity_ranks_count_what_the_search_finds(max_k):
    """Counting gives the ranks of the search over one-dimensional vectors (user = 1, item =
    its count), ties included: few distinct counts make many exact ties."""
    rng = np.random.default_rng(3)
    n_items, n_users = 60, 200
    counts = rng.integers(0, 6, size=n_items + 1).astype(np.float32)
    indptr, indices = random_histories(rng, n_users, n_items, max_len=15)
    targets = rng.integers(1, n_items + 1, size=n_users)
    for exclude in (True, False):
        got = popularity_ranks(counts, targets, indptr, indices, exclude_history=exclude, max_k=max_k)
        want = reference_ranks(np.ones((n_users, 1), np.float32), counts[:, None], targets, indptr, indices,
                               exclude, max_k)
        np.testing.assert_array_equal(got, want, err_msg=f"exclude_history={exclude}")
