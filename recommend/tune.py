"""``recommend tune``: hyper-parameter search for one configuration, on validation only.

Paper 001 (§3) searches the learning rate and weight decay per model; one setting for
every mode makes a comparison say more about the setting than about the modes. This
is Optuna's search, not one of our own:

- sampler: TPE; pruner: median (default) or Hyperband, fed after every epoch by the
  trainer's own full-pool validation HR@10 (a training callback, :class:`PlateauAwarePruning`);
- space: lr, weight decay, dropout, width d, and depth N for ts-dnn
  (:data:`DEFAULT_SPACE`), or a YAML/JSON file (:func:`load_space`);
- storage: any SQLAlchemy URL; by default a SQLite file in ROOT. Many workers (on many
  machines, with a shared database server) given the same ``--storage`` and
  ``--study-name`` share one search: Optuna's own distributed mode hands each trial to
  exactly one worker.

Every trial is an ordinary run folder (``ROOT/runs/STUDY-tN``), so ``eval rank`` and
``eval compare`` work on it. Resumable: workers send heartbeats; a trial whose worker
was killed is marked failed once its heartbeat is ``2 x --heartbeat`` seconds old and is
re-queued with the same parameters, and the re-queued trial trains into the killed
trial's run folder, so the trainer resumes it after its last saved epoch. The search
never looks at the test split: a trial's value is its best validation HR@10.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from featurestore.errors import UserError
from featurestore.workspace import Workspace
from recommend.run import write_atomic
from eval.metrics import percent
from recommend.callbacks import Callback
from recommend.item_towers import ITEM_TOWERS
from recommend.options import SHARED_FIELDS, range_problem
from recommend.plugins import option_fields
from recommend.tracking import TRACKING_OPTIONS, parent_run
from recommend.trainer import MONITOR, TrainOptions, check_options, train

# name -> distribution; "float"/"int" take low/high (and log), "categorical" takes choices
DEFAULT_SPACE: dict[str, dict] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "dim": {"type": "categorical", "choices": [32, 64, 128]},
}
PRUNERS = ("median", "hyperband", "none")
DB_FILE = "tune.db"
PLOT = "search.png"
MAX_RETRY = 3  # a killed trial is re-queued at most this many times


@dataclass
class TuneOptions:
    """Everything ``recommend tune`` takes besides the training options it searches around."""

    base: TrainOptions
    trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    space: dict = field(default_factory=dict)  # empty: the default space for the mode
    pruner: str = "median"
    sampler_seed: int | None = None
    heartbeat: int = 60


def default_space(mode: str) -> dict:
    """The shared space, and what the mode searches besides (TS-DNN: its depth N)."""
    return {**DEFAULT_SPACE, **ITEM_TOWERS.get(mode).search_space}


def load_space(path: Path) -> dict:
    """A search space from YAML or JSON: ``{option: {type, low, high[, log] | choices}}``.

    Example file::

        lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
        dim: {type: categorical, choices: [64, 128]}
    """
    import yaml

    try:
        space = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except OSError as err:
        raise UserError(f"--space {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"--space {path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    return check_space(space, str(path))


def check_space(space, where: str = "the search space") -> dict:
    """Every entry names a training option and a distribution Optuna can sample whose values the
    option accepts: checked before the first trial, so a bad bound fails here naming its key."""
    known = set(TrainOptions().to_dict())
    fields = {**SHARED_FIELDS, **option_fields()}
    if not isinstance(space, dict) or not space:
        raise UserError(f"{where}: give a mapping of option -> distribution, e.g. "
                        "{lr: {type: float, low: 1e-4, high: 1e-2, log: true}}")
    for name, dist in space.items():
        if name not in known:
            raise UserError(f"{where}: {name!r} is no option of `recommend train`; use e.g. "
                            f"{', '.join(DEFAULT_SPACE)} or layers")
        kind = dist.get("type") if isinstance(dist, dict) else None
        if kind in ("float", "int"):
            bounds = [dist.get("low"), dist.get("high")]
            if not all(_finite(v) for v in bounds) or not bounds[0] <= bounds[1]:
                raise UserError(f"{where}: {name} needs numbers low <= high, got {dist}")
            if dist.get("log") and bounds[0] <= 0:
                raise UserError(f"{where}: {name} has log: true, which needs low > 0, got low {bounds[0]}")
        elif kind == "categorical":
            if not isinstance(dist.get("choices"), list) or not dist["choices"]:
                raise UserError(f"{where}: {name} needs a non-empty choices list")
            bounds = dist["choices"]
        else:
            raise UserError(f"{where}: {name} needs type float, int or categorical, got {kind!r}")
        problem = next(filter(None, (range_problem(fields[name], v) for v in bounds)), None) if name in fields else None
        if problem:
            raise UserError(f"{where}: {name} reaches values the option refuses ({problem})")
    return space


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """One value per option of ``space``, sampled by the study's sampler."""
    params = {}
    for name, dist in space.items():
        if dist["type"] == "float":
            params[name] = trial.suggest_float(name, float(dist["low"]), float(dist["high"]),
                                               log=bool(dist.get("log", False)))
        elif dist["type"] == "int":
            params[name] = trial.suggest_int(name, int(dist["low"]), int(dist["high"]),
                                             log=bool(dist.get("log", False)))
        else:
            params[name] = trial.suggest_categorical(name, list(dist["choices"]))
    return params


def default_study_name(base: TrainOptions) -> str:
    mode = base.mode + (str(base.layers) if base.layers is not None else "")
    groups = "-".join(g.replace("/", "_") for g in base.encoders + base.features)
    return "-".join(filter(None, ["tune", base.dataset, mode, groups, base.backbone, base.loss]))


def open_storage(ws: Workspace, url: str | None, heartbeat: int) -> RDBStorage:
    """Optuna's SQLAlchemy storage with heartbeats and retry of killed trials."""
    url = url or f"sqlite:///{(ws.root / DB_FILE).resolve()}"
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
    for attempt in range(3):  # workers started together race to create the tables: the loser retries
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
        except Exception as err:  # sqlalchemy's own errors: a bad URL, a missing driver, no server
            _raise_if_disk_full(err, url)
            if not type(err).__module__.startswith("sqlalchemy") and not isinstance(err, ImportError):
                raise  # not the storage's fault (an OSError gets its own one line from run_cli)
            if attempt == 2 or "://" not in url or type(err).__name__ not in ("OperationalError", "IntegrityError"):
                raise UserError(f"--storage {url}: Optuna cannot open it ({type(err).__name__}: "
                                f"{str(err).splitlines()[0]}); give a SQLAlchemy URL such as "
                                "sqlite:///path/tune.db or postgresql://user@host/db") from None
            time.sleep(1 + attempt)


def _raise_if_disk_full(err: Exception, url: str) -> None:
    """SQLite says a full disk in its own words; say it as a full disk, naming the database file."""
    if "disk is full" in str(err) or "disk I/O error" in str(err):
        where = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
        raise UserError(f"{where}: no space left on the device ({str(err).splitlines()[0]}); free some space "
                        "and run the same command again (finished trials are kept)") from None


def _requeue(study: optuna.Study, number: int) -> None:
    """Ctrl-C in a trial: queue it again with its parameters, as a killed worker's stale heartbeat
    would, so the rerun resumes its run folder instead of drawing new parameters."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, frozen)


def _pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":  # after 3 finished trials, stop a trial below their median at the same epoch
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max(epochs, 2))
    return optuna.pruners.NopPruner()


class PlateauAwarePruning(Callback):
    """Report each epoch's validation HR@10 to the trial; let the pruner stop it only once the run has
    left the popularity plateau.

    Sequential models first learn popularity and can sit at its level for tens of epochs before they
    learn sequences (001 Fig. 5); a median pruner comparing trials on that plateau cuts the late
    learners, often the best ones (a 12-trial search on a real dataset pruned 8 of them there). The
    trainer's own ``--plateau-patience`` still ends a trial that never leaves it.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, epoch: int, record: dict) -> bool:
        self.trial.report(record["valid"][MONITOR[0]], epoch)
        return bool(record["left_plateau"]) and self.trial.should_prune()


def trial_run_name(study_name: str, trial: optuna.Trial) -> str:
    """The run folder of a trial; a re-queued trial keeps the folder of the one it retries."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    return f"{study_name}-t{history[0] if history else trial.number}"


def _finished_count(study: optuna.Study) -> int:
    """Trials that count towards ``--trials``: complete, pruned, or failed and not re-queued."""
    trials = study.get_trials(deepcopy=False)
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried) for t in trials)


def run_tune(ws: Workspace, opts: TuneOptions, echo: bool = True) -> dict:
    """Run (or continue) the search until ``opts.trials`` trials are done; its summary.

    Returns:
        :func:`summary` of the study, plus ``plot`` (the PNG of the search).

    Example:
        >>> run_tune(Workspace(root), TuneOptions(TrainOptions(dataset="demo", mode="id"), trials=20))
    """
    space = check_space(opts.space or default_space(opts.base.mode))
    if opts.trials < 1:
        raise UserError(f"--trials must be >= 1, got {opts.trials}")
    if opts.heartbeat < 1:
        raise UserError(f"--heartbeat must be >= 1 second, got {opts.heartbeat}")
    if opts.pruner not in PRUNERS:
        raise UserError(f"--pruner {opts.pruner}: choose from {', '.join(PRUNERS)}")
    if opts.base.run_name:
        raise UserError("--run-name: every trial gets its own run folder (STUDY-tN); drop --run-name")
    check_options(opts.base)  # bad base options fail here, not in every trial
    name = opts.study_name or default_study_name(opts.base)
    storage = open_storage(ws, opts.storage, opts.heartbeat)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its failed-trial warning prints a traceback; ours is one line
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=opts.sampler_seed),
                                pruner=_pruner(opts.pruner, opts.base.epochs))
    if opts.sampler_seed is not None and study.trials:  # a resumed or extended seeded search draws anew
        study.sampler = optuna.samplers.TPESampler(seed=opts.sampler_seed + len(study.trials))
    _record_setup(study, opts, space)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        run = trial_run_name(name, trial)
        trial.set_user_attr("run", run)
        options = opts.base.replace(run_name=run, **params)

        try:
            result = train(ws, options, progress=False, echo=False, callbacks=[PlateauAwarePruning(trial)])
        except KeyboardInterrupt:
            _requeue(trial.study, trial.number)
            raise
        except UserError as err:
            if echo:
                print(f"trial {trial.number} ({run}): failed: {err}", file=sys.stderr, flush=True)
            raise
        if echo:
            print(f"trial {trial.number} ({run}): {result['status']}, best validation {MONITOR[0]} "
                  f"{percent(result['best'].get(MONITOR[0]))}% at epoch {result['best_epoch']}; "
                  + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()),
                  file=sys.stderr, flush=True)
        if result["status"] == "pruned":
            raise optuna.TrialPruned()
        if not result["best"]:
            raise UserError(f"trial {trial.number}: no epoch was validated ({result['message']})")
        return result["best"][MONITOR[0]]

    def stop_when_done(study: optuna.Study, _trial) -> None:
        if _finished_count(study) >= opts.trials:
            study.stop()

    folder = ws.root / "tune" / name
    # under --track mlflow the search is a parent run and its trials nest in it
    with parent_run(ws.root, opts.base.track, opts.base.tracking_uri, opts.base.dataset, folder, "tune",
                    {"space": space, "base": study.user_attrs["base"]}) as parent:
        remaining = opts.trials - _finished_count(study)
        if remaining > 0:
            try:
                study.optimize(objective, n_trials=remaining, timeout=opts.timeout, catch=(UserError,),
                               callbacks=[stop_when_done], gc_after_trial=True)
            except Exception as err:  # the storage's own errors on a full disk
                _raise_if_disk_full(err, opts.storage or f"sqlite:///{ws.root / DB_FILE}")
                raise
        result = summary(study, ws)
        result["plot"] = str(plot_search(study, folder / PLOT))
        write_atomic(folder / "summary.json", (json.dumps(result, indent=2) + "\n").encode())
        parent.record({f"best/valid_{MONITOR[0]}": result["best"]["value"]} if result["best"] else {},
                      [folder / "summary.json", folder / PLOT])
    return result


def _record_setup(study: optuna.Study, opts: TuneOptions, space: dict) -> None:
    """What is searched around what, kept with the study (the first worker writes it); a later
    worker or restart with other fixed options or another space is refused, so trials of two
    setups never compete for one "best"."""
    base = {k: v for k, v in opts.base.to_dict().items()
            if k not in space and k not in ("run_name", "device", *TRACKING_OPTIONS)}
    base = json.loads(json.dumps(base, default=str))
    if "base" in study.user_attrs:
        stored = study.user_attrs["base"]
        changed = sorted(k for k in set(base) | set(stored) if k != "device" and base.get(k) != stored.get(k))
        if changed or json.loads(json.dumps(space)) != study.user_attrs.get("space"):
            what = ", ".join(f"{k}: {stored.get(k)!r} there, {base.get(k)!r} here" for k in changed) or "the space"
            raise UserError(f"Optuna study {study.study_name} searches other settings ({what}); "
                            f"give --study-name NEW for this search")
    else:
        study.set_user_attr("base", base)
        study.set_user_attr("space", space)
        study.set_user_attr("metric", f"validation {MONITOR[0]} (full pool, history excluded)")


def summary(study: optuna.Study, ws: Workspace | None = None) -> dict:
    """The best trial, its parameters and run, and how many trials ran, were pruned, failed."""
    trials = study.get_trials(deepcopy=False)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return {
        "study": study.study_name,
        "metric": study.user_attrs.get("metric"),
        "trials": len(trials),
        "complete": states["complete"], "pruned": states["pruned"], "failed": states["fail"],
        "running": states["running"] + states["waiting"],
        "best": None if best is None else {
            "trial": best.number, "value": best.value, "params": best.params, "run": best.user_attrs.get("run"),
            "run_dir": None if ws is None else str(ws.run_dir(best.user_attrs.get("run", ""))),
        },
        "space": study.user_attrs.get("space"),
        "base": study.user_attrs.get("base"),
    }


def plot_search(study: optuna.Study, path: Path) -> Path:
    """PNG: validation metric per trial (pruned trials at their last reported value) with
    the running best, and Optuna's parameter importances when it can compute them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    importances = {}
    if sum(t.state == TrialState.COMPLETE for t in trials) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError, ZeroDivisionError):  # too few distinct trials
            importances = {}
    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(11 if importances else 6, 4), squeeze=False)
    ax = axes[0][0]
    best, line = float("-inf"), []
    for state, colour in ((TrialState.COMPLETE, "tab:blue"), (TrialState.PRUNED, "tab:orange")):
        points = [(t.number, t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)])
                  for t in trials if t.state == state and (t.value is not None or t.intermediate_values)]
        if points:
            ax.scatter(*zip(*points), c=colour, label=state.name.lower(), zorder=3)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            best = max(best, t.value)
        line.append(best if best > float("-inf") else None)
    ax.step([t.number for t in trials], [v if v is not None else float("nan") for v in line], where="post",
            c="k", lw=1, label="best so far")
    ax.set(xlabel="trial", ylabel=f"validation {MONITOR[0]}", title=study.study_name)
    ax.legend(loc="lower right")
    if importances:
        names = list(importances)[::-1]
        axes[0][1].barh(names, [importances[n] for n in names])
        axes[0][1].set(xlabel="importance (fANOVA)", title="parameter importances")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
