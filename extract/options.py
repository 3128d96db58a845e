"""What an extraction takes, and the command line that repeats one.

Apart from :mod:`extract.job` so that the caches (:mod:`extract.cache`,
:mod:`extract.layers`) can name the exact ``featurestore extract`` command that writes
the states a run lacks without importing the job that writes them (which imports the
caches): the refusals and the job share one command builder, and no import climbs back.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from featurestore.store import DEFAULT_CHUNK_ROWS, FeatureGroup, extract_command, parse_group_name


@dataclass
class ExtractOptions:
    """Everything ``featurestore extract`` takes (see its ``--help``)."""

    dataset: str
    encoder: str
    modality: str | None = None
    pooling: str | None = None
    batch_size: int = 64
    workers: int = 1
    device: str = "auto"
    dtype: str = "float32"
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    variant: str | None = None
    on_bad_item: str = "skip"
    max_text_tokens: int = 30
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    progress: bool = True
    cache_layer: int | str | None = None  # K, or "all" (extract.layers)
    cache_dtype: str = "float16"
    precision: str | None = None  # --dtype: the forward pass's dtype (None: fp32 on a CPU, autocast on a GPU)
    prompt: str | None = None

    def command(self, root: Path | None = None) -> str:
        """The command line that reproduces this job (stored in the provenance)."""
        words = [extract_command(self.dataset, self.encoder, modality=self.modality, variant=self.variant,
                                 root=root)]
        for flag, value in (("--pooling", self.pooling), ("--weights", self.weights),
                            ("--store-dtype", self.dtype if self.dtype != "float32" else None),
                            ("--dtype", self.precision), ("--prompt", shlex.quote(self.prompt) if self.prompt else None),
                            ("--max-text-tokens", self.max_text_tokens if self.max_text_tokens != 30 else None),
                            ("--cache-layer", self.cache_layer),
                            ("--cache-dtype", self.cache_dtype
                             if self.cache_layer is not None and self.cache_dtype != "float16" else None)):
            if value is not None:
                words.append(f"{flag} {value}")
        if self.random_init:
            words.append(f"--random-init --seed {self.seed}")
        return " ".join(words)


def encoder_options(attrs: dict) -> dict:
    """``create_encoder`` keyword arguments rebuilding the encoder a group's attributes record."""
    prov = attrs["provenance"]
    kind = prov["weights_kind"]
    return {"weights": prov["weights_location"] if kind in ("file", "hub") else None,
            "random_init": kind == "random-init", "seed": prov.get("weights_seed") or 0,
            "pooling": attrs["pooling"],
            "max_text_tokens": attrs["preprocessing"].get("max_tokens", 30),
            "prompt": attrs["preprocessing"].get("prompt")}


def states_command(group: FeatureGroup, cache_layer: int | str, variant: str) -> str:
    """The command caching ``cache_layer`` states with the encoder and settings of ``group``, into ``variant``.

    For refusals that name the fix: a group made without the states a run needs is
    re-extracted with its own weights, pooling and token limit, so the new group's
    vectors match the old one's. A group with no extraction provenance (imported)
    gets the plain command for its encoder.
    """
    parsed = parse_group_name(group.name)
    if "weights_kind" not in group.attrs.get("provenance", {}):
        return (extract_command(parsed.dataset, parsed.encoder, modality=parsed.modality, variant=variant)
                + f" --cache-layer {cache_layer}")
    return ExtractOptions(dataset=parsed.dataset, encoder=parsed.encoder, variant=variant, cache_layer=cache_layer,
                          dtype=group.attrs.get("dtype", "float32"), **encoder_options(group.attrs)).command()
