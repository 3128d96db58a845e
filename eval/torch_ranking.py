"""Exact full-pool ranking in torch, for any torch device and without faiss.

``torch``: one fp32 matmul of a user block against the whole catalogue, the target's
score read from the same matrix, excluded items and the target set to ``-inf``, and a
top-``max_k`` of what is left: the target's rank is one plus the listed scores ``>=``
its own (ties pessimistic, as :data:`eval.ranking.TIES_RULE`). Every unlisted item
scores no higher than the last listed one, so if all ``max_k`` listed items reach the
target, its rank is beyond ``max_k`` whatever the rest hold; the rank is exact up to
``max_k``, reported as ``max_k + 1`` beyond. No search depth limit (faiss GPU has 2048).

``torch-twopass``: exact ranks from a bf16 first pass, for hardware where bf16 matmuls
run faster (tensor cores; AVX512-BF16). For a user ``u`` and item ``v`` with real score
``s = u . v`` and ``s'`` the bf16 matmul's output (inputs rounded to nearest bf16,
products exact and summed in fp32, the sum rounded to bf16),

    |s' - s| <= eps' |s'| + A,   A = c ||u|| max_j ||v_j|| + tiny,
    eps = 2^-8 (bf16 unit roundoff), eps' = eps / (1 - eps),
    c = 2 eps + eps^2 + gamma_d(fp32) (1 + eps)^2 + 4 gamma_d(fp64),
    gamma_d(p) = d u_p / (1 - d u_p),

(input rounding ``(2 eps + eps^2) sum |u_i v_i|``, the fp32 summation, the output
rounding ``eps |acc|``, and the fp64 rescoring below; Cauchy-Schwarz bounds
``sum |u_i v_i|``; ``tiny`` covers underflow). So an item can reach the target's score
``t`` only if ``s' >= tau_lo``, and surely does if ``s' >= tau_hi`` (:func:`thresholds`).
The first pass keeps the top ``max_k`` by ``s'`` (excluded items and the target at
``-inf``): if the last of them is ``>= tau_hi``, ``max_k`` items outscore the target and
the rank is ``max_k + 1``; if it is ``< tau_lo``, the listed items at ``>= tau_hi`` are
counted as above the target and those in ``[tau_lo, tau_hi)`` are all the candidates;
otherwise (a crowd of near-ties at the cut-off) the same is tried with a top-k
:data:`DEEPER` times as deep, and failing that the candidates are every item of the
user's row at ``>= tau_lo``. The candidates and the target are rescored in float64 (fp32
inputs, so every product is exact) in one batched dot product, which gives equal items
equal scores (ties stay pessimistic), and counted.

The ranks are those of the real scores. An fp32 scorer (``flat``, ``torch``) rounds
each score to 24 bits, and two fp32 kernels (faiss's and torch's matmul) may round the
same score differently in its last bit; they can disagree with each other, and with
``torch-twopass``, only on items whose real scores differ by about one fp32 ulp, which
``bench/rank.py`` checks does not happen on its users (it asserts equal ranks).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch

EPS_BF16 = 2.0**-8
SCORE_BUDGET = {"cpu": 2**25, "cuda": 2**28}  # score-matrix elements per block of users
DEEPER = 8  # a crowded row's second top-k is this many times max_k deep


def _gamma(dim: int, unit: float) -> float:
    return dim * unit / (1 - dim * unit)


def error_coefficient(dim: int) -> float:
    """``c`` of the module docstring: the bf16 pass's error per unit ``||u|| max ||v||``.

    The ``4 gamma_d(fp64)`` covers the rescoring's own rounding, twice: the thresholds
    come from one float64 evaluation of the target's score, the final count from another.
    """
    eps = EPS_BF16
    return 2 * eps + eps**2 + _gamma(dim, 2.0**-24) * (1 + eps) ** 2 + 4 * _gamma(dim, 2.0**-53)


def thresholds(t: torch.Tensor, margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau_lo, tau_hi) in float64: ``s' >= tau_lo`` is needed, ``s' >= tau_hi`` enough, to reach ``t``.

    ``s' + eps'|s'|`` is increasing in ``s'``; an item can reach ``t`` only if it is at
    least ``t - A``, whose preimage is ``tau_lo``. Likewise ``s' - eps'|s'| >= t + A``
    gives ``tau_hi``.
    """
    eps = EPS_BF16 / (1 - EPS_BF16)
    low, high = t - margin, t + margin
    tau_lo = torch.where(low >= 0, low / (1 + eps), low / (1 - eps))
    tau_hi = torch.where(high >= 0, high / (1 - eps), high / (1 + eps))
    return tau_lo, tau_hi


@contextlib.contextmanager
def ieee_matmuls() -> Iterator[None]:
    """fp32 matmuls in full fp32 (no TF32) and bf16 matmuls summed in fp32 while ranking.

    Both are what the error bound assumes; the settings are restored afterwards.
    """
    precision = torch.get_float32_matmul_precision()
    cuda = torch.backends.cuda.matmul
    reduced = cuda.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    cuda.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        cuda.allow_bf16_reduced_precision_reduction = reduced


class TorchRanker:
    """``torch``: fp32 matmul + top-k on one device (module docstring)."""

    def __init__(self, items: np.ndarray, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.pool = torch.from_numpy(np.ascontiguousarray(items[1:], dtype=np.float32)).to(self.device)
        budget = SCORE_BUDGET["cuda" if self.device.type == "cuda" else "cpu"]
        self.block = max(1, budget // len(self.pool))

    def ranks(self, users: np.ndarray, targets: np.ndarray, hist_indptr: np.ndarray,
              hist_indices: np.ndarray, max_k: int) -> np.ndarray:
        """Ranks of ``targets`` (item ids) for a batch of users; the CSR lists excluded item ids."""
        out = np.empty(len(users), dtype=np.int64)
        with torch.no_grad(), ieee_matmuls():
            for lo in range(0, len(users), self.block):
                hi = min(lo + self.block, len(users))
                u = torch.from_numpy(np.ascontiguousarray(users[lo:hi])).to(self.device)
                cols = torch.from_numpy(targets[lo:hi] - 1).to(self.device)
                rows, excluded = self._excluded(hist_indptr, hist_indices, lo, hi)
                out[lo:hi] = self._block_ranks(u, cols, rows, excluded, max_k).cpu().numpy()
        return out

    def _excluded(self, indptr: np.ndarray, indices: np.ndarray, lo: int, hi: int):
        """(row in block, column) of the block's excluded items, as device tensors."""
        start, stop = int(indptr[lo]), int(indptr[hi])
        items = np.asarray(indices[start:stop], dtype=np.int64)
        rows = np.repeat(np.arange(hi - lo), np.diff(np.asarray(indptr[lo : hi + 1], dtype=np.int64)))
        keep = items > 0
        return (torch.from_numpy(rows[keep]).to(self.device),
                torch.from_numpy(items[keep] - 1).to(self.device))

    def _masked_scores(self, u: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor,
                       excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores with the excluded items and the target at -inf, the target's score)."""
        scores = u @ self.pool.T
        block = torch.arange(len(u), device=self.device)
        target = scores[block, cols].clone()
        scores[rows, excluded] = -math.inf
        scores[block, cols] = -math.inf
        return scores, target

    def _block_ranks(self, u, cols, rows, excluded, max_k):
        scores, target = self._masked_scores(u, cols, rows, excluded)
        top = scores.topk(min(max_k, scores.shape[1]), dim=1, sorted=False).values
        return 1 + (top >= target[:, None]).sum(dim=1)


class TwoPassRanker(TorchRanker):
    """``torch-twopass``: bf16 first pass, fp32 rescoring of the candidates (module docstring)."""

    def __init__(self, items: np.ndarray, device: str = "cpu") -> None:
        super().__init__(items, device)
        self.block = max(1, 2 * SCORE_BUDGET["cuda" if self.device.type == "cuda" else "cpu"] // len(self.pool))
        self.pool_lo = self.pool.to(torch.bfloat16)
        dim = self.pool.shape[1]
        self.item_norm = float(torch.linalg.vector_norm(self.pool.double(), dim=1).max()) * (1 + 1e-9)
        self.coefficient = error_coefficient(dim)
        self.tiny = dim * 2.0**-120 * (1 + float(self.pool.abs().max()))
        self.candidates = 0  # rescored (user, item) pairs so far, for the benchmark's report
        self.crowded = 0  # users whose candidates were searched in their whole row

    def _masked_scores(self, u, cols, rows, excluded):
        scores = u.to(torch.bfloat16) @ self.pool_lo.T
        block = torch.arange(len(u), device=self.device)
        scores[rows, excluded] = -math.inf
        scores[block, cols] = -math.inf
        return scores, None

    def _block_ranks(self, u, cols, rows, excluded, max_k):
        scores, _ = self._masked_scores(u, cols, rows, excluded)
        n = len(u)
        block = torch.arange(n, device=self.device)
        # the target's score in float64 (the same kernel rescores the candidates below)
        target = self._rescore(u, block, cols)
        user_norm = torch.linalg.vector_norm(u.double(), dim=1) * (1 + 1e-9)
        tiny = self.tiny * (1 + float(u.abs().max()))  # underflow, see the module docstring
        tau_lo, tau_hi = thresholds(target, self.coefficient * user_norm * self.item_norm + tiny)
        sure = torch.zeros(n, dtype=torch.int64, device=self.device)
        capped = torch.zeros(n, dtype=torch.bool, device=self.device)
        pairs_r, pairs_c = [], []
        left = block
        for depth in (max_k, DEEPER * max_k):  # the first pass's top-k, then deeper for crowded rows
            depth = min(depth, scores.shape[1])
            top = (scores if len(left) == n else scores[left]).topk(depth, dim=1, sorted=True)
            values, lo, hi = top.values.double(), tau_lo[left, None], tau_hi[left, None]
            if depth >= max_k:  # max_k items surely above: the rank is beyond max_k
                capped[left] = values[:, max_k - 1] >= hi[:, 0]
            complete = (values[:, -1] < lo[:, 0]) & ~capped[left]
            sure[left] = ((values >= hi) & complete[:, None]).sum(dim=1)  # above the target, no rescoring
            rows, slots = ((values >= lo) & (values < hi) & complete[:, None]).nonzero(as_tuple=True)
            pairs_r.append(left[rows])
            pairs_c.append(top.indices[rows, slots])
            left = left[~capped[left] & ~complete]
            if len(left) == 0 or depth == scores.shape[1]:
                break
        self.crowded += len(left)
        if len(left):
            # a bf16 grid value >= tau_lo is >= tau_lo rounded to the grid: compare in bf16
            rows, more_cols = (scores[left] >= tau_lo[left].to(torch.bfloat16)[:, None]).nonzero(as_tuple=True)
            pairs_r.append(left[rows])
            pairs_c.append(more_cols)
        pair_rows, pair_cols = torch.cat(pairs_r), torch.cat(pairs_c)
        self.candidates += len(pair_rows)
        # candidates and targets in one batched float64 dot product: the same rounding for both
        exact = self._rescore(u, torch.cat([pair_rows, block]), torch.cat([pair_cols, cols]))
        reached = exact[: len(pair_rows)] >= exact[len(pair_rows):][pair_rows]
        ranks = 1 + sure + torch.bincount(pair_rows[reached], minlength=n)
        ranks[capped] = max_k + 1
        return torch.clamp(ranks, max=max_k + 1)

    def _rescore(self, u: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """float64 ``u[rows] . pool[cols]`` for each pair, in one kernel (exact products)."""
        return (u[rows].double() * self.pool[cols].double()).sum(dim=1)
