"""What a training run tells those who watch it: a callback per observer, as Lightning's ``Callback``.

The loop calls every callback at the same three points, on process 0 only. A callback never
changes what is trained; the one exception is :meth:`Callback.on_epoch_end` returning True, which
asks the run to stop as ``pruned`` (a hyper-parameter search's pruner, ``recommend tune``).
Experiment tracking (TensorBoard, MLflow) is a callback too.
"""

from __future__ import annotations

from pathlib import Path


class Callback:
    """An observer of one training run; every method does nothing unless overridden."""

    def on_train_start(self, run_dir: Path, config: dict) -> None:
        """The run folder exists and holds ``config.json`` (``config``); resumed runs start here too."""

    def on_epoch_end(self, epoch: int, record: dict) -> bool:
        """Epoch ``epoch`` was validated; ``record`` is its line of ``metrics.jsonl``. True: stop (pruned)."""
        return False

    def on_train_end(self, outcome: dict) -> None:
        """The run ended (``outcome``: status, best epoch and metrics, message, popularity, warning)."""
