"""What one training example is (``--instances``): a training feature every run has.

``sequence`` (the default, the MoRec code's and SASRec's own): one row per user, its most
recent ``max_seq_len + 1`` training items, and the loss at every position at once
(:func:`recommend.batches.training_rows`, :func:`recommend.steps.next_item_step`).

``prefix`` (RecBole's sequential models): one row per (prefix, next item) pair of each
user's training sequence, the prefix cut to its most recent ``max_seq_len`` items, and the
loss at the row's last position only (:func:`prefix_rows`, :func:`recommend.steps.last_item_step`).
A user with n training items gives n - 1 rows, so an epoch sees each (prefix, next item)
pair once as under ``sequence``, but each in a row of its own: a batch of ``--batch-size``
rows holds that many pairs (RecBole: 2048) instead of that many users' sequences, and
with positions counted from the newest item (sasrec's default) each pair is scored with
its last input at position 0, as at inference.

The option stays None when not given and ``check`` does not fill it, so runs from before
this feature and their resumptions are the same runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.dataset import PreparedDataset
from featurestore.errors import UserError
from recommend.batches import training_rows
from recommend.options import TrainOptions, option

INSTANCES = ("sequence", "prefix")


@dataclass(frozen=True)
class InstanceOptions:
    instances: str | None = option(
        flag="--instances", choices=INSTANCES, purpose="sets what one training example is",
        help="What one training example is. sequence = one row per user, next-item loss at every position at "
             "once (the MoRec code's and the SASRec paper's); prefix = one row per (prefix, next item) pair, loss "
             "at the last position only (RecBole's: its --batch-size counts pairs, 2048 by default there). Each "
             "pair is seen once per epoch either way; prefix runs the backbone over every prefix, about "
             "max_seq_len times the work of an epoch [default: sequence].")


class InstancesFeature:
    """``--instances``: a training feature every run has (a plugin of recommend.plugins)."""

    options = InstanceOptions

    def check(self, opts: TrainOptions) -> TrainOptions:
        from recommend.user_encoders import USER_ENCODERS

        if opts.instances == "prefix" and USER_ENCODERS.get(opts.backbone).cloze:
            raise UserError(f"--instances prefix scores the next item after each prefix; --backbone "
                            f"{opts.backbone} is trained by cloze on whole sequences: drop --instances")
        return opts


INSTANCES_FEATURE = InstancesFeature()


def prefix_rows(dataset: PreparedDataset, max_seq_len: int) -> np.ndarray:
    """``(pairs, max_seq_len + 1)`` int64, left-padded with 0: for each user and each t >= 1 of its
    training sequence s, the row ``s[max(0, t - max_seq_len) : t + 1]`` (the last column is the target).

    Example:
        one user trained on [5, 6, 7] with max_seq_len 2 gives [[0, 5, 6], [5, 6, 7]].
    """
    indptr, items = dataset.history("train")
    width = max_seq_len + 1
    starts = np.repeat(indptr[:-1], np.diff(indptr))  # each item's user's first index
    targets = np.flatnonzero(np.arange(len(items)) > starts)  # every item but a user's first
    starts, ends = starts[targets], targets
    rows = np.zeros((len(ends), width), dtype=np.int64)
    for back in range(width):
        at = ends - back
        has = at >= starts
        rows[has, width - 1 - back] = items[at[has]]
    return rows


def instance_rows(opts: TrainOptions, dataset: PreparedDataset, max_seq_len: int) -> np.ndarray:
    """The training rows of a run with these options."""
    return prefix_rows(dataset, max_seq_len) if opts.instances == "prefix" else training_rows(dataset, max_seq_len)


def last_only(opts: TrainOptions) -> bool:
    """Whether the loss is taken at each row's last position only."""
    return opts.instances == "prefix"
