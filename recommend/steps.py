"""One training step of a backbone: what it returns, and the next-item step most backbones take.

A backbone owns its training step (``UserEncoder.training_step``), as a RecBole model owns
``calculate_loss``: causal backbones predict the next item at every position with
:func:`next_item_step`, BERT4Rec fills in masked items (:mod:`recommend.cloze`). The
trainer calls the step and knows neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recommend.losses import Loss, embed_step

if TYPE_CHECKING:
    from recommend.model import Recommender


@dataclass
class StepOutput:
    """A step's loss, and the item vectors and hidden states the auxiliary terms read
    (None for a step whose positions are not next-item predictions)."""

    value: torch.Tensor
    vectors: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def next_item_step(model: Recommender, loss: Loss, rows: torch.Tensor) -> StepOutput:
    """The loss of predicting ``rows[:, 1:]`` from ``rows[:, :-1]``, the batch embedded in one tower call."""
    vectors, extra, extra_vectors = embed_step(model, loss, rows)
    hidden = model.encode(vectors[:, :-1], rows[:, :-1] > 0)
    return StepOutput(loss(hidden, rows, vectors, extra, extra_vectors), vectors, hidden)


def last_item_step(model: Recommender, loss: Loss, rows: torch.Tensor) -> StepOutput:
    """The loss of predicting each row's last item from the items before it (``--instances prefix``):
    the backbone reads ``rows[:, :-1]`` as :func:`next_item_step` does, and the loss sees only the last
    position: the states ``hidden[:, -1:]`` and the rows cut to their last two columns (input, target).

    Per-position extras (``bce``'s and ``gbce``'s negatives, drawn against the whole row) are cut to the
    last position's; ``sce``'s shared draws are used as they are. ``inbatch`` masks a candidate found in
    the user's row, here the last input and the target only.
    """
    vectors, extra, extra_vectors = embed_step(model, loss, rows)
    hidden = model.encode(vectors[:, :-1], rows[:, :-1] > 0)
    if extra is not None and not loss.shared_extras:  # position-major per-position draws: keep the last's
        per_position = extra.shape[1] // (rows.shape[1] - 1)
        extra, extra_vectors = extra[:, -per_position:], extra_vectors[:, -per_position:]
    return StepOutput(loss(hidden[:, -1:], rows[:, -2:], vectors[:, -2:], extra, extra_vectors), vectors, hidden)
