"""Semantic IDs and content-started ID tables against IDRec and TS / TS-DNN on the generated world (issue 25).

Generates the world (texts only), extracts MiniLM-L6, writes rq-kmeans codes, then runs one
``recommend study`` over IDRec, TS, TS-DNN-N, sid, sid + id and id-init: test HR@10 / NDCG@10 on
all, warm and cold users beside popularity and the two oracle rows, and each row's parameters
(``code_tables`` is the sid item table). Every step resumes or is skipped when done, as the
commands it calls do.

    python bench/sid_study.py --users 12500 --items 3000 --threads 1            # the ~3,000-item world
    python bench/sid_study.py --users 500000 --items 87000 --epochs 2 --threads 1   # bench/scale.py's size
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from data.prepare import synthetic_dataset
from extract.codes import CodesOptions, run_codes
from extract.job import ExtractOptions, run_extraction
from featurestore.workspace import Workspace
from recommend.sid import STUDY_CODES
from recommend.study import StudyOptions, run_study

ENCODER = "minilm-l6"


@click.command()
@click.option("--root", type=click.Path(path_type=Path), default=Path("bench-sid"), show_default=True)
@click.option("--users", default=12_500, show_default=True)
@click.option("--items", default=3_000, show_default=True)
@click.option("--layers", default=8, show_default=True, help="TS-DNN depth of the TS-DNN row.")
@click.option("--epochs", default=100, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(root: Path, users: int, items: int, layers: int, epochs: int, threads: int, seed: int) -> None:
    """Print the study's two tables and each row's parameters as JSON."""
    ws, name = Workspace(root), f"world{items}"
    if not ws.dataset_dir(name).exists():
        synthetic_dataset(root, name, "hm", users=users, items=items, seed=seed, images=False)
    run_extraction(ws, ExtractOptions(dataset=name, encoder=ENCODER, progress=False))
    codes = run_codes(ws, CodesOptions(dataset=name, encoder=ENCODER, seed=seed, **STUDY_CODES))
    click.echo(codes.summary(), err=True)
    result = run_study(ws, StudyOptions(dataset=name, encoder=ENCODER, layers=[layers], epochs=epochs, seed=seed,
                                        threads=threads, modes=["id", "ts", "ts-dnn", "sid", "id-init"]))
    click.echo(json.dumps({"codes": codes.to_dict(), "table": result["table"], "subsets": result["subset_table"],
                           "report": result["report"]}, indent=1))


if __name__ == "__main__":
    main()
