"""Training examples: each user's training sequence as one left-padded row.

Leave-one-out (ARCHITECTURE.md): a user's training sequence is all but the last two
items. One row per user holds its most recent ``max_seq_len + 1`` training items,
left-padded with 0; the model reads ``row[:-1]`` and predicts ``row[1:]`` at every
position (SASRec seq2seq). Users with a single training item have no (input,
target) pair and contribute no row.

``max_seq_len`` (the longest input) is the longest training sequence minus one,
as in the papers' code (keep 13 items -> train on 11 -> inputs of 10). Validation
and test histories are cut to the same most recent ``max_seq_len`` items, so every
position vector the model uses has been trained.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from data.dataset import PreparedDataset


def model_seq_len(dataset: PreparedDataset) -> int:
    """The longest input a model trained on ``dataset`` sees (its ``max_seq_len``)."""
    return max(1, int(dataset.lengths().max(initial=3)) - 3)


def training_rows(dataset: PreparedDataset, max_seq_len: int) -> np.ndarray:
    """``(users with >= 2 training items, max_seq_len + 1)`` int64, left-padded with 0."""
    indptr, items = dataset.history("train")
    lengths = np.diff(indptr)
    users = np.flatnonzero(lengths >= 2)
    width = max_seq_len + 1
    ends, kept = indptr[1:][users], np.minimum(lengths[users], width)
    rows = np.zeros((len(users), width), dtype=np.int64)
    for back in range(width):
        has = back < kept
        rows[has, width - 1 - back] = items[ends[has] - 1 - back]
    return rows


class SequenceBatches:
    """Shuffled mini-batches of training rows, one shard per process.

    The same ``DistributedSampler`` serves one process (world size 1) and DDP, so
    a seed gives the same order in both; ``set_epoch`` reshuffles.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.rows = torch.from_numpy(rows)
        self.sampler = DistributedSampler(range(len(rows)), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.batches = BatchSampler(self.sampler, batch_size, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def n_sequences(self) -> int:
        """Rows this process sees per epoch."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in self.batches:
            yield self.rows[index]
