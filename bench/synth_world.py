"""Do real encoders read the generated world at the papers' catalogue size?

Draws the 87K-item world (few users: items and their content do not depend on them),
takes a random sample of items, renders their pictures and texts exactly as
``featurestore dataset synth`` does, embeds them with the real offline MiniLM-L6 and
EfficientNet-Lite0 weights, and prints the latent-neighbour agreement@10 within the
sample against chance (the baseline: a random neighbour list), as a ratio.

    python bench/synth_world.py --items 87000 --sample 1000
"""

from __future__ import annotations

import time

import click
import numpy as np

from data.latent_check import agreement, chance, image_vectors, text_vectors
from data.synth import build_world


@click.command()
@click.option("--items", default=87_000, show_default=True, help="Catalogue size of the world.")
@click.option("--sample", default=1000, show_default=True, help="Items sampled at random and embedded.")
@click.option("--k", default=10, show_default=True, help="Neighbours compared.")
@click.option("--seed", default=0, show_default=True, help="World and sample seed.")
def main(items: int, sample: int, k: int, seed: int) -> None:
    """Latent-neighbour agreement of MiniLM-L6 and EfficientNet-Lite0 vectors on a sample."""
    world = build_world(users=100, items=items, seed=seed)
    picked = np.sort(np.random.default_rng(seed).choice(items, size=sample, replace=False))
    base = chance(sample, k)
    click.echo(f"{items} items, {len(world.centres)} regions, sample {sample}, chance {base:.4f}")
    for name, embed in (("minilm-l6 (texts)", text_vectors), ("efficientnet-lite0 (pictures)", image_vectors)):
        start = time.perf_counter()
        share = agreement(embed(world, picked), world.latent[picked], k)
        click.echo(f"{name:30} agreement@{k} {share:.4f}  = {share / base:.1f}x chance  "
                   f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
