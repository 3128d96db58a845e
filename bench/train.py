"""Training cost: TS-DNN on stored vectors vs IDRec, same data, same backbone, one run.

The point of the two-stage path (BRIEF, 001 Table 6) is that training on stored
encoder vectors costs about what IDRec costs: the encoder never runs, rows come
from the store's memory map, and only a small tower (DT layer + N dense layers)
is added. This bench measures it with the papers' settings (SASRec, d = 512,
2 blocks, 2 heads, batch 64, BCE with one negative, TS-DNN-8) on a synthetic
dataset, with a store group of the width of a paper encoder (768 = BERT-base /
ViT-B) written through the store API: training throughput does not depend on
what the vectors mean, only on their shape and on reading them from the store.

It prints, per mode, training sequences/s and seconds per epoch (validation
excluded; medians over rounds that alternate the modes, so background load on a
shared machine hits all alike), and the ratio TS-DNN / IDRec.

``--extras`` adds the pieces of the multi-modal and transfer papers, each timed against
the run it extends (the same data, width and rounds):

- ``fusion``: two store groups (image 768-d + text 384-d) fused by concat, vs TS-DNN-N on one;
- ``objectives``: that fusion run plus PMMRec's nicl, nid and rcl terms, vs ``fusion``;
- ``bert4rec``: TS-DNN-N with BERT4Rec's cloze training, vs SASRec's next-item training.

    python bench/train.py                          # CPU defaults (a few minutes)
    python bench/train.py --epochs 3 --json        # one JSON object
    python bench/train.py --device cuda --users 100000 --items 20000
    python bench/train.py --extras fusion,objectives,bert4rec --dim 128 --rounds 2 --threads 1

``--loss-steps N_ITEMS`` instead times one training step (forward, backward, AdamW) of
``--loss ce`` (softmax over all N items; content towers run over the whole catalogue in
checkpointed chunks) and of ``--loss sce`` (its sampled estimate, ``--negatives`` shared
negatives) against ``inbatch`` on a catalogue of N items, for IDRec and TS-DNN-N, with
the trainer's own Objective and random rows (step time does not depend on what the
items mean), and beside them the floor of any exact ce step (:func:`exact_ce_floor`):

    python bench/train.py --loss-steps 87000 --dim 64 --threads 2
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from data.dataset import PreparedDataset
from data.prepare import synthetic_dataset
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace
from recommend.features import FeatureSource
from recommend.losses import LossContext, SampledSoftmax, create_loss
from recommend.model import build_recommender
from recommend.run import read_metrics
from recommend.trainer import Objective, TrainOptions, train


# --extras: name -> (options added to the run it extends, the name of that run)
EXTRAS = {
    "fusion": ({"fusion": "concat"}, "ts-dnn"),
    "objectives": ({"fusion": "concat", "objectives": ["nicl", "nid", "rcl"]}, "fusion"),
    "bert4rec": ({"backbone": "bert4rec"}, "ts-dnn"),
}
TEXT_DIM = 384  # the second group of the fusion runs: MiniLM-L6's width


def write_feature_group(ws: Workspace, dataset: PreparedDataset, dim: int, seed: int,
                        modality: str = "image") -> str:
    """A complete store group of random ``dim``-wide rows for every item (real store path)."""
    name = f"{dataset.name}/{modality}/random-{dim}@bench"
    store = FeatureStore(ws.store)
    if store.exists(name):
        return name
    rng = np.random.default_rng(seed)
    group = store.create(name, rows=dataset.n_items + 1, dim=dim, dtype="float32", chunk_rows=4096,
                         attrs={"dataset_fingerprint": dataset.fingerprint, "encoder": f"random-{dim}"})
    for chunk in range(group.n_chunks):
        start, stop = group.chunk_bounds(chunk)
        rows = rng.standard_normal((stop - start, dim), dtype=np.float32)
        present = np.ones(stop - start, dtype=bool)
        if start == 0:
            rows[0], present[0] = 0.0, False
        group.write_chunk(chunk, rows, present)
    group.write_flat()
    group.update_attrs(status="complete")
    return name


def run_once(ws: Workspace, opts: TrainOptions) -> dict:
    """Train one run; its per-epoch training figures (validation excluded)."""
    result = train(ws, opts, progress=False, echo=False)
    run_dir = Path(result["run_dir"])
    return {"epochs": read_metrics(run_dir),
            "trainable_params": json.loads((run_dir / "config.json").read_text())["cost"]["trainable_params"],
            "best": result["best"]}


STEP_LOSSES = ("inbatch", "ce", "sce")  # inbatch first: the baseline of the ratios


def loss_steps(n_items: int, dim: int, layers: int, feat_dim: int, batch_size: int, rounds: int,
               negatives: int = SampledSoftmax.defaults["negatives"]) -> dict:
    """Median seconds per training step of each of STEP_LOSSES, per tower, alternating the losses."""
    rows = np.random.default_rng(0).standard_normal((n_items + 1, feat_dim)).astype(np.float32)
    source = FeatureSource(group="bench/image/random", rows=rows, present=np.ones(n_items + 1, bool),
                           dim=feat_dim, fingerprint="bench")
    batch = torch.randint(1, n_items + 1, (batch_size, 14), generator=torch.Generator().manual_seed(0))
    towers = {"id": ({"name": "id"}, []),
              f"ts-dnn-{layers}": ({"name": "ts-dnn", "layers": layers, "dropout": 0.1, "whiten": False}, [source])}
    out = {}
    for tower, (spec, sources) in towers.items():
        model = build_recommender({"n_items": n_items, "dim": dim, "max_seq_len": 13, "item_tower": spec,
                                   "user_encoder": {"name": "sasrec", "blocks": 2, "heads": 2, "dropout": 0.1}},
                                  sources)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        context = LossContext(n_items, np.ones(n_items + 1), negatives=negatives)
        objectives = {loss: Objective(model, create_loss(loss, context)) for loss in STEP_LOSSES}
        times: dict[str, list[float]] = {loss: [] for loss in objectives}
        for round_ in range(rounds + 1):  # round 0 warms up
            for loss, objective in objectives.items():
                start = time.perf_counter()
                value = objective(batch)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                if round_:
                    times[loss].append(time.perf_counter() - start)
        floor = [exact_ce_floor(model, batch_size * 13, n_items, dim, content=bool(sources)) for _ in range(rounds)]
        out[tower] = {loss: statistics.median(t) for loss, t in times.items()}
        # a ce step does at least inbatch's work (but its own small positions x positions logits)
        # plus the floor's products: that sum bounds any exact implementation's step from below
        out[tower]["ce_floor"] = out[tower]["inbatch"] + statistics.median(floor)
        for loss in (*STEP_LOSSES[1:], "ce_floor"):
            out[tower][f"ratio_{loss}_vs_inbatch"] = out[tower][loss] / out[tower]["inbatch"]
    return out


def exact_ce_floor(model, positions: int, n_items: int, dim: int, content: bool) -> float:
    """Seconds of the work an exact full-catalogue softmax adds to a step, done as bare
    unchunked products: the logits (positions x items), the gradients of both factors, and
    for a content tower its forward and backward over every item. The bench prints ce
    against inbatch's step plus this, so a missed target can be told from a slow
    implementation."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(positions, dim, generator=generator)
    start = time.perf_counter()
    if content:
        items = model.item_tower(torch.arange(1, n_items + 1))
        probs = torch.softmax(hidden @ items.detach().T, dim=1)
        grad_items = probs.T @ hidden
        (items * grad_items).sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        items = torch.randn(n_items, dim, generator=generator)
        probs = torch.softmax(hidden @ items.T, dim=1)
        probs.T @ hidden
    probs @ items.detach()
    return time.perf_counter() - start


def loss_steps_report(n_items: int, dim: int, layers: int, feat_dim: int, batch_size: int, rounds: int,
                      negatives: int) -> dict:
    return {"items": n_items, "dim": dim, "batch_size": batch_size, "positions": batch_size * 13,
            "feat_dim": feat_dim, "rounds": rounds, "threads": torch.get_num_threads(), "sce_negatives": negatives,
            "towers": loss_steps(n_items, dim, layers, feat_dim, batch_size, rounds, negatives)}


def summarise(mode: str, runs: list[dict]) -> dict:
    epochs = [e for r in runs for e in r["epochs"]]
    seconds = statistics.median(e["seconds"] for e in epochs)
    sequences = round(epochs[0]["sequences_per_sec"] * epochs[0]["seconds"])
    steps = epochs[0]["steps"]
    return {
        "mode": mode,
        "epoch_seconds": seconds,
        "epoch_seconds_all": [round(e["seconds"], 3) for e in epochs],
        "sequences_per_sec": sequences / seconds,
        "sec_per_step": seconds / steps,
        "eval_seconds": statistics.median(e["eval_seconds"] for e in epochs),
        "peak_rss_mb": max(e["peak_rss_mb"] for e in epochs),
        "trainable_params": runs[0]["trainable_params"],
        "epochs_timed": len(epochs),
    }


@click.command()
@click.option("--users", default=2000, show_default=True, help="Synthetic users (before filtering).")
@click.option("--items", default=1000, show_default=True, help="Synthetic items.")
@click.option("--feat-dim", default=768, show_default=True, help="Width of the stored vectors.")
@click.option("--layers", default=8, show_default=True, help="TS-DNN depth N.")
@click.option("--dim", default=512, show_default=True, help="Recommender width d.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--epochs", default=1, show_default=True, help="Epochs per run.")
@click.option("--rounds", default=3, show_default=True,
              help="Rounds; each trains IDRec then TS-DNN once; medians over all epochs.")
@click.option("--extras", default="", show_default=True, metavar="NAME[,NAME]",
              help=f"Also time these, each against the run it extends: {', '.join(EXTRAS)}.")
@click.option("--loss-steps", type=int, default=None, metavar="N_ITEMS",
              help="Instead: seconds per training step of --loss ce and sce vs inbatch on a catalogue of N_ITEMS items.")
@click.option("--negatives", default=SampledSoftmax.defaults["negatives"], show_default=True,
              help="--loss-steps: the shared negatives of sce.")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, default=None,
              help="torch CPU threads [default: torch's choice]; 1 is steadier on a shared machine.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Workspace to use (kept); default: a temporary folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(users: int, items: int, feat_dim: int, layers: int, dim: int, batch_size: int, epochs: int,
         rounds: int, extras: str, loss_steps: int | None, negatives: int, device: str, threads: int | None,
         root: Path | None,
         as_json: bool) -> None:
    """Seconds per training epoch of TS-DNN-N against IDRec (and of --extras against their base runs)."""
    if threads:
        torch.set_num_threads(threads)
    if loss_steps:
        steps = loss_steps_report(loss_steps, dim, layers, feat_dim, batch_size, rounds, negatives)
        click.echo(json.dumps(steps) if as_json else "\n".join(
            f"{tower}: inbatch {r['inbatch']:.3f} s/step; " + ", ".join(
                f"{loss} {r[loss]:.3f} s/step (x{r[f'ratio_{loss}_vs_inbatch']:.2f})" for loss in STEP_LOSSES[1:])
            + f"; exact-ce floor (inbatch + the bare products) {r['ce_floor']:.3f} s/step "
              f"(x{r['ratio_ce_floor_vs_inbatch']:.2f}), ce / floor x{r['ce'] / r['ce_floor']:.2f}"
            for tower, r in steps["towers"].items()))
        return
    asked = {e.strip() for e in extras.split(",") if e.strip()}
    unknown = sorted(asked - set(EXTRAS))
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; known: {', '.join(EXTRAS)}", param_hint="--extras")
    asked |= {EXTRAS[e][1] for e in asked if EXTRAS[e][1] in EXTRAS}  # an extra's base run is timed too
    extras_wanted = [e for e in EXTRAS if e in asked]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        ws = Workspace(root or Path(tmp))
        if not ws.dataset_dir("bench").exists():
            synthetic_dataset(ws.root, "bench", "hm", users=users, items=items, seed=0, images=False)
        dataset = PreparedDataset.load(ws.dataset_dir("bench"))
        group = write_feature_group(ws, dataset, feat_dim, seed=0)
        common = dict(dataset="bench", dim=dim, batch_size=batch_size, epochs=epochs, loss="bce",
                      patience=epochs, device=device, seed=0)
        tsdnn = dict(mode="ts-dnn", layers=layers, features=[group])
        modes = {"id": dict(mode="id"), f"ts-dnn-{layers}": tsdnn}
        if extras_wanted:
            text = write_feature_group(ws, dataset, TEXT_DIM, seed=1, modality="text")
        for extra in extras_wanted:
            settings = EXTRAS[extra][0]
            groups = [text, group] if "fusion" in settings else [group]
            modes[extra] = {**tsdnn, "features": groups, **settings}
        runs: dict[str, list[dict]] = {name: [] for name in modes}
        stamp = time.strftime("%H%M%S")
        for round_ in range(rounds):  # alternate the modes so background load hits both alike
            for name, options in modes.items():
                opts = TrainOptions(run_name=f"bench-{name}-{stamp}-{round_}", **options, **common)
                runs[name].append(run_once(ws, opts))
                click.echo(f"round {round_ + 1}/{rounds} {name}: "
                           f"{runs[name][-1]['epochs'][-1]['seconds']:.1f}s/epoch", err=True)
        results = [summarise(name, runs[name]) for name in modes]
    idrec, tsdnn = results[:2]
    by_mode = {r["mode"]: r for r in results}
    bases = {extra: EXTRAS[extra][1] if EXTRAS[extra][1] in EXTRAS else f"ts-dnn-{layers}"
             for extra in extras_wanted}
    extra_ratios = {extra: by_mode[extra]["epoch_seconds"] / by_mode[bases[extra]]["epoch_seconds"]
                    for extra in extras_wanted}
    report = {
        "dataset": {"users": dataset.n_users, "items": dataset.n_items,
                    "train_sequences": int((dataset.lengths() >= 4).sum()),
                    "max_seq_len": dataset.max_seq_len},
        "settings": {"dim": dim, "batch_size": batch_size, "backbone": "sasrec", "loss": "bce",
                     "feat_dim": feat_dim, "layers": layers, "epochs": epochs, "rounds": rounds,
                     "device": device, "threads": torch.get_num_threads()},
        "results": results,
        "epoch_time_ratio_tsdnn_vs_id": tsdnn["epoch_seconds"] / idrec["epoch_seconds"],
        "throughput_ratio_tsdnn_vs_id": tsdnn["sequences_per_sec"] / idrec["sequences_per_sec"],
        "epoch_time_ratio_extras": {extra: {"vs": bases[extra], "ratio": ratio}
                                    for extra, ratio in extra_ratios.items()},
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"{dataset.n_users} users, {dataset.n_items} items, SASRec d={dim}, batch {batch_size}, "
               f"stored vectors {feat_dim}-d, device {device}, {torch.get_num_threads()} threads, "
               f"medians of {rounds} alternating rounds")
    click.echo(f"{'mode':10} {'seq/s':>9} {'s/epoch':>8} {'s/step':>8} {'eval s':>7} "
               f"{'trainable':>10} {'peak RSS MB':>11}")
    for r in results:
        click.echo(f"{r['mode']:10} {r['sequences_per_sec']:9.1f} {r['epoch_seconds']:8.2f} "
                   f"{r['sec_per_step']:8.4f} {r['eval_seconds']:7.2f} {r['trainable_params']:>10,} "
                   f"{r['peak_rss_mb']:11.0f}")
    click.echo(f"TS-DNN-{layers} / IDRec: epoch time x{report['epoch_time_ratio_tsdnn_vs_id']:.2f}, "
               f"throughput x{report['throughput_ratio_tsdnn_vs_id']:.2f}")
    for extra, ratio in extra_ratios.items():
        click.echo(f"{extra} / {bases[extra]}: epoch time x{ratio:.2f}")


if __name__ == "__main__":
    main()
