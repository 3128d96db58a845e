"""PNG figures: accuracy vs TS-DNN depth and vs training cost; 2-D maps of item vectors.

matplotlib runs on the Agg backend (no display on the project's machines) and is
imported only when a figure is drawn, so the CLI starts fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.compare import RunSummary

PROJECTIONS = ("pca", "tsne")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(summaries: list[RunSummary], out: Path, metric: str = "HR@10") -> Path:
    """Two panels: ``metric`` against TS-DNN depth (TS = depth 0; other modes as
    horizontal reference lines), and ``metric`` against seconds per epoch."""
    plt = _pyplot()
    fig, (depth_ax, cost_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    scored = [s for s in summaries if s.metric(metric) is not None]

    towers = sorted((s for s in scored if s.mode in ("ts", "ts-dnn")),
                    key=lambda s: 0 if s.mode == "ts" else (s.layers or 0))
    by_encoder: dict[str, list[RunSummary]] = {}
    for s in towers:
        by_encoder.setdefault(s.encoder, []).append(s)
    for encoder, runs in by_encoder.items():
        depth = [0 if s.mode == "ts" else (s.layers or 0) for s in runs]
        depth_ax.plot(depth, [100 * s.metric(metric) for s in runs], marker="o", label=encoder)
    several = len({s.encoder for s in scored if s.mode not in ("popularity", "id")}) > 1
    name = (lambda s: f"{s.label} ({s.encoder})") if several else (lambda s: s.label)
    references = sorted((s for s in scored if s.mode not in ("ts", "ts-dnn")), key=lambda s: s.metric(metric))
    for number, s in enumerate(references):
        depth_ax.axhline(100 * s.metric(metric), linestyle="--", linewidth=1, color="grey")
        side = number % 2  # neighbouring lines labelled at opposite ends, so close values stay legible
        depth_ax.annotate(name(s), (0.99 if side else 0.01, 100 * s.metric(metric)),
                          xycoords=("axes fraction", "data"), ha="right" if side else "left", fontsize=8,
                          xytext=(0, 2), textcoords="offset points")
    depth_ax.set_xlabel("TS-DNN depth (0 = TS)")
    depth_ax.set_ylabel(f"{metric} (%)")
    depth_ax.set_title(f"{metric} against TS-DNN depth")
    if by_encoder:
        depth_ax.legend(fontsize=8)

    costed = [s for s in scored if s.sec_per_epoch]
    for s in costed:
        cost_ax.scatter(s.sec_per_epoch, 100 * s.metric(metric))
        cost_ax.annotate(name(s), (s.sec_per_epoch, 100 * s.metric(metric)), fontsize=8,
                         xytext=(3, 3), textcoords="offset points")
    if costed:
        cost_ax.set_xscale("log")
        cost_ax.margins(x=0.2)  # room for the labels of the costliest runs
    cost_ax.set_xlabel("training seconds per epoch (log)")
    cost_ax.set_ylabel(f"{metric} (%)")
    cost_ax.set_title(f"{metric} against training cost")

    return _save(fig, out)


def project_2d(vectors: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of ``vectors`` by PCA or t-SNE (scikit-learn)."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
    raise ValueError(f"method must be one of {PROJECTIONS}, not {method!r}")


def plot_item_map(coords: np.ndarray, counts: np.ndarray, out: Path, title: str) -> Path:
    """Scatter of item coordinates coloured by log10(1 + training interactions), as
    003 Fig. 4: whether cold items are spread out or collapsed together."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    order = np.argsort(counts)  # popular items drawn last, on top
    points = ax.scatter(coords[order, 0], coords[order, 1], c=np.log10(1 + counts[order]),
                        s=6, cmap="viridis", linewidths=0)
    fig.colorbar(points, ax=ax, label="training interactions, log10(1 + n)")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out)


def _save(fig, out: Path | str) -> Path:
    """Write ``fig`` as a PNG at ``out`` (making its folder) and free it."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out
