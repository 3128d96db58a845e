"""The one writer of a run folder while it trains (process 0 of a torchrun launch).

Every file the trainer leaves in ``ROOT/runs/RUN`` is written here, in the order that makes
a kill at any point resumable: the resumable state first, then the best checkpoint it names,
then the epoch's line of ``metrics.jsonl`` (:meth:`RunFolder.epoch_done`); a resumed run first
makes the folder agree with its state (:meth:`RunFolder.resume`). On other processes every
method that writes does nothing, so the loop calls them unconditionally.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from featurestore.runtime.files import write_json
from featurestore.runtime.processes import Processes
from featurestore.workspace import Workspace
from recommend.model import Recommender
from recommend.run import (BEST, FINISHED, LAST, append_metrics, default_run_name, load_training_state, open_run,
                           read_metrics, rewrite_metrics, run_lock, save_checkpoint, save_training_state)


class RunFolder:
    """A run's folder as the trainer writes it.

    Args:
        path: the folder (``ws.run_dir(name)``).
        main: whether this process writes (process 0).
    """

    def __init__(self, path: Path, main: bool) -> None:
        self.path, self.main = Path(path), main

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def open(cls, ws: Workspace, run_name: str | None, config: dict, procs: Processes) -> "RunFolder":
        """Make (or reopen, to resume) the folder: the given ``--run-name``, else a generated name made
        unique with a suffix; every process gets process 0's."""
        name = procs.broadcast((run_name or _new_name(ws, config)) if procs.main else None)
        path = open_run(ws, name, config) if procs.main else ws.run_dir(name)
        return cls(path, procs.main)

    def finished(self, procs: Processes) -> dict | None:
        """The outcome of a run that already ended (best.json says so), else None; on every process."""
        return procs.broadcast(self._finished() if self.main else None)

    def _finished(self) -> dict | None:
        path = self.path / BEST
        best = json.loads(path.read_text()) if path.exists() else {}
        if best.get("status") not in FINISHED:
            return None
        return {"status": best["status"], "best_epoch": best.get("epoch"), "best": best.get("metrics", {}),
                "epochs": len(read_metrics(self.path)), "popularity": best.get("popularity"),
                "warning": best.get("warning"),
                "message": f"already finished, nothing to do: {best.get('message', '')}".strip()}

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One writer per run: a second trainer of the same run is refused, naming the first."""
        with run_lock(self.path, self.main):
            yield

    def resume(self, model: Recommender, optimizer: torch.optim.Optimizer) -> dict | None:
        """Restore weights and optimiser from ``last.safetensors`` (every process) and make the folder
        agree with that state after a kill at any point of an epoch; the state, or None.

        ``metrics.jsonl`` keeps the resumed epochs only; when the state's own epoch was the best,
        the kill may have come between the state and the checkpoint, so the checkpoint is rewritten
        from the restored weights (an older best was written before its successor state).
        """
        state = load_training_state(self.path, model, optimizer)
        if state is None or not self.main:
            return state
        rewrite_metrics(self.path, state["records"])
        if state["best_epoch"] is not None:
            if state["best_epoch"] == state["epoch"]:
                save_checkpoint(self.path, model)
            write_json(self.path / BEST, {"epoch": state["best_epoch"], "metrics": state["best"], "status": "running"})
        return state

    def epoch_done(self, model: Recommender, optimizer: torch.optim.Optimizer, state: dict, record: dict,
                   improved: bool) -> None:
        """Keep a validated epoch: the resumable state, the checkpoint if it is the best, its metrics line."""
        if not self.main:
            return
        save_training_state(self.path, model, optimizer, state)
        if improved:
            save_checkpoint(self.path, model)
            write_json(self.path / BEST, {"epoch": record["epoch"], "metrics": record["valid"], "status": "running"})
        append_metrics(self.path, record)

    def interrupted(self) -> None:
        """Ctrl-C: best.json says so; the best checkpoint and the resumable state stay."""
        if not self.main:
            return
        path = self.path / BEST
        best = json.loads(path.read_text()) if path.exists() else {"epoch": None, "metrics": {}}
        write_json(path, {**best, "status": "interrupted"})

    def finish(self, outcome: dict) -> None:
        """The run ended: best.json records how, and nothing is left to resume."""
        if not self.main:
            return
        write_json(self.path / BEST, {"epoch": outcome["best_epoch"], "metrics": outcome["best"],
                                      "status": outcome["status"], "message": outcome["message"],
                                      "popularity": outcome["popularity"], "warning": outcome["warning"]})
        (self.path / LAST).unlink(missing_ok=True)


def _new_name(ws: Workspace, config: dict) -> str:
    base = name = default_run_name(config)
    suffix = 2
    while ws.run_dir(name).exists():
        name, suffix = f"{base}-{suffix}", suffix + 1
    return name
