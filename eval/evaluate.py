"""The one scoring function: the trainer's validation and ``eval rank`` both call it.

:func:`evaluate` turns a model (the Recommender protocol: ``item_vectors``,
``user_vectors``, ``max_seq_len``) and a prepared dataset into full-pool HR@K /
NDCG@K for one split and one user subset. Sharing it means a number logged during
training and a number printed by ``eval rank`` can never disagree on protocol.

Subsets follow the papers: a user is *cold* when their target item has fewer than
10 training interactions (``PreparedDataset.cold_items``), *warm* otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from eval.distributed import Shard
from eval.metrics import DEFAULT_KS, metrics_from_ranks
from eval.ranking import DEFAULT_BATCH_SIZE, TIES_RULE, csr_rows, popularity_ranks, rank_targets
from featurestore.progress import progress_bar

SUBSETS = ("all", "cold", "warm")
SPLITS = ("valid", "test")
EXPORT_FILES = ("items", "users", "targets", "history_indptr", "history_indices")


@dataclass
class EvalVectors:
    """Everything needed to recompute the metrics with plain numpy.

    ``items`` is (N + 1, d) with row = item id and row 0 the padding; ``users`` has one
    row per evaluated user, aligned with ``targets``; the CSR lists, per user, the item
    ids removed from the ranking (empty rows when history was not excluded).
    """

    items: np.ndarray
    users: np.ndarray
    targets: np.ndarray
    history_indptr: np.ndarray
    history_indices: np.ndarray

    def save(self, folder: Path) -> dict[str, str]:
        """Write ``<name>.npy`` for each array; returns name -> path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in EXPORT_FILES:
            path = folder / f"{name}.npy"
            np.save(path, getattr(self, name))
            paths[name] = str(path)
        return paths

    @classmethod
    def load(cls, folder: Path) -> "EvalVectors":
        return cls(**{name: np.load(Path(folder) / f"{name}.npy") for name in EXPORT_FILES})


def subset_users(dataset, split: str, subset: str) -> np.ndarray:
    """Indices of the users whose ``split`` target falls in ``subset`` (all, cold, warm)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, not {subset!r}")
    everyone = np.arange(dataset.n_users)
    if subset == "all":
        return everyone
    cold = dataset.cold_items()[dataset.targets(split)]
    return everyone[cold if subset == "cold" else ~cold]


def left_padded(indptr: np.ndarray, items: np.ndarray, rows: np.ndarray, length: int) -> np.ndarray:
    """(len(rows), length) int64: each row's last ``length`` items, right-aligned, 0-padded."""
    indptr = np.asarray(indptr, dtype=np.int64)
    ends = indptr[rows + 1]
    kept = np.minimum(ends - indptr[rows], length)
    out = np.zeros((len(rows), length), dtype=np.int64)
    row_of = np.repeat(np.arange(len(rows)), kept)
    offset = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
    out[row_of, length - np.repeat(kept, kept) + offset] = items[np.repeat(ends - kept, kept) + offset]
    return out


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_vectors(
    model, hist_indptr: np.ndarray, hist_items: np.ndarray, rows: np.ndarray, batch_size: int,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(item vectors (N + 1, d), user vectors for ``rows``) as float32, in eval mode.

    The model's training mode is restored afterwards, so the trainer can call this
    between epochs.
    """
    was_training = getattr(model, "training", False)
    device = _model_device(model)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            items = model.item_vectors(batch_size=batch_size).detach().float().cpu().numpy()
            users = np.empty((len(rows), items.shape[1]), dtype=np.float32)
            length = int(model.max_seq_len)
            with progress_bar(total=len(rows), unit="user", desc="user vectors", disable=not progress) as bar:
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start : start + batch_size]
                    history = torch.from_numpy(left_padded(hist_indptr, hist_items, chunk, length))
                    vectors = model.user_vectors(history.to(device))
                    users[start : start + len(chunk)] = vectors.detach().float().cpu().numpy()
                    bar.update(len(chunk))
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return np.ascontiguousarray(items), users


def vector_ranks(
    vectors: EvalVectors,
    max_k: int,
    exclude_history: bool,
    index: str = "flat",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """Ranks for already-computed vectors (``vectors`` holds the excluded CSR)."""
    # FAISS blocks queries by 4096 itself; fewer per call drops it off its BLAS path
    # (3x slower at d = 64), and a search batch costs only batch x k' results in memory
    return rank_targets(
        vectors.users, vectors.items, vectors.targets,
        vectors.history_indptr, vectors.history_indices,
        exclude_history=exclude_history, max_k=max_k, index=index,
        batch_size=max(batch_size, DEFAULT_BATCH_SIZE), progress=progress, device=device,
    )


def _result(metrics: dict, split: str, subset: str, exclude_history: bool, users: int,
            ks: tuple[int, ...], index: str) -> dict:
    return {
        **metrics,
        "users": int(users),
        "split": split,
        "subset": subset,
        "exclude_history": bool(exclude_history),
        "ks": list(ks),
        "ties": TIES_RULE,
        "index": index,
    }


def _excluded(dataset, split: str, rows: np.ndarray, exclude_history: bool) -> tuple[np.ndarray, np.ndarray]:
    if not exclude_history:
        return np.zeros(len(rows) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return csr_rows(*dataset.history(split), rows)


def _check(split: str, ks: Iterable[int]) -> tuple[int, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def evaluate(
    model,
    dataset,
    split: str = "valid",
    ks: Iterable[int] = DEFAULT_KS,
    exclude_history: bool = True,
    subset: str = "all",
    batch_size: int = 1024,
    index: str = "flat",
    return_vectors: bool = False,
    progress: bool = False,
    device: str = "cpu",
) -> dict:
    """Full-pool HR@K / NDCG@K of ``model`` on ``dataset``'s ``split``.

    Args:
        model: follows the Recommender protocol (``item_vectors(batch_size=)``,
            ``user_vectors(history)`` on left-padded LongTensor histories, ``max_seq_len``).
        dataset: a ``data.dataset.PreparedDataset``.
        split: ``valid`` or ``test``; the user sequence fed to the model and the excluded
            history are everything before that split's target.
        ks: cut-offs; ranks are exact up to ``max(ks)``.
        exclude_history: remove the user's history items from the ranking (papers' code)
            or not (RecBole); the result says which.
        subset: ``all``, ``cold`` or ``warm`` users by their target's training count.
        batch_size: users per model call (searches take at least 4096 users per call).
        index: an :data:`eval.ranking.RANKERS` name (``flat``, ``flat-gpu``, ``torch``, ...).
        return_vectors: add ``"vectors"`` (an :class:`EvalVectors` for exporting) and
            ``"ranks"`` (each user's rank, capped at ``max(ks) + 1``).
        device: torch device of the ``torch`` rankers.

    Under torchrun (an initialised process group) every process ranks its block of the
    users against the whole catalogue and the ranks are gathered
    (:mod:`eval.distributed`): every process returns the one-process result.
    Returns:
        ``{"HR@10": ..., "NDCG@10": ..., ..., "users", "split", "subset",
        "exclude_history", "ks", "ties", "index"}`` (+ ``"vectors"``, ``"ranks"``).

    Example:
        >>> evaluate(model, PreparedDataset.load(path), split="test")["HR@10"]
    """
    ks = _check(split, ks)
    rows = subset_users(dataset, split, subset)
    shard = Shard.current()
    mine = rows[shard.block(len(rows))]
    hist_indptr, hist_items = dataset.history(split)
    items, users = model_vectors(model, hist_indptr, hist_items, mine, batch_size, progress)
    targets = dataset.targets(split).astype(np.int64)
    vectors = EvalVectors(items, users, targets[mine], *_excluded(dataset, split, mine, exclude_history))
    ranks = shard.gather(vector_ranks(vectors, max(ks), exclude_history, index, batch_size, progress, device),
                         len(rows))
    result = _result(metrics_from_ranks(ranks, ks), split, subset, exclude_history, len(rows), ks, index)
    if return_vectors:
        result["ranks"] = ranks
        result["vectors"] = EvalVectors(items, shard.gather(users, len(rows)), targets[rows],
                                        *_excluded(dataset, split, rows, exclude_history))
    return result


def evaluate_subsets(model, dataset, subsets: Sequence[str], split: str = "valid", **kwargs) -> dict[str, dict]:
    """:func:`evaluate` for several user subsets from one ranking: ``{subset: result}``.

    A user's rank does not depend on which other users are ranked, so every user is ranked
    once and each subset's metrics are read from those ranks: the all / warm / cold tables
    cost one model pass and one search instead of three. ``kwargs`` are :func:`evaluate`'s;
    ``return_vectors`` (an export of the users ranked) needs a single subset.
    """
    subsets = list(dict.fromkeys(subsets))
    if len(subsets) == 1:
        return {subsets[0]: evaluate(model, dataset, split, subset=subsets[0], **kwargs)}
    if kwargs.pop("return_vectors", False):
        raise ValueError("return_vectors exports one subset's users; evaluate one subset at a time")
    everyone = evaluate(model, dataset, split, subset="all", return_vectors=True, **kwargs)
    everyone.pop("vectors")
    ranks = everyone.pop("ranks")
    results = {}
    for subset in subsets:
        rows = subset_users(dataset, split, subset)
        results[subset] = {**everyone, **metrics_from_ranks(ranks[rows], everyone["ks"]),
                           "subset": subset, "users": len(rows)}
    return results


def popularity_metrics(
    dataset,
    split: str = "valid",
    ks: Iterable[int] = DEFAULT_KS,
    exclude_history: bool = True,
    subset: str = "all",
) -> dict:
    """The same metrics for the popularity baseline: every user gets items ranked by
    training count, with the same exclusion and pessimistic ties as every other model.

    Ranked by counting (:func:`eval.ranking.popularity_ranks`): a ranking shared by all
    users needs no search, so the baseline costs seconds even at 500K users.
    """
    ks = _check(split, ks)
    rows = subset_users(dataset, split, subset)
    ranks = popularity_ranks(dataset.train_counts(), dataset.targets(split)[rows],
                             *_excluded(dataset, split, rows, exclude_history),
                             exclude_history=exclude_history, max_k=max(ks))
    return {**_result(metrics_from_ranks(ranks, ks), split, subset, exclude_history, len(rows), ks, "counting"),
            "model": "popularity"}
