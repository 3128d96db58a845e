"""A run's ranked results: loading what to rank, and keeping results in its ``eval.json``.

Library code under ``eval rank`` that ``recommend study`` calls too (its test ranking is
stamped, keyed and recorded exactly as ``eval rank``'s), so it lives apart from the CLI
and no library module imports a command module.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import click

from featurestore.errors import UserError
from featurestore.runtime.files import write_json
from featurestore.workspace import Workspace

EVAL_FILE = "eval.json"
ZERO_SHOT = "zero-shot"  # eval.json section for rankings of other datasets (never read as own results)


def load_run_and_dataset(ws: Workspace, run_dir: Path, device: str = "cpu"):
    """(model, config, dataset), refusing a dataset that changed since training."""
    from data.dataset import PreparedDataset
    from recommend.run import load_run

    model, config = load_run(run_dir, device=device, ws=ws)
    wanted = config["dataset"]
    dataset = PreparedDataset.load(ws.dataset_dir(wanted["name"]))
    for key in ("fingerprint", "interactions_fingerprint"):
        if key in wanted and wanted[key] != dataset.manifest.get(key):
            raise UserError(
                f"dataset {wanted['name']} has {key} {dataset.manifest.get(key)} but run "
                f"{run_dir.name} was trained on {wanted[key]}; re-prepare the dataset it was "
                "trained on or retrain the run"
            )
    return model, config, dataset


def result_key(result: dict) -> str:
    """The options that change a result: one ``eval.json`` entry per combination.

    A zero-shot result (``result["zero_shot"]``) is keyed by its target dataset and
    weights (``source`` or ``untrained``) first.
    """
    history = "exclude-history" if result["exclude_history"] else "keep-history"
    ks = ",".join(str(k) for k in result["ks"])
    key = f"{result['split']}/{result['subset']}/{history}/k={ks}"
    zero_shot = result.get("zero_shot")
    return f"{zero_shot['target']}/{zero_shot['weights']}/{key}" if zero_shot else key


def record_result(run_dir: Path, result: dict) -> Path:
    """Add ``result`` to the run's ``eval.json`` (replacing the same options), atomically.

    Zero-shot results go into the ``zero-shot`` section, so readers of the run's own
    results (``eval compare``, ``recommend study``) never take one for its own test score.
    """
    path = run_dir / EVAL_FILE
    stored = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            # keep the new result; set the unreadable file aside rather than overwrite it
            aside = path.with_name(f"{EVAL_FILE}.unreadable-{int(dt.datetime.now().timestamp())}")
            os.replace(path, aside)
            click.echo(f"warning: {path} was not valid JSON; moved to {aside.name}", err=True)
    place = stored.setdefault(ZERO_SHOT, {}) if result.get("zero_shot") else stored
    place[result_key(result)] = result
    write_json(path, stored)
    return path


def stamp(result: dict, dataset) -> dict:
    """``result`` with when and on which dataset (name, fingerprint) it was ranked, as every
    eval.json entry records it."""
    result["evaluated_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result["dataset"] = {"name": dataset.name, "fingerprint": dataset.fingerprint}
    return result
