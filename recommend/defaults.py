"""Fill in what a command line left out when the workspace allows only one answer.

``recommend train --mode ts-dnn --layers 8`` in a root holding one prepared dataset
and one store group of it means exactly one thing; ``eval rank --full-pool`` after a
training run means "rank that run". Each function here returns the one answer and
the sentence the CLI prints about it (the user sees every inference), or refuses
with the candidates and the option that chooses among them: a guess between two
datasets would train on the wrong one silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from featurestore.errors import UserError
from featurestore.workspace import Workspace
from recommend.run import BEST, CONFIG, FINISHED, run_problem


@dataclass(frozen=True)
class Inferred:
    """One value the user did not type: ``value`` and the ``note`` saying why it is the one."""

    value: str
    note: str


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def prepared_datasets(ws: Workspace) -> list[str]:
    """Names of the prepared datasets under ``ROOT/datasets`` (folders with a manifest), sorted."""
    if not ws.datasets.is_dir():
        return []
    return sorted(d.name for d in ws.datasets.iterdir() if (d / "manifest.json").is_file())


def only_dataset(ws: Workspace) -> Inferred:
    """The prepared dataset of ``ROOT`` when it holds exactly one.

    Example:
        >>> only_dataset(ws).note
        'dataset HM (the only one in workspace)'
    """
    names = prepared_datasets(ws)
    if not names:
        raise UserError(f"no prepared dataset in {ws.root}; prepare one with `featurestore dataset prepare "
                        "--format FORMAT --source RAWDIR --name NAME`, or pass --root")
    if len(names) > 1:
        raise UserError(f"{ws.root} holds {len(names)} prepared datasets ({_listing(names)}); "
                        "choose one with --dataset NAME")
    return Inferred(names[0], f"dataset {names[0]} (the only one in {ws.root})")


def complete_groups(ws: Workspace, dataset: str) -> list[str]:
    """Names of the dataset's store groups of item vectors whose extraction finished, sorted (codes groups,
    ``featurestore codes``, hold no vectors a content mode could read)."""
    from extract.codes import CODES
    from featurestore.store import STATUS_COMPLETE, FeatureStore, parse_group_name

    store = FeatureStore(ws.store)
    return [g for g in store.groups() if parse_group_name(g).dataset == dataset
            and parse_group_name(g).modality != CODES and _status(store, g) == STATUS_COMPLETE]


def _status(store, group: str) -> str:
    """A group's status; ``damaged`` when a damaged file makes it unreadable (`featurestore ls` says which)."""
    try:
        return store.open(group).status
    except UserError:
        return "damaged"


def only_group(ws: Workspace, dataset: str, mode: str) -> Inferred:
    """The complete store group of ``dataset`` when there is exactly one (``--mode`` reads stored vectors)."""
    groups = complete_groups(ws, dataset)
    if not groups:
        raise UserError(f"--mode {mode} trains on stored vectors and dataset {dataset} has no complete store "
                        f"group; extract one first (`featurestore extract --dataset {dataset} --encoder ENC`; "
                        "`featurestore ls` lists the damaged ones)")
    if len(groups) > 1:
        raise UserError(f"--mode {mode} needs a store group and dataset {dataset} has {len(groups)} "
                        f"({_listing(groups)}); choose with --encoder ENC[@VARIANT][,ENC] or --features GROUP")
    return Inferred(groups[0], f"store group {groups[0]} (the only complete one of {dataset})")


def _finished_at(run_dir: Path) -> float | None:
    """When the run finished (``best.json`` written with a final status), or None."""
    path = run_dir / BEST
    try:
        status = json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return path.stat().st_mtime if status in FINISHED else None


def latest_finished_run(ws: Workspace) -> Inferred:
    """The run under ``ROOT/runs`` that finished last (by its ``best.json``)."""
    runs = [d for d in ws.runs.iterdir() if (d / CONFIG).is_file()] if ws.runs.is_dir() else []
    problems = {d.name: problem for d in runs if (problem := run_problem(d)) is not None}
    damaged = sorted(problems)  # never picked: it would not rank
    finished = sorted(((t, d.name) for d in runs if d.name not in problems and (t := _finished_at(d)) is not None),
                      reverse=True)
    if not finished:
        waiting = sorted(d.name for d in runs if d.name not in damaged)
        unfinished = (f" ({len(waiting)} still running or interrupted: {_listing(waiting)})" if waiting else "") \
            + (f" (damaged: {_listing(damaged)}; {problems[damaged[0]]})" if damaged else "")
        raise UserError(f"no finished run in {ws.runs}{unfinished}; train one with `recommend train`, "
                        "or name a run with --run RUN")
    name = finished[0][1]
    others = f"the most recently finished of {len(finished)}" if len(finished) > 1 else "the only finished one"
    skipped = f"; skipped damaged {_listing(damaged)}, see `recommend runs`" if damaged else ""
    return Inferred(name, f"run {name} ({others} in {ws.runs}{skipped}; choose another with --run RUN)")
