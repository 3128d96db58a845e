"""This process's place in a ``torchrun`` launch, and the few collectives the jobs need.

Extraction, training and ranking all run as one process or as ``torchrun``'s processes.
:class:`Processes` is that place (rank 0 of 1 without a launcher, where every collective is
the identity) and its collectives: objects from process 0 or from everyone (control
messages: chunk lists, stop decisions), a logical and, a mean, and the all-gather of
per-process blocks of rows (users ranked by each process). :func:`process_group` joins
and leaves the launcher's group around one job.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether torchrun started this process (even as its only one: ``--nproc-per-node 1``
    still joins a process group, so one GPU exercises the NCCL path)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", 1)) > 1


@dataclass(frozen=True)
class Processes:
    """Process ``rank`` of ``world_size``, ``local_rank`` on its machine (0 of 1 alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Processes":
        """The place torchrun's environment gives, whether or not a group is joined yet."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @classmethod
    def current(cls) -> "Processes":
        """The joined process group's place, else the single process (the whole)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    @property
    def main(self) -> bool:
        """Process 0: the one that writes."""
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list:
        """Every process's ``obj``, in rank order, on every process (also a barrier)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every process (``device``: where the group's tensors live)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over the processes."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of every process's block of ``n`` rows (sizes differ by <= 1)."""
        edges = [n * r // self.world_size for r in range(self.world_size + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def block(self, n: int) -> slice:
        """This process's block of ``n`` rows."""
        return slice(*self.bounds(n)[self.rank])

    def gather(self, local: np.ndarray, n: int) -> np.ndarray:
        """Every process's block of rows, concatenated in row order, on every process.

        ``local`` is this process's block (``len(local)`` rows of the ``n``); rows may have
        any trailing shape and dtype numpy and torch share.
        """
        if self.world_size == 1:
            return local
        sizes = [stop - start for start, stop in self.bounds(n)]
        if len(local) != sizes[self.rank]:
            raise ValueError(f"process {self.rank} holds {len(local)} rows; its block has {sizes[self.rank]}")
        device = self._collective_device()
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=torch.from_numpy(local[:0]).dtype,
                             device=device)
        padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local)).to(device)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return np.concatenate([part[:size].cpu().numpy() for part, size in zip(parts, sizes)])

    def _collective_device(self) -> torch.device:
        """NCCL moves CUDA tensors only (this process's own GPU); gloo moves CPU tensors."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


@contextlib.contextmanager
def process_group(device: str = "cpu", timeout: dt.timedelta = dt.timedelta(hours=2)) -> Iterator[Processes]:
    """Join torchrun's process group for one job and leave it together; yields this process's place.

    Args:
        device: where the group's tensors live: a ``cuda`` device means NCCL on this process's
            own GPU (``device`` as :func:`featurestore.runtime.device.local_device` gives it),
            anything else gloo (enough for control messages, even beside a GPU).
        timeout: how long a collective may wait for the slowest process.

    Without torchrun this is the single process. A group someone else joined (the
    trainer's, around its validation) is used and left alone.

    Example:
        >>> with process_group(timeout=dt.timedelta(hours=48)) as procs:
        ...     todo = procs.broadcast(todo)
    """
    created = False
    if launched() and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        created = True
    try:
        yield Processes.current()
        if created:
            dist.barrier()  # leave together: a rank tearing gloo down while another still uses it aborts
    finally:
        if created:
            dist.destroy_process_group()
