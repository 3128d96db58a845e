"""``featurestore adapt``: a second round of MLM / MAE pretraining on a dataset's own items.

The training code (torch, transformers) is imported inside the command, so
``featurestore --help`` stays quick.
"""

from __future__ import annotations

import click

from featurestore.cliutil import SEED, FloatRange, emit, json_option, root_option
from featurestore.workspace import Workspace


@click.command()
@click.option("--dataset", required=True, help="Prepared dataset name (ROOT/datasets/NAME) whose item texts or "
              "images are trained on: all items, validation/test targets included (content only, no interactions).")
@click.option("--encoder", required=True,
              help="Encoder to adapt: a text encoder (minilm-l6, bert-*, roberta-base) for mlm, a ViT-MAE "
                   "(mae-b, mae-tiny) for mae (list: `featurestore encoders`).")
@click.option("--objective", required=True, type=click.Choice(["mlm", "mae"]),
              help="mlm: BERT masked-language modelling on titles (80/10/10 masking); "
                   "mae: masked-autoencoder pixel reconstruction on pictures.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Passes over the dataset's items; a checkpoint is written after each.")
@click.option("--mask-ratio", type=FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Share of tokens (mlm) or patches (mae) hidden and predicted [default: mlm 0.15, mae 0.75].")
@click.option("--lr", type=FloatRange(min=0, min_open=True), default=None, help="Peak AdamW learning rate [default: mlm 5e-5, mae 1e-4].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Items per optimiser step [default: mlm 32, mae 64].")
@click.option("--weight-decay", type=FloatRange(min=0), default=None,
              help="AdamW weight decay, not applied to biases and norms [default: mlm 0.01, mae 0.05].")
@click.option("--warmup", type=FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
              help="Share of all steps with a linear learning-rate warmup; cosine decay to 0 after it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where training runs; cuda uses bf16 (else fp16) autocast. auto: cuda if visible.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader processes reading items [default: 2 for images, 0 for texts].")
@click.option("--name", default=None,
              help="Folder ROOT/adapted/NAME for the weights and adapt.json [default: DATASET-ENCODER-OBJECTIVE]. "
                   "The store variant of a later extraction is the objective for a default name, else NAME.")
@click.option("--weights", default=None, metavar="PATH_OR_HUB_ID",
              help="Base weights file/folder or hub id [default: the weights bundled with the encoder, if any].")
@click.option("--random-init", is_flag=True, help="Start from an untrained, seeded encoder (tests, ablations).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seeds --random-init, the head's initialisation, shuffling, masking and dropout.")
@click.option("--max-text-tokens", type=click.IntRange(min=2), default=30, show_default=True,
              help="Cut texts to this many tokens, special tokens included (as extraction does).")
@click.option("--probe-items", type=click.IntRange(min=0), default=256, show_default=True,
              help="Items with fixed masks whose loss is measured before training and after every epoch.")
@root_option
@json_option
def adapt(ws: Workspace, as_json: bool, **options: object) -> None:
    """Continue self-supervised pretraining of an encoder on a dataset's items (MLM or MAE).

    Writes ROOT/adapted/NAME: the adapted encoder (config.json + model.safetensors, and the
    tokenizer for text) for `featurestore extract --weights ROOT/adapted/NAME --variant TAG`,
    adapt.json (base weights + sha256, dataset fingerprint, settings, loss per epoch) and
    loss.png. Resumable: after a kill, run the same command again; it continues after the
    last finished epoch. A completed run is not redone.

    \b
    featurestore adapt --dataset MIND --encoder bert-base --objective mlm --weights google-bert/bert-base-uncased
    featurestore adapt --dataset HM --encoder minilm-l6 --objective mlm --epochs 3
    featurestore adapt --dataset HM --encoder mae-b --objective mae --random-init
    """
    from extract.adapt import AdaptOptions, run_adaptation

    result = run_adaptation(ws, AdaptOptions(**options, progress=not as_json))
    emit(result.to_dict(), as_json, result.summary())
