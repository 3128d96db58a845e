"""MLflow on request (``--track mlflow``, the ``mlflow`` extra): each run folder as an MLflow run.

A training run becomes an MLflow run of the experiment ``recommend-DATASET``: the whole
``config.json`` as parameters, the curves of :func:`recommend.tracker.epoch_scalars` per epoch,
and at its end the best metrics, ``best.json``, ``metrics.jsonl``, ``config.json`` and the
checkpoint's sha256 (a tag and a ``sha256sum`` file). A study and a search are parent runs
(:class:`MlflowParent`); the runs trained inside one carry MLflow's parent tag, in this process
or a child it starts (the parent's id travels in :data:`PARENT_ENV`).

Each MLflow run is found again by the folder it copies (the tag :data:`HOME_TAG`): a resumed run
keeps logging into its MLflow run from the first epoch the server does not have yet, and a study
adds to its parent the rows trained before it was tracked. Where: ``--tracking-uri``, else
``MLFLOW_TRACKING_URI``, else a SQLite store inside ROOT (:data:`STORE`, artifacts in
:data:`ARTIFACTS`). A server that is down costs one short wait (:data:`HTTP_DEFAULTS`), is said
once, and the run goes on (:class:`recommend.tracker.Guarded`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from eval.results import EVAL_FILE
from featurestore.store import file_sha256
from recommend.run import BEST, CHECKPOINT, CONFIG, METRICS, read_best, read_config, read_metrics
from recommend.tracker import Guarded, Parent, Tracker, best_scalars, epoch_scalars, flat

STORE = "mlflow.db"  # the embedded default: sqlite:///ROOT/mlflow.db
ARTIFACTS = "mlflow-artifacts"  # ... with the files of its runs in ROOT/mlflow-artifacts
PARENT_ENV = "MOREC_MLFLOW_PARENT_RUN"
HOME_TAG, HOME_ID_TAG, KIND_TAG, PARENT_TAG = "morec.home", "morec.home_id", "morec.kind", "mlflow.parentRunId"
SHA256_TAG = "checkpoint_sha256"
# MLflow's own defaults retry an unreachable server for minutes; a training loop waits seconds at most
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
STATUS = {"completed": "FINISHED", "early_stopped": "FINISHED", "pruned": "KILLED", "collapsed": "FAILED"}
PARAMS_PER_CALL, PARAM_LENGTH = 100, 6000  # MLflow's limits


def tracking_uri(root: Path, given: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite store inside ROOT."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / STORE).resolve()}"


def metric_key(name: str) -> str:
    """An MLflow metric name (no ``@``: ``valid/HR@10`` is ``valid/HR_at_10``)."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


class MlflowStore:
    """One tracking server or store: the dataset's experiment, and runs found by their folder."""

    def __init__(self, root: Path, given: str | None) -> None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)  # the user's own settings win
        from mlflow import MlflowClient

        self.uri = tracking_uri(root, given)
        embedded = not given and not os.environ.get("MLFLOW_TRACKING_URI")
        # a SQLite store of ours keeps its files beside it, not in ./mlruns of wherever the command ran
        self.artifacts = (Path(root) / ARTIFACTS).resolve().as_uri() if embedded else None
        self.client = MlflowClient(self.uri)

    def experiment(self, dataset: str) -> str:
        name = f"recommend-{dataset}"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifacts)
        except Exception:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def find(self, dataset: str, home: Path) -> str | None:
        """The MLflow run that copies the folder ``home``, if any."""
        runs = self.client.search_runs([self.experiment(dataset)], f"tags.`{HOME_ID_TAG}` = '{_home_id(home)}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def open(self, dataset: str, home: Path, kind: str, params: Mapping[str, Any]) -> tuple[str, bool]:
        """(run id, created): the MLflow run of the folder ``home`` running again, else a new one
        with ``params``; under a parent (:data:`PARENT_ENV`) either is nested in it."""
        parent = os.environ.get(PARENT_ENV)
        run_id = self.find(dataset, home)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            if parent:
                self.client.set_tag(run_id, PARENT_TAG, parent)
            return run_id, False
        tags = {HOME_TAG: str(Path(home).resolve()), HOME_ID_TAG: _home_id(home), KIND_TAG: kind,
                **({PARENT_TAG: parent} if parent else {})}
        run_id = self.client.create_run(self.experiment(dataset), run_name=Path(home).name, tags=tags).info.run_id
        self.log_params(run_id, params)
        return run_id, True

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:PARAM_LENGTH]) for key, value in flat(params).items()]
        for start in range(0, len(items), PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=items[start:start + PARAMS_PER_CALL])

    def log_metrics(self, run_id: str, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(metric_key(k), v, now, step) for k, v in values.items()])

    def last_step(self, run_id: str, name: str) -> int:
        """The last step of a metric the store holds (0: none)."""
        return max((m.step for m in self.client.get_metric_history(run_id, metric_key(name))), default=0)

    def log_files(self, run_id: str, files: Iterable[Path]) -> None:
        for path in files:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path))


def _home_id(home: Path) -> str:
    """The folder as a tag value any search filter can quote (a path may hold quotes)."""
    return hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:20]


class _AtStore:
    """Names the store in the one message that says tracking stopped."""

    backend = "MLflow"
    store: MlflowStore | None = None

    def where(self) -> str:
        return f"MLflow at {self.store.uri}" if self.store is not None else self.backend


class MlflowTracker(_AtStore, Tracker):
    """One training run as an MLflow run (see the module docstring); ``uri``: ``--tracking-uri``."""

    def __init__(self, uri: str | None) -> None:
        super().__init__()
        self.uri, self.store, self.run_id, self.run_dir = uri, None, None, None

    def start(self, run_dir: Path, config: dict) -> None:
        self.run_dir = run_dir
        self.store = MlflowStore(run_dir.parent.parent, self.uri)  # ROOT/runs/RUN
        self.run_id, created = self.store.open(config["dataset"]["name"], run_dir, "train", config)
        if created:
            self.store.log_files(self.run_id, [run_dir / CONFIG])
        logged = 0 if created else self.store.last_step(self.run_id, "train/loss")
        for record in read_metrics(run_dir):  # a resumed run's epochs the store has not had yet
            if record["epoch"] > logged:
                self.epoch(record["epoch"], record)

    def epoch(self, epoch: int, record: dict) -> None:
        self.store.log_metrics(self.run_id, epoch_scalars(record), epoch)

    def end(self, outcome: dict) -> None:
        self.store.log_metrics(self.run_id, best_scalars(outcome), outcome.get("epochs") or 0)
        checkpoint = self.run_dir / CHECKPOINT
        with tempfile.TemporaryDirectory() as tmp:
            sums = []
            if checkpoint.is_file():
                digest = file_sha256([checkpoint])
                self.store.client.set_tag(self.run_id, SHA256_TAG, digest)
                sums.append(Path(tmp) / f"{CHECKPOINT}.sha256")
                sums[0].write_text(f"{digest}  {CHECKPOINT}\n")  # sha256sum -c reads it
            self.store.log_files(self.run_id, [self.run_dir / BEST, self.run_dir / METRICS,
                                               self.run_dir / EVAL_FILE, *sums])
        self.store.client.set_terminated(self.run_id, STATUS.get(outcome["status"], "FINISHED"))


class MlflowParent(_AtStore, Guarded, Parent):
    """A study or a search as a parent MLflow run (nested itself when opened inside another).

    Args:
        root: ROOT (for the embedded store).
        uri: ``--tracking-uri`` (None: see :func:`tracking_uri`).
        dataset: names the experiment.
        home: the folder it copies (the study's folder, ``ROOT/tune/NAME``): found again by it.
        kind: ``study`` or ``tune``.
        params: its settings, logged once as parameters.
    """

    def __init__(self, root: Path, uri: str | None, dataset: str, home: Path, kind: str,
                 params: Mapping[str, Any]) -> None:
        super().__init__()
        self.root, self.uri, self.dataset, self.home, self.kind, self.params = root, uri, dataset, home, kind, params
        self.store: MlflowStore | None = None
        self.run_id: str | None = None
        self.outer: str | None = None

    def __enter__(self) -> "MlflowParent":
        self.outer = os.environ.get(PARENT_ENV)
        self.guarded(self._open)
        return self

    def _open(self) -> None:
        self.store = MlflowStore(self.root, self.uri)
        self.run_id, _ = self.store.open(self.dataset, self.home, self.kind, self.params)
        os.environ[PARENT_ENV] = self.run_id  # children spawned from here on inherit it

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if self.outer is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = self.outer
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        self.guarded(lambda: self.store.client.set_terminated(self.run_id, status))

    def nest(self, run_dir: Path) -> None:
        self.guarded(self._nest, Path(run_dir))

    def _nest(self, run_dir: Path) -> None:
        run_id = self.store.find(self.dataset, run_dir)
        if run_id is None:  # trained before this study was tracked: copied from its folder now
            tracker = MlflowTracker(self.uri)
            tracker.start(run_dir, read_config(run_dir))
            best = read_best(run_dir)
            tracker.end({"status": best.get("status"), "best": best.get("metrics"), "best_epoch": best.get("epoch"),
                         "epochs": len(read_metrics(run_dir))})
            run_id = tracker.run_id
        self.store.log_files(run_id, [run_dir / EVAL_FILE])

    def record(self, metrics: Mapping[str, float], files: Iterable[Path]) -> None:
        self.guarded(self._record, metrics, list(files))

    def _record(self, metrics: Mapping[str, float], files: list[Path]) -> None:
        self.store.log_metrics(self.run_id, metrics, 0)
        self.store.log_files(self.run_id, files)
