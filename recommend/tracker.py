"""What every experiment tracker shares: the values it records, and that it never decides a result.

A tracker (:mod:`recommend.tensorboard_log`, :mod:`recommend.mlflow_log`) copies what the run
folder already holds to where researchers look. The run folder stays the record: a tracker
that fails (a server down, a broken install) says so once on stderr and stops tracking, and
the run goes on exactly as without it. Both trackers name the same values the same way
(:func:`epoch_scalars`, :func:`best_scalars`), so a curve reads alike in either.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from recommend.callbacks import Callback


def epoch_scalars(record: dict) -> dict[str, float]:
    """The curves of one ``metrics.jsonl`` line: training loss and its terms, every validation
    metric, each parameter group's learning rate, speed and peak memory."""
    values = {"train/loss": record["loss"],
              **{f"train/{name}": value for name, value in (record.get("terms") or {}).items()},
              **{f"valid/{name}": value for name, value in record["valid"].items()},
              **{f"lr/{group}": lr for group, lr in (record.get("lr") or {}).items()},
              "speed/sequences_per_sec": record.get("sequences_per_sec"),
              "time/train_seconds": record.get("seconds"), "time/eval_seconds": record.get("eval_seconds"),
              "memory/peak_rss_mb": record.get("peak_rss_mb"), "memory/peak_gpu_mb": record.get("peak_gpu_mb")}
    return {name: float(value) for name, value in values.items() if value is not None}


def best_scalars(outcome: Mapping[str, Any]) -> dict[str, float]:
    """The run's best validation metrics and their epoch (the HParams view's metrics)."""
    best = {f"best/{name}": float(value) for name, value in (outcome.get("best") or {}).items()}
    if outcome.get("best_epoch") is not None:
        best["best/epoch"] = float(outcome["best_epoch"])
    return best


def flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config as ``section.key`` scalars: lists of plain values joined by commas, other
    lists as JSON, None left out (an unset option says nothing)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            plain = all(isinstance(v, (str, int, float, bool)) for v in value)
            out[name] = ",".join(map(str, value)) if plain else json.dumps(value, default=str)
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


class Guarded:
    """Tracking work whose first failure is said once and ends it, never the run (:meth:`guarded`)."""

    backend = "tracking"

    def __init__(self) -> None:
        self.failed = False

    def where(self) -> str:
        """Where the tracker writes, for the one message that says it stopped."""
        return self.backend

    def guarded(self, step: Callable[..., Any], *args: Any) -> None:
        """Run ``step`` unless this tracker failed before; a failure is said once and stops it."""
        if self.failed:
            return
        try:
            step(*args)
        except Exception as err:  # whatever the backend raises: tracking never decides a result
            self.failed = True
            detail = (str(err).strip().splitlines() or [""])[0][:300]
            print(f"tracking: {self.where()} failed ({type(err).__name__}: {detail}); the run goes on "
                  "without it and its folder keeps everything", file=sys.stderr, flush=True)


class Tracker(Guarded, Callback):
    """A callback that copies a run to a tracking backend: :meth:`start`, :meth:`epoch` and
    :meth:`end` do the work, each :meth:`guarded`."""

    def start(self, run_dir: Path, config: dict) -> None:
        """The run folder is open (a resumed run: with its earlier epochs in ``metrics.jsonl``)."""

    def epoch(self, epoch: int, record: dict) -> None:
        """One validated epoch's line of ``metrics.jsonl``."""

    def end(self, outcome: dict) -> None:
        """The run ended; ``best.json`` is written."""

    def on_train_start(self, run_dir: Path, config: dict) -> None:
        self.guarded(self.start, Path(run_dir), config)

    def on_epoch_end(self, epoch: int, record: dict) -> bool:
        self.guarded(self.epoch, epoch, record)
        return False

    def on_train_end(self, outcome: dict) -> None:
        self.guarded(self.end, outcome)


class Parent:
    """The tracked run of a study or a search, whose runs nest under it; this one tracks nothing.

    A context manager: inside it, every run trained (in this process or a child it starts)
    nests under it.
    """

    def __enter__(self) -> "Parent":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def nest(self, run_dir: Path) -> None:
        """Make sure a finished run folder is one of the nested runs, with its ``eval.json``."""

    def record(self, metrics: Mapping[str, float], files: Iterable[Path]) -> None:
        """Its own results: metrics and files (report, plots, summary)."""
