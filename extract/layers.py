"""Per-layer pooled states: ``featurestore extract --cache-layer all`` (IISAN's cache).

IISAN (Fu et al., SIGIR 2024) trains small side networks beside frozen encoders and
never runs the encoders during training: what the side networks read is, per item,
the pooled state after the stem and after every block, ``(depth + 1)`` vectors. They
are computed once here, in the same pass as the group's embeddings, and stored in the
group's ``cache`` array like the token caches of :mod:`extract.cache` (same chunks,
resume, lock, fingerprint and provenance; float16 by default, ``--cache-dtype float32``
on request).

Pooling is the encoder's own where it applies to any layer, and global average pooling
where the encoder's head only fits its last stage:

- text (BERT family): the encoder's pooling, ``cls`` or ``mean`` over real tokens;
- ViT / MAE: the class token (``cls``, and ``pooled`` where the model pools by its class
  token), or the mean of the patch tokens (``mean``); the final norm is left out, since
  it belongs to the last layer only;
- CLIP / SigLIP towers: the token their head reads where it is one token (CLIP's class
  token; the last real token of a title: CLIP's end-of-text, SigLIP's last position),
  else the mean of the patch tokens (SigLIP's attention-pooling head); ViLT: [CLS];
  final norms and projection heads left out, as for ViT;
- Swin, ResNet, EfficientNet: global average pooling of each stage's feature map.

Convolutional stages differ in width, so a row is the layers' pooled vectors one after
the other, ``cache_widths`` long each (attribute), ``(sum of widths,)`` in all; a
Transformer's is ``(depth + 1) x width`` flattened.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from extract.encoder import Encoder, Hidden, last_real_token, move_inputs
from featurestore.errors import UserError

if TYPE_CHECKING:
    from extract.job import Forward

ALL_LAYERS = "all"  # --cache-layer all


def states_variant(cache_layer: int | str) -> str:
    """The store variant holding the states a cached e2e run of top-K trains from (``layers``:
    every layer's pooled state, for side runs)."""
    return "layers" if cache_layer == ALL_LAYERS else f"top{cache_layer}"


def _tokens_pool(encoder: Encoder) -> Callable[[Hidden], torch.Tensor]:
    prefix = int(getattr(encoder.model, "num_prefix_tokens", 1))
    by_token = encoder.pooling == "cls" or (encoder.pooling == "pooled"
                                            and getattr(encoder.model, "global_pool", "token") == "token")
    if by_token:
        return lambda hidden: hidden.states[:, 0]
    return lambda hidden: hidden.states[:, prefix:].mean(1)


def _first_token(hidden: Hidden) -> torch.Tensor:
    return hidden.states[:, 0]


def _by_modality(text: Callable[[Hidden], torch.Tensor],
                 image: Callable[[Hidden], torch.Tensor]) -> Callable[[Encoder], Callable[[Hidden], torch.Tensor]]:
    return lambda encoder: text if encoder.config.modality == "text" else image


LAYER_POOLS: dict[str, Callable[[Encoder], Callable[[Hidden], torch.Tensor]]] = {
    "bert": lambda encoder: encoder.pool,
    "roberta": lambda encoder: encoder.pool,
    "vit": _tokens_pool,
    "mae": _tokens_pool,
    "swin": lambda encoder: lambda hidden: hidden.states.mean((1, 2)),
    "resnet": lambda encoder: lambda hidden: hidden.states.mean((2, 3)),
    "efficientnet": lambda encoder: lambda hidden: hidden.states.mean((2, 3)),
    "clip": _by_modality(last_real_token, _first_token),
    "siglip": _by_modality(last_real_token, lambda hidden: hidden.states.mean(1)),
    "vilt": lambda encoder: _first_token,
    "hf-text": lambda encoder: encoder.pool.layer_pool,  # the pooling without final norm or normalisation
    "timm-tokens": _tokens_pool,
    "timm-nchw": lambda encoder: lambda hidden: hidden.states.mean((2, 3)),
    "timm-nhwc": lambda encoder: lambda hidden: hidden.states.mean((1, 2)),
}


def layer_pool(encoder: Encoder) -> Callable[[Hidden], torch.Tensor]:
    """How one layer's states become one vector per item, for ``encoder``'s family."""
    family = encoder.config.family
    if family not in LAYER_POOLS:
        raise UserError(f"--cache-layer {ALL_LAYERS}: no per-layer pooling for encoder {encoder.name} "
                        f"({family}); known families: {', '.join(LAYER_POOLS)}")
    return LAYER_POOLS[family](encoder)


def pooled_layers(encoder: Encoder, inputs: Any) -> tuple[list[torch.Tensor], Hidden]:
    """Each layer's pooled state ``[(B, width_l)] * (depth + 1)`` (stem, then every block) and the last Hidden."""
    pool = layer_pool(encoder)
    hidden = encoder.stem(inputs)
    pooled = [pool(hidden)]
    for block in encoder.blocks:
        hidden = block(hidden)
        pooled.append(pool(hidden))
    return pooled, hidden


@dataclass(frozen=True)
class LayerPlan:
    """The per-layer cache of one encoder: widths of its ``depth + 1`` pooled states.

    Has the fields :class:`extract.cache.StateChunk` and ``ensure_cache_arrays`` read
    (``shape``, ``dtype``, ``counted``, ``attrs()``), so the chunks are written like a token cache's.
    """

    widths: tuple[int, ...]
    dtype: str
    counted: bool = False  # one row per item, no token counts

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(self.widths),)

    def attrs(self) -> dict:
        return {"cache_layer": ALL_LAYERS, "cache_block": 0, "cache_shape": list(self.shape),
                "cache_dtype": self.dtype, "cache_layout": "layers", "cache_widths": list(self.widths)}


def plan_layers(encoder: Encoder, dtype: str) -> LayerPlan:
    """Widths from one dry run on the preprocessor's blank probe (text: a one-token string)."""
    from extract.cache import CACHE_DTYPES

    if dtype not in CACHE_DTYPES:
        raise UserError(f"--cache-dtype {dtype}: choose one of {', '.join(CACHE_DTYPES)}")
    device = next(encoder.model.parameters()).device
    with torch.inference_mode():
        pooled, _ = pooled_layers(encoder, move_inputs(encoder.preprocessor.probe(), device))
    return LayerPlan(tuple(int(p.shape[-1]) for p in pooled), dtype)


class LayerForward:
    """The job's batched inference, also keeping every layer's pooled state (one pass, no second forward)."""

    def __init__(self, forward: "Forward", plan: LayerPlan) -> None:
        self.encoder = forward.encoder
        self.device = forward.device
        self.amp = forward.amp
        self.dtype = forward.dtype
        self.plan = plan
        self.last: tuple[np.ndarray, None] | None = None

    def __call__(self, inputs: Any) -> np.ndarray:
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            pooled, hidden = pooled_layers(self.encoder, move_inputs(inputs, self.device))
            out = self.encoder.pool(hidden)
        rows = torch.cat([p.float() for p in pooled], dim=1).cpu().numpy()
        self.last = (rows.astype(self.plan.dtype), None)
        return out.float().cpu().numpy().astype(self.dtype)

    def chunk(self, start: int, stop: int):
        from extract.cache import StateChunk

        return StateChunk(self, start, stop)


def open_layer_cache(store_path: Path, group: str, fingerprint: str, n_items: int) -> "LayerCache":
    """Open the per-layer states of ``group``; refuse a group without them, with another cache
    (another layer set), for another dataset fingerprint or row count, each with the fix."""
    from extract.cache import check_cache_matches, held_states
    from extract.options import states_command
    from featurestore.store import FeatureStore, group_extract_command, parse_group_name

    fg = FeatureStore(store_path).open(group, complete=True, extract_flags=f"--cache-layer {ALL_LAYERS}")
    cached = fg.attrs.get("cache_layer")
    if cached != ALL_LAYERS:
        parsed = parse_group_name(fg.name)
        held = ("holds no cached states (extracted without --cache-layer)" if cached is None
                else f"caches {held_states(cached)}")
        raise UserError(f"store group {fg.name} {held}, but --mode side reads the pooled state of every layer: "
                        f"write them with `{states_command(fg, ALL_LAYERS, 'layers')}` and train with "
                        f"--encoder {parsed.encoder}@layers")
    check_cache_matches(fg, fingerprint, n_items, f"{group_extract_command(fg.name)} --cache-layer {ALL_LAYERS}")
    return LayerCache(fg)


class LayerCache:
    """The per-layer states of one complete group, memory-mapped (an :class:`extract.cache.StateCache`)."""

    def __init__(self, group: Any) -> None:
        from extract.cache import StateCache

        self.states = StateCache(group)
        self.group = group.name
        self.attrs = self.states.attrs
        self.present = self.states.present
        self.widths = tuple(int(w) for w in self.attrs["cache_widths"])

    @property
    def modality(self) -> str:
        return self.attrs["modality"]

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 ``(len(ids), sum(widths))``: each item's layers one after the other."""
        return self.states.gather(ids)[0]

    def record(self) -> dict:
        return {**self.states.record(), "dim": sum(self.widths), "widths": list(self.widths)}
