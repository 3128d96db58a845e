"""One resumable-checkpoint format: weights, optimizer moments and the job's bookkeeping in one file.

A job killed at any point must continue from its last finished epoch as if never stopped,
so the model's weights, the optimizer's state and a JSON dict of the job's own bookkeeping
(epoch, best metrics, loss curve) go into one safetensors file replaced atomically
(:func:`featurestore.runtime.files.write_atomic`): a kill leaves the previous epoch's
checkpoint or this one's, never a mix. Layout: tensors ``model.NAME`` and
``optimizer.INDEX.SLOT``; metadata ``state`` (the dict), ``param_groups`` and ``scalars``
(optimizer slots that are no tensors), all JSON.

Adaptation runs wrote ``optim.INDEX.SLOT`` tensors and one ``meta`` JSON entry before this
format; :func:`load_checkpoint` still reads them, so such a run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from featurestore.errors import UserError
from featurestore.runtime.files import write_atomic

RESTART = "delete it and run the same command again to start the job over from its first epoch"


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as separate CPU tensors (tied weights, such as an MLM decoder sharing
    the word embeddings, become copies: safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def write_safetensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Serialised in memory, then :func:`write_atomic`: safetensors' own writer turns a full
    disk into an error that is no OSError and names no file."""
    write_atomic(path, safetensors_bytes(tensors, metadata=metadata))


def save_checkpoint(path: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Everything needed to continue: ``model``, ``optimizer`` and ``state`` (JSON) in ``path``.

    Example:
        >>> save_checkpoint(run_dir / "last.safetensors", model, optimizer, {"epoch": 3})
    """
    tensors = {f"model.{k}": v for k, v in cpu_state(model).items()}
    saved = optimizer.state_dict()
    scalars = {}
    for index, slots in saved["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"state": json.dumps(state), "param_groups": json.dumps(saved["param_groups"]),
                "scalars": json.dumps(scalars)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, metadata)


def check_safetensors(path: Path | str, fix: str) -> None:
    """Refuse an empty, cut or foreign safetensors file in one line naming it and ``fix``: the
    header is parsed and must cover the file exactly, which catches every damage short of
    bytes changed in place."""
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is damaged (not a readable safetensors file: {err}); {fix}") from None


def load_checkpoint(path: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    fix: str = RESTART) -> dict | None:
    """Restore ``model`` and ``optimizer`` from ``path``; the saved ``state``, or None without a file.
    A damaged file, or one holding another model's weights, is a UserError naming it and ``fix``."""
    path = Path(path)
    if not path.exists():
        return None
    check_safetensors(path, fix)
    try:
        return _restore(path, model, optimizer)
    except (SafetensorError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{path} is damaged or holds another model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); {fix}") from None


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    if "meta" in metadata:  # an adaptation run's checkpoint from before this format
        prefix, scalars, state = "optim.", {}, json.loads(metadata["meta"])
        groups = optimizer.state_dict()["param_groups"]
    else:
        prefix, scalars, state = "optimizer.", json.loads(metadata["scalars"]), json.loads(metadata["state"])
        groups = _param_groups(json.loads(metadata["param_groups"]), optimizer)
    slots: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            _, index, key = name.split(".", 2)
            slots.setdefault(int(index), {})[key] = value
    for name, value in scalars.items():
        index, key = name.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": groups})
    return state


def _param_groups(groups: list[dict], optimizer: torch.optim.Optimizer) -> list[dict]:
    """The saved groups with the tuples JSON turned into lists (AdamW's betas) made tuples again."""
    for group, current in zip(groups, optimizer.param_groups):
        for key, value in group.items():
            if isinstance(current.get(key), tuple):
                group[key] = tuple(value)
    return groups
