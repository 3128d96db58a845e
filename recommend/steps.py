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
