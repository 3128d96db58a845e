"""HR@K and NDCG@K from 1-based ranks (one relevant item per user, leave-one-out).

HR@K = mean over users of [r <= K]; NDCG@K = mean of 1/log2(r + 1) when r <= K,
else 0 (the ideal DCG is 1 with a single relevant item). Ranks come from
:func:`eval.ranking.rank_targets`, which caps them at ``max_k + 1``; every K asked
for here must therefore be <= the ``max_k`` the ranks were computed with.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

DEFAULT_KS = (10, 20, 50)


def percent(value: float | None) -> str:
    """A metric for people: percent with two decimals (``0.4334`` -> ``"43.34"``), ``"-"`` when absent.

    Every human-readable output (logs, summaries, tables, reports) goes through here and
    labels the unit, so a run's HR@10 reads the same in ``recommend runs``, ``eval rank``
    and a study report; ``--json`` keeps the fractions.
    """
    return "-" if value is None else f"{100 * value:.2f}"


def format_metrics(metrics: dict) -> str:
    """``"HR@10 43.34%, NDCG@10 21.10%"``: the metrics of ``metrics`` (other keys skipped)."""
    return ", ".join(f"{name} {percent(value)}%" for name, value in metrics.items()
                     if name.startswith(("HR@", "NDCG@")))


def parse_ks(text: str) -> tuple[int, ...]:
    """``"10,20,50"`` -> (10, 20, 50), sorted and de-duplicated."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        from featurestore.errors import UserError

        raise UserError(f"--k {text!r}: give positive integers separated by commas, e.g. 10,20,50")
    return tuple(ks)


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, float | None]:
    """``{"HR@10": ..., "NDCG@10": ..., "HR@20": ...}`` in the order of ``ks``.

    With no users the values are ``None`` (there is nothing to average).

    Example:
        >>> metrics_from_ranks(np.array([1, 3, 11]), [10])
        {'HR@10': 0.6666666666666666, 'NDCG@10': 0.5}
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float | None] = {}
    for k in ks:
        if len(ranks) == 0:
            out[f"HR@{k}"] = out[f"NDCG@{k}"] = None
            continue
        hit = ranks <= k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    return out
