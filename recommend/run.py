"""Run folders: a trained recommender as a directory, like ``from_pretrained``.

``ROOT/runs/RUN`` holds ``config.json`` (plain data: everything needed to rebuild
and rerun), ``model.safetensors`` (the best checkpoint), ``metrics.jsonl`` (one
line per epoch), ``best.json`` and ``train.log``. :func:`load_run` rebuilds the
model from the folder alone (plus the store groups its config names and checks by
fingerprint), never from global state.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from featurestore.cliutil import UserError
from featurestore.workspace import Workspace
from recommend.features import open_source
from recommend.model import Recommender, build_recommender

CONFIG = "config.json"
CHECKPOINT = "model.safetensors"
METRICS = "metrics.jsonl"
BEST = "best.json"
LOG = "train.log"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


def default_run_name(config: dict) -> str:
    """``DATASET-MODE[N]-BACKBONE-LOSS-YYYYmmdd-HHMMSS``: readable and time-ordered."""
    tower = config["model"]["item_tower"]
    mode = tower["name"] + (str(tower["layers"]) if tower.get("layers") is not None else "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (f"{config['dataset']['name']}-{mode}-{config['model']['user_encoder']['name']}-"
            f"{config['training']['loss']}-{stamp}")


def create_run(ws: Workspace, name: str, config: dict) -> Path:
    """Make ``ROOT/runs/NAME`` (it must not exist) and write its ``config.json``."""
    if not _NAME.match(name):
        raise UserError(f"bad run name {name!r}; use letters, digits and . _ @ + -")
    run_dir = ws.run_dir(name)
    ws.runs.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise UserError(f"run {name} already exists at {run_dir}; pick another --run-name "
                        "or remove the old folder") from None
    write_json(run_dir / CONFIG, config)
    return run_dir


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (temporary file, then rename): never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: Recommender) -> None:
    """The model's state as safetensors, replaced atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = Path(run_dir) / f".{CHECKPOINT}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, Path(run_dir) / CHECKPOINT)


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise UserError(f"no run at {run_dir} (no {CONFIG}); see `recommend runs`")
    return json.loads(path.read_text())


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
    if not (run_dir / CHECKPOINT).exists():
        raise UserError(f"run {run_dir.name} has no {CHECKPOINT} yet (no epoch finished); "
                        "train it again or wait for its first validation")
    ws = ws or Workspace(run_dir.resolve().parent.parent)
    spec = config["model"]
    sources = [open_source(ws, f["group"], config["dataset"]["fingerprint"], spec["n_items"])
               for f in config.get("features", [])]
    model = build_recommender(spec, sources, fit=False)
    model.load_state_dict(load_file(str(run_dir / CHECKPOINT)))
    return model.to(device).eval(), config


def run_summary(run_dir: Path) -> dict:
    """One row of ``recommend runs``: settings, progress and best validation metrics."""
    config = read_config(run_dir)
    best_path = run_dir / BEST
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
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


def list_runs(ws: Workspace) -> list[dict]:
    """Summaries of every run under the root, oldest first."""
    if not ws.runs.exists():
        return []
    dirs = sorted((d for d in ws.runs.iterdir() if (d / CONFIG).exists()),
                  key=lambda d: (d / CONFIG).stat().st_mtime)
    return [run_summary(d) for d in dirs]
