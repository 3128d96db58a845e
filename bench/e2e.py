"""Training cost of the comparison path: TS-DNN vs side networks vs cached E2E vs naive E2E, same data, one run.

Paper 001 (Table 6) reports E2E at 100x+ the cost of TS. The naive E2E path (the
papers') decodes every item of a step and runs the whole encoder, the frozen bottom
included, at every step; the cached path (``featurestore extract --cache-layer K``,
``recommend train --mode e2e --cached``) reads the states entering the top K blocks
from the store and runs only those blocks. TS-DNN trains on the pooled vectors alone.
All three train the same SASRec recommender (papers' settings: d = 512, 2 blocks,
2 heads, batch 64, BCE with one negative) on one synthetic dataset with real JPEGs
and titles, with one small real encoder.

The side row (IISAN, ``recommend train --mode side``) trains side networks over every
layer's pooled state, cached once by ``featurestore extract --cache-layer all``; no
encoder runs while it trains.

It prints, for each mode, the median training step (forward, backward and optimiser
step, batch assembly included: robust to the first step's warm-up and to a loaded
machine's spikes), set apart from the two costs that do not grow with the steps: full-pool
validation per epoch, and the fixed cost of the run (process start, imports, opening the
store and caches, building the model: the run's wall time minus training and
validation); then seconds per training epoch, peak memory (each run in a process of its own, so peaks do not carry over),
validation accuracy, the ratios, the one-off cost of extracting with each cache and its
size; the ratios are of median steps. Then the first-epoch training losses of the cached and naive runs (the same model:
they agree up to the float16 cache's rounding), and the FLOP-ideal speed-up of cached over
naive E2E beside the measured one: per step naive runs stem + bottom forward and the top's
forward + backward (about 3x its forward), cached only the latter, counted by
``torch.utils.flop_counter`` on one item.

    python bench/e2e.py                                   # CPU: efficientnet-lite0, top 2 stages
    python bench/e2e.py --encoder minilm-l6 --top-k 2     # text
    python bench/e2e.py --device cuda --encoder swin-t --random-init --users 20000 --items 5000

``--losses`` instead compares the catalogue losses of cached E2E (exact ``ce``, ``ce`` over a
cached catalogue refreshed every 1, 10, 100 steps, ``sce``, ``inbatch``) at ``--items`` and
``--large-items`` items (:mod:`e2e_losses`, issue 29):

    python bench/e2e.py --losses --encoder minilm-l6 --users 2500 --items 3000 --epochs 3 --dim 64
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import torch

from data.dataset import PreparedDataset
from data.prepare import synthetic_dataset
from extract.job import ExtractOptions, run_extraction
from extract.registry import create_encoder
from featurestore.workspace import Workspace
from recommend.run import read_metrics
from recommend.trainer import TrainOptions, train


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _train_alone(root: Path, opts: TrainOptions, threads: int | None) -> tuple[dict, float]:
    """Train in this (fresh) process; also its peak RSS before training (the imports' share)."""
    from recommend.trainer import _peak_rss_mb

    if threads:
        torch.set_num_threads(threads)
    start = _peak_rss_mb()
    return train(Workspace(root), opts, progress=False, echo=False), start


def timed_run(ws: Workspace, name: str, opts: TrainOptions, threads: int | None = None) -> dict:
    """Train one run in a fresh process (its own peak memory); per-epoch training seconds
    (validation excluded), peak memory, accuracy and cost record."""
    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result, start_mb = pool.submit(_train_alone, ws.root, opts, threads).result()
    wall = time.perf_counter() - started
    run_dir = Path(result["run_dir"])
    epochs = read_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    seconds = statistics.median(e["seconds"] for e in epochs)
    return {"mode": name, "step_seconds": statistics.median(e["sec_per_step_median"] for e in epochs),
            "first_step_seconds": epochs[0]["first_step_seconds"], "steps": sum(e["steps"] for e in epochs),
            "epoch_seconds": seconds, "epoch_seconds_all": [round(e["seconds"], 2) for e in epochs],
            "sec_per_step": seconds / epochs[0]["steps"], "eval_seconds": statistics.median(
                e["eval_seconds"] for e in epochs),
            "fixed_seconds": wall - sum(e["seconds"] + e["eval_seconds"] for e in epochs),
            "first_loss": epochs[0]["loss"], "peak_rss_mb": max(e["peak_rss_mb"] for e in epochs),
            "training_rss_mb": max(e["peak_rss_mb"] for e in epochs) - start_mb,
            "peak_gpu_mb": max((e["peak_gpu_mb"] or 0) for e in epochs) or None,
            "trainable_params": config["cost"]["trainable_params"], "total_params": config["cost"]["total_params"],
            "best": result["best"]}


def _labels(text: str | None) -> list[str] | None:
    return None if text is None else [label.strip() for label in text.split(",") if label.strip()]


def flop_ideal(encoder_name: str, top_k: int, random_init: bool, item) -> float:
    """Ideal naive / cached E2E step ratio from counted FLOPs: (stem + bottom + 3 top) / (3 top)."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = create_encoder(encoder_name, random_init=random_init).eval()
    inputs = encoder.preprocessor.collate([encoder.preprocessor.load(item)])
    first = encoder.depth - top_k

    def flops(fn):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            out = fn()
        return counter.get_total_flops(), out

    stem, hidden = flops(lambda: encoder.stem(inputs))
    bottom, hidden = flops(lambda: encoder.run_blocks(hidden, 0, first))
    top, _ = flops(lambda: encoder.pool(encoder.run_blocks(hidden, first)))
    return (stem + bottom + 3 * top) / (3 * top)


@click.command()
@click.option("--encoder", default="efficientnet-lite0", show_default=True, help="Registry encoder.")
@click.option("--top-k", default=2, show_default=True, help="Encoder blocks tuned by E2E (and cached).")
@click.option("--random-init", is_flag=True, help="Untrained encoder (paper encoders without local weights).")
@click.option("--users", default=400, show_default=True, help="Synthetic users (before filtering).")
@click.option("--items", default=300, show_default=True, help="Synthetic items.")
@click.option("--layers", default=8, show_default=True, help="TS-DNN depth N.")
@click.option("--dim", default=512, show_default=True, help="Recommender width d.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--epochs", default=1, show_default=True,
              help="Epochs per run (the median step is over every epoch's steps; epoch time: median epoch).")
@click.option("--cache-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (training and extraction).")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice].")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Workspace to use (kept); default: a temporary folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--losses", is_flag=True,
              help="Instead: step time, peak memory and validation HR@10 of cached E2E under exact ce, ce over a "
                   "cached catalogue (R = 1, 10, 100, auto), sce and inbatch, at --items and --large-items items.")
@click.option("--large-users", default=6000, show_default=True, help="With --losses: users of the large catalogue.")
@click.option("--large-items", default=20000, show_default=True,
              help="With --losses: the large catalogue (0: the accuracy comparison at --items alone).")
@click.option("--small-losses", default=None, metavar="LABELS",
              help="With --losses: the losses trained at --items, comma-separated labels as printed (e.g. "
                   "'ce exact,ce cached R=auto,inbatch') [default: all; exact, inbatch and the default refresh "
                   "always run]. A loss finished earlier in the same --root is read back, not retrained.")
@click.option("--large-losses", default=None, metavar="LABELS",
              help="With --losses: the losses timed at --large-items [default: all; inbatch and the default "
                   "refresh always run].")
@click.option("--cold", is_flag=True,
              help="With --losses: the small runs start from scratch, not from a TS run over the same vectors.")
@click.option("--large-steps", default=6, show_default=True,
              help="With --losses: steps timed per loss there (the first, a warm-up, left out; refreshes priced apart).")
def main(encoder: str, top_k: int, random_init: bool, users: int, items: int, layers: int, dim: int,
         batch_size: int, epochs: int, cache_dtype: str, device: str, threads: int | None, root: Path | None,
         as_json: bool, losses: bool, large_users: int, large_items: int, small_losses: str | None,
         large_losses: str | None, cold: bool, large_steps: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    if losses:
        from e2e_losses import compare_losses, print_report  # this script's folder is on sys.path

        with tempfile.TemporaryDirectory(prefix="bench-e2e-losses-") as tmp:
            report = compare_losses(Workspace(root or Path(tmp)), encoder, top_k, random_init, users, items,
                                    large_users, large_items, large_steps, epochs, dim, batch_size, device, threads,
                                    timed_run, _labels(small_losses), _labels(large_losses), cold)
        if as_json:
            click.echo(json.dumps(report))
        else:
            print_report(report)
        return
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
        started = time.perf_counter()
        layers_group = run_extraction(ws, ExtractOptions(
            dataset="bench", encoder=encoder, random_init=random_init, cache_layer="all", cache_dtype=cache_dtype,
            variant="layers", device="cuda" if device.startswith("cuda") else "cpu", progress=False))
        layers_seconds = time.perf_counter() - started
        layers_mb = folder_mb(Path(layers_group.path) / "cache")
        ideal = flop_ideal(encoder, top_k, random_init, next(i for i in dataset.items if i.text and i.image))
        common = dict(dataset="bench", encoders=[encoder], dim=dim, batch_size=batch_size, epochs=epochs, loss="bce",
                      patience=epochs, device=device, seed=0)
        live = dict(mode="e2e", top_k=top_k, random_init=random_init)
        stamp = time.strftime("%H%M%S")
        runs = []
        for name, options in ((f"ts-dnn-{layers}", dict(mode="ts-dnn", layers=layers)),
                              ("side", dict(mode="side", encoders=[f"{encoder}@layers"])),
                              ("e2e cached", {**live, "cached": True, "random_init": False}),
                              ("e2e naive", live)):
            opts = TrainOptions(run_name=f"bench-{name.replace(' ', '-')}-{stamp}", **{**common, **options})
            runs.append(timed_run(ws, name, opts, threads))
            click.echo(f"{name}: {runs[-1]['step_seconds']:.3f} s/step (median of {runs[-1]['steps']}), "
                       f"{runs[-1]['epoch_seconds_all']} s/epoch", err=True)
    ts, side, cached, naive = runs
    report = {
        "dataset": {"users": dataset.n_users, "items": dataset.n_items},
        "settings": {"encoder": encoder, "top_k": top_k, "random_init": random_init, "dim": dim,
                     "batch_size": batch_size, "epochs": epochs, "layers": layers, "cache_dtype": cache_dtype,
                     "device": device, "threads": torch.get_num_threads()},
        "extraction": {"seconds": round(extract_seconds, 2), "cache_mb": round(cache_mb, 1),
                       "cache_mb_per_1k_items": round(cache_mb / dataset.n_items * 1000, 1),
                       "all_layers_seconds": round(layers_seconds, 2), "all_layers_mb": round(layers_mb, 2)},
        "results": runs,
        "ratios_of": "median training step",
        "naive_vs_cached": naive["step_seconds"] / cached["step_seconds"],
        "naive_vs_cached_flop_ideal": ideal,
        "naive_vs_side": naive["step_seconds"] / side["step_seconds"],
        "cached_vs_side": cached["step_seconds"] / side["step_seconds"],
        "side_vs_ts_dnn": side["step_seconds"] / ts["step_seconds"],
        "side_peak_share_of_naive": side["peak_rss_mb"] / naive["peak_rss_mb"],
        "side_training_rss_share_of_naive": side["training_rss_mb"] / max(naive["training_rss_mb"], 1e-9),
        "cached_vs_ts_dnn": cached["step_seconds"] / ts["step_seconds"],
        "naive_vs_ts_dnn": naive["step_seconds"] / ts["step_seconds"],
        "first_loss_rel_diff_cached_naive": abs(cached["first_loss"] - naive["first_loss"]) / abs(naive["first_loss"]),
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"{dataset.n_users} users, {dataset.n_items} items; {encoder} top {top_k} blocks; SASRec d={dim}, "
               f"batch {batch_size}; device {device}, {torch.get_num_threads()} threads; median of {epochs} epochs")
    click.echo(f"extraction with --cache-layer {top_k}: {extract_seconds:.1f}s, cache {cache_mb:.1f} MB "
               f"({cache_dtype}, {report['extraction']['cache_mb_per_1k_items']} MB per 1k items)")
    click.echo(f"extraction with --cache-layer all: {layers_seconds:.1f}s, cache {layers_mb:.2f} MB")
    click.echo(f"{'mode':12} {'s/step':>7} {'1st step':>8} {'steps':>5} {'eval s':>7} {'fixed s':>7} {'s/epoch':>8} "
               f"{'trainable':>11} {'total':>11} {'peak RSS MB':>11} {'+training':>9} {'peak GPU MB':>11} "
               f"{'1st loss':>9} {'HR@10':>7} {'NDCG@10':>7}")
    for r in runs:
        click.echo(f"{r['mode']:12} {r['step_seconds']:7.3f} {r['first_step_seconds']:8.3f} {r['steps']:5d} "
                   f"{r['eval_seconds']:7.2f} {r['fixed_seconds']:7.1f} {r['epoch_seconds']:8.2f} "
                   f"{r['trainable_params']:>11,} {r['total_params']:>11,} {r['peak_rss_mb']:11.0f} "
                   f"{r['training_rss_mb']:9.0f} {r['peak_gpu_mb'] or 0:11.0f} {r['first_loss']:9.4f} "
                   f"{r['best'].get('HR@10', 0):7.4f} {r['best'].get('NDCG@10', 0):7.4f}")
    click.echo("s/step: median training step; eval s: validation per epoch; fixed s: the run's start-up and "
               "set-up, outside training and validation")
    click.echo(f"step time: naive E2E / cached E2E x{report['naive_vs_cached']:.2f} (FLOP ideal "
               f"x{ideal:.2f}); cached E2E / TS-DNN x{report['cached_vs_ts_dnn']:.2f}; naive E2E / TS-DNN "
               f"x{report['naive_vs_ts_dnn']:.2f}")
    click.echo(f"side: naive E2E / side x{report['naive_vs_side']:.1f}; cached E2E / side "
               f"x{report['cached_vs_side']:.1f}; side / TS-DNN x{report['side_vs_ts_dnn']:.2f}; side peak RSS "
               f"{100 * report['side_peak_share_of_naive']:.0f}% of naive E2E's, its growth during training "
               f"(+training: peak minus the process's peak before training) "
               f"{100 * report['side_training_rss_share_of_naive']:.0f}%")
    click.echo(f"first-epoch loss, cached vs naive: relative difference "
               f"{report['first_loss_rel_diff_cached_naive']:.1e} ({cache_dtype} cache)")


if __name__ == "__main__":
    main()
