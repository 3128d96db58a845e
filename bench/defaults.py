"""Do the defaults converge? Plain ``recommend train`` against ``recommend tune``, per cheap mode.

On the bundled synthetic dataset (the README's demo: H&M layout, real text through
MiniLM-L6), each cheap mode (id, ts, ts-dnn) is trained once with nothing but its
defaults, and searched by ``recommend tune`` with up to ``--trials`` trials (TPE, median
pruning). Both are judged on validation HR@10, the only split the search sees; the
ratio defaults / tuned is what a user gives up by not tuning. ``--epochs`` bounds every
run (the same for defaults and trials) so the bench fits a shared 2-core machine.

    python bench/defaults.py                          # 20 trials per mode, 20 epochs
    python bench/defaults.py --trials 8 --epochs 10 --json
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import click
import torch

from data.prepare import synthetic_dataset
from extract.job import ExtractOptions, run_extraction
from featurestore.workspace import Workspace
from recommend.trainer import TrainOptions, train
from recommend.tune import TuneOptions, run_tune

MODES = {"id": {}, "ts": {"encoders": ["minilm-l6"]}, "ts-dnn": {"encoders": ["minilm-l6"]}}


@click.command()
@click.option("--users", default=1000, show_default=True, help="Synthetic users (the README's demo).")
@click.option("--items", default=300, show_default=True, help="Synthetic items.")
@click.option("--trials", default=20, show_default=True, help="Trials of recommend tune per mode.")
@click.option("--epochs", default=20, show_default=True, help="Most epochs of every run.")
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Workspace to use (kept; a rerun continues the searches); default: a temporary folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(users: int, items: int, trials: int, epochs: int, modes: str, threads: int | None,
         root: Path | None, as_json: bool) -> None:
    """Validation HR@10 of plain defaults against the best of `recommend tune`, per mode."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-defaults-") as tmp:
        ws = Workspace(root or Path(tmp))
        if not ws.dataset_dir("demo").exists():
            synthetic_dataset(ws.root, "demo", "hm", users=users, items=items, seed=0)
        run_extraction(ws, ExtractOptions(dataset="demo", encoder="minilm-l6", progress=False))
        rows = []
        for mode in [m.strip() for m in modes.split(",") if m.strip()]:
            base = TrainOptions(dataset="demo", mode=mode, epochs=epochs, **MODES[mode])
            start = time.perf_counter()
            # named by its options: a changed default is a new run, not the old one found finished
            digest = hashlib.sha256(json.dumps(asdict(base), sort_keys=True).encode()).hexdigest()[:8]
            plain = train(ws, replace(base, run_name=f"defaults-{mode}-e{epochs}-{digest}"), progress=False, echo=False)
            plain_seconds = time.perf_counter() - start
            start = time.perf_counter()
            tuned = run_tune(ws, TuneOptions(base, trials=trials, study_name=f"defaults-{mode}-e{epochs}"),
                             echo=not as_json)
            best = tuned["best"]["value"] if tuned["best"] else float("nan")
            rows.append({"mode": mode, "defaults_hr10": plain["best"]["HR@10"], "defaults_epochs": plain["epochs"],
                         "defaults_warning": plain["warning"], "tuned_hr10": best,
                         "tuned_params": tuned["best"]["params"] if tuned["best"] else None,
                         "trials": tuned["trials"], "pruned": tuned["pruned"],
                         "ratio": plain["best"]["HR@10"] / best, "popularity_hr10": plain["popularity"]["HR@10"],
                         "seconds": {"defaults": plain_seconds, "tune": time.perf_counter() - start}})
    if as_json:
        click.echo(json.dumps({"trials": trials, "epochs": epochs, "rows": rows}))
        return
    click.echo(f"{'mode':7} {'popularity':>10} {'defaults':>9} {'tuned':>7} {'ratio':>6} {'trials':>6} "
               f"{'pruned':>6}  best parameters")
    for r in rows:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (r["tuned_params"] or {}).items())
        click.echo(f"{r['mode']:7} {r['popularity_hr10']:10.4f} {r['defaults_hr10']:9.4f} {r['tuned_hr10']:7.4f} "
                   f"{r['ratio']:6.2f} {r['trials']:6d} {r['pruned']:6d}  {params}")


if __name__ == "__main__":
    main()
