"""``featurestore codes``: semantic IDs for a dataset's items, from a store group of their vectors."""

from __future__ import annotations

import click

from featurestore.cliutil import SEED, emit, json_option, root_option
from featurestore.store import DEFAULT_CHUNK_ROWS
from featurestore.workspace import Workspace


@click.command()
@click.option("--dataset", required=True, help="Prepared dataset name (ROOT/datasets/NAME).")
@click.option("--encoder", required=True, metavar="ENC[@VARIANT]",
              help="The complete store group DATASET/<modality>/ENC[@VARIANT] to quantise.")
@click.option("--levels", type=click.IntRange(min=1, max=16), default=3, show_default=True,
              help="Codes per item L (TIGER, Singh et al.: 3-4).")
@click.option("--codebook", type=click.IntRange(min=2, max=65536), default=256, show_default=True,
              help="Codes per level K.")
@click.option("--method", default="rq-kmeans", show_default=True, metavar="rq-kmeans|rq-vae",
              help="rq-kmeans: faiss k-means on each level's residual; rq-vae: TIGER's residual-quantised "
                   "auto-encoder, trained in torch (commitment loss, dead-code restarts).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the quantiser (codes are "
                                                                      "deterministic for a seed).")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="k-means iterations per level (rq-kmeans) or training epochs (rq-vae) [default: 20 / 50].")
@click.option("--disambiguate", is_flag=True,
              help="Add TIGER's extra level: the item's position among items sharing all L codes, so every "
                   "item's codes are unique.")
@click.option("--variant", default=None, metavar="TAG",
              help="Write DATASET/codes/ENC@TAG [default: ENC@[VARIANT+]METHOD-LxK].")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=DEFAULT_CHUNK_ROWS, show_default=True,
              help="Rows per store chunk.")
@root_option
@json_option
def codes(ws: Workspace, as_json: bool, **options: object) -> None:
    """Quantise a complete store group into L codes per item (residual quantisation), written to the store
    group DATASET/codes/ENC@METHOD-LxK with their provenance: the source group and its fingerprint, the
    method and settings, the reconstruction error and code usage per level, and the collisions.

    `recommend train --mode sid --codes GROUP` trains on them. Same lock, resume and
    fingerprint checks as `featurestore extract`.

    \b
    featurestore codes --dataset HM --encoder minilm-l6 --levels 3 --codebook 256 --method rq-kmeans
    """
    from extract.codes import CodesOptions, run_codes

    result = run_codes(ws, CodesOptions(**options))
    emit(result.to_dict(), as_json, result.summary())
