"""Benchmark: prepare a synthetic H&M dataset (100k users / 20k items by default).

Compares the streaming preparation (``data.prepare.prepare_dataset``: chunked CSV,
int codes, numpy sorts) with the obvious baseline measured in the same run: read the
whole transactions CSV with pandas, sort, drop duplicates, filter and truncate with
groupby, collect per-user lists. Each method runs in its own subprocess, so its peak
RSS (ru_maxrss, including the interpreter and imports) is its own; a second, untimed
run under tracemalloc gives the peak memory the work itself allocated. Both methods
must produce identical sequences (checked by the interactions fingerprint).

    python bench/prepare.py                      # synthesize (with JPEGs) + benchmark
    python bench/prepare.py --no-images --json   # skip writing pictures (same layout)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import click
import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def streaming(raw: Path, out: Path, chunk_rows: int) -> str:
    from data.prepare import prepare_dataset

    return prepare_dataset("hm", raw, out, name="bench", chunk_rows=chunk_rows)["interactions_fingerprint"]


def naive_pandas(raw: Path, out: Path, chunk_rows: int) -> str:
    """The obvious approach: everything in one DataFrame, groupby per user."""
    import pandas as pd

    from data.dataset import sequences_fingerprint

    df = pd.read_csv(raw / "transactions_train.csv", dtype={"article_id": str})
    df["t_dat"] = pd.to_datetime(df["t_dat"])
    df = df.sort_values(["customer_id", "t_dat"], kind="stable")
    df = df.drop_duplicates(["customer_id", "article_id"], keep="first")
    df = df[df.groupby("customer_id")["article_id"].transform("size") >= 5]
    df = df.groupby("customer_id").tail(13)
    sequences = df.groupby("customer_id", sort=True)["article_id"].apply(list)
    articles = pd.read_csv(raw / "articles.csv", dtype=str).set_index("article_id")
    used = sorted(set(df["article_id"]))
    fields = ["prod_name", "product_type_name", "colour_group_name", "detail_desc"]
    texts = articles.loc[used, fields].fillna("").agg(". ".join, axis=1).tolist()
    images = [os.path.exists(raw / "images" / a[:3] / f"{a}.jpg") for a in used]
    assert len(texts) == len(images) == len(used)
    new_id = {a: k + 1 for k, a in enumerate(used)}
    lengths = sequences.map(len).to_numpy()
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    items = np.fromiter((new_id[a] for seq in sequences for a in seq), dtype=np.int32, count=int(lengths.sum()))
    return sequences_fingerprint(indptr, items)


METHODS = {"streaming": streaming, "naive-pandas": naive_pandas}


def run_worker(method: str, raw: Path, out: Path, chunk_rows: int) -> dict:
    """Run one method in a fresh interpreter; return its time, peak memory and fingerprint."""
    command = [sys.executable, __file__, "--worker", method, "--raw", str(raw), "--work", str(out),
               "--chunk-rows", str(chunk_rows)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if done.returncode:
        raise SystemExit(f"{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--users", default=100_000, show_default=True, help="Synthetic users.")
@click.option("--items", default=20_000, show_default=True, help="Synthetic items.")
@click.option("--seed", default=0, show_default=True, help="Generator seed.")
@click.option("--images/--no-images", default=True, show_default=True,
              help="Write the article JPEGs (the layout is the same either way).")
@click.option("--chunk-rows", default=1_000_000, show_default=True, help="Streaming chunk size (prepare's default).")
@click.option("--small-chunks", default=100_000, show_default=True, help="Second, smaller streaming chunk size.")
@click.option("--out", type=click.Path(path_type=Path), default=OUT, show_default=True,
              help="Folder for the raw and prepared data.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--worker", type=click.Choice(sorted(METHODS)), default=None, hidden=True)
@click.option("--raw", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--work", type=click.Path(path_type=Path), default=None, hidden=True)
def main(users: int, items: int, seed: int, images: bool, chunk_rows: int, small_chunks: int, out: Path, as_json: bool,
         worker: str | None, raw: Path | None, work: Path | None) -> None:
    """Time and measure peak memory of `dataset prepare` on a synthetic H&M dataset vs naive pandas."""
    if worker:
        import pandas  # noqa: F401  (imports are not part of the measured work)

        import data.prepare  # noqa: F401

        start = time.perf_counter()
        fingerprint = METHODS[worker](raw, work, chunk_rows)
        seconds = time.perf_counter() - start
        rss = peak_rss_mb()
        tracemalloc.start()  # a second, untimed run: tracing slows allocation-heavy code
        METHODS[worker](raw, work, chunk_rows)
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        click.echo(json.dumps({"seconds": seconds, "peak_rss_mb": rss, "peak_traced_mb": traced,
                               "fingerprint": fingerprint}))
        return

    from data.synth import synthesize

    raw = out / f"hm-{users}u-{items}i-s{seed}{'' if images else '-noimg'}"
    start = time.perf_counter()
    if not (raw / "truth.json").exists():
        synthesize("hm", raw, users=users, items=items, seed=seed, images=images)
    synth_seconds = time.perf_counter() - start
    rows = sum(1 for _ in open(raw / "transactions_train.csv", encoding="utf-8")) - 1
    # Streaming at the default chunk size reads this file in one or two chunks; the small
    # chunks show the bound that matters for the real 31M-row file.
    runs = {"streaming": ("streaming", chunk_rows), f"streaming-{small_chunks // 1000}k": ("streaming", small_chunks),
            "naive-pandas": ("naive-pandas", chunk_rows)}
    results = {label: run_worker(method, raw, out / "prepared", rows) for label, (method, rows) in runs.items()}
    fast, slow = results["streaming"], results["naive-pandas"]
    if len({r["fingerprint"] for r in results.values()}) != 1:
        raise SystemExit("the methods disagree on the sequences")
    report = {
        "users": users, "items": items, "transactions": rows, "images": images,
        "csv_mb": round((raw / "transactions_train.csv").stat().st_size / 2**20, 1),
        "synth_seconds": round(synth_seconds, 2), "results": results,
        "speedup": slow["seconds"] / fast["seconds"],
        "memory_ratio": slow["peak_traced_mb"] / fast["peak_traced_mb"],
        "memory_ratio_small_chunks": slow["peak_traced_mb"] / results[f"streaming-{small_chunks // 1000}k"]["peak_traced_mb"],
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"H&M synthetic: {users} users, {items} items, {rows} transactions "
               f"({report['csv_mb']} MB CSV), images={'yes' if images else 'no'}; synthesis {synth_seconds:.1f}s")
    for name, r in results.items():
        click.echo(f"{name:>15}: {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mb']:5.0f} MB   "
                   f"peak allocated (tracemalloc) {r['peak_traced_mb']:5.0f} MB")
    click.echo(f"streaming vs naive pandas: {report['speedup']:.2f}x faster; peak allocated memory "
               f"{report['memory_ratio']:.2f}x less ({report['memory_ratio_small_chunks']:.2f}x with "
               f"{small_chunks}-row chunks); identical sequences")


if __name__ == "__main__":
    main()
