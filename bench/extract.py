"""Extraction throughput: the whole ``featurestore extract`` job vs the bare model forward.

For each encoder (default: EfficientNet-Lite0 over pictures, MiniLM-L6 over titles,
both with their real offline weights) on one synthetic catalogue this times

  (a) the bare forward: every batch already decoded, tokenised and collated into
      tensors (the job's own batches, same batch size), then only the model runs
      (same device, same autocast, outputs copied back to the host);
  (b) the whole job (``extract.job.run_extraction``): DataLoader workers decoding
      JPEGs / reading texts, forward, chunk writes to Zarr, bad-item handling and the
      final flat copy; the model build is excluded from both (it is reported apart);

in alternating rounds, so load from other processes hits both alike, and prints the
job's items/s as a fraction of the bare forward's (target on CPU: >= 0.9).

The synthetic pictures are 96 x 96 JPEGs; ``--image-size 600x900`` re-saves them at
an HM-like photo size to show what decoding costs on a small CPU.

    python bench/extract.py
    python bench/extract.py --items 1024 --image-size 600x900
    python bench/extract.py --device cuda --batch-size 256 --workers 8 --items 8192
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This script is named like the package it measures: keep its own folder off the
# import path so ``import extract`` finds the package, not this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import click  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data.dataset import PreparedDataset  # noqa: E402
from data.prepare import prepare_dataset, synthetic_dataset  # noqa: E402
from extract import create_encoder  # noqa: E402
from extract.cli import DEFAULT_WORKERS  # noqa: E402
from extract.job import ExtractOptions, Forward, ItemDataset, run_extraction  # noqa: E402
from featurestore.workspace import Workspace  # noqa: E402


def make_catalogue(root: Path, items: int, image_size: str | None) -> PreparedDataset:
    """A synthetic HM catalogue (pictures + titles), optionally with pictures re-saved larger."""
    folder = synthetic_dataset(root, "bench", "hm", users=max(4 * items, 400), items=items, seed=0)
    dataset = PreparedDataset.load(folder)
    if image_size:
        width, height = (int(v) for v in image_size.lower().split("x"))
        for item in dataset.items:
            if item.image and Path(item.image).exists():
                Image.open(item.image).convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(
                    item.image, "JPEG", quality=90)
        # the fingerprint hashes image sizes: prepare again so the store sees the new pictures
        prepare_dataset("hm", root / "raw" / "bench", folder, name="bench", seed=0, progress=False)
        dataset = PreparedDataset.load(folder)
    return dataset


def ready_batches(encoder, dataset: PreparedDataset, batch_size: int) -> list:
    """The job's batches (ids 1..N in order, bad items dropped), fully preprocessed."""
    items = ItemDataset(dataset.items, encoder.preprocessor)
    batches = []
    for lo in range(1, dataset.n_items + 1, batch_size):
        batch = items.collate([items[i] for i in range(lo, min(lo + batch_size, dataset.n_items + 1))])
        if batch.ids:
            batches.append((len(batch.ids), batch.inputs))
    return batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_bare(forward: Forward, batches: list) -> tuple[float, int]:
    """(a): seconds for every ready batch through the model, and the items done."""
    device = forward.device
    on_device = [(n, {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device))
                 for n, x in batches]
    sync(device)
    start = time.perf_counter()
    for _, inputs in on_device:
        forward(inputs)
    sync(device)
    return time.perf_counter() - start, sum(n for n, _ in on_device)


def time_job(ws: Workspace, encoder: str, opts: dict, round_: int) -> tuple[float, int, float]:
    """(b): seconds of the job after its model is built, items embedded, model build seconds."""
    start = time.perf_counter()
    result = run_extraction(ws, ExtractOptions(dataset="bench", encoder=encoder, variant=f"bench{round_}",
                                               progress=False, **opts))
    wall = time.perf_counter() - start
    group_attrs = json.loads((Path(result.path) / "zarr.json").read_text())["attributes"]
    load = group_attrs["timings"]["model_load_s"]
    return wall - load, result.embedded, load


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--encoders", default="efficientnet-lite0,minilm-l6", show_default=True,
              help="Comma-separated encoder names (with weights available here).")
@click.option("--items", default=512, show_default=True, help="Catalogue size.")
@click.option("--batch-size", default=32, show_default=True, help="Batch size of both (a) and (b).")
@click.option("--workers", default=DEFAULT_WORKERS, show_default=True, help="DataLoader workers of the job.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where both run (cuda: bf16/fp16 autocast in both).")
@click.option("--rounds", default=3, show_default=True,
              help="Alternating (a)/(b) rounds; the best of each is compared.")
@click.option("--image-size", default=None, metavar="WxH", help="Re-save the pictures at this size (e.g. 600x900).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Workspace to build the catalogue in [default: a temporary folder].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(encoders, items, batch_size, workers, device, rounds, image_size, root, as_json):
    """Time the extraction job against the bare forward of the same model on the same batches."""
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        ws = Workspace(root or Path(tmp))
        dataset = make_catalogue(ws.root, items, image_size)
        opts = {"batch_size": batch_size, "workers": workers, "device": device, "chunk_rows": 1024}
        results = []
        for name in encoders.split(","):
            encoder = create_encoder(name)
            forward = Forward(encoder, torch.device("cuda" if device == "cuda" else "cpu"), "float32")
            batches = ready_batches(encoder, dataset, batch_size)
            forward(batches[0][1])  # warm-up: kernels, allocator
            bare, job, loads = [], [], []
            for round_ in range(rounds):
                seconds, n = time_bare(forward, batches)
                bare.append(n / seconds)
                seconds, n, load = time_job(ws, name, opts, round_)
                job.append(n / seconds)
                loads.append(load)
            results.append({
                "encoder": name, "items": dataset.n_items, "embedded": n, "batch_size": batch_size,
                "workers": workers, "device": device, "torch_threads": torch.get_num_threads(),
                "bare_items_per_s": round(max(bare), 1), "job_items_per_s": round(max(job), 1),
                "ratio": round(max(job) / max(bare), 3),
                "bare_rounds": [round(v, 1) for v in bare], "job_rounds": [round(v, 1) for v in job],
                "ratio_median": round(statistics.median(job) / statistics.median(bare), 3),
                "model_build_s": round(min(loads), 2),
            })
    report = {"image_size": image_size or "96x96 (synthetic)", "results": results}
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"catalogue: {dataset.n_items} items, pictures {report['image_size']}, device {device}, "
               f"batch {batch_size}, {workers} workers, {rounds} rounds (best of each compared)")
    click.echo(f"{'encoder':<20}{'bare items/s':>14}{'job items/s':>13}{'ratio':>8}{'ratio (median)':>16}")
    for r in results:
        click.echo(f"{r['encoder']:<20}{r['bare_items_per_s']:>14}{r['job_items_per_s']:>13}"
                   f"{r['ratio']:>8}{r['ratio_median']:>16}")


if __name__ == "__main__":
    main()
