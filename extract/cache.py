"""Cached activations: per item, the hidden states that enter the top K encoder blocks.

Why: end-to-end training that fine-tunes only the top K blocks (PMMRec and MMSR tune
the top 2) recomputes at every step the part that never changes: decoding the image
or tokenising the text, then the frozen stem and bottom blocks. Those produce the
same states every epoch, so ``featurestore extract --cache-layer K`` stores them
once, beside the group's pooled embeddings, and ``recommend train --mode e2e
--cached --top-k K`` trains the top K blocks from them. It is the same function of
the same inputs as the naive path, so loss and gradients agree up to the stored
precision (float32 for an exact check, float16 by default to halve the disk).

Layout inside the group ``DATASET/MODALITY/ENCODER[@VARIANT]``:

- ``cache``: ``(N + 1, *state_shape)``, row = item id, chunked by the group's row
  chunks and uncompressed: every chunk file is the raw little-endian array, so a
  reader memory-maps it and gathers a batch of random items without decompressing
  whole chunks (activations barely compress anyway). Written with its chunk, before
  the chunk is marked done, so a resumed job never has rows without states.
- ``cache_tokens``: ``(N + 1,)`` int16, text and multimodal (ViLT's title + patches) only:
  the real token count of each item; its states are right-padded with zeros to ``max_tokens``.
- attributes: ``cache_layer`` (the K it was made for), ``cache_block`` (index of the
  first block fed from the cache), ``cache_shape``, ``cache_dtype``, ``cache_layout``.

``--cache-layer 0`` keeps the states LEAVING the last block instead (``cache_block``
= depth: nothing above is fed from them): the token / patch states before pooling
that token-level fusion (``recommend train --fusion merge-attn``) attends over. Same
arrays, chunks, resume and gather; only the cut moves to the top.

The state layout is the library's own between blocks: ``tokens x width`` for
Transformers (BERT, ViT, MAE, CLIP / SigLIP towers, ViLT), ``height x width x channels`` for Swin,
``channels x height x width`` for ResNet / EfficientNet stages;
:meth:`StateCache.sequence` turns each into ``tokens x width`` with a validity mask.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import zarr

from extract.encoder import Encoder, Hidden, move_inputs
from extract.options import encoder_options, states_command
from featurestore.errors import UserError
from featurestore.store import FeatureGroup, FeatureStore, NamingStore, group_extract_command, parse_group_name

if TYPE_CHECKING:
    from extract.job import Forward

CACHE_DTYPES = ("float16", "float32")
FINAL_LAYER = 0  # --cache-layer 0: the states leaving the last block, before pooling
LAYOUTS = {"bert": "tokens,width", "roberta": "tokens,width", "vit": "tokens,width", "mae": "tokens,width",
           "clip": "tokens,width", "siglip": "tokens,width", "vilt": "tokens,width",
           "swin": "height,width,channels", "resnet": "channels,height,width",
           "efficientnet": "channels,height,width",
           # library names (extract.hf, extract.timm_any): families named by their derived split
           "hf-text": "tokens,width", "timm-tokens": "tokens,width", "timm-nchw": "channels,height,width",
           "timm-nhwc": "height,width,channels"}
# cache layout -> (states (B, *shape) -> tokens (B, T, width), axis of the width in the per-item shape)
SEQUENCES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "tokens,width": (lambda s: s, -1),
    "height,width,channels": (lambda s: s.flatten(1, 2), -1),
    "channels,height,width": (lambda s: s.flatten(2).transpose(1, 2), 0),
}


@dataclass(frozen=True)
class CachePlan:
    """What to cache for one encoder: the input of its top ``top_k`` blocks (0: the last block's output)."""

    top_k: int
    first_block: int
    shape: tuple[int, ...]
    dtype: str
    layout: str
    counted: bool  # per-item token counts (text, ViLT): states vary in length

    def attrs(self) -> dict:
        """The group attributes recording which layer was cached (part of the job's signature)."""
        return {"cache_layer": self.top_k, "cache_block": self.first_block, "cache_shape": list(self.shape),
                "cache_dtype": self.dtype, "cache_layout": self.layout}


def check_top_k(encoder_name: str, depth: int, top_k: int, flag: str, also: str = "") -> None:
    """Refuse a K the encoder cannot have: at least 1, at most its number of blocks (``also``: other choices)."""
    if not 1 <= top_k <= depth:
        raise UserError(f"{flag} {top_k}: encoder {encoder_name} has {depth} blocks; choose 1..{depth} "
                        f"(K counts blocks from the top){also}")


def plan_cache(encoder: Encoder, top_k: int, dtype: str = "float16") -> CachePlan:
    """Where the cache cuts ``encoder`` and the per-item state shape there.

    Shapes come from one dry run on the preprocessor's blank probe; states of varying
    length (text, ViLT: :class:`extract.encoder.TokenStates`) are padded to their
    ``max_tokens``. ``top_k = 0`` cuts after the last block.
    """
    if top_k != FINAL_LAYER:
        check_top_k(encoder.name, encoder.depth, top_k, "--cache-layer",
                    f", or {FINAL_LAYER} for the states leaving the last block (--fusion merge-attn)")
    if dtype not in CACHE_DTYPES:
        raise UserError(f"--cache-dtype {dtype}: choose one of {', '.join(CACHE_DTYPES)}")
    first = encoder.depth - top_k
    device = next(encoder.model.parameters()).device
    with torch.inference_mode():
        states = encoder.run_blocks(encoder.stem(move_inputs(encoder.preprocessor.probe(), device)), 0, first).states
    shape = tuple(states.shape[1:])
    if encoder.tokens is not None:
        shape = (encoder.tokens.max_tokens, *shape[1:])
    return CachePlan(top_k, first, shape, dtype, LAYOUTS.get(encoder.config.family, "library"),
                     encoder.tokens is not None)


def _zarr_group(group: FeatureGroup) -> zarr.Group:
    return zarr.open_group(NamingStore(group.store.path), path=group.name, mode="r+")


def ensure_cache_arrays(group: FeatureGroup) -> None:
    """Add the ``cache`` (and, for text and multimodal, ``cache_tokens``) arrays a group's attributes call for.

    A no-op for a group extracted without ``--cache-layer``, and for one that has them.
    """
    if group.attrs.get("cache_layer") is None:
        return
    zgroup = _zarr_group(group)
    shape = tuple(group.attrs["cache_shape"])
    if "cache" not in zgroup:
        zgroup.create_array("cache", shape=(group.rows, *shape), chunks=(group.chunk_rows, *shape),
                            dtype=group.attrs["cache_dtype"], compressors=None, filters=None, fill_value=0)
    counted = group.attrs.get("modality") != "image" and group.attrs["cache_layout"] != "layers"
    if counted and "cache_tokens" not in zgroup:
        zgroup.create_array("cache_tokens", shape=(group.rows,), chunks=(group.chunk_rows,), dtype="int16",
                            fill_value=0)


class CachingForward:
    """The job's batched inference, also keeping what enters the top K blocks.

    Wraps the job's :class:`extract.job.Forward` (same device, autocast and output
    dtype): one pass computes the bottom once, keeps its states, and finishes the
    top and pooling for the embeddings, so caching costs no second forward.
    """

    def __init__(self, forward: "Forward", plan: CachePlan) -> None:
        self.encoder = forward.encoder
        self.device = forward.device
        self.amp = forward.amp
        self.dtype = forward.dtype
        self.plan = plan
        self.last: tuple[np.ndarray, np.ndarray | None] | None = None

    def __call__(self, inputs: Any) -> np.ndarray:
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            hidden = self.encoder.run_blocks(self.encoder.stem(move_inputs(inputs, self.device)),
                                             0, self.plan.first_block)
            out = self.encoder.pool(self.encoder.run_blocks(hidden, self.plan.first_block))
        self.last = _to_rows(hidden, self.plan)
        return out.float().cpu().numpy().astype(self.dtype)

    def chunk(self, start: int, stop: int) -> "StateChunk":
        return StateChunk(self, start, stop)


def _to_rows(hidden: Hidden, plan: CachePlan) -> tuple[np.ndarray, np.ndarray | None]:
    """(states in the stored dtype, padded to the cached shape; token counts where they vary).

    Such rows keep only the item's real tokens (the stem put them first): the states the batch computed at its
    padding positions depend on which items shared the batch, so they are stored as
    zeros like the rest of the padding (readers mask them anyway).
    """
    states = hidden.states.float().cpu().numpy()
    if not plan.counted:
        return states.astype(plan.dtype), None
    mask = hidden.token_mask.cpu().numpy().astype(bool)
    rows = np.zeros((len(states), *plan.shape), dtype=plan.dtype)
    rows[:, : states.shape[1]] = np.where(mask[..., None], states, 0.0)
    return rows, mask.sum(1).astype(np.int16)


class StateChunk:
    """The cached states of one row chunk, filled batch by batch, written with the chunk."""

    def __init__(self, forward: CachingForward, start: int, stop: int) -> None:
        self.forward = forward
        self.start, self.stop = start, stop
        plan = forward.plan
        self.states = np.zeros((stop - start, *plan.shape), dtype=plan.dtype)
        self.tokens = np.zeros(stop - start, dtype=np.int16) if plan.counted else None

    def put(self, ids: list[int]) -> None:
        """Keep the states of the last forward pass, whose rows are items ``ids``."""
        states, tokens = self.forward.last
        if not np.isfinite(states).all():
            raise UserError(f"cached states of items {ids[:5]}... overflow {self.forward.plan.dtype}; "
                            "extract with --cache-dtype float32")
        rows = np.asarray(ids) - self.start
        self.states[rows] = states
        if self.tokens is not None:
            self.tokens[rows] = tokens

    def write(self, group: FeatureGroup) -> None:
        zgroup = _zarr_group(group)
        zgroup["cache"][self.start : self.stop] = self.states
        if self.tokens is not None:
            zgroup["cache_tokens"][self.start : self.stop] = self.tokens


class StateCache:
    """Reads the cached states of a complete group, for training the top K blocks.

    Every chunk file of the uncompressed ``cache`` array is memory-mapped; a batch
    gathers its rows from the maps (the OS pages in only what is read).

    Attributes:
        group: the group name.
        attrs: the group's attributes (provenance of the encoder that made the states).
        present: bool (N + 1,), false where the item had no readable content.
    """

    def __init__(self, group: FeatureGroup) -> None:
        self.group = group.name
        self.attrs = dict(group.attrs)
        self.fingerprint = group.fingerprint
        self.present = np.asarray(group.present(), dtype=bool).copy()
        self.present[0] = False
        zgroup = _zarr_group(group)
        array = zgroup["cache"]
        self.rows = int(array.shape[0])
        self.shape = tuple(int(s) for s in array.shape[1:])
        self.chunk_rows = int(array.chunks[0])
        self.dtype = np.dtype(str(array.dtype)).newbyteorder("<")
        self._folder = Path(group.path) / "cache"
        self._keys = [array.metadata.encode_chunk_key((c,) + (0,) * len(self.shape))
                      for c in range(-(-self.rows // self.chunk_rows))]
        self._maps: dict[int, np.ndarray | None] = {}
        self.tokens = (np.asarray(zgroup["cache_tokens"][:], dtype=np.int64)
                       if "cache_tokens" in zgroup else None)

    @property
    def top_k(self) -> int:
        return int(self.attrs["cache_layer"])

    def _map(self, chunk: int) -> np.ndarray | None:
        if chunk not in self._maps:
            path = self._folder / self._keys[chunk]
            # zarr leaves a chunk that is all fill value (no item had content) unwritten
            self._maps[chunk] = (np.memmap(path, dtype=self.dtype, mode="r",
                                           shape=(self.chunk_rows, *self.shape)) if path.exists() else None)
        return self._maps[chunk]

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 states ``(len(ids), *shape)`` and, where they vary, token counts, in ``ids`` order."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), *self.shape), dtype=np.float32)
        chunks = ids // self.chunk_rows
        for chunk in np.unique(chunks):
            where = np.flatnonzero(chunks == chunk)
            mapped = self._map(int(chunk))
            if mapped is not None:
                out[where] = mapped[ids[where] - chunk * self.chunk_rows]
        return out, (self.tokens[ids] if self.tokens is not None else None)

    @property
    def token_width(self) -> int:
        """Width of one token / patch state (the channels of a feature map)."""
        return self.shape[self._sequence_of()[1]]

    def _sequence_of(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
        layout = self.attrs.get("cache_layout")
        if layout not in SEQUENCES:
            raise UserError(f"store group {self.group} caches states in layout {layout!r}, which has no token "
                            f"order here (known: {', '.join(SEQUENCES)}); use an encoder of the families "
                            f"{', '.join(LAYOUTS)}")
        return SEQUENCES[layout]

    def sequence(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``(len(ids), T, width)`` float32 and their validity mask ``(len(ids), T)`` bool.

        Every layout becomes a token sequence (feature maps: one token per position,
        row-major). Text is cut to the longest item among ``ids`` and its padding
        tokens are invalid, so an item's result never depends on the padding stored
        after its tokens nor on which other items share the batch. Absent items come
        back as zeros; masking them is the caller's (it knows ``present``).
        """
        states, tokens = self.gather(ids)
        to_tokens, _ = self._sequence_of()
        seq = to_tokens(torch.from_numpy(states))
        if tokens is None:
            return seq, torch.ones(seq.shape[:2], dtype=torch.bool)
        length = max(int(tokens.max(initial=0)), 1)
        return seq[:, :length], torch.arange(length)[None, :] < torch.from_numpy(tokens)[:, None]

    def encoder_options(self) -> dict:
        """``create_encoder`` keyword arguments rebuilding the encoder that made the states."""
        return encoder_options(self.attrs)

    def states_record(self) -> dict:
        """The state arrays a run reads, as its config.json keeps them beside the group's record."""
        return {"array": "cache", **{k: self.attrs.get(k) for k in ("cache_layer", "cache_block", "cache_shape",
                                                                    "cache_dtype", "cache_layout")},
                "token_counts": "cache_tokens" if self.tokens is not None else None}

    def record(self) -> dict:
        """What a run's config.json keeps about the cache: enough to find and check it."""
        keep = ("encoder", "modality", "variant", "pooling", "weights", "weights_sha256", "state_sha256",
                "cache_layer", "cache_block", "cache_shape", "cache_dtype", "cache_layout", "command")
        return {"group": self.group, "fingerprint": self.fingerprint, "kind": "cache",
                "missing": int((~self.present[1:]).sum()),
                "provenance": {k: self.attrs[k] for k in keep if k in self.attrs}}


def open_final_states(group: FeatureGroup) -> StateCache:
    """The states leaving the last block of ``group``'s encoder (``--cache-layer 0``).

    A group without them (extracted without ``--cache-layer`` or for another layer)
    is refused with the command that writes them: the group's own recorded setup
    (weights, pooling, tokens) re-run into a ``tokens`` variant beside it, since one
    group holds one cache.
    """
    cached = group.attrs.get("cache_layer")
    if cached == FINAL_LAYER:
        return StateCache(group)
    parsed = parse_group_name(group.name)
    variant = f"{parsed.variant}-tokens" if parsed.variant else "tokens"
    held = ("holds no cached states (extracted without --cache-layer)" if cached is None
            else f"caches {held_states(cached)}, not the last block's output")
    raise UserError(f"store group {group.name} {held}; --fusion merge-attn reads the token states leaving the "
                    f"last block: write them with `{states_command(group, FINAL_LAYER, variant)}` and train on "
                    f"--encoder {parsed.encoder}@{variant}")


def held_states(cached: int | str) -> str:
    """What a group's ``cache_layer`` attribute says it holds, for refusals."""
    if cached == FINAL_LAYER:
        return "the states leaving the last block (--cache-layer 0, for --fusion merge-attn)"
    if cached == "all":
        return "the pooled state of every layer (--cache-layer all, for --mode side)"
    return f"the input of the top {cached} blocks"


def open_state_cache(store_path: Path, group: str, top_k: int, fingerprint: str, n_items: int) -> StateCache:
    """Open the cached states of ``group`` for ``--top-k top_k``; refuse any mismatch with the fix."""
    fg = FeatureStore(store_path).open(group, complete=True)
    command = group_extract_command(fg.name)
    cached = fg.attrs.get("cache_layer")
    if cached != top_k:
        fix = f"`{states_command(fg, top_k, f'top{top_k}')}`"  # the group's own weights and settings
        if cached is None:
            raise UserError(f"store group {fg.name} holds no cached states (extracted without --cache-layer); "
                            f"write them with {fix} and train with "
                            f"--encoder {parse_group_name(fg.name).encoder}@top{top_k}")
        other_k = isinstance(cached, int) and cached != FINAL_LAYER
        raise UserError(f"store group {fg.name} caches {held_states(cached)}, but this run asks --top-k {top_k}; "
                        f"{f'train with --top-k {cached}, or ' if other_k else ''}extract another variant: {fix}")
    check_cache_matches(fg, fingerprint, n_items, f"{command} --cache-layer {top_k}")
    return StateCache(fg)


def check_cache_matches(fg: FeatureGroup, fingerprint: str, n_items: int, command: str) -> None:
    """Refuse a cache built for other items: another dataset fingerprint or row count.

    ``command`` is the extraction that rebuilds it, named in the error.
    """
    if fg.fingerprint != fingerprint:
        raise UserError(f"store group {fg.name} was built for dataset fingerprint {fg.fingerprint or 'unknown'}, "
                        f"but the prepared dataset has {fingerprint}; re-extract it "
                        f"(`featurestore rm {fg.name}`, then `{command}`)")
    if fg.rows != n_items + 1:
        raise UserError(f"store group {fg.name} has {fg.rows} rows, the dataset needs {n_items + 1}; "
                        f"re-extract it: `{command}`")


def restore_hidden(encoder: Encoder, states: torch.Tensor, tokens: torch.Tensor | None) -> Hidden:
    """The :class:`Hidden` the bottom blocks would hand to the top, rebuilt from cached states.

    Variable-length states are cut to the longest item of the batch (the naive path
    pads a batch the same way) and get back the token mask and the attention mask the
    stem builds (:class:`extract.encoder.TokenStates`).
    """
    if tokens is None:
        return Hidden(states)
    length = max(int(tokens.max()), 1)
    states = states[:, :length]
    mask = (torch.arange(length, device=states.device)[None, :] < tokens[:, None]).long()
    return encoder.tokens.hidden(states, mask)
