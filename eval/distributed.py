"""Ranking under torchrun: the *users* are sharded across processes, never the catalogue.

Each process scores its contiguous block of users against every item (the item vectors
are computed, or indexed, whole on every process), so a rank is computed exactly as in
one process; the blocks are then all-gathered in user order. Every process ends with
the same ranks, hence the same metrics, which is what the trainer needs for its
early-stopping decision; only process 0 writes results.

Sharding users and not items keeps the exactness argument of :mod:`eval.ranking`
untouched: a sharded catalogue would need a cross-process merge of partial top-k
lists and of tie counts, where a sharded user set needs nothing but a concatenation.

The pieces are the runtime's (:mod:`featurestore.runtime.processes`): a :data:`Shard` is this
process's place there, with ``block(n)`` its users and ``gather(local, n)`` the all-gather;
:func:`process_group` joins torchrun's group around one ranking.
"""

from __future__ import annotations

from featurestore.runtime.device import local_device
from featurestore.runtime.processes import Processes as Shard
from featurestore.runtime.processes import launched, process_group

__all__ = ["Shard", "launched", "local_device", "process_group"]
