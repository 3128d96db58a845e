"""Item popularity: how many users each item has, binned as 001 Figure 3 shows it.

A warm-N dataset (``--min-item-interactions N``) cuts the long tail at N; the
histogram is how one sees what a cut removes before choosing it. Bins grow
geometrically (1, 2-4, 5-9, 10-19, 20-49, ...) because popularity is heavy-tailed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EDGES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def item_interactions(seq_items: np.ndarray, n_items: int) -> np.ndarray:
    """Interactions per item id 1..N over all users' whole sequences (index 0 = padding, 0)."""
    return np.bincount(seq_items, minlength=n_items + 1)


def histogram(counts: np.ndarray) -> list[dict]:
    """Items per popularity bin: ``[{"from": 1, "to": 1, "items": k}, ...]`` up to the largest count."""
    counts = np.asarray(counts)[1:]
    top = int(counts.max(initial=0))
    edges = [e for e in EDGES if e <= top] + [top + 1]
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        bins.append({"from": low, "to": high - 1, "items": int(((counts >= low) & (counts < high)).sum())})
    return bins


def bin_label(b: dict) -> str:
    """``5-9`` (or ``1`` for a one-value bin)."""
    return str(b["from"]) if b["from"] == b["to"] else f"{b['from']}-{b['to']}"


def plot_histogram(bins: list[dict], out: Path, title: str) -> Path:
    """A PNG bar chart of the bins (items per popularity range, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [bin_label(b) for b in bins]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(bins)), [b["items"] for b in bins], color="tab:blue")
    ax.set_xticks(range(len(bins)), labels, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_xlabel("interactions per item")
    ax.set_ylabel("items")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
