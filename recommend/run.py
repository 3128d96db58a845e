"""Run folders: a trained recommender as a directory, like ``from_pretrained``.

``ROOT/runs/RUN`` holds ``config.json`` (plain data: everything needed to rebuild
and rerun), ``model.safetensors`` (the best checkpoint), ``metrics.jsonl`` (one
line per epoch), ``best.json`` and ``train.log``. :func:`load_run` rebuilds the
model from the folder alone (plus the store groups its config names and checks by
fingerprint), never from global state.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from featurestore.errors import UserError
from featurestore.runtime.checkpoint import RESTART, check_safetensors, cpu_state, load_checkpoint
from featurestore.runtime.checkpoint import save_checkpoint as save_resumable, write_safetensors
from featurestore.runtime.files import read_json, write_atomic, write_json
from featurestore.store import GroupLock
from featurestore.workspace import Workspace, name_problem
from recommend.item_towers import ITEM_TOWERS
from recommend.model import Recommender, build_recommender
from recommend.objectives import recommender_state

CONFIG = "config.json"
CHECKPOINT = "model.safetensors"
METRICS = "metrics.jsonl"
BEST = "best.json"
LOG = "train.log"
LAST = "last.safetensors"
WRITER_LOCK = "writer.lock"  # held by the process training the run (see run_lock)
FINISHED = ("completed", "early_stopped", "collapsed", "pruned")  # best.json statuses of a run that is done


def default_run_name(config: dict) -> str:
    """``DATASET-MODE[N]-BACKBONE-LOSS-YYYYmmdd-HHMMSS``: readable and time-ordered."""
    tower = config["model"]["item_tower"]
    mode = tower["name"] + (str(tower["layers"]) if tower.get("layers") is not None else "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (f"{config['dataset']['name']}-{mode}-{config['model']['user_encoder']['name']}-"
            f"{config['training']['loss']}-{stamp}")


def open_run(ws: Workspace, name: str, config: dict) -> Path:
    """Make ``ROOT/runs/NAME`` with its ``config.json``, or reopen it to resume.

    An existing folder is reopened only when its config describes the same training
    (:func:`setup_differences` is empty); then the trainer resumes from its
    ``last.safetensors`` or, if the run had finished, does nothing.
    """
    run_dir = ws.run_dir(name)
    ws.runs.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        if not (run_dir / CONFIG).exists():
            write_json(run_dir / CONFIG, config)  # killed between mkdir and config: nothing trained yet
            return run_dir
        differ = setup_differences(read_config(run_dir), config)
        if differ:
            raise UserError(f"run {name} already exists at {run_dir} with other settings "
                            f"({', '.join(differ[:4])}); pick another --run-name or remove the old "
                            "folder") from None
        return run_dir
    write_json(run_dir / CONFIG, config)
    return run_dir


# Config entries that may change between a run and its resumption without changing what it trains.
_VOLATILE = {"created", "command", "package_version", "training.device", "training.world_size",
             "options.device", "options.track", "options.tracking_uri"}  # where it runs and who watches


def setup_differences(stored: dict, wanted: dict) -> list[str]:
    """Config keys (``section.key``) whose values differ, times/command line/device excluded."""
    def entries(config: dict) -> dict:
        config = json.loads(json.dumps(config))  # tuples -> lists, as stored
        out = {}
        for key, value in config.items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    a, b = entries(stored), entries(wanted)
    return sorted(k for k in a.keys() | b.keys() if k not in _VOLATILE and a.get(k) != b.get(k))


def writer_lock(run_dir: Path) -> GroupLock:
    """The lock a training process holds on its run folder: one writer per run, as per store group."""
    return GroupLock(Path(run_dir) / WRITER_LOCK, Path(run_dir).name, what="run",
                     command=" ".join(sys.argv))


@contextmanager
def run_lock(run_dir: Path, main: bool = True) -> Iterator[None]:
    """Hold the run's writer lock (process 0 only under torchrun); a second ``recommend train``
    with the same --run-name is refused, naming the first, instead of mixing their epochs."""
    lock = writer_lock(run_dir) if main else None
    if lock is not None:
        lock.acquire()
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def unfinished(run_dir: Path) -> dict | None:
    """None for a run that has ended; else where it stands, for ``eval rank`` to say that it
    scored the best checkpoint so far: ``status`` is ``training`` (a live process holds the
    run's lock), ``interrupted`` (Ctrl-C) or ``stopped`` (killed)."""
    best = read_best(run_dir)
    if best.get("status") in FINISHED:
        return None
    holder = writer_lock(run_dir).live_holder()
    status = "training" if holder else "interrupted" if best.get("status") == "interrupted" else "stopped"
    return {"status": status, "pid": holder.get("pid") if holder else None, "best_epoch": best.get("epoch"),
            "epochs_done": len(read_metrics(run_dir))}


def save_checkpoint(run_dir: Path, model: Recommender) -> None:
    """The model's state as safetensors, replaced atomically."""
    write_safetensors(Path(run_dir) / CHECKPOINT, cpu_state(model))


def save_training_state(run_dir: Path, model: Recommender, optimizer: torch.optim.Optimizer,
                        state: dict) -> None:
    """Everything needed to continue after epoch ``state["epoch"]``, in ``last.safetensors``
    (the runtime's one resumable format: :mod:`featurestore.runtime.checkpoint`)."""
    save_resumable(Path(run_dir) / LAST, model, optimizer, state)


def load_training_state(run_dir: Path, model: Recommender,
                        optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore ``model`` and ``optimizer`` from ``last.safetensors``; its ``state``, or None."""
    return load_checkpoint(Path(run_dir) / LAST, model, optimizer,
                           f"{RESTART} (this run's best checkpoint so far is kept until a better epoch replaces it)")


def rewrite_metrics(run_dir: Path, records: list[dict]) -> None:
    """Replace ``metrics.jsonl`` by ``records`` atomically (resuming drops epochs not kept)."""
    write_atomic(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in records).encode())


def append_metrics(run_dir: Path, record: dict) -> None:
    path = Path(run_dir) / METRICS
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err


def read_metrics(run_dir: Path) -> list[dict]:
    """The epochs of ``metrics.jsonl``; a last line cut short by a kill is left out (its epoch is
    redone on resume), any other unreadable line is a UserError naming the file."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines) and record is None and line.startswith(b"{"):
                break
            raise UserError(f"{path} is damaged (line {number} is not a JSON object); "
                            f"{_fix(METRICS, Path(run_dir))}")
        records.append(record)
    return records


def _fix(file: str, run_dir: Path) -> str:
    """What to do about a damaged file of a run folder: rebuild what can be rebuilt, keep the rest."""
    if file == CONFIG:
        return (f"the run cannot be rebuilt without it: restore it from a copy, or remove the folder "
                f"(rm -r {run_dir}) and train the run again")
    return (f"train the run again into a new folder (`recommend train --config {run_dir / CONFIG}`), "
            f"then remove this one (rm -r {run_dir})")


def read_best(run_dir: Path) -> dict:
    """``best.json`` (``{}`` before the first validated epoch); a damaged one is a UserError."""
    path = Path(run_dir) / BEST
    return read_json(path, _fix(BEST, Path(run_dir))) if path.exists() else {}


def resolve_run(ws: Workspace, run: str) -> Path:
    """A run folder from a name under ``ROOT/runs`` or a path to the folder."""
    names = [ws.run_dir(run)] if name_problem("run", run) is None else []
    for candidate in (*names, Path(run)):
        if (candidate / CONFIG).exists():
            return candidate
    raise UserError(
        f"no run {run!r}: neither {ws.runs / run} nor {Path(run)} holds a {CONFIG}; "
        "list runs with `recommend runs` or pass --root"
    )


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise UserError(f"no run at {run_dir} (no {CONFIG}); see `recommend runs`")
    config = read_json(path, _fix(CONFIG, Path(run_dir)))
    missing = [k for k in _CONFIG_SECTIONS if not isinstance(config.get(k), dict)]
    if missing:
        raise UserError(f"{path} is damaged (no {', '.join(missing)} section); {_fix(CONFIG, Path(run_dir))}")
    return config


_CONFIG_SECTIONS = ("dataset", "model", "training")  # what every reader of a run's config needs


def best_checkpoint(run_dir: Path, who: str = "run") -> Path:
    """The run's best checkpoint (``model.safetensors``); a run that has none yet is refused."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        best = read_best(run_dir)
        if best.get("status") in FINISHED:
            raise UserError(f"{who} {Path(run_dir).name} ended ({best['status']}) without a {CHECKPOINT}: no epoch "
                            f"validated ({best.get('message') or 'see its train.log'}); train it again with other "
                            f"settings (`recommend train --config {Path(run_dir) / CONFIG} --lr ...`)")
        raise UserError(f"{who} {Path(run_dir).name} has no {CHECKPOINT} yet (no epoch finished); "
                        "train it first, or wait for its first validation")
    check_safetensors(path, _fix(CHECKPOINT, Path(run_dir)))
    return path


def load_best_weights(model: Recommender, run_dir: Path) -> None:
    """Load a run's best checkpoint into ``model``, minus the auxiliary objectives' heads
    (NID's classifier): ranking needs only the recommender."""
    path = best_checkpoint(run_dir)
    try:
        model.load_state_dict(recommender_state(load_file(str(path))))
    except RuntimeError as err:  # other tensor names or shapes than config.json builds
        raise UserError(f"{path} holds other weights than {Path(run_dir) / CONFIG} describes "
                        f"({str(err).splitlines()[0]}); {_fix(CHECKPOINT, Path(run_dir))}") from None


def load_run(run_dir: Path | str, device: str | torch.device = "cpu",
             ws: Workspace | None = None) -> tuple[Recommender, dict]:
    """Rebuild a trained Recommender from its run folder, in eval mode.

    Args:
        run_dir: ``ROOT/runs/RUN``.
        device: where to put the model.
        ws: the workspace whose store holds the features; default: the root the run
            folder sits in (``run_dir/../..``).

    Returns:
        ``(model, config)``.

    Example:
        >>> model, config = load_run(Workspace(root).run_dir("HM-ts-dnn8-sasrec-bce-..."))
        >>> model.item_vectors().shape
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    best_checkpoint(run_dir)  # refused before the model is built
    ws = ws or Workspace(run_dir.resolve().parent.parent)
    spec = config["model"]
    sources = ITEM_TOWERS.get(spec["item_tower"]["name"]).reopen(ws, config)
    model = build_recommender(spec, sources, fit=False)
    load_best_weights(model, run_dir)
    return model.to(device).eval(), config


def run_summary(run_dir: Path) -> dict:
    """One row of ``recommend runs``: settings, progress and best validation metrics."""
    config = read_config(run_dir)
    best = read_best(run_dir)
    try:
        return _summary(run_dir, config, best)
    except (KeyError, TypeError) as err:
        raise UserError(f"{run_dir / CONFIG} is damaged (no {err} entry); {_fix(CONFIG, run_dir)}") from None


def _summary(run_dir: Path, config: dict, best: dict) -> dict:
    tower = config["model"]["item_tower"]
    return {
        "run": run_dir.name,
        "dataset": config["dataset"]["name"],
        "mode": tower["name"],
        "layers": tower.get("layers"),
        "features": [f["group"] for f in config.get("features", [])],
        "fusion": tower.get("fusion"),
        "with_id": tower.get("with_id"),
        "whiten": tower.get("whiten", False),
        "backbone": config["model"]["user_encoder"]["name"],
        "loss": config["training"]["loss"],
        "dim": config["model"]["dim"],
        "lr": config["training"]["lr"],
        "seed": config["training"]["seed"],
        "trainable_params": config["cost"]["trainable_params"],
        "epochs": len(read_metrics(run_dir)),
        "status": best.get("status", "running"),
        "best_epoch": best.get("epoch"),
        "best": best.get("metrics", {}),
    }


def run_problem(run_dir: Path) -> str | None:
    """Why the run folder cannot be ranked or listed (a damaged config, best.json or checkpoint), else None."""
    try:
        run_summary(run_dir)
        if (run_dir / CHECKPOINT).exists():
            best_checkpoint(run_dir)
    except UserError as err:
        return str(err)
    return None


def list_runs(ws: Workspace) -> list[dict]:
    """Summaries of every run under the root, oldest first; a damaged folder is listed with
    ``status: damaged`` and its ``problem`` instead of stopping the listing."""
    if not ws.runs.exists():
        return []
    dirs = sorted((d for d in ws.runs.iterdir() if (d / CONFIG).exists()),
                  key=lambda d: (d / CONFIG).stat().st_mtime)
    return [_listed(d) for d in dirs]


def _listed(run_dir: Path) -> dict:
    problem = run_problem(run_dir)
    return {"run": run_dir.name, "status": "damaged", "problem": problem} if problem else run_summary(run_dir)
