"""``bench/e2e.py --losses``: what a cached-E2E step costs under each catalogue loss, and what each learns.

Issue 29: with exact ``ce`` every step runs the whole catalogue through the live top
blocks, forward and backward, so the step grows linearly with N. This compares, on the
same generated data and the same cached encoder states, exact ``ce``
(``--catalogue-refresh 0``), ``ce`` over a cached catalogue refreshed every R steps
(R = 1, 10, 100) or by the ``auto`` rule (once a catalogue's worth of items has run live:
the live modes' default), ``sce`` and ``inbatch``:

- at about 3,000 items: per-step time (median), peak memory, the validation HR@10 after
  the same number of epochs, and the refreshes and their seconds per epoch (from
  metrics.jsonl, where the loss records them);
- at about 20,000 items: a few steps of the trainer's own pieces (no validation), each
  loss in a fresh process. A step's refresh is timed apart from its live part, and the
  step is priced as its median live part plus one refresh pass times the refreshes per
  step (1/R, or the live items per step over N for ``auto``): a few timed steps then give
  the amortised step of any R, which their median alone would not (it skips the refreshes);
- the projected epoch time of E2E at 500K users x 87K items on this machine, from the
  measured steps of the default: the live step's part that grows with N is fitted on the
  two sizes, the refresh priced per item.

Every run trains in a fresh process (its own peak memory), as the rest of bench/e2e.py.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from data.dataset import PreparedDataset
from data.prepare import synthetic_dataset
from extract.job import ExtractOptions, run_extraction
from featurestore.workspace import Workspace
from recommend.catalogue_cache import AUTO
from recommend.losses import LIVE_REFRESH
from recommend.run import read_metrics
from recommend.trainer import TrainOptions

REFRESHES = (1, 10, 100)
PROJECTED_USERS, PROJECTED_ITEMS = 500_000, 87_000


def variants(only: list[str] | None = None) -> list[tuple[str, dict]]:
    """(label, loss options) of every loss compared, or of the labels in ``only``."""
    cached = [(f"ce cached R={r}", {"loss": "ce", "catalogue_refresh": r}) for r in (*REFRESHES, AUTO)]
    every = [("ce exact", {"loss": "ce", "catalogue_refresh": 0}), *cached,
             ("sce", {"loss": "sce"}), ("inbatch", {"loss": "inbatch"})]
    unknown = sorted(set(only or ()) - {label for label, _ in every})
    if unknown:
        raise SystemExit(f"unknown losses {unknown}: choose from {[label for label, _ in every]}")
    return [(label, loss) for label, loss in every if only is None or label in only]


def _finished(run_dir: Path, epochs: int) -> list[dict] | None:
    """The epochs of a run this bench finished earlier in the same root (then it is read, not retrained)."""
    records = read_metrics(run_dir) if (run_dir / "best.json").exists() else []
    return records if len(records) == epochs else None


def prepare(ws: Workspace, name: str, users: int, items: int, encoder: str, top_k: int, random_init: bool,
            device: str) -> PreparedDataset:
    """A generated text dataset and its encoder states entering the top K blocks (made once per workspace)."""
    if not ws.dataset_dir(name).exists():
        synthetic_dataset(ws.root, name, "mind", users=users, items=items, seed=0, images=False)
    run_extraction(ws, ExtractOptions(dataset=name, encoder=encoder, random_init=random_init, cache_layer=top_k,
                                      device="cuda" if device.startswith("cuda") else "cpu", progress=False))
    return PreparedDataset.load(ws.dataset_dir(name))


def measure(ws: Workspace, dataset: PreparedDataset, common: dict, epochs: int, timed_run: Callable,
            threads: int | None, only: list[str] | None = None) -> list[dict]:
    """Train every variant on ``dataset`` for ``epochs``; its step, memory, last validation, refresh cost.
    A variant finished earlier in the same ``--root`` is read back (a stopped bench resumes)."""
    rows = []
    for label, loss in variants(only):
        start = "warm" if common.get("init_from") else "cold"
        name = f"losses-{dataset.name}-{label.replace(' ', '-').replace('=', '')}-{epochs}ep-{start}"
        records = _finished(ws.run_dir(name), epochs)
        if records is None:
            opts = TrainOptions(dataset=dataset.name, run_name=name, epochs=epochs, patience=epochs,
                                plateau_patience=epochs, **common, **loss)
            row = {"loss": label, **timed_run(ws, label, opts, threads)}
            records = read_metrics(ws.run_dir(name))
        else:
            seconds = statistics.median(r["seconds"] for r in records)
            row = {"loss": label, "reused": True, "epoch_seconds": seconds, "steps": sum(r["steps"] for r in records),
                   "sec_per_step": seconds / records[0]["steps"], "peak_rss_mb": max(r["peak_rss_mb"] for r in records)}
        row["step_seconds"] = row["sec_per_step"]  # epoch seconds over steps: each refresh priced in
        row["valid_last"] = records[-1]["valid"]
        row["refreshes_per_epoch"] = statistics.mean(r.get("catalogue_refreshes", 0) for r in records)
        row["refresh_seconds_per_epoch"] = statistics.mean(r.get("catalogue_refresh_seconds", 0) for r in records)
        if row["refreshes_per_epoch"]:
            row["refresh_seconds"] = row["refresh_seconds_per_epoch"] / row["refreshes_per_epoch"]
        row["live_step_seconds"] = (row["epoch_seconds"] - row["refresh_seconds_per_epoch"]) / records[0]["steps"]
        rows.append(row)
        print(f"{dataset.n_items} items, {label}: {row['step_seconds']:.3f} s/step, peak {row['peak_rss_mb']:.0f} MB, "
              f"valid HR@10 {row['valid_last'].get('HR@10', 0):.4f}", flush=True)
    return rows


def _time_steps(root: Path, opts: TrainOptions, steps: int, threads: int | None) -> dict:
    """In a fresh process: ``steps`` training steps of the trainer's own pieces, each timed; peak RSS."""

    from recommend.batches import SequenceBatches, training_rows
    from recommend.item_towers import ITEM_TOWERS
    from recommend.losses import LOSSES, LossContext, create_loss
    from recommend.model import build_recommender
    from recommend.trainer import Objective, _peak_rss_mb, check_options, model_spec, optimizer_groups

    if threads:
        torch.set_num_threads(threads)
    ws, opts = Workspace(root), check_options(opts)
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    kind = ITEM_TOWERS.get(opts.mode)
    spec = model_spec(opts, dataset)
    torch.manual_seed(opts.seed)
    model = build_recommender(spec, kind.open(ws, opts, dataset)).to(opts.device)
    loss = create_loss(opts.loss, LossContext(dataset.n_items, dataset.train_counts(),
                                              **LOSSES.get(opts.loss).context_options(opts)))
    objective = Objective(model, loss).train()
    optimizer = torch.optim.AdamW(optimizer_groups(model, opts.lr, kind.encoder_lr(opts)), lr=opts.lr)
    batches = SequenceBatches(training_rows(dataset, spec["max_seq_len"]), opts.batch_size, opts.seed, 0, 1)
    batches.set_epoch(1)
    seconds, live_seconds, live_items = [], [], []
    cache = getattr(loss, "cache", None)
    for rows in batches:
        start, refreshed = time.perf_counter(), cache.seconds if cache is not None else 0.0
        value = objective(rows.to(opts.device))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        live_seconds.append(seconds[-1] - ((cache.seconds - refreshed) if cache is not None else 0.0))
        live_items.append(len(set(rows.flatten().tolist()) - {0}))
        if len(seconds) == steps:
            break
    live_step = statistics.median(live_seconds[1:] or live_seconds)
    row = {"step_seconds": live_step, "live_step_seconds": live_step, "steps": len(seconds),
           "step_seconds_all": [round(t, 2) for t in seconds], "peak_rss_mb": _peak_rss_mb(),
           "live_items_per_step": statistics.mean(live_items), "refresh_seconds": None}
    if cache is not None:
        row["refresh_seconds"] = cache.seconds / cache.refreshes
        every = opts.catalogue_refresh
        row["refreshes_per_step"] = row["live_items_per_step"] / dataset.n_items if every == AUTO else 1 / every
        row["step_seconds"] = live_step + row["refresh_seconds"] * min(row["refreshes_per_step"], 1.0)
    return row


def measure_steps(ws: Workspace, dataset: PreparedDataset, common: dict, steps: int, threads: int | None,
                  only: list[str] | None = None) -> list[dict]:
    """Every variant's median step (the first, a warm-up and a refresh, left out) on ``dataset``, no validation."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    rows = []
    for label, loss in variants(only):
        opts = TrainOptions(dataset=dataset.name, **common, **loss)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            row = {"loss": label, **pool.submit(_time_steps, ws.root, opts, steps, threads).result()}
        rows.append(row)
        print(f"{dataset.n_items} items, {label}: {row['step_seconds']:.3f} s/step {row['step_seconds_all']}, "
              f"peak {row['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def projection(small: list[dict], large: list[dict], n_small: int, n_large: int, batch_size: int) -> dict:
    """Epoch time of E2E at 500K users x 87K items with the default refresh: live step = a + b N (b >= 0:
    noise can make the larger catalogue's step the shorter), plus refreshes (every R steps, or with
    ``auto`` as many as the epoch's live items hold catalogues)."""
    label = f"ce cached R={LIVE_REFRESH}"
    live = {n: next(r for r in rows if r["loss"] == label) for n, rows in ((n_small, small), (n_large, large))}
    slope = max(0.0, (live[n_large]["live_step_seconds"] - live[n_small]["live_step_seconds"]) / (n_large - n_small))
    step = live[n_large]["live_step_seconds"] + slope * (PROJECTED_ITEMS - n_large)
    steps = math.ceil(PROJECTED_USERS / batch_size)
    per_item = live[n_large]["refresh_seconds"] / n_large
    if LIVE_REFRESH == AUTO:
        refreshes = math.ceil(steps * live[n_large]["live_items_per_step"] / PROJECTED_ITEMS)
    else:
        refreshes = math.ceil(steps / LIVE_REFRESH)
    seconds = steps * step + refreshes * per_item * PROJECTED_ITEMS
    return {"loss": label, "users": PROJECTED_USERS, "items": PROJECTED_ITEMS, "steps": steps,
            "step_seconds": step, "refreshes": refreshes, "refresh_seconds": per_item * PROJECTED_ITEMS,
            "epoch_hours": seconds / 3600, "measured_steps": live[n_small]["steps"] + live[n_large]["steps"]}


def warm_source(ws: Workspace, dataset: PreparedDataset, common: dict, timed_run: Callable,
                threads: int | None) -> dict:
    """The TS run the small runs start from (``--init-from``, as the study's live rows do), trained to
    early stopping once per root; its best validation is where every loss starts."""
    name = f"losses-{dataset.name}-ts"
    if not (ws.run_dir(name) / "best.json").exists():
        opts = TrainOptions(dataset=dataset.name, run_name=name, mode="ts", encoders=common["encoders"],
                            dim=common["dim"], batch_size=common["batch_size"], device=common["device"],
                            seed=common["seed"])
        timed_run(ws, "ts", opts, threads)
    best = json.loads((ws.run_dir(name) / "best.json").read_text())
    return {"run": name, "valid": best["metrics"], "epoch": best["epoch"], "popularity": best.get("popularity")}


def compare_losses(ws: Workspace, encoder: str, top_k: int, random_init: bool, users: int, items: int,
                   large_users: int, large_items: int, large_steps: int, epochs: int, dim: int, batch_size: int,
                   device: str, threads: int | None, timed_run: Callable, small_losses: list[str] | None = None,
                   large_losses: list[str] | None = None, cold: bool = False) -> dict:
    """The whole comparison; returns the report ``bench/e2e.py --losses`` prints. ``small_losses`` /
    ``large_losses``: the labels to run at each size (default all; exact ce, inbatch and the default
    refresh are always run, the ratios and the projection need them). The small runs start from a TS
    run over the same vectors (cold from scratch with ``cold``: two epochs of a cold E2E run end below
    popularity at 3,000 items, where no accuracy comparison means anything)."""
    needed = {"ce exact", "inbatch", f"ce cached R={LIVE_REFRESH}"}
    small_losses = None if small_losses is None else sorted(needed | set(small_losses))
    large_losses = None if large_losses is None else sorted(needed - {"ce exact"} | set(large_losses))
    common = dict(mode="e2e", encoders=[encoder], top_k=top_k, cached=True, dim=dim, batch_size=batch_size,
                  device=device, seed=0)
    small = prepare(ws, "losses-small", users, items, encoder, top_k, random_init, device)
    start = None if cold else warm_source(ws, small, common, timed_run, threads)
    small_common = common if start is None else {**common, "init_from": start["run"]}
    small_rows = measure(ws, small, small_common, epochs, timed_run, threads, small_losses)
    exact = next(r for r in small_rows if r["loss"] == "ce exact")
    report = {
        "settings": {"encoder": encoder, "top_k": top_k, "dim": dim, "batch_size": batch_size, "epochs": epochs,
                     "device": device, "threads": torch.get_num_threads()},
        "small": {"users": small.n_users, "items": small.n_items, "rows": small_rows, "start": start},
        "step_vs_inbatch": {str(small.n_items): vs_inbatch(small_rows)},
        "hr10_vs_exact": {r["loss"]: r["valid_last"]["HR@10"] / max(exact["valid_last"]["HR@10"], 1e-12)
                          for r in small_rows},
    }
    if large_items:  # 0: the accuracy comparison alone
        large = prepare(ws, "losses-large", large_users, large_items, encoder, top_k, random_init, device)
        large_rows = measure_steps(ws, large, common, large_steps, threads, large_losses)
        report["large"] = {"users": large.n_users, "items": large.n_items, "rows": large_rows}
        report["step_vs_inbatch"][str(large.n_items)] = vs_inbatch(large_rows)
        report["projection"] = projection(small_rows, large_rows, small.n_items, large.n_items, batch_size)
    return report


def vs_inbatch(rows: list[dict]) -> dict[str, float]:
    """Each loss's median step over inbatch's, on one dataset."""
    base = next(r for r in rows if r["loss"] == "inbatch")["step_seconds"]
    return {r["loss"]: r["step_seconds"] / base for r in rows}


def print_report(report: dict) -> None:
    s = report["settings"]
    print(f"{s['encoder']} top {s['top_k']} blocks (cached states), SASRec d={s['dim']}, batch {s['batch_size']}, "
          f"device {s['device']}, {s['threads']} threads")
    for size in (s for s in ("small", "large") if s in report):
        part = report[size]
        ratios = report["step_vs_inbatch"][str(part["items"])]
        print(f"\n{part['users']} users x {part['items']} items "
              f"({str(s['epochs']) + ' epoch(s)' if size == 'small' else 'steps timed, no validation'}):")
        start = part.get("start")
        if start:
            print(f"every run starts from TS run {start['run']} (best validation HR@10 {start['valid']['HR@10']:.4f} "
                  f"at epoch {start['epoch']}; popularity {(start['popularity'] or {}).get('HR@10', 0):.4f})")
        print(f"{'loss':16} {'s/step':>7} {'x inbatch':>9} {'steps':>5} {'peak RSS MB':>11} {'refresh s':>9} "
              f"{'refresh s/epoch':>15} {'valid HR@10':>11} {'x exact':>7}")
        for r in part["rows"]:
            vs_exact = report["hr10_vs_exact"].get(r["loss"]) if size == "small" else None
            print(f"{r['loss']:16} {r['step_seconds']:7.3f} {ratios[r['loss']]:9.2f} {r['steps']:5d} "
                  f"{r['peak_rss_mb']:11.0f} {r.get('refresh_seconds') or 0:9.2f} "
                  f"{r.get('refresh_seconds_per_epoch', 0):15.1f} {r.get('valid_last', {}).get('HR@10', 0):11.4f} "
                  + (f"{vs_exact:7.3f}" if vs_exact is not None else f"{'-':>7}"))
    p = report.get("projection")
    if p:
        print(f"\nprojected E2E epoch at {p['users']:,} users x {p['items']:,} items ({p['loss']}, from "
              f"{p['measured_steps']} measured steps): {p['steps']:,} steps x {p['step_seconds']:.2f} s + "
              f"{p['refreshes']} refreshes x {p['refresh_seconds']:.0f} s = {p['epoch_hours']:.1f} h")
