"""The torch rankers: equal to faiss flat, and the two-pass bound holds where it is tight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.ranking import multi_gpu_layout, rank_targets
from test_ranking import reference_ranks
from eval.torch_ranking import EPS_BF16, TwoPassRanker, error_coefficient, thresholds


def planted(rng, n_users, n_items, dim, history=12):
    """Users near their target (ranks spread over 1..50, as in bench/rank.py), random histories."""
    items = rng.standard_normal((n_items + 1, dim), dtype=np.float32)
    items[0] = 0
    targets = rng.integers(1, n_items + 1, size=n_users)
    users = (0.3 * items[targets] + rng.standard_normal((n_users, dim), dtype=np.float32)).astype(np.float32)
    lengths = rng.integers(0, history + 1, size=n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(1, n_items + 1, size=int(indptr[-1])).astype(np.int64)
    return users, items, targets, indptr, indices


@pytest.mark.parametrize("index", ["torch", "torch-twopass"])
def test_torch_rankers_equal_faiss_flat(index):
    rng = np.random.default_rng(0)
    args = planted(rng, 1500, 3000, 64)
    want = rank_targets(*args, max_k=50, index="flat", progress=False)
    got = rank_targets(*args, max_k=50, index=index, progress=False)
    np.testing.assert_array_equal(got, want)
    assert 0.1 < np.mean(want <= 50) < 0.95  # the ranks spread: both capped and exact ones compared


def test_two_pass_exact_where_bf16_cannot_tell_items_apart():
    """Items within bf16 rounding of the target, above and below it, and a crowd of
    near-ties at the cut-off: only the rescoring orders them. They lie a few fp32 ulps
    apart, so the reference is the real (float64) ranking, which the fp32 paths may miss."""

    rng = np.random.default_rng(1)
    dim, n_users = 32, 60
    base = rng.standard_normal((n_users, dim)).astype(np.float32)
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    blocks = [np.zeros((1, dim), dtype=np.float32)]
    for u in range(n_users):
        near = base[u] + 1e-4 * rng.standard_normal((80, dim)).astype(np.float32)  # 80 near-ties
        blocks.append(np.concatenate([base[u : u + 1], near, base[u : u + 1]]))  # and one exact tie
    items = np.concatenate(blocks)
    targets = 1 + 82 * np.arange(n_users)  # each user's own base vector
    users = (users + 3 * base).astype(np.float32)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    for max_k in (10, 50, 200):
        want = reference_ranks(users, items, targets, indptr, empty, False, max_k)
        got = rank_targets(users, items, targets, indptr, empty, max_k=max_k, index="torch-twopass",
                           progress=False)
        np.testing.assert_array_equal(got, want, err_msg=f"max_k={max_k}")
        assert (want > 1).all()  # the exact duplicate outranks every target (pessimistic ties)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e4])
def test_bf16_pass_stays_within_the_bound(scale):
    """The proven bound against the actual bf16 matmul: every pair, several magnitudes."""
    rng = np.random.default_rng(2)
    dim = 512
    users = torch.from_numpy((scale * rng.standard_normal((64, dim))).astype(np.float32))
    items = torch.from_numpy((rng.standard_normal((2000, dim)) * rng.uniform(0.1, 3, (2000, 1))).astype(np.float32))
    exact = users @ items.T
    low = (users.bfloat16() @ items.bfloat16().T).double()
    margin = (error_coefficient(dim) * torch.linalg.vector_norm(users.double(), dim=1)[:, None]
              * torch.linalg.vector_norm(items.double(), dim=1).max())
    bound = EPS_BF16 / (1 - EPS_BF16) * low.abs() + margin + 1e-300
    assert ((low - exact.double()).abs() <= bound).all()
    # the bound is not vacuous: it is within 200x of the worst error seen
    assert (low - exact.double()).abs().max() * 200 > bound.min()


def test_thresholds_bracket_the_target():
    t = torch.tensor([-5.0, 0.0, 3.0], dtype=torch.float64)
    lo, hi = thresholds(t, torch.full_like(t, 0.5))
    assert (lo < t - 0.5 + 1e-12).all() and (hi > t + 0.5 - 1e-12).all()


def test_two_pass_counts_its_candidates():
    rng = np.random.default_rng(3)
    users, items, targets, indptr, indices = planted(rng, 200, 1000, 32)
    ranker = TwoPassRanker(items)
    ranker.ranks(users, targets, indptr, indices, 50)
    assert 0 < ranker.candidates < 200 * 1000 / 4  # far fewer than a full rescoring


def test_multi_gpu_layout_replicates_what_fits():
    gib = 2**30
    assert multi_gpu_layout(int(0.2 * gib), [80 * gib, 80 * gib]) == "replicate"
    assert multi_gpu_layout(60 * gib, [80 * gib, 70 * gib]) == "shard"
