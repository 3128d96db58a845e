"""Experiment tracking (``--track``, ``--tracking-uri``): a training feature every run has.

Researchers watch training in TensorBoard or keep their runs in MLflow; the run folder
already holds everything, and this feature copies it there as the run goes
(:mod:`recommend.tensorboard_log`, :mod:`recommend.mlflow_log`). TensorBoard is the default,
MLflow is asked for, ``none`` writes the run folder only. Tracking never decides a result
(:class:`recommend.tracker.Guarded`).

The options stay None when not given, and ``check`` does not fill them: None already means
TensorBoard, and a recorded value would make a run folder from before this feature differ
from its own resumption. They are not settings of what is trained: a study's run names and
a search's fixed settings leave them out (:data:`TRACKING_OPTIONS`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from featurestore.errors import UserError
from recommend.callbacks import Callback
from recommend.mlflow_log import MlflowParent, MlflowTracker
from recommend.options import TrainOptions, option
from recommend.tensorboard_log import TensorBoardTracker
from recommend.tracker import Parent

TRACKERS = ("tensorboard", "mlflow", "none")
DEFAULT_TRACK = "tensorboard"


@dataclass(frozen=True)
class TrackingOptions:
    track: str | None = option(
        flag="--track", choices=TRACKERS, purpose="picks where the run's curves go",
        help="Where the run's curves go besides its folder: tensorboard = event files in the run folder "
             "(`tensorboard --logdir ROOT/runs`); mlflow = those and an MLflow run (the mlflow extra: "
             "pip install -e \".[mlflow]\"); none = the run folder only [default: tensorboard].")
    tracking_uri: str | None = option(
        flag="--tracking-uri", metavar="URI", purpose="points --track mlflow at a server or store",
        help="With --track mlflow: the MLflow server or store (http://HOST:5000, sqlite:///PATH.db) "
             "[default: $MLFLOW_TRACKING_URI, else sqlite:///ROOT/mlflow.db].")


TRACKING_OPTIONS = tuple(f.name for f in fields(TrackingOptions))


class TrackingFeature:
    """``--track`` / ``--tracking-uri``: a training feature every run has (a plugin of recommend.plugins)."""

    options = TrackingOptions

    def check(self, opts: TrainOptions) -> TrainOptions:
        """Refuse an MLflow address without MLflow, and MLflow where it is not installed."""
        if opts.tracking_uri is not None and opts.track != "mlflow":
            raise UserError("--tracking-uri points MLflow at a server or store; give --track mlflow too")
        if opts.track == "mlflow" and importlib.util.find_spec("mlflow") is None:
            raise UserError("--track mlflow needs MLflow, which is not installed: pip install -e \".[mlflow]\" "
                            "(or pip install mlflow)")
        return opts

    def callbacks(self, opts: TrainOptions) -> list[Callback]:
        track = opts.track or DEFAULT_TRACK
        trackers: list[Callback] = []
        if track != "none":
            trackers.append(TensorBoardTracker(skip=("run_name", *TRACKING_OPTIONS)))
        if track == "mlflow":
            trackers.append(MlflowTracker(opts.tracking_uri))
        return trackers


TRACKING_FEATURE = TrackingFeature()


def parent_run(root: Path, track: str | None, tracking_uri: str | None, dataset: str, home: Path, kind: str,
               params: Mapping[str, Any]) -> Parent:
    """The parent run of a study or a search (``kind``) whose folder is ``home``: an MLflow run
    under ``--track mlflow``, else one that tracks nothing (TensorBoard compares runs by folder)."""
    if track != "mlflow":
        return Parent()
    return MlflowParent(root, tracking_uri, dataset, home, kind, params)
