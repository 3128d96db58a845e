"""Stage three: exact full-pool ranking (FAISS), HR@K / NDCG@K, comparison reports.

``evaluate`` is the one scoring function shared by the trainer's validation and
``eval rank``.
"""

from eval.evaluate import evaluate, popularity_metrics
from eval.metrics import metrics_from_ranks
from eval.ranking import TIES_RULE, rank_targets

__all__ = ["evaluate", "metrics_from_ranks", "popularity_metrics", "rank_targets", "TIES_RULE"]
