"""Training objectives: next-item prediction at every real position.

Every loss has the same two verbs, so the trainer picks one by name and knows
nothing of its insides:

- ``extra_items(rows) -> ids or None``: item ids the loss needs beyond the batch's
  own rows (sampled negatives). The trainer embeds rows and extras in ONE item-tower
  call, so a TS-DNN tower projects each distinct item once per step (the papers'
  code likewise embeds positives and negatives together).
- ``forward(hidden, rows, vectors, extra, extra_vectors) -> scalar``: ``rows`` is the
  left-padded training sequence ``(B, L + 1)`` (inputs = ``rows[:, :-1]``, targets =
  ``rows[:, 1:]``), ``vectors`` its item vectors, ``hidden`` the user encoder's
  states ``(B, L, d)``; a position counts when its input item is real.

Losses:

- ``bce`` (the papers' default, 001 Eq. 1): binary cross-entropy on the positive and
  ONE uniformly sampled negative per position, drawn from the items NOT in the
  user's training sequence (rejection sampling: uniform over that complement).
- ``inbatch``: softmax over the distinct targets of the batch with the
  log-popularity ("logQ") correction of sampled softmax; an item with no training
  interactions counts as 1, so ``log 0`` never happens.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recommend.registry import Registry

LOSSES: Registry["Loss"] = Registry("loss")

@dataclass(frozen=True)
class LossContext:
    """Dataset facts a loss may need."""

    n_items: int
    train_counts: np.ndarray  # interactions per item id in the training split, length N + 1


class Loss(nn.Module):
    def extra_items(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Item ids ``(B, *)`` to embed besides ``rows`` (default: none)."""
        return None

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor,
                extra: torch.Tensor | None, extra_vectors: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def sample_negatives(sequence: torch.Tensor, n_items: int, max_rounds: int = 1000) -> torch.Tensor:
    """One uniform item id in 1..N per position of ``sequence[:, 1:]``, never in its row.

    Rejection sampling: positions whose draw hits the user's sequence are redrawn,
    which is exactly uniform over the items the user has not interacted with.
    """
    rows, width = sequence.shape
    draws = torch.randint(1, n_items + 1, (rows, width - 1), device=sequence.device)
    for _ in range(max_rounds):
        clash = (draws.unsqueeze(-1) == sequence.unsqueeze(1)).any(-1)
        if not clash.any():
            return draws
        draws[clash] = torch.randint(1, n_items + 1, (int(clash.sum()),), device=sequence.device)
    raise RuntimeError(f"could not draw negatives outside the sequences in {max_rounds} rounds: "
                       f"the catalogue ({n_items} items) is barely larger than a sequence")


def in_rows(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, len(ids))`` bool: which of ``ids`` occur in each row of ``rows`` (B, W)."""
    return (ids[None, None, :] == rows[:, :, None]).any(1)


def first_positions(inverse: torch.Tensor, count: int) -> torch.Tensor:
    """For ``unique(x, return_inverse=True)``'s ``inverse``: the first index in ``x`` of each
    of the ``count`` distinct values, so one row per value can be gathered from ``x``'s data."""
    positions = torch.arange(len(inverse), device=inverse.device)
    return torch.full((count,), len(inverse), dtype=positions.dtype,
                      device=inverse.device).scatter_reduce(0, inverse, positions, "amin")


@LOSSES.register("bce")
class SampledBCE(Loss):
    """BCE on (positive, one sampled negative) per position; the two means are summed."""

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        self.n_items = ctx.n_items

    def extra_items(self, rows):
        return sample_negatives(rows, self.n_items)

    def forward(self, hidden, rows, vectors, extra, extra_vectors):
        valid = rows[:, :-1] > 0
        pos = (hidden * vectors[:, 1:]).sum(-1)[valid]
        neg = (hidden * extra_vectors).sum(-1)[valid]
        return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))


@LOSSES.register("inbatch")
class InBatchSoftmax(Loss):
    """Softmax over the batch's distinct targets, corrected by log popularity.

    Popular items appear as in-batch negatives more often than uniform sampling
    would draw them; subtracting ``log count(i)`` removes that bias. Candidates
    that are in the same user's sequence (other than the true target) are masked,
    so an item is never pushed down for a user who interacted with it. Candidate
    vectors are the targets' own vectors: no extra tower call.
    """

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        counts = torch.as_tensor(np.asarray(ctx.train_counts), dtype=torch.float32)
        self.register_buffer("log_pop", torch.log(counts.clamp_min(1.0)), persistent=False)

    def forward(self, hidden, rows, vectors, extra, extra_vectors):
        valid = rows[:, :-1] > 0
        target_ids, target_vectors = rows[:, 1:][valid], vectors[:, 1:][valid]
        candidates, label = torch.unique(target_ids, return_inverse=True)
        first = first_positions(label, len(candidates))
        logits = hidden[valid] @ target_vectors[first].T - self.log_pop[candidates]
        in_sequence = in_rows(rows, candidates)  # (B, C)
        row = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(valid)[valid]
        own = F.one_hot(label, len(candidates)).bool()
        logits = logits.masked_fill(in_sequence[row] & ~own, float("-inf"))
        return F.cross_entropy(logits, label)


def create_loss(name: str, ctx: LossContext) -> Loss:
    """Build a registered loss.

    Example:
        >>> loss = create_loss("bce", LossContext(n_items=100, train_counts=np.ones(101)))
    """
    return LOSSES.create(name, ctx)


def list_losses(pattern: str = "*") -> list[str]:
    return LOSSES.names(pattern)
