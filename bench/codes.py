"""What ``featurestore codes`` costs at the papers' catalogue size: time, peak memory, error, collisions.

Each (method, width) runs in a fresh process, so its peak resident memory (VmHWM) is its own.
The vectors are a clustered Gaussian catalogue (200 regions, unit noise), not an encoder's: the
quantisers' cost depends on the shape, and real 87K-item vectors would first need an extraction.

    python bench/codes.py --items 87000 --dims 384,1024 --methods rq-kmeans,rq-vae --threads 2
"""

from __future__ import annotations

import json
import multiprocessing
import time

import click
import numpy as np


def _peak_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


def clustered(items: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dim)).astype(np.float32) * 3
    return centres[rng.integers(0, 200, items)] + rng.normal(size=(items, dim)).astype(np.float32)


def measure(method: str, items: int, dim: int, levels: int, codebook: int, threads: int, queue) -> None:
    import faiss
    import torch

    from extract.quantise import QUANTISERS, code_usage, collisions

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    x = clustered(items, dim)
    start = time.perf_counter()
    result = QUANTISERS.get(method)(x, levels, codebook, seed=0)
    queue.put({"method": method, "items": items, "dim": dim, "levels": levels, "codebook": codebook,
               "threads": threads, "seconds": round(time.perf_counter() - start, 1), "peak_mb": round(_peak_mb()),
               "errors": [round(e, 4) for e in result.errors], "code_usage": code_usage(result.codes),
               **collisions(result.codes), "settings": result.settings})


@click.command()
@click.option("--items", default=87_000, show_default=True)
@click.option("--dims", default="384,1024", show_default=True, help="Vector widths (MiniLM-L6: 384; BERT-large: 1024).")
@click.option("--methods", default="rq-kmeans", show_default=True)
@click.option("--levels", default=3, show_default=True)
@click.option("--codebook", default=256, show_default=True)
@click.option("--threads", default=2, show_default=True)
def main(items: int, dims: str, methods: str, levels: int, codebook: int, threads: int) -> None:
    """One line of JSON per (method, width)."""
    context = multiprocessing.get_context("spawn")
    for method in methods.split(","):
        for dim in (int(d) for d in dims.split(",")):
            queue = context.Queue()
            child = context.Process(target=measure, args=(method, items, dim, levels, codebook, threads, queue))
            child.start()
            click.echo(json.dumps(queue.get()))
            child.join()


if __name__ == "__main__":
    main()
