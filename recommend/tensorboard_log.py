"""TensorBoard event files in the run folder: every run's curves and, at its end, its HParams row.

The events go into the run folder itself, so ``tensorboard --logdir ROOT/runs`` lists each run
under the name ``recommend runs`` and ``eval rank`` use, and compares them in its HParams view.
A resumed run starts a new event file that purges every epoch written before (TensorBoard's
own purge step) and writes the epochs of ``metrics.jsonl`` again: an epoch half-written by a
killed process is replaced, never shown twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from recommend.run import read_metrics
from recommend.tracker import Tracker, best_scalars, epoch_scalars, flat

FLUSH_SECONDS = 30  # a crash loses nothing either way: every epoch is flushed as it ends


class TensorBoardTracker(Tracker):
    """Per epoch the scalars of :func:`recommend.tracker.epoch_scalars`; at the end the run's
    options as hyper-parameters with its best metrics (:func:`recommend.tracker.best_scalars`).

    Args:
        skip: options left out of the HParams view (they say where and how to track, not what is trained).
    """

    backend = "TensorBoard"

    def __init__(self, skip: Iterable[str] = ()) -> None:
        super().__init__()
        self.skip = set(skip)
        self.writer = None
        self.options: dict = {}

    def where(self) -> str:
        return f"TensorBoard ({self.writer.log_dir})" if self.writer is not None else self.backend

    def start(self, run_dir: Path, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.options = {k: v for k, v in config.get("options", {}).items() if k not in self.skip}
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=1, flush_secs=FLUSH_SECONDS)
        for record in read_metrics(run_dir):  # a resumed run's kept epochs, after the purge
            self._scalars(record["epoch"], epoch_scalars(record))

    def epoch(self, epoch: int, record: dict) -> None:
        self._scalars(epoch, epoch_scalars(record))

    def end(self, outcome: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = best_scalars(outcome)
        writer = self.writer.file_writer
        for summary in hparams(flat(self.options), metrics):  # in this run's own folder, not a new one
            writer.add_summary(summary)
        self._scalars(outcome.get("epochs") or 0, metrics)
        self.writer.close()

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()
