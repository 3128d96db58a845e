"""Cloze training for bidirectional backbones (BERT4Rec): fill in masked items.

A training row ``(B, L + 1)`` (``recommend.batches``) is used whole: a share of its
real items is replaced by the [MASK] vector, the bidirectional encoder reads the row,
and each masked position's state is scored against its true item with the run's own
loss (any of ``recommend.losses``). Masking follows the BERT4Rec code (``gen_data_fin.py``):

- a row with n real items gets exactly ``max(1, round(n * mask_prob))`` masked items,
  chosen uniformly, always replaced by [MASK] (the code's ``mask_prob=1.0``);
- the paper's Sec. 3.6 also trains on rows that mask only the last item, to match
  inference (a [MASK] appended after the history). The code adds one such row per
  ten randomly masked copies of each sequence (``dupe_factor=10``), so here each row
  masks only its last item with probability ``LAST_ONLY_SHARE = 1 / 11``.

Masks are drawn from torch's global RNG, which the trainer seeds per epoch, so a
masked epoch is reproducible and a resumed run draws what an uninterrupted one does.

The losses score position t's state against ``rows[:, t + 1]`` wherever the input
``rows[:, t]`` is real. The masked positions are therefore packed, per row and
right-aligned, into a chain ``[0, …, 0, t1, t1, t2, …, tK]`` (``t`` = the masked
items in order): exactly K positions count and their targets are the masked items.
Negatives come from ``loss.extra_items`` on the whole row (``bce``: never an item of
the row; ``sce``'s are shared by the batch and used as they are). One difference from next-item training: ``inbatch`` masks same-user
candidates by the chain, so only the row's masked items (not its visible ones) are
kept out of that user's negatives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from recommend.losses import Loss, embed_step

if TYPE_CHECKING:
    from recommend.model import Recommender

LAST_ONLY_SHARE = 1 / 11  # BERT4Rec code: 1 mask-last instance per 10 random ones


def cloze_mask(rows: torch.Tensor, mask_prob: float) -> torch.Tensor:
    """Which positions of left-padded ``rows`` (B, T) to mask: bool (B, T), real items only.

    Example:
        >>> cloze_mask(torch.tensor([[0, 0, 5, 6, 7, 8, 9]]), 0.4).sum().item() in (1, 2)
        True
    """
    real = rows > 0
    count = torch.clamp(torch.round(real.sum(1) * mask_prob), min=1)
    keys = torch.rand(rows.shape, device=rows.device).masked_fill(~real, 2.0)  # padding last
    rank = keys.argsort(dim=1).argsort(dim=1)
    masked = rank < count.unsqueeze(1)
    last_only = torch.rand(rows.shape[0], device=rows.device) < LAST_ONLY_SHARE
    masked[last_only] = False
    masked[last_only, -1] = True  # rows are left-padded: the last column is the newest item
    return masked & real


def _chain(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned positions of each row's masked items: ``index`` (B, K), ``used`` (B, K).

    K is the most masked items in any row; a row with fewer has unused slots on the left.
    """
    width = int(masked.sum(1).max())
    order = torch.sort(masked.to(torch.int8), dim=1, stable=True).indices  # masked last, in order
    index = order[:, -width:]
    return index, masked.gather(1, index)


def cloze_loss(model: Recommender, loss: Loss, rows: torch.Tensor,
               masked: torch.Tensor | None = None) -> torch.Tensor:
    """The run's loss on the masked items of training ``rows`` (B, L + 1).

    Args:
        model: a Recommender whose user encoder has ``fill`` and ``mask_prob`` (BERT4Rec).
        loss: the run's loss module, called with the chain described above.
        rows: left-padded training rows, every one with at least one real item.
        masked: which positions to mask (default: ``cloze_mask`` with the encoder's share).
    """
    encoder = model.user_encoder
    if masked is None:
        masked = cloze_mask(rows, encoder.mask_prob)
    padded = F.pad(rows, (0, 1))  # extras for every position of ``rows``; 0 is never drawn
    vectors, extra, extra_vectors = embed_step(model, loss, rows, padded)  # one tower call
    hidden = encoder.fill(vectors, rows > 0, masked)

    index, used = _chain(masked)
    targets = rows.gather(1, index).masked_fill(~used, 0)
    first = used.to(torch.int8).argmax(dim=1, keepdim=True)  # the chain's first slot
    chain = F.pad(targets, (1, 0)).scatter(1, first, targets.gather(1, first))

    target_vectors = F.pad(pick_slots(vectors, index), (0, 0, 1, 0))
    if extra is not None and not loss.shared_extras:  # per-position draws, position-major: keep the chain's
        per_position = extra.shape[1] // rows.shape[1]
        slots = (index.unsqueeze(-1) * per_position + torch.arange(per_position, device=rows.device)).flatten(1)
        extra, extra_vectors = extra.gather(1, slots), pick_slots(extra_vectors, slots)
    return loss(pick_slots(hidden, index), chain, target_vectors, extra, extra_vectors)


def pick_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for vectors ``x`` (B, W, d) and ``index`` (B, K): (B, K, d)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
