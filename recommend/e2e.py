"""End-to-end item towers: the encoder runs live and its top K blocks train with the recommender.

Paper 001 (E2E) fine-tunes the item encoder jointly with the recommender; PMMRec and
MMSR tune only its top 2 blocks. ``--mode e2e --top-k K`` does that: the stem and
blocks ``[0, depth - K)`` are frozen, run under ``torch.no_grad`` and stay in eval
mode (no dropout, BatchNorm statistics untouched); blocks ``[depth - K, depth)`` and
the pooling head train, followed by the DT layer ``Linear(width -> d)``. The frozen
part is the BOTTOM: one public implementation flipped the comparison and trained the
bottom blocks instead; ``tests/test_e2e.py`` checks which parameters get gradients.

One tower, two inputs:

- naive (the papers): each step decodes the pictures / tokenises the titles of its
  distinct items with the encoder's own preprocessing (a few threads), then runs the
  stem and the frozen bottom, then the top with gradients;
- cached (``--cached``): the states entering the top K blocks come from the store
  (``featurestore extract --cache-layer K``, see :mod:`extract.cache`), so decoding
  and the bottom are skipped. Same function of the same inputs: same loss, same
  gradients, up to the stored precision.

Items without content (no image, empty text) get ``missing``, a learned vector in
the encoder's output space, as the TS towers do.

A checkpoint holds only what training changes (top blocks, head, DT layer, ...); the
frozen part is rebuilt from the registry and the recorded weights source, and its
``state_sha256`` must match the one recorded at training time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from data.dataset import Item, PreparedDataset
from extract.cache import StateCache, check_top_k, open_state_cache, restore_hidden
from extract.layers import states_variant
from extract.encoder import BadItem, Encoder, Hidden, move_inputs
from extract.registry import (EncoderConfig, config_missing, create_encoder, encoder_group, get_encoder_config,
                              resolve_weights, weights_location)
from featurestore.errors import UserError
from featurestore.workspace import Workspace
from recommend.features import retarget_group
from recommend.inputs import TowerKind
from recommend.item_towers import ITEM_TOWERS, ContentOptions, ItemTower, content_spec, dt_layer
from recommend.options import SEED_MAX, TrainOptions, fill, option

LIVE_MODES = ("e2e", "adapter")  # the modes of this family (recommend.adapters registers the second)
DEFAULT_TOP_K = 2  # PMMRec / MMSR tune the top 2 blocks
ENCODER_LR_FACTOR = 0.1  # default --encoder-lr = --lr / 10 (equal rates can collapse, 001 Fig. 5)
ITEM_BATCH = 256  # items per encoder call when listing the catalogue
LOADER_THREADS = min(4, os.cpu_count() or 1)


@dataclass
class LiveInput:
    """What a live-encoder tower reads: the dataset's items (naive) or cached states."""

    dataset: str
    fingerprint: str
    items: list[Item] | None = None
    cache: StateCache | None = None

    def record(self) -> dict:
        """The run config's record of this input (a store group only when cached)."""
        if self.cache is not None:
            return self.cache.record()
        return {"content": "raw items", "dataset": self.dataset, "fingerprint": self.fingerprint}


class LiveEncoderTower(ItemTower):
    """Item ids -> encoder (frozen bottom, tuned top) -> pooled vector -> DT layer.

    Args:
        encoder: a registry encoder (stem / blocks / pool).
        live: the items to preprocess, or the cache of states entering ``first_block``.
        first_block: blocks before it are frozen and run without gradients.
        tune_top: train blocks ``[first_block:]`` and the pooling head (e2e); False
            leaves every encoder weight frozen (adapter mode adds its own modules).
        grad_checkpointing: recompute the top blocks' activations in backward.
        amp: run the encoder under bfloat16 autocast.
        item_batch: items per encoder call when listing the whole catalogue.
    """

    def __init__(self, encoder: Encoder, live: LiveInput, n_items: int, dim: int, *, first_block: int,
                 tune_top: bool, grad_checkpointing: bool = False, amp: bool = False,
                 item_batch: int = ITEM_BATCH) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, dim
        self.encoder = encoder
        self.live = live
        self.first_block = first_block
        self.tune_top = tune_top
        self.grad_checkpointing = grad_checkpointing
        self.amp = amp
        self.item_batch = item_batch
        self.missing = nn.Parameter(torch.zeros(encoder.width))
        self.project = dt_layer(encoder.width, dim)
        nn.init.xavier_normal_(self.project[0].weight)
        nn.init.zeros_(self.project[0].bias)
        encoder.requires_grad_(False)
        self._tuned = tuple([*encoder.blocks[first_block:], encoder.pool] if tune_top else [])
        for module in self._tuned:
            module.requires_grad_(True)
        self._frozen_keys = frozen_state_keys(encoder, self._tuned)
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_fill_frozen)
        self._threads: ThreadPoolExecutor | None = None
        self.train()

    def cost_parts(self) -> dict:
        return {"item_encoder": self.encoder}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_threads": None}  # a thread pool does not copy or pickle

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """The pretrained encoder weights being fine-tuned (they get ``--encoder-lr``)."""
        for module in self._tuned:
            yield from module.parameters()

    def identity(self) -> dict:
        return {"state_sha256": self.encoder.provenance["state_sha256"]}

    def train(self, mode: bool = True) -> "LiveEncoderTower":
        super().train(mode)
        self.encoder.stem.eval()
        for block in self.encoder.blocks[: self.first_block]:
            block.eval()
        if not self.tune_top:
            self.encoder.pool.eval()
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        vectors = self.project(self.content(unique))
        return vectors[inverse].reshape(*ids.shape, self.dim)

    def content(self, ids: torch.Tensor) -> torch.Tensor:
        """``(P, width)`` pooled encoder output for distinct item ids (``missing`` where no content).

        Without gradients (listing the catalogue, also through a wrapper such as
        ``--with-id``) the encoder sees at most ``item_batch`` items at a time.
        """
        if not torch.is_grad_enabled() and len(ids) > self.item_batch:
            return torch.cat([self.content(part) for part in ids.split(self.item_batch)])
        present, hidden = self._bottom(ids.cpu().numpy())
        present = torch.from_numpy(present).to(self.missing.device)
        out = torch.zeros(len(ids), self.encoder.width, device=self.missing.device)
        if hidden is not None:
            out = out.index_copy(0, present.nonzero().squeeze(1), self._top(hidden))
        return torch.where(present.unsqueeze(1), out, self.missing)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        device = self.missing.device
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--amp runs the encoder in bfloat16, which this GPU lacks; drop --amp")
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _bottom(self, ids: np.ndarray) -> tuple[np.ndarray, Hidden | None]:
        """(which ids have content, the states entering ``first_block`` for those)."""
        device = self.missing.device
        if self.live.cache is not None:
            present = self.live.cache.present[ids]
            if not present.any():
                return present, None
            states, tokens = self.live.cache.gather(ids[present])
            return present, restore_hidden(self.encoder, torch.from_numpy(states).to(device),
                                           None if tokens is None else torch.from_numpy(tokens).to(device))
        samples = self._load(ids)
        present = np.array([s is not None for s in samples], dtype=bool)
        if not present.any():
            return present, None
        inputs = self.encoder.preprocessor.collate([s for s in samples if s is not None])
        with torch.no_grad(), self._autocast():
            hidden = self.encoder.stem(move_inputs(inputs, device))
            return present, self.encoder.run_blocks(hidden, 0, self.first_block)

    def _load(self, ids: np.ndarray) -> list[Any]:
        """Preprocessed samples (None for padding and unreadable items), decoded in threads."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(LOADER_THREADS, thread_name_prefix="e2e-load")
        return list(self._threads.map(self._load_one, ids.tolist()))

    def _load_one(self, item_id: int) -> Any:
        if item_id <= 0:
            return None
        try:
            return self.encoder.preprocessor.load(self.live.items[item_id - 1])
        except BadItem:
            return None

    def _top(self, hidden: Hidden) -> torch.Tensor:
        """Blocks ``[first_block:]`` and the pooling head; gradients only where something trains."""
        top = [*self.encoder.blocks[self.first_block:], self.encoder.pool]
        trains = torch.is_grad_enabled() and any(p.requires_grad for m in top for p in m.parameters())
        with torch.set_grad_enabled(trains), self._autocast():
            for block in self.encoder.blocks[self.first_block:]:
                if trains and self.grad_checkpointing and self.training:
                    hidden = checkpoint(block, hidden, use_reentrant=False)
                else:
                    hidden = block(hidden)
            return self.encoder.pool(hidden).float()


def frozen_state_keys(encoder: Encoder, tuned: Sequence[nn.Module]) -> frozenset[str]:
    """State-dict keys (relative to the tower) of every encoder tensor outside ``tuned``."""
    keep = {id(t) for m in tuned for t in itertools.chain(m.parameters(), m.buffers())}
    return frozenset(f"encoder.{k}" for k, t in encoder.state_dict(keep_vars=True).items() if id(t) not in keep)


def _drop_frozen(module: LiveEncoderTower, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in module._frozen_keys:
        state_dict.pop(prefix + key, None)


def _fill_frozen(module: LiveEncoderTower, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                 missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Loading a checkpoint: the frozen tensors are the ones rebuilt from the registry."""
    for key, tensor in module.encoder.state_dict().items():
        full = f"{prefix}encoder.{key}"
        if f"encoder.{key}" in module._frozen_keys and full not in state_dict:
            state_dict[full] = tensor


def live_towers(model: nn.Module) -> list[LiveEncoderTower]:
    return [m for m in model.modules() if isinstance(m, LiveEncoderTower)]


# --- building: registry entry, options, run folders ----------------------------------


def _live_input(spec: dict, sources: Sequence[Any]) -> LiveInput:
    if len(sources) != 1 or not isinstance(sources[0], LiveInput):
        raise UserError(f"--mode {spec['name']} runs the encoder itself: name it with --encoder ENC "
                        "(not --features)")
    return sources[0]


def build_live_encoder(spec: dict, live: LiveInput) -> Encoder:
    """The encoder a live tower runs: the run's weights, or those the cache was made with.

    Refuses weights that differ from the ones recorded at training time (``state_sha256``).
    """
    if live.cache is not None:
        encoder = create_encoder(spec["encoder"], **live.cache.encoder_options())
        if encoder.provenance["state_sha256"] != live.cache.attrs.get("state_sha256"):
            raise UserError(f"the weights of {spec['encoder']} ({encoder.provenance['weights']}) are not the ones "
                            f"store group {live.cache.group} was extracted with; re-extract it")
    else:
        encoder = create_encoder(spec["encoder"], weights=spec.get("weights"),
                                 random_init=spec.get("random_init", False), seed=spec.get("encoder_seed", 0),
                                 pooling=spec.get("pooling"), max_text_tokens=spec.get("max_text_tokens", 30))
    expected = spec.get("state_sha256")
    if expected and encoder.provenance["state_sha256"] != expected:
        raise UserError(f"the frozen weights of {spec['encoder']} ({encoder.provenance['weights']}) differ from "
                        "the ones this run was trained with (state sha256 mismatch); restore those weights "
                        "or retrain the run")
    return encoder


def live_encoder_config(name: str, opts: Any) -> EncoderConfig | None:
    """The live encoder's config, read with ``--weights`` (a model folder stands in for an uncached hub
    repository, as in extraction).

    None for a ``--cached`` run of a library name whose config cannot be read here and no ``--weights``
    (an ``hf:`` model extracted from a folder, offline): the tower is built from the weights location its
    store group records (:func:`build_live_encoder`), and ``--top-k`` is checked on that encoder.
    """
    try:
        return get_encoder_config(name, weights=opts.weights)
    except UserError:
        if opts.cached and not opts.weights and config_missing(name):
            return None
        raise


def study_weights(study: Any) -> dict:
    """A study row's encoder weights: the study's ``--random-init`` or ``--weights`` (unset: not hashed into
    the run name, so rows of studies without ``--weights`` keep their names)."""
    return {"random_init": study.random_init, **({"weights": study.weights} if study.weights else {})}


def tower_options(spec: dict) -> dict:
    return {"grad_checkpointing": bool(spec.get("grad_checkpointing")), "amp": bool(spec.get("amp")),
            "item_batch": int(spec.get("item_batch", ITEM_BATCH))}


LIVE = f"belongs to the live-encoder modes (--mode {' or '.join(LIVE_MODES)})"


@dataclass(frozen=True)
class LiveOptions(ContentOptions):
    """The live-encoder modes' options: how the encoder is built and run, and each mode's own
    (``e2e`` refuses the adapter's and ``adapter`` the e2e ones, each with why)."""

    top_k: int | None = option(flag="--top-k", min=1, purpose=LIVE,
                               help="e2e: fine-tune the top K encoder blocks (Transformer blocks, or "
                                    "ResNet/EfficientNet stages) and the pooling head; everything below stays "
                                    "frozen and runs without gradients [default: 2, as PMMRec/MMSR].")
    encoder_lr: float | None = option(flag="--encoder-lr", min=0.0, min_open=True, purpose=LIVE,
                                      help="e2e: AdamW learning rate of the fine-tuned encoder weights, a separate "
                                           "parameter group (equal rates can collapse training, 001 Fig. 5); new "
                                           "modules (DT layer, adapters, user encoder) use --lr [default: --lr / 10].")
    cached: bool = option(False, flag="--cached", is_flag=True, purpose=LIVE,
                          help="e2e: train the top K blocks from the states cached by `featurestore extract "
                               "--cache-layer K` (store group DATASET/MODALITY/ENC[@VARIANT]), skipping decoding "
                               "and the frozen bottom; same loss and gradients as the naive path.")
    grad_checkpointing: bool = option(False, flag="--grad-checkpointing", is_flag=True, purpose=LIVE,
                                      help="e2e/adapter: recompute the trained blocks' activations during backward "
                                           "(less memory, about one more forward pass of those blocks).")
    amp: bool = option(False, flag="--amp", is_flag=True, purpose=LIVE,
                       help="e2e/adapter: run the encoder under bfloat16 autocast (CPU, or GPUs with bf16).")
    adapter_dim: int | None = option(flag="--adapter-dim", min=1, purpose=LIVE,
                                     help="adapter: bottleneck width k of each Houlsby adapter [default: 64].")
    adapter_in: str | None = option(flag="--adapter-in", choices=("item", "user", "both"), purpose=LIVE,
                                    help="adapter: put adapters into the item encoder, the user encoder (sasrec) "
                                         "or both; the adapted encoders are frozen [default: both, as paper 004].")
    weights: str | None = option(flag="--weights", metavar="PATH_OR_HUB_ID", purpose=LIVE,
                                 help="e2e/adapter: encoder weights file/folder or hub id [default: the weights "
                                      "bundled with the encoder, if any; with --cached: the store group's].")
    random_init: bool = option(False, flag="--random-init", is_flag=True, purpose=LIVE,
                               help="e2e/adapter: start from an untrained, seeded encoder (tests, ablations); paper "
                                    "encoders have no local weights and are refused without this or --weights.")
    encoder_seed: int = option(0, flag="--encoder-seed", min=0, max=SEED_MAX, show_default=True, purpose=LIVE,
                               help="Seed of --random-init (the same as `featurestore extract --seed`).")
    pooling: str | None = option(flag="--pooling", choices=("cls", "mean", "pooled"), purpose=LIVE,
                                 help="e2e/adapter: pooling of the live encoder [default: the encoder's own; with "
                                      "--cached: the store group's].")


E2E_ONLY = ("top_k", "encoder_lr", "cached")
ADAPTER_ONLY = ("adapter_dim", "adapter_in")  # read by recommend.adapters
FLAGS = {f.name: f.metadata["flag"] for f in fields(LiveOptions)}


def option_given(value: Any) -> bool:
    return value is not None and value is not False


def refuse_given(opts: TrainOptions, names: Sequence[str], why: str) -> None:
    """Refuse the first of ``names`` given in ``opts``: ``"FLAG WHY"``."""
    for name in names:
        if option_given(getattr(opts, name)):
            raise UserError(f"{FLAGS[name]} {why}")


class LiveKind(TowerKind):
    """The live-encoder modes: one encoder named by ``--encoder``, run by the tower itself over
    the dataset's decoded items, or (e2e ``--cached``) over the states cached below its top."""

    options = LiveOptions
    runs_encoder_live = True
    transfer_settings = ("name", "encoder", "pooling", "max_text_tokens", "state_sha256")

    def check(self, opts: TrainOptions) -> TrainOptions:
        """Refuse what a live encoder cannot take; fill the mode's defaults (:meth:`check_mode`)."""
        if len(opts.encoders) != 1 or opts.features:
            raise UserError(f"--mode {opts.mode} runs one encoder itself: name it with --encoder ENC "
                            "(e.g. --encoder minilm-l6); --features and two encoders are for ts/ts-dnn")
        if opts.whiten or opts.fusion:
            raise UserError(f"--whiten and --fusion transform stored vectors; --mode {opts.mode} has none")
        name, _, variant = opts.encoders[0].partition("@")
        config = live_encoder_config(name, opts)
        if variant and not opts.cached:
            raise UserError(f"--encoder {opts.encoders[0]}: a @VARIANT names a store group, read only with "
                            "--cached; for the naive path pass the variant's weights with --weights")
        if not opts.cached:
            resolve_weights(config, opts.weights, opts.random_init, opts.encoder_seed)  # refuses missing weights now
        return self.check_mode(opts, config)

    def check_mode(self, opts: TrainOptions, config: Any) -> TrainOptions:
        raise NotImplementedError

    def spec(self, opts: TrainOptions, dataset: str) -> dict:
        name = opts.encoders[0].partition("@")[0]
        return {**content_spec(opts), "encoder": name, "weights": opts.weights, "random_init": opts.random_init,
                "encoder_seed": opts.encoder_seed, "pooling": opts.pooling, "max_text_tokens": 30,
                "grad_checkpointing": opts.grad_checkpointing, "amp": opts.amp, "item_batch": ITEM_BATCH,
                **self.mode_spec(opts, dataset)}

    def mode_spec(self, opts: TrainOptions, dataset: str) -> dict:
        raise NotImplementedError

    def encoder_lr(self, opts: TrainOptions) -> float | None:
        return opts.encoder_lr

    def study_rows(self, mode: str, study: Any) -> list[tuple[str, dict]]:
        return [(mode, {"encoders": [study.encoder], **study_weights(study)})]

    def open(self, ws: Workspace, opts: Any, dataset: PreparedDataset) -> list[LiveInput]:
        return open_live_inputs(ws, opts, dataset)

    def reopen(self, ws: Workspace, config: dict) -> list[LiveInput]:
        return reopen_live_inputs(ws, config)

    def retarget(self, config: dict, dataset: PreparedDataset) -> dict:
        moved = super().retarget(config, dataset)
        tower = moved["model"]["item_tower"]
        if tower.get("group"):
            moved["model"]["item_tower"] = {**tower, "group": retarget_group(tower["group"], dataset.name)}
        return moved

    def describe(self, config: dict, model: nn.Module) -> None:
        live_config(config, model)

    def dt_layer_keys(self, tower: dict) -> dict[str, str]:
        """The DT layer over the live encoder's pooled output: a TS run over the same encoder and
        pooling read the same vectors, so its DT layer is where this one starts (``--init-from``)."""
        return {"weight": "project.0.weight", "bias": "project.0.bias", "missing": "missing"}


class E2EKind(LiveKind):
    """``e2e``: the top K blocks and the pooling head fine-tune; the bottom stays frozen."""

    summary = "the encoder runs live, its top K blocks fine-tuned with the recommender"

    def __call__(self, spec: dict, sources: Sequence[Any], fit: bool) -> ItemTower:
        live = _live_input(spec, sources)
        encoder = build_live_encoder(spec, live)
        top_k = int(spec["top_k"])
        check_top_k(encoder.name, encoder.depth, top_k, "--top-k")
        return LiveEncoderTower(encoder, live, spec["n_items"], spec["dim"], first_block=encoder.depth - top_k,
                                tune_top=True, **tower_options(spec))

    transfer_settings = LiveKind.transfer_settings + ("top_k",)

    def check_mode(self, opts: TrainOptions, config: Any) -> TrainOptions:
        refuse_given(opts, ADAPTER_ONLY, "is for --mode adapter, not e2e")
        opts = fill(opts, top_k=DEFAULT_TOP_K, encoder_lr=opts.lr * ENCODER_LR_FACTOR)
        if config is not None:  # else checked on the encoder built from the store group's weights
            check_top_k(config.name, config.depth, opts.top_k, "--top-k")
        if not opts.encoder_lr > 0:
            raise UserError(f"--encoder-lr must be > 0, got {opts.encoder_lr}")
        return opts

    def mode_spec(self, opts: TrainOptions, dataset: str) -> dict:
        return {"top_k": opts.top_k, "cached": opts.cached,
                "group": cache_group(dataset, opts.encoders[0]) if opts.cached else None}

    def study_extraction(self, study: Any) -> tuple[int, str] | None:
        if not study.cached:
            return None
        return study.top_k, f"states entering the top {study.top_k} blocks of {study.encoder}, for cached e2e"

    def study_rows(self, mode: str, study: Any) -> list[tuple[str, dict]]:
        encoder = f"{study.encoder}@{states_variant(study.top_k)}" if study.cached else study.encoder
        return [(f"{mode}-top{study.top_k}", {"encoders": [encoder], "top_k": study.top_k, "cached": study.cached,
                                               **study_weights(study)})]


ITEM_TOWERS.register("e2e")(E2EKind())


def cache_group(dataset: str, encoder: str) -> str:
    """The store group ``--cached --encoder ENC[@VARIANT]`` reads."""
    return encoder_group(dataset, encoder)


def _check_cache_weights(opts: Any, cache: StateCache) -> None:
    """``--weights`` / ``--random-init`` with ``--cached`` must name what the cache was made with."""
    kind = cache.attrs["provenance"]["weights_kind"]
    if opts.random_init and kind != "random-init":
        raise UserError(f"--random-init, but store group {cache.group} was extracted with "
                        f"{cache.attrs.get('weights')}; --cached uses the group's weights: drop --random-init")
    if opts.weights and cache.attrs["provenance"].get("weights_location") not in (weights_location(opts.weights), None):
        raise UserError(f"--weights {opts.weights}, but store group {cache.group} was extracted with "
                        f"{cache.attrs.get('weights')}; --cached uses the group's weights: drop --weights")


def open_live_inputs(ws: Workspace, opts: Any, dataset: PreparedDataset) -> list[LiveInput]:
    """The trainer's sources for a live mode: the dataset's items, or the checked cache."""
    if getattr(opts, "cached", False):
        cache = open_state_cache(ws.store, cache_group(dataset.name, opts.encoders[0]), opts.top_k,
                                 dataset.fingerprint, dataset.n_items)
        _check_cache_weights(opts, cache)
        return [LiveInput(dataset.name, dataset.fingerprint, cache=cache)]
    return [LiveInput(dataset.name, dataset.fingerprint, items=dataset.items)]


def reopen_live_inputs(ws: Workspace, config: dict) -> list[LiveInput]:
    """``load_run``'s sources for a live run, checked against the recorded dataset fingerprint."""
    spec, wanted = config["model"]["item_tower"], config["dataset"]
    if spec.get("cached"):
        cache = open_state_cache(ws.store, spec["group"], int(spec["top_k"]), wanted["fingerprint"],
                                 config["model"]["n_items"])
        return [LiveInput(wanted["name"], wanted["fingerprint"], cache=cache)]
    dataset = PreparedDataset.load(ws.dataset_dir(wanted["name"]))
    if dataset.fingerprint != wanted["fingerprint"]:
        raise UserError(f"dataset {wanted['name']} has item fingerprint {dataset.fingerprint}, but the run was "
                        f"trained on {wanted['fingerprint']}; its encoder reads the items themselves, so "
                        "re-prepare the dataset it was trained on or retrain the run")
    return [LiveInput(wanted["name"], wanted["fingerprint"], items=dataset.items)]


def live_config(config: dict, model: nn.Module) -> None:
    """Record a live run's encoder in its config: label, provenance, weights identity, cache group."""
    towers = live_towers(model)
    if not towers:
        return
    tower = towers[0]
    prov = tower.encoder.provenance
    config["model"]["item_tower"]["state_sha256"] = prov["state_sha256"]
    config["encoder"] = tower.encoder.name
    config["item_encoder"] = {
        "encoder": tower.encoder.name, "depth": tower.encoder.depth, "width": tower.encoder.width,
        "first_tuned_block": tower.first_block if tower.tune_top else None,
        "input": "cached states" if tower.live.cache is not None else "raw items",
        **{k: prov.get(k) for k in ("pooling", "weights", "weights_sha256", "state_sha256", "preprocessing")},
    }
    config["features"] = [tower.live.cache.record()] if tower.live.cache is not None else []
