"""The one device rule of every command's ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

``auto`` is the GPU when there is one, else the CPU. ``cuda`` is this process's own GPU:
under torchrun process ``local_rank`` takes ``cuda:(local_rank % device count)``, so N
processes on N GPUs never share one, and more processes than GPUs still start. A name
outside the rule, or a GPU this machine does not have, is refused with the names that work,
instead of quietly running somewhere else.
"""

from __future__ import annotations

import re

import torch

from featurestore.errors import UserError
from featurestore.runtime.processes import Processes, launched

VALID = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str, procs: Processes) -> torch.device:
    """The torch device ``--device name`` means for process ``procs``.

    Example:
        >>> resolve_device("cuda", Processes(rank=1, world_size=2, local_rank=1))
        device(type='cuda', index=1)
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"unknown --device {name!r}; use {VALID}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    count = torch.cuda.device_count()
    if name == "cuda":
        return torch.device("cuda", procs.local_rank % count)
    index = int(name.removeprefix("cuda:"))
    if index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def local_device(name: str) -> str:
    """``name`` with ``cuda`` made this process's own GPU under torchrun (:func:`resolve_device`);
    for commands that hand a device name on."""
    if name == "cuda" and launched():
        return str(resolve_device(name, Processes.from_env()))
    return name
