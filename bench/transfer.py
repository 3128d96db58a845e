"""Cross-dataset transfer: NoPT vs HasPT per transfer kind, zero-shot vs an untrained model.

The comparison NineRec (000) and PMMRec (002) report: pretrain a modality-based
recommender on a large source dataset, then on a small target either train from
scratch (NoPT) or start from the source's item tower, user encoder or both (HasPT,
``recommend train --init-from SOURCE --transfer item|user|full``), all else equal
(same seeds, same settings); and rank the target with the source model untrained on it
(zero-shot, ``eval rank --run SOURCE --dataset TARGET``) against the same architecture
freshly initialised (``--untrained``).

Source and target are two draws of the synthetic generator with different seeds.
What they share is the content model (the same themes: words, colours, shapes) and
the habit of staying with a theme; which items exist, their popularity and the
theme-to-theme jumps are drawn anew. So transfer can help only through "content
like the recent items comes next", which is honest: nothing is tuned to make it
help. The item content is real MiniLM-L6 title vectors by default.

It prints the table (test split, full pool, history excluded; mean +- sd over the
target seeds) and the gain lines HasPT / NoPT and zero-shot / untrained.

    python bench/transfer.py                     # --quick sizes: about 6 min on a shared 2-core machine
    python bench/transfer.py --full --threads 2  # larger datasets
    python bench/transfer.py --json
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from data.dataset import PreparedDataset
from data.prepare import synthetic_dataset
from eval.evaluate import evaluate, popularity_metrics
from extract.job import ExtractOptions, run_extraction
from extract.registry import get_encoder_config
from featurestore.workspace import Workspace
from recommend.run import load_run
from recommend.trainer import TrainOptions, train
from recommend.transfer import list_transfers, zero_shot_model

KS = (10, 20)
PRESETS = {  # (source users, source items, target users, target items, epochs)
    "quick": (3000, 600, 500, 200, 20),
    "full": (20000, 3000, 2000, 800, 50),
}


def make_dataset(ws: Workspace, name: str, users: int, items: int, seed: int, images: bool) -> PreparedDataset:
    if not ws.dataset_dir(name).exists():
        synthetic_dataset(ws.root, name, "hm", users=users, items=items, seed=seed, images=images)
    return PreparedDataset.load(ws.dataset_dir(name))


def test_metrics(ws: Workspace, run_name: str, dataset: PreparedDataset) -> dict:
    model, _ = load_run(ws.run_dir(run_name), ws=ws)
    return evaluate(model, dataset, split="test", ks=KS)


def summarise(label: str, init: str, results: list[dict]) -> dict:
    row = {"run": label, "init": init, "n": len(results)}
    for key in [f"{m}@{k}" for k in KS for m in ("HR", "NDCG")] + ["best_epoch"]:
        values = [r[key] for r in results if r.get(key) is not None]
        row[key] = statistics.fmean(values) if values else None
        row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def fmt(row: dict, key: str, scale: float = 100.0) -> str:
    if row.get(key) is None:
        return "-"
    sd = row.get(f"{key}_sd") or 0.0
    return f"{row[key] * scale:.2f}" + (f" ± {sd * scale:.2f}" if row["n"] > 1 else "")


@click.command()
@click.option("--quick/--full", default=True, show_default=True,
              help="Preset sizes: quick = source 3000 users / 600 items, target 500 / 200, 20 epochs; "
                   "full = 20000 / 3000, 2000 / 800, 50 epochs.")
@click.option("--source-users", type=int, default=None, help="Synthetic source users [default: preset].")
@click.option("--source-items", type=int, default=None, help="Synthetic source items [default: preset].")
@click.option("--target-users", type=int, default=None, help="Synthetic target users [default: preset].")
@click.option("--target-items", type=int, default=None, help="Synthetic target items [default: preset].")
@click.option("--source-seed", default=0, show_default=True, help="Generator seed of the source dataset.")
@click.option("--target-seed", default=1, show_default=True, help="Generator seed of the target dataset.")
@click.option("--encoder", default="minilm-l6", show_default=True,
              help="Item encoder whose stored vectors both datasets use (extracted if missing).")
@click.option("--random-init", is_flag=True, help="Extract with a seeded untrained encoder (paper encoders).")
@click.option("--mode", type=click.Choice(["ts", "ts-dnn"]), default="ts-dnn", show_default=True,
              help="Item tower of every run.")
@click.option("--layers", default=2, show_default=True, help="TS-DNN depth N (--mode ts-dnn).")
@click.option("--dim", default=64, show_default=True, help="Recommender width d.")
@click.option("--lr", default=1e-3, show_default=True, help="AdamW learning rate of every run.")
@click.option("--epochs", type=int, default=None, help="Most epochs per run [default: preset].")
@click.option("--patience", default=5, show_default=True, help="Early-stopping patience (epochs).")
@click.option("--seeds", default="0,1,2", show_default=True,
              help="Training seeds of the target runs (each kind is trained once per seed).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads; 1 is steadier on a shared machine.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Workspace to use (kept; finished runs are reused); default: a temporary folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(quick: bool, source_users: int | None, source_items: int | None, target_users: int | None,
         target_items: int | None, source_seed: int, target_seed: int, encoder: str, random_init: bool,
         mode: str, layers: int, dim: int, lr: float, epochs: int | None, patience: int, seeds: str,
         threads: int, root: Path | None, as_json: bool) -> None:
    torch.set_num_threads(threads)
    preset = PRESETS["quick" if quick else "full"]
    su, si, tu, ti, ep = (given if given is not None else default for given, default in
                          zip((source_users, source_items, target_users, target_items, epochs), preset))
    train_seeds = [int(s) for s in seeds.split(",") if s.strip()]
    images = get_encoder_config(encoder).modality == "image"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        ws = Workspace(root or Path(tmp))
        source = make_dataset(ws, "source", su, si, source_seed, images)
        target = make_dataset(ws, "target", tu, ti, target_seed, images)
        for name in ("source", "target"):
            run_extraction(ws, ExtractOptions(dataset=name, encoder=encoder, random_init=random_init,
                                              workers=0, progress=False))
        common = dict(mode=mode, layers=layers if mode == "ts-dnn" else None, encoders=[encoder], dim=dim,
                      lr=lr, batch_size=64, epochs=ep, patience=patience, loss="bce")

        def run(dataset: str, name: str, **options) -> dict:
            result = train(ws, TrainOptions(dataset=dataset, run_name=name, **common, **options),
                           progress=False, echo=False)
            data = target if dataset == "target" else source
            return {**test_metrics(ws, name, data), "best_epoch": result["best_epoch"]}

        source_result = run("source", "source-run", seed=source_seed)
        click.echo(f"source trained: HR@10 {source_result['HR@10']:.4f} on its own test split", err=True)
        rows = []
        for kind in [None, *list_transfers()]:
            results = []
            for seed in train_seeds:
                name = f"target-{kind or 'nopt'}-s{seed}"
                results.append(run("target", name, seed=seed, **({"init_from": "source-run", "transfer": kind}
                                                                  if kind else {})))
                click.echo(f"{name}: HR@10 {results[-1]['HR@10']:.4f}", err=True)
            rows.append(summarise("NoPT" if kind is None else f"HasPT-{kind}",
                                  "fresh" if kind is None else f"source {kind}", results))
        for untrained, label in ((False, "zero-shot"), (True, "untrained")):
            model, _, data = zero_shot_model(ws, ws.run_dir("source-run"), "target", untrained=untrained)
            rows.append(summarise(label, "source model, no target training" if not untrained
                                  else "same architecture, random init, no training",
                                  [evaluate(model, data, split="test", ks=KS)]))
        rows.append(summarise("popularity", "target training counts",
                              [popularity_metrics(target, split="test", ks=KS)]))
    by = {r["run"]: r for r in rows}
    gains = {k: by[f"HasPT-{k}"]["HR@10"] / by["NoPT"]["HR@10"] for k in list_transfers()}
    zero_vs_random = by["zero-shot"]["HR@10"] / by["untrained"]["HR@10"]
    report = {
        "source": {"users": source.n_users, "items": source.n_items, "seed": source_seed,
                   "test": {k: source_result[k] for k in ("HR@10", "NDCG@10")}},
        "target": {"users": target.n_users, "items": target.n_items, "seed": target_seed},
        "settings": {"encoder": encoder, "mode": mode, "layers": common["layers"], "dim": dim, "lr": lr,
                     "epochs": ep, "patience": patience, "seeds": train_seeds, "threads": threads},
        "rows": rows, "hr10_ratio_haspt_vs_nopt": gains, "hr10_ratio_zero_shot_vs_untrained": zero_vs_random,
        "wall_seconds": time.perf_counter() - start,
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    tower = f"{mode}-{layers}" if mode == "ts-dnn" else mode
    click.echo(f"source: {source.n_users} users, {source.n_items} items (seed {source_seed}); target: "
               f"{target.n_users} users, {target.n_items} items (seed {target_seed}); {encoder} vectors, "
               f"{tower}, SASRec d={dim}, <= {ep} epochs (patience {patience}), target seeds {train_seeds}; "
               "test split, full pool, history excluded")
    click.echo("\n| target run | init | HR@10 (%) | NDCG@10 (%) | HR@20 (%) | NDCG@20 (%) | best epoch |")
    click.echo("|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['run']} | {r['init']} | {fmt(r, 'HR@10')} | {fmt(r, 'NDCG@10')} | {fmt(r, 'HR@20')} | "
                   f"{fmt(r, 'NDCG@20')} | {fmt(r, 'best_epoch', 1.0)} |")
    click.echo("\nHR@10 HasPT / NoPT: " + ", ".join(f"{k} x{g:.3f}" for k, g in gains.items())
               + f"; zero-shot / untrained: x{zero_vs_random:.2f} "
               f"(wall {report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
