"""Ranking under torchrun: the *users* are sharded across processes, never the catalogue.

Each process scores its contiguous block of users against every item (the item vectors
are computed, or indexed, whole on every process), so a rank is computed exactly as in
one process; the blocks are then all-gathered in user order. Every process ends with
the same ranks, hence the same metrics, which is what the trainer needs for its
early-stopping decision; only process 0 writes results.

Sharding users and not items keeps the exactness argument of :mod:`eval.ranking`
untouched: a sharded catalogue would need a cross-process merge of partial top-k
lists and of tie counts, where a sharded user set needs nothing but a concatenation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's share of the users: block ``rank`` of ``world_size`` near-equal blocks."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Shard":
        """The initialised process group's place, else the whole (one process)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of every process's block of ``n`` users (sizes differ by <= 1)."""
        edges = [n * r // self.world_size for r in range(self.world_size + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def block(self, n: int) -> slice:
        """This process's block of ``n`` users."""
        return slice(*self.bounds(n)[self.rank])

    def gather(self, local: np.ndarray, n: int) -> np.ndarray:
        """Every process's block, concatenated in user order, on every process.

        ``local`` is this process's block (``len(local)`` rows of the ``n``); rows may have
        any trailing shape and dtype numpy and torch share.
        """
        if self.world_size == 1:
            return local
        sizes = [stop - start for start, stop in self.bounds(n)]
        if len(local) != sizes[self.rank]:
            raise ValueError(f"process {self.rank} holds {len(local)} rows; its block has {sizes[self.rank]}")
        device = _collective_device()
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=torch.from_numpy(local[:0]).dtype,
                             device=device)
        padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local)).to(device)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return np.concatenate([part[:size].cpu().numpy() for part, size in zip(parts, sizes)])


def _collective_device() -> torch.device:
    """NCCL moves CUDA tensors only (this process's own GPU); gloo moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def launched() -> bool:
    """Whether torchrun started this process (even as its only one: ``--nproc-per-node 1``
    still joins a process group, so one GPU exercises the NCCL path)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", 1)) > 1


def local_device(device: str) -> str:
    """``cuda`` made this process's own GPU under torchrun (``cuda:LOCAL_RANK``)."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Shard]:
    """Join torchrun's process group for one ranking (NCCL on CUDA, gloo on CPU) and leave it.

    Without torchrun this is the single process's whole shard. A group someone else initialised (the trainer's) is used and left alone.
    """
    created = False
    if launched() and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(local_device(device)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(hours=2))
        created = True
    try:
        yield Shard.current()
        if created:
            dist.barrier()  # leave together: a rank tearing gloo down while another still uses it aborts
    finally:
        if created:
            dist.destroy_process_group()
