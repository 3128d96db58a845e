"""Training cost of the comparison path: TS-DNN vs cached E2E vs naive E2E, same data, one run.

Paper 001 (Table 6) reports E2E at 100x+ the cost of TS. The naive E2E path (the
papers') decodes every item of a step and runs the whole encoder, the frozen bottom
included, at every step; the cached path (``featurestore extract --cache-layer K``,
``recommend train --mode e2e --cached``) reads the states entering the top K blocks
from the store and runs only those blocks. TS-DNN trains on the pooled vectors alone.
All three train the same SASRec recommender (papers' settings: d = 512, 2 blocks,
2 heads, batch 64, BCE with one negative) on one synthetic dataset with real JPEGs
and titles, with one small real encoder.

It prints seconds per training epoch (validation excluded; median over epochs) for
each mode, the ratios, the one-off cost of extracting with the cache and its size,
and the first-epoch training losses of the cached and naive runs (the same model:
they agree up to the float16 cache's rounding).

    python bench/e2e.py                                   # CPU: efficientnet-lite0, top 2 stages
    python bench/e2e.py --encoder minilm-l6 --top-k 2     # text
    python bench/e2e.py --device cuda --encoder swin-t --random-init --users 20000 --items 5000
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
from extract.job import ExtractOptions, run_extraction
from featurestore.workspace import Workspace
from recommend.run import read_metrics
from recommend.trainer import TrainOptions, train


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def timed_run(ws: Workspace, name: str, opts: TrainOptions) -> dict:
    """Train one run; its per-epoch training seconds (validation excluded) and cost record."""
    result = train(ws, opts, progress=False, echo=False)
    run_dir = Path(result["run_dir"])
    epochs = read_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    seconds = statistics.median(e["seconds"] for e in epochs)
    return {"mode": name, "epoch_seconds": seconds, "epoch_seconds_all": [round(e["seconds"], 2) for e in epochs],
            "sec_per_step": seconds / epochs[0]["steps"], "eval_seconds": statistics.median(
                e["eval_seconds"] for e in epochs),
            "first_loss": epochs[0]["loss"], "peak_rss_mb": max(e["peak_rss_mb"] for e in epochs),
            "peak_gpu_mb": max((e["peak_gpu_mb"] or 0) for e in epochs) or None,
            "trainable_params": config["cost"]["trainable_params"], "total_params": config["cost"]["total_params"],
            "best": result["best"]}


@click.command()
@click.option("--encoder", default="efficientnet-lite0", show_default=True, help="Registry encoder.")
@click.option("--top-k", default=2, show_default=True, help="Encoder blocks tuned by E2E (and cached).")
@click.option("--random-init", is_flag=True, help="Untrained encoder (paper encoders without local weights).")
@click.option("--users", default=400, show_default=True, help="Synthetic users (before filtering).")
@click.option("--items", default=300, show_default=True, help="Synthetic items.")
@click.option("--layers", default=8, show_default=True, help="TS-DNN depth N.")
@click.option("--dim", default=512, show_default=True, help="Recommender width d.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--epochs", default=1, show_default=True, help="Epochs per run (median epoch time reported).")
@click.option("--cache-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (training and extraction).")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice].")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Workspace to use (kept); default: a temporary folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(encoder: str, top_k: int, random_init: bool, users: int, items: int, layers: int, dim: int,
         batch_size: int, epochs: int, cache_dtype: str, device: str, threads: int | None, root: Path | None,
         as_json: bool) -> None:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        ws = Workspace(root or Path(tmp))
        if not ws.dataset_dir("bench").exists():
            synthetic_dataset(ws.root, "bench", "hm", users=users, items=items, seed=0)
        dataset = PreparedDataset.load(ws.dataset_dir("bench"))
        started = time.perf_counter()
        extraction = run_extraction(ws, ExtractOptions(
            dataset="bench", encoder=encoder, random_init=random_init, cache_layer=top_k, cache_dtype=cache_dtype,
            device="cuda" if device.startswith("cuda") else "cpu", progress=False))
        extract_seconds = time.perf_counter() - started
        group_path = Path(extraction.path)
        cache_mb = folder_mb(group_path / "cache")
        common = dict(dataset="bench", encoders=[encoder], dim=dim, batch_size=batch_size, epochs=epochs, loss="bce",
                      patience=epochs, device=device, seed=0)
        live = dict(mode="e2e", top_k=top_k, random_init=random_init)
        stamp = time.strftime("%H%M%S")
        runs = []
        for name, options in ((f"ts-dnn-{layers}", dict(mode="ts-dnn", layers=layers)),
                              ("e2e cached", {**live, "cached": True, "random_init": False}),
                              ("e2e naive", live)):
            opts = TrainOptions(run_name=f"bench-{name.replace(' ', '-')}-{stamp}", **options, **common)
            runs.append(timed_run(ws, name, opts))
            click.echo(f"{name}: {runs[-1]['epoch_seconds_all']} s/epoch", err=True)
    ts, cached, naive = runs
    report = {
        "dataset": {"users": dataset.n_users, "items": dataset.n_items},
        "settings": {"encoder": encoder, "top_k": top_k, "random_init": random_init, "dim": dim,
                     "batch_size": batch_size, "epochs": epochs, "layers": layers, "cache_dtype": cache_dtype,
                     "device": device, "threads": torch.get_num_threads()},
        "extraction": {"seconds": round(extract_seconds, 2), "cache_mb": round(cache_mb, 1),
                       "cache_mb_per_1k_items": round(cache_mb / dataset.n_items * 1000, 1)},
        "results": runs,
        "naive_vs_cached": naive["epoch_seconds"] / cached["epoch_seconds"],
        "cached_vs_ts_dnn": cached["epoch_seconds"] / ts["epoch_seconds"],
        "naive_vs_ts_dnn": naive["epoch_seconds"] / ts["epoch_seconds"],
        "first_loss_rel_diff_cached_naive": abs(cached["first_loss"] - naive["first_loss"]) / abs(naive["first_loss"]),
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"{dataset.n_users} users, {dataset.n_items} items; {encoder} top {top_k} blocks; SASRec d={dim}, "
               f"batch {batch_size}; device {device}, {torch.get_num_threads()} threads; median of {epochs} epochs")
    click.echo(f"extraction with --cache-layer {top_k}: {extract_seconds:.1f}s, cache {cache_mb:.1f} MB "
               f"({cache_dtype}, {report['extraction']['cache_mb_per_1k_items']} MB per 1k items)")
    click.echo(f"{'mode':12} {'s/epoch':>8} {'s/step':>8} {'eval s':>7} {'trainable':>11} {'total':>11} "
               f"{'peak RSS MB':>11} {'1st loss':>9}")
    for r in runs:
        click.echo(f"{r['mode']:12} {r['epoch_seconds']:8.2f} {r['sec_per_step']:8.3f} {r['eval_seconds']:7.2f} "
                   f"{r['trainable_params']:>11,} {r['total_params']:>11,} {r['peak_rss_mb']:11.0f} "
                   f"{r['first_loss']:9.4f}")
    click.echo(f"epoch time: naive E2E / cached E2E x{report['naive_vs_cached']:.2f}; cached E2E / TS-DNN "
               f"x{report['cached_vs_ts_dnn']:.2f}; naive E2E / TS-DNN x{report['naive_vs_ts_dnn']:.2f}")
    click.echo(f"first-epoch loss, cached vs naive: relative difference "
               f"{report['first_loss_rel_diff_cached_naive']:.1e} ({cache_dtype} cache)")


if __name__ == "__main__":
    main()
