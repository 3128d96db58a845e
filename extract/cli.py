"""``featurestore extract`` and ``featurestore encoders``.

Model libraries are imported inside the commands, so ``featurestore --help`` and
the store verbs stay quick.
"""

from __future__ import annotations

import os
from typing import Any

import click

from extract.registry import MODALITIES, POOLINGS
from featurestore.cliutil import SEED, UserError, emit, json_option, root_option
from featurestore.store import DEFAULT_CHUNK_ROWS
from featurestore.workspace import Workspace

ALL_LAYERS = "all"  # the same word as extract.layers.ALL_LAYERS, which imports torch


class CacheLayer(click.ParamType):
    """``--cache-layer``: a block count K >= 0, or ``all`` (every layer, pooled)."""

    name = "K|all"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if isinstance(value, int) or value == ALL_LAYERS:
            return value
        if str(value).isdigit():
            return int(value)
        self.fail(f"{value!r} is neither a block count K >= 0 nor {ALL_LAYERS!r}", param, ctx)


# Half the cores decode/tokenise, the rest feed the model: on a 2-core machine one
# worker, since a second would only take CPU from the forward it is waiting for.
DEFAULT_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))


@click.command()
@click.option("--dataset", required=True,
              help="Prepared dataset name (ROOT/datasets/NAME; see `featurestore dataset`).")
@click.option("--encoder", required=True,
              help="Encoder: a registry name (efficientnet-lite0, minilm-l6, swin-b, bert-base; "
                   "`featurestore encoders`) or any library name: timm:MODEL[.TAG], hf:ORG/NAME[@REVISION], "
                   "st:ORG/NAME (sentence-transformers).")
@click.option("--modality", type=click.Choice(list(MODALITIES)), default=None,
              help="Item content to encode [default: the encoder's own; must match it; picks the tower of "
                   "a CLIP / SigLIP hf: name].")
@click.option("--pooling", type=click.Choice(list(POOLINGS)), default=None,
              help="cls: first token (BERT/RoBERTa/ViT); mean: average over tokens or positions; "
                   "pooled: the model's own pooled output (Swin/ResNet/EfficientNet); last-token: the last real "
                   "token (decoder-only LLM embedders) [default: the encoder's].")
@click.option("--prompt", default=None, metavar="TEXT",
              help="Instruction put before every text (E5: 'passage: '; Qwen3-Embedding: 'Instruct: ...\\nQuery:'); "
                   "recorded in the provenance.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Items per forward pass (a batch never spans two store chunks).")
@click.option("--workers", type=click.IntRange(min=0), default=DEFAULT_WORKERS, show_default=True,
              help="DataLoader processes decoding images / reading texts (0: in the main process).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs; cuda uses bf16 (else fp16) autocast unless --dtype. auto: cuda if visible.")
@click.option("--dtype", "precision", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="dtype of the forward pass: the weights are cast once [default: float32 on a CPU, bf16 "
                   "(else fp16) autocast on a GPU]; independent of --store-dtype.")
@click.option("--store-dtype", "dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Stored dtype of the embeddings (reads always return float32).")
@click.option("--weights", default=None, metavar="PATH_OR_HUB_ID",
              help="Weights file/folder, or a Hugging Face hub id where the hub is reachable "
                   "[default: the weights bundled with the encoder, if any].")
@click.option("--random-init", is_flag=True,
              help="Use an untrained, seeded model (tests, ablations); recorded in the provenance.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of --random-init.")
@click.option("--variant", default=None, metavar="TAG",
              help="Write group DATASET/MODALITY/ENCODER@TAG, e.g. for adapted (MLM/MAE) weights.")
@click.option("--adapted", default=None, metavar="NAME",
              help="Use the encoder adapted by `featurestore adapt --name NAME` (MLM/MAE on this dataset): "
                   "sets --weights to ROOT/adapted/NAME and --variant to its objective unless given.")
@click.option("--on-bad-item", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="Missing/corrupt image or empty text. skip: leave its row zero, mark it absent and list "
                   "it in the group's attributes; fail: stop, naming the item and file.")
@click.option("--max-text-tokens", type=click.IntRange(min=2), default=30, show_default=True,
              help="Cut texts to this many tokens, special tokens included (the papers use 30).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=DEFAULT_CHUNK_ROWS, show_default=True,
              help="Rows per store chunk: the unit of resuming and of work split across torchrun ranks.")
@click.option("--cache-layer", type=CacheLayer(), default=None, metavar="K|all",
              help="Also store, per item, the hidden states entering the encoder's top K blocks (tokens or "
                   "patches x width), for `recommend train --mode e2e --cached --top-k K`; 0: the states "
                   "leaving the last block (before pooling), for `recommend train --fusion merge-attn`; "
                   "all: the pooled state after the stem and after every block, (depth + 1) vectors, for "
                   "`recommend train --mode side`.")
@click.option("--cache-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Stored dtype of the --cache-layer states (float32 for bit-level comparisons).")
@root_option
@json_option
def extract(ws: Workspace, as_json: bool, **options: object) -> None:
    """Run an encoder over every item of a dataset into the store group DATASET/MODALITY/ENCODER[@VARIANT].

    Resumable: after a kill, run the same command again and it continues from the
    finished chunks. Distributed: `torchrun --nproc-per-node N -m featurestore.cli
    extract ...` splits the chunks across N processes.

    \b
    featurestore extract --dataset HM --encoder efficientnet-lite0
    featurestore extract --dataset HM --encoder minilm-l6 --pooling mean
    featurestore extract --dataset HM --encoder swin-t --random-init
    """
    from extract.job import ExtractOptions, run_extraction

    adapted = options.pop("adapted")
    if adapted:
        _use_adapted(ws, adapted, options)
    result = run_extraction(ws, ExtractOptions(**options, progress=not as_json))
    if int(os.environ.get("RANK", "0")) == 0:
        emit(result.to_dict(), as_json, result.summary())


def _use_adapted(ws: Workspace, name: str, options: dict) -> None:
    """Point ``options`` at the adapted weights ``name``; refuse a base-encoder mismatch."""
    from extract.adapt import resolve_adapted

    adapted = resolve_adapted(ws, name)
    if adapted["encoder"] != options["encoder"]:
        raise UserError(f"adapted weights {name!r} were trained from {adapted['encoder']!r}, not "
                        f"{options['encoder']!r}; pass --encoder {adapted['encoder']}")
    if options.get("weights"):
        raise UserError("--adapted already chooses the weights; drop --weights")
    options["weights"] = str(adapted["weights"])
    options["variant"] = options.get("variant") or adapted["variant"]


@click.command()
@click.option("--pattern", default="*", show_default=True, help="Shell-style filter on names, e.g. 'swin*'.")
@click.option("--info", "info_name", default=None, metavar="NAME",
              help="Describe one registry or library name (modality, width, stem/blocks/pool split, pooling, "
                   "parameters, weights, preprocessing) from its config and a meta-device build: no weights read.")
@click.option("--modality", type=click.Choice(["text", "image"]), default=None,
              help="With --info: the tower of a CLIP / SigLIP hf: name.")
@click.option("--weights", default=None, metavar="PATH",
              help="With --info: the weights to describe; a model folder stands in for an uncached hf: / st: name.")
@json_option
def encoders(as_json: bool, pattern: str, info_name: str | None, modality: str | None, weights: str | None) -> None:
    """List the registered encoders: modality, output width, depth, parameters, where their weights stand and
    their library name; any timm:MODEL[.TAG], hf:ORG/NAME[@REVISION] or st:ORG/NAME works too.

    Weights: bundled (a pip package ships them), cached (in the Hugging Face hub cache: used with
    no network), downloadable (fetched into the hub cache on first use) or unavailable offline
    (HF_HUB_OFFLINE set and not cached: pass --weights PATH or --random-init).

    \b
    featurestore encoders --pattern 'swin*'
    featurestore encoders --info timm:convnext_tiny.fb_in1k
    featurestore encoders --info hf:Qwen/Qwen3-Embedding-0.6B --json
    """
    from extract.hub import cache_dir
    from extract.info import LIBRARY_FORMS, encoder_info, info_text, library_name_of
    from extract.registry import get_encoder_config, list_encoders, parameter_count, weights_status

    if info_name is not None:
        if pattern != "*":
            raise UserError("--pattern filters the listing; drop it with --info NAME")
        info = encoder_info(info_name, modality, weights)
        emit({**info, "hub_cache": str(cache_dir())}, as_json, info_text(info))
        return
    if modality or weights:
        raise UserError("--modality and --weights describe one name; add --info NAME")
    rows = []
    for name in list_encoders(pattern):
        cfg = get_encoder_config(name)
        rows.append({
            "name": name, "modality": cfg.modality, "family": cfg.family, "width": cfg.width,
            "depth": cfg.depth, "parameters": parameter_count(name), "pooling": cfg.pooling,
            "poolings": list(cfg.poolings), "weights_status": (status := weights_status(cfg)),
            "weights_available": status in ("bundled", "cached"),
            "weights": f"package {cfg.local_package}" if cfg.local_package else
                       f"hub {cfg.hub_id}" if cfg.hub_id else "no published weights",
            "library_name": library_name_of(cfg),
        })
    lines = [f"Besides these names, any model of timm, transformers or sentence-transformers: {', '.join(LIBRARY_FORMS)}",
             "(`featurestore encoders --info NAME` describes one without downloading it)",
             f"{'name':<20}{'modality':<9}{'width':>6}{'depth':>6}{'params':>9}  {'pooling':<8}{'weights':<20}"
             "library name"]
    for r in rows:
        lines.append(f"{r['name']:<20}{r['modality']:<9}{r['width']:>6}{r['depth']:>6}"
                     f"{r['parameters'] / 1e6:>8.1f}M  {r['pooling']:<8}{r['weights_status']:<20}"
                     f"{r['library_name'] or '-'}")
    lines.append(f"hub cache: {cache_dir()}")
    emit({"encoders": rows, "library_names": list(LIBRARY_FORMS), "hub_cache": str(cache_dir())}, as_json,
         "\n".join(lines))
