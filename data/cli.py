"""``featurestore dataset``: synthesize raw files, prepare them, describe the result."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from data.dataset import COLD_THRESHOLD, PreparedDataset
from data.formats import get_format, list_formats
from data.popularity import bin_label, histogram, item_interactions, plot_histogram
from data.prepare import prepare_dataset
from data.synth import Signals, list_synth_formats, synthesize
from data.synth_folder import synthesize_into
from featurestore.cliutil import SEED, UserError, emit, json_option, root_option
from featurestore.workspace import Workspace


@click.group()
def dataset() -> None:
    """Raw datasets -> prepared datasets (ids 1..N, time-ordered sequences, leave-one-out split).

    \b
    featurestore dataset synth --format hm --out raw/HM
    featurestore dataset prepare --format hm --source raw/HM --name HM
    featurestore dataset info HM
    """


def _split_fields(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return [f.strip() for f in value.split(",") if f.strip()] if value else None


@dataset.command()
@click.option("--format", "fmt", required=True, type=click.Choice(list_formats()),
              help="Raw layout of --source: " + "; ".join(f"{f}: {get_format(f).summary}" for f in list_formats()) + ".")
@click.option("--source", required=True, type=click.Path(path_type=Path),
              help="Folder holding the raw files.")
@click.option("--name", required=True, help="Name of the prepared dataset (folder ROOT/datasets/NAME).")
@click.option("--max-seq-len", type=click.IntRange(min=3), default=None,
              help="Keep each user's most recent N items [default: 13 for image-first formats "
                   "(hm, ninerec, generic with images), 23 for text-first ones (mind, seqtsv)].")
@click.option("--min-interactions", type=click.IntRange(min=3), default=5, show_default=True,
              help="Drop users with fewer distinct items (counted before truncation).")
@click.option("--min-item-interactions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Warm-N (001 Table 3): first remove items with fewer distinct users in the raw data.")
@click.option("--iterate", is_flag=True,
              help="Repeat the item and user filters until neither removes anything (a k-core).")
@click.option("--users", type=click.IntRange(min=1), default=None,
              help="Keep a deterministic random sample of N users (drawn after the --min-interactions filter).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the --users sample.")
@click.option("--text-fields", callback=_split_fields, default=None,
              help="Comma-separated catalogue fields joined into the item text [default per format: "
                   "hm prod_name,product_type_name,colour_group_name,detail_desc; mind title; "
                   "ninerec text_en if present else text; generic text; seqtsv text].")
@click.option("--chunk-rows", type=click.IntRange(min=1000), default=1_000_000, show_default=True,
              help="Interaction rows read per chunk (memory vs. speed).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing dataset NAME prepared from other data (other items or interactions); "
                   "its store groups and runs then no longer match it. Without this, that is refused.")
@root_option
@json_option
def prepare(ws: Workspace, as_json: bool, fmt: str, source: Path, name: str, max_seq_len: int | None,
            min_interactions: int, min_item_interactions: int, iterate: bool, users: int | None, seed: int,
            text_fields: list[str] | None, chunk_rows: int, overwrite: bool) -> None:
    """Read a raw dataset, filter and truncate it, and write ROOT/datasets/NAME atomically."""
    guard = None if overwrite else functools.partial(refuse_other_data, ws, name)
    manifest = prepare_dataset(fmt, source, ws.dataset_dir(name), name=name, max_seq_len=max_seq_len,
                               min_interactions=min_interactions, users=users, seed=seed,
                               text_fields=text_fields, chunk_rows=chunk_rows, progress=not as_json,
                               min_item_interactions=min_item_interactions, iterate=iterate,
                               before_replace=guard)
    counts, stats = manifest["counts"], manifest["stats"]
    summary = {"name": name, "path": ws.dataset_dir(name), "users": counts["users"], "items": counts["items"],
               "interactions": counts["interactions"], "fingerprint": manifest["fingerprint"],
               "max_seq_len": manifest["options"]["max_seq_len"], "stats": stats}
    text = (f"prepared {name} at {ws.dataset_dir(name)}: {counts['users']} users, {counts['items']} items, "
            f"{counts['interactions']} interactions (max_seq_len {manifest['options']['max_seq_len']}), "
            f"fingerprint {manifest['fingerprint']}\n"
            f"read {stats['rows_read']} rows: {stats['bad_rows']} unreadable, {stats['unknown_item_rows']} "
            f"with unknown items, {stats['duplicates_removed']} duplicates removed, "
            + (f"{stats['items_below_min']} items below {min_item_interactions} interactions "
               f"({stats['warm_rounds']} rounds), " if "items_below_min" in stats else "")
            + f"{stats['users_below_min']} users below {min_interactions} interactions, "
            f"{stats['interactions_truncated']} interactions truncated; "
            f"{stats['catalogue_bad_rows']} unreadable catalogue rows, "
            f"{stats['items_missing_image']} items without image")
    emit(summary, as_json, text)


FINGERPRINTS = ("fingerprint", "interactions_fingerprint")


def dependants(ws: Workspace, name: str, fingerprint: str) -> list[str]:
    """Store groups and runs built on dataset ``name`` as it had ``fingerprint``."""
    from featurestore.store import FeatureStore
    from recommend.run import CONFIG

    store = FeatureStore(ws.store)
    found = [f"store group {g}" for g in store.groups()
             if g.startswith(f"{name}/") and store.open(g).fingerprint == fingerprint]
    if ws.runs.is_dir():
        for run in sorted(ws.runs.iterdir()):
            try:
                dataset = json.loads((run / CONFIG).read_text()).get("dataset", {})
            except (OSError, ValueError):
                continue
            if dataset.get("name") == name and dataset.get("fingerprint") == fingerprint:
                found.append(f"run {run.name}")
    return found


def refuse_other_data(ws: Workspace, name: str, new: dict) -> None:
    """Keep an existing dataset that ``new`` (a manifest) would replace with other data."""
    old = PreparedDataset.load(ws.dataset_dir(name)).manifest
    if all(old.get(key) == new.get(key) for key in FINGERPRINTS):
        return  # the same data again: replacing it changes nothing that depends on it
    using = dependants(ws, name, old.get("fingerprint", ""))
    shown = ", ".join(using[:6]) + (f" and {len(using) - 6} more" if len(using) > 6 else "")
    raise UserError(f"dataset {name} already exists, prepared from other data (fingerprint {old.get('fingerprint')}, "
                    f"now {new.get('fingerprint')}); {'built on it: ' + shown if using else 'nothing is built on it yet'}; "
                    f"pass --overwrite to replace it, or choose another --name")


def dataset_info(ds: PreparedDataset) -> dict:
    """Counts a user wants before training: sizes per split, density, lengths, images, cold items."""
    lengths = ds.lengths()
    counts = ds.manifest["counts"]
    cold = int(ds.cold_items().sum())
    return {
        "name": ds.name,
        "format": ds.manifest.get("format"),
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": int(len(ds.seq_items)),
        "splits": {split: counts[split] for split in ("train", "valid", "test")},
        "density": float(len(ds.seq_items) / max(1, ds.n_users * ds.n_items)),
        "avg_length": float(lengths.mean()) if len(lengths) else 0.0,
        "max_seq_len": ds.max_seq_len,
        "items_with_image": counts["items_with_image"],
        "cold_items": cold,
        "cold_threshold": COLD_THRESHOLD,
        "min_item_interactions": ds.manifest["options"].get("min_item_interactions", 1),
        "popularity": histogram(item_interactions(ds.seq_items, ds.n_items)),
        "fingerprint": ds.fingerprint,
        "interactions_fingerprint": ds.manifest["interactions_fingerprint"],
        "path": str(ds.path),
    }


@dataset.command()
@click.argument("name")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the item-popularity histogram as a PNG (001 Figure 3).")
@root_option
@json_option
def info(ws: Workspace, as_json: bool, name: str, plot: Path | None) -> None:
    """Describe the prepared dataset NAME, with its item-popularity histogram and the
    popularity and (for a generated dataset) oracle and oracle-without-links rows on its
    test split."""
    from data.oracle import reference_rows  # lazily: it needs eval (torch); prepare and synth do not
    from eval.metrics import percent

    ds = PreparedDataset.load(ws.dataset_dir(name))
    summary = {**dataset_info(ds), "baselines": reference_rows(ds)}
    if plot is not None:
        summary["plot"] = str(plot_histogram(summary["popularity"], plot, f"{name}: item popularity"))
    splits = summary["splits"]
    text = "\n".join([
        f"dataset {summary['name']} ({summary['format']}) at {summary['path']}",
        f"users {summary['users']}, items {summary['items']}, interactions {summary['interactions']} "
        f"(train {splits['train']}, valid {splits['valid']}, test {splits['test']})",
        f"density {summary['density']:.5f}, average length {summary['avg_length']:.2f} "
        f"(max {summary['max_seq_len']})",
        f"items with image {summary['items_with_image']}/{summary['items']}, cold items "
        f"(< {COLD_THRESHOLD} training interactions) {summary['cold_items']}",
        f"fingerprint {summary['fingerprint']}, interactions {summary['interactions_fingerprint']}",
        "interactions per item: " + ", ".join(f"{bin_label(b)}: {b['items']}" for b in summary["popularity"]),
        *([f"plot: {summary['plot']}"] if "plot" in summary else []),
        *(f"{metrics['model']:<20} test HR@10 {percent(metrics['HR@10'])}%  NDCG@10 {percent(metrics['NDCG@10'])}% "
          f"(full pool, history excluded)" for metrics in summary["baselines"].values()),
    ])
    emit(summary, as_json, text)



@dataset.command()
@click.option("--format", "fmt", required=True, type=click.Choice(list_synth_formats()),
              help="Raw layout to write (the same layouts `dataset prepare` reads).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write the raw files to [default: ROOT/raw/FORMAT].")
@click.option("--users", type=click.IntRange(min=1), default=2000, show_default=True, help="Users to simulate.")
@click.option("--items", type=click.IntRange(min=8), default=500, show_default=True, help="Catalogue size.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Same seed, same files.")
@click.option("--clusters", type=click.IntRange(min=2), default=None,
              help="Latent regions (item latents lie near one region centre each) [default: items / 8, "
                   "between 4 and 128].")
@click.option("--content-signal", type=click.FloatRange(min=0), default=Signals.content, show_default=True,
              help="Weight of the content component: a region near the user's taste and recent items, "
                   "then an item of it by popularity (what image and text encoders can learn).")
@click.option("--id-signal", type=click.FloatRange(min=0), default=Signals.id, show_default=True,
              help="Weight of the idiosyncratic links: one of the last item's follow-ups, drawn "
                   "independently of content (only an ID table can learn them).")
@click.option("--popularity", type=click.FloatRange(min=0), default=Signals.popularity, show_default=True,
              help="Weight of global popularity (itself partly a function of content). The three "
                   "weights are normalised to sum to 1.")
@click.option("--taste", type=click.FloatRange(0, 1), default=Signals.taste, show_default=True,
              help="Share of the long-term taste in the content query; the rest is the recent items.")
@click.option("--images/--no-images", default=True, show_default=True,
              help="Write the JPEGs (skip them for quick, large interaction-only tests).")
@click.option("--prefix", default="synth", show_default=True, help="NineRec file prefix (PREFIX_pair.csv).")
@click.option("--overwrite", is_flag=True,
              help="Replace everything in --out, also files `dataset synth` did not write (without it "
                   "only a folder holding an earlier generation, unchanged, is replaced).")
@root_option
@json_option
def synth(ws: Workspace, as_json: bool, fmt: str, out: Path | None, users: int, items: int, seed: int,
          clusters: int | None, content_signal: float, id_signal: float, popularity: float, taste: float,
          images: bool, prefix: str, overwrite: bool) -> None:
    """Write a synthetic raw dataset from a world whose next-item distribution is known
    (truth.json: each item's region; world.npz: what the oracle row is computed from)."""
    out = out or ws.root / "raw" / fmt
    signals = Signals(content_signal, id_signal, popularity, taste)
    summary = synthesize_into(out, overwrite, ws.root, lambda folder: synthesize(
        fmt, folder, users=users, items=items, seed=seed, clusters=clusters, images=images, name=prefix,
        signals=signals))
    emit(summary, as_json, f"wrote synthetic {fmt} data to {out}: {summary['users']} users, "
                           f"{summary['items']} items ({summary['images']} images), "
                           f"{summary['interactions']} interactions, {summary['clusters']} regions")
