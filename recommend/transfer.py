"""Cross-dataset transfer: start a run from another run's weights, or rank another dataset zero-shot.

NineRec (000) and PMMRec (002) pretrain a modality-based recommender on a large
source dataset and report, on a small target, training from scratch (NoPT) against
starting from the source's item tower and/or user encoder (HasPT), plus the source
model ranking the target without any training (zero-shot). Three entry points:

- :func:`init_from_run` (``recommend train --init-from SOURCE --transfer full|item|user``):
  the target model is first built exactly as a NoPT run (same seed, same initialiser),
  then the chosen parts are overwritten by the source checkpoint, so every parameter
  that is not transferred is what NoPT starts from. ``item`` = ``model.item_tower``
  (DT / TS-DNN layers, fusion, the learned "missing content" vector, the PCA whitening
  buffers, the tuned encoder blocks and adapters of e2e/adapter runs), ``user`` =
  ``model.user_encoder`` (with its adapters), ``full`` = both.
- :func:`warm_start` (``--mode e2e|adapter --init-from TS_RUN``): the DT layer (and the
  no-content vector) and the user encoder of a TS / TS-DNN run over the same encoder,
  weights and pooling start the live tower where that run ended, so E2E fine-tunes from
  TS instead of from scratch (issue 29); its encoder is the registry's, adapters stay fresh.
- :func:`zero_shot_model` (``eval rank --run SOURCE --dataset TARGET``): the source
  architecture rebuilt over the target's items and store groups, with the source's
  weights (or, ``untrained``, freshly initialised: the random baseline).

Only ID-free models transfer: a row of an ID table names one of the source's items,
which the target does not have (why NineRec's IDRec has no HasPT). Everything that shapes a
transferred tensor must match (width d, tower settings, the encoder, its variant and
weights, the backbone); each mismatch is refused with its reason. ``--transfer user``
only needs the backbone and d to match, so a user encoder may move to another item
tower or modality (PMMRec transfers its components alone and to single-modality targets).

SASRec's ``positions`` table has one row per position counted back from the newest
item (row 0 = the newest) and is sized by the dataset's ``max_seq_len``: the rows both
datasets have mean the same positions and are copied, the target's extra rows keep
their fresh initialisation; the run config records both counts.

e2e/adapter checkpoints hold only trained tensors (``recommend.e2e``): the frozen
encoder is rebuilt from the registry in both runs, so it is equal when the recorded
``state_sha256`` (the encoder weights) is, which is checked; the trained tensors are
copied like any other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load as load_safetensors

from data.dataset import PreparedDataset
from featurestore.errors import UserError
from featurestore.workspace import Workspace
from recommend.item_towers import ITEM_TOWERS
from featurestore.registry import Registry
from recommend.model import Recommender, build_recommender
from recommend.options import TrainOptions, option
from recommend.run import best_checkpoint, load_best_weights, read_config, resolve_run

ITEM, USER = "item_tower", "user_encoder"
DEFAULT_TRANSFER = "full"
# tensors sized by max_seq_len, row 0 = the newest item: the overlapping rows are copied
SEQUENCE_SIZED = ("user_encoder.positions.weight",)
USER_SETTINGS = ("name", "blocks", "heads")

TRANSFERS: Registry[tuple[str, ...]] = Registry("transfer")


@TRANSFERS.register("full")
def _full() -> tuple[str, ...]:
    """Item tower and user encoder: everything an ID-free model has."""
    return (ITEM, USER)


@TRANSFERS.register("item")
def _item() -> tuple[str, ...]:
    """The item tower only: how content becomes item vectors."""
    return (ITEM,)


@TRANSFERS.register("user")
def _user() -> tuple[str, ...]:
    """The user encoder only: how a sequence of item vectors becomes a user."""
    return (USER,)


def transfer_parts(kind: str) -> tuple[str, ...]:
    """Model attributes (``item_tower``, ``user_encoder``) a ``--transfer`` kind copies."""
    return TRANSFERS.create(kind)


def list_transfers() -> list[str]:
    return TRANSFERS.names()


def refuse_ids(tower: dict, who: str) -> None:
    """An ID table cannot move to another dataset: its rows are the source's items."""
    if tower.get("name") == "id" or tower.get("with_id"):
        raise UserError(f"{who} uses an item-ID table (--mode id or --with-id), whose rows are one dataset's "
                        "items; transfer needs an ID-free mode on both sides: ts, ts-dnn, e2e or adapter")


@dataclass(frozen=True)
class TransferOptions:
    init_from: str | None = option(
        flag="--init-from", metavar="SOURCE_RUN", purpose="starts from another run",
        help="Start from a run trained on another dataset (name under ROOT/runs or a folder): the --transfer "
             "parts are copied from its best checkpoint, the rest is freshly initialised. ID-free modes only "
             "(ts, ts-dnn, e2e, adapter); recorded in config.json. e2e/adapter from a ts or ts-dnn run over the "
             "same encoder, weights and pooling (a warm start): its DT layer and user encoder start where it "
             "ended.")
    transfer: str | None = option(
        flag="--transfer", choices=TRANSFERS, purpose="picks what --init-from copies",
        help="With --init-from: copy the item tower and user encoder (full), the item tower only (item) or "
             "the user encoder only (user) [default: full].")


class TransferFeature:
    """``--init-from`` / ``--transfer``: a training feature every run has (a plugin of recommend.plugins)."""

    options = TransferOptions

    def check(self, opts: TrainOptions) -> TrainOptions:
        """Only what the options alone decide; the source run is checked when the model exists
        (:func:`init_from_run`). Fills ``--transfer full``."""
        if opts.init_from is None:
            if opts.transfer is not None:
                raise UserError("--transfer picks what --init-from copies; give --init-from SOURCE_RUN too")
            return opts
        opts = opts.replace(transfer=opts.transfer or DEFAULT_TRANSFER)
        refuse_ids({"name": opts.mode, "with_id": opts.with_id}, f"the target run (--mode {opts.mode})")
        return opts


TRANSFER_FEATURE = TransferFeature()


@dataclass
class SourceRun:
    """A finished (or at least once validated) run to transfer from."""

    run_dir: Path
    config: dict
    state: dict[str, torch.Tensor]
    sha256: str

    @property
    def name(self) -> str:
        return self.run_dir.name

    def record(self) -> dict:
        dataset = self.config["dataset"]
        return {"source_run": self.name, "source_dir": str(self.run_dir.resolve()),
                "source_dataset": dataset["name"], "source_dataset_fingerprint": dataset["fingerprint"],
                "source_checkpoint_sha256": self.sha256}


def open_source_run(ws: Workspace, run: str) -> SourceRun:
    """Read a source run (name under ROOT/runs or a folder) and its best checkpoint; refuse ID models."""
    run_dir = resolve_run(ws, run)
    config = read_config(run_dir)
    refuse_ids(config["model"]["item_tower"], f"source run {run_dir.name}")
    data = best_checkpoint(run_dir, "source run").read_bytes()
    return SourceRun(run_dir, config, load_safetensors(data), hashlib.sha256(data).hexdigest())


def _setting_differences(source: dict, target: dict, keys: Sequence[str], label: str) -> list[str]:
    return [f"{label} {key}: source {source.get(key)!r}, target {target.get(key)!r}"
            for key in keys if source.get(key) != target.get(key)]


def compatibility_problems(source: dict, target_spec: dict, target_features: Sequence[dict],
                           parts: Sequence[str]) -> list[str]:
    """Everything that stops ``parts`` of the source (its config) from fitting the target model.

    ``target_spec`` is the target's model spec (its live item tower carrying the
    ``state_sha256`` of the encoder it built); ``target_features`` its store-group records.
    """
    model = source["model"]
    problems = []
    if model["dim"] != target_spec["dim"]:
        problems.append(f"width d: source {model['dim']}, target {target_spec['dim']} (--dim)")
    if ITEM in parts:
        keys = dict.fromkeys(_kind(model).transfer_settings + _kind(target_spec).transfer_settings)
        problems += _setting_differences(model["item_tower"], target_spec["item_tower"], tuple(keys), "item tower")
        problems += ITEM_TOWERS.get(target_spec["item_tower"]["name"]).feature_problems(
            source.get("features", []), target_features)
    if USER in parts:
        problems += _setting_differences(model["user_encoder"], target_spec["user_encoder"], USER_SETTINGS,
                                         "user encoder")
        ours = _kind(model).user_encoder_additions(model["item_tower"])
        theirs = _kind(target_spec).user_encoder_additions(target_spec["item_tower"])
        if ours != theirs:
            problems.append(f"user-encoder adapters (width): source {ours or 'none'}, target {theirs or 'none'} "
                            "(--adapter-in, --adapter-dim)")
    return problems


def _kind(model_spec: dict):
    return ITEM_TOWERS.get(model_spec["item_tower"]["name"])


def copy_parts(model: Recommender, state: dict[str, torch.Tensor], parts: Sequence[str]) -> dict:
    """Load the ``parts`` of ``state`` (a source checkpoint) into ``model``; the rest stays as built.

    Every target tensor of a part must exist in the source with the same shape, except
    :data:`SEQUENCE_SIZED` ones, whose overlapping rows are copied. Returns counts and the
    partial copies.
    """
    prefixes = tuple(f"{part}." for part in parts)
    current = model.state_dict()  # e2e/adapter: trained tensors only, as in the checkpoint
    merged = dict(current)
    problems, partial, copied = [], {}, 0
    absent = [key for key in current if key.startswith(prefixes) and key not in state]
    extra = [key for key in state if key.startswith(prefixes) and key not in current]
    for keys, what in ((absent, "the target has {n} tensor(s) the source lacks, e.g. {key}"),
                       (extra, "the source has {n} tensor(s) the target lacks, e.g. {key}")):
        if keys:
            problems.append(what.format(n=len(keys), key=keys[0]))
    for key, tensor in current.items():
        source = state.get(key)
        if source is None or not key.startswith(prefixes):
            continue
        if source.shape == tensor.shape:
            merged[key] = source
            copied += source.numel()
        elif key in SEQUENCE_SIZED and source.shape[1:] == tensor.shape[1:]:
            rows = min(source.shape[0], tensor.shape[0])
            merged[key] = tensor.detach().clone()
            merged[key][:rows] = source[:rows].to(tensor.device, tensor.dtype)
            partial[key] = {"source_rows": int(source.shape[0]), "target_rows": int(tensor.shape[0]),
                            "copied_rows": rows, "fresh_rows": int(tensor.shape[0]) - rows,
                            "why": "row r is the r-th position back from the newest item; rows both "
                                   "datasets have are copied, the target's extra rows keep their fresh "
                                   "initialisation"}
            copied += rows * source[0].numel()
        else:
            problems.append(f"{key} has shape {tuple(source.shape)} in the source, {tuple(tensor.shape)} here")
    if problems:
        raise UserError(f"the source's {' and '.join(parts)} does not fit this model: {'; '.join(problems[:4])}")
    model.load_state_dict(merged)
    return {"params_copied": copied, "partial": partial}


def _target_spec_with_weights(spec: dict, model: Recommender) -> dict:
    """The spec with the built tower's identity (a frozen encoder's weights), as the source's config records it."""
    return {**spec, "item_tower": {**spec["item_tower"], **model.item_tower.identity()}}


def init_from_run(ws: Workspace, opts: Any, model: Recommender, spec: dict, sources: Sequence[Any]) -> dict | None:
    """``--init-from``: overwrite the ``--transfer`` parts of a freshly built model with the source's.

    Called by the trainer right after ``build_recommender`` (before the optimiser state,
    DDP and resumption touch the weights). Returns the run config's ``transfer`` record
    (None without ``--init-from``); refuses, before any run folder exists, a source whose
    parts do not fit.
    """
    if opts.init_from is None:
        return None
    source = open_source_run(ws, opts.init_from)
    parts = transfer_parts(opts.transfer)
    if _kind(spec).runs_encoder_live and source.config["model"]["item_tower"]["name"] != spec["item_tower"]["name"]:
        return warm_start(source, model, spec, parts, opts.transfer)
    problems = compatibility_problems(source.config, _target_spec_with_weights(spec, model),
                                      [s.record() for s in sources], parts)
    if problems:
        raise UserError(f"cannot --init-from {source.name} with --transfer {opts.transfer}: "
                        f"{'; '.join(problems)}. Train the target with the source's settings (its config.json)"
                        + ("" if parts == (USER,) else ", or transfer only the user encoder (--transfer user)"))
    copied = copy_parts(model, source.state, parts)
    record = {**source.record(), "kind": opts.transfer, "transferred": list(parts),
              "fresh": [p for p in (ITEM, USER) if p not in parts], **copied}
    if ITEM in parts and spec["item_tower"].get("whiten"):
        record["whitening"] = f"the source's (fitted on {source.config['dataset']['name']}'s catalogue)"
    return record


def warm_start_problems(source: dict, target_spec: dict, target_encoder: dict) -> list[str]:
    """Why a TS / TS-DNN run (its config) cannot warm-start a live tower: its DT layer must read the
    vectors the live encoder computes (same encoder, weights and pooling) at the same d, and its user
    encoder must be the same backbone."""
    model = source["model"]
    kind = _kind(model)
    problems = []
    if kind.runs_encoder_live or kind.dt_layer_keys(model["item_tower"]) is None:
        problems.append(f"source mode {model['item_tower']['name']} has no DT layer over one store group's vectors "
                        "(warm starts come from ts, or ts-dnn --dnn residual, without --whiten or --fusion)")
    if model["dim"] != target_spec["dim"]:
        problems.append(f"width d: source {model['dim']}, target {target_spec['dim']} (--dim)")
    problems += _setting_differences(model["user_encoder"], target_spec["user_encoder"], USER_SETTINGS, "backbone")
    groups = source.get("features", [])
    stored = groups[0].get("provenance", {}) if len(groups) == 1 else {}
    for key, what in (("encoder", "encoder"), ("pooling", "pooling"), ("state_sha256", "encoder weights (state sha256)")):
        if stored.get(key) != target_encoder.get(key):
            problems.append(f"{what}: source {stored.get(key)!r}, target {target_encoder.get(key)!r}")
    return problems


def warm_start(source: SourceRun, model: Recommender, spec: dict, parts: Sequence[str], kind: str) -> dict:
    """``--init-from`` a TS / TS-DNN run into e2e or adapter: the DT layer (and the no-content vector) and
    the user encoder start where the source ended; the encoder is the registry's (the source read its
    vectors from the store), every other new tensor (adapters) stays as built. Refused in one line with
    each mismatch; returns the run config's ``transfer`` record."""
    described = {"model": {"item_tower": {}}}
    _kind(spec).describe(described, model)  # the live tower's encoder, pooling and weights identity
    problems = warm_start_problems(source.config, spec, described.get("item_encoder", {}))
    if problems:
        raise UserError(f"cannot warm-start --mode {spec['item_tower']['name']} from {source.name}: "
                        f"{'; '.join(problems)}")
    current = model.state_dict()
    mapping: dict[str, str] = {}
    if ITEM in parts:
        ours = _kind(spec).dt_layer_keys(spec["item_tower"])
        theirs = _kind(source.config["model"]).dt_layer_keys(source.config["model"]["item_tower"])
        mapping.update({f"{ITEM}.{ours[role]}": f"{ITEM}.{theirs[role]}" for role in ours})
    if USER in parts:
        mapping.update({key: key for key in source.state if key.startswith(f"{USER}.")})
    bad = [f"{src} has shape {tuple(source.state[src].shape)} in the source, "
           f"{tuple(current[dst].shape) if dst in current else 'none'} here"
           for dst, src in mapping.items() if dst not in current or source.state[src].shape != current[dst].shape]
    if bad:
        raise UserError(f"cannot warm-start from {source.name}: {'; '.join(bad[:4])}")
    model.load_state_dict({**current, **{dst: source.state[src] for dst, src in mapping.items()}})
    return {**source.record(), "kind": kind, "transferred": list(parts), "warm_start": True,
            "source_mode": source.config["model"]["item_tower"]["name"],
            "fresh": [p for p in (ITEM, USER) if p not in parts],
            "params_copied": sum(source.state[src].numel() for src in mapping.values()),
            "renamed": {dst: src for dst, src in mapping.items() if dst != src}}


def zero_shot_model(ws: Workspace, run_dir: Path, target: str, untrained: bool = False,
                    device: str | torch.device = "cpu") -> tuple[Recommender, dict, PreparedDataset]:
    """The source run's model over another dataset's items, in eval mode, for ``evaluate``.

    The architecture is the source's (its config's ``model`` section) with the target's
    ``n_items`` and the target's store groups (same encoder and variant, checked against
    the source's provenance; e2e/adapter runs read the target's items or its cache).
    ``max_seq_len`` stays the source's: every position the model uses was trained, and
    target histories are cut to that many most recent items. ``untrained`` keeps the
    architecture but not the weights: parameters come from the initialiser seeded with
    the source's training seed (whitening, if any, fitted on the target), the random
    baseline zero-shot is measured against.

    Returns:
        ``(model, record, target dataset)``; ``record`` says what was ranked with what.
    """
    config = read_config(run_dir)
    refuse_ids(config["model"]["item_tower"], f"run {run_dir.name}")
    own = config["dataset"]["name"]
    if target == own:
        raise UserError(f"dataset {target} is run {run_dir.name}'s own; drop --dataset to rank it as usual")
    dataset = PreparedDataset.load(ws.dataset_dir(target))
    spec, sources = _target_sources(ws, config, dataset)
    torch.manual_seed(config["training"]["seed"])
    model = build_recommender(spec, sources, fit=untrained)
    if not untrained:
        load_best_weights(model, run_dir)
    record = {"source_run": run_dir.name, "source_dataset": own, "target": dataset.name,
              "target_fingerprint": dataset.fingerprint,
              "weights": "untrained" if untrained else "source",
              "seed": config["training"]["seed"] if untrained else None,
              "features": [s.record() for s in sources], "max_seq_len": spec["max_seq_len"]}
    return model.to(device).eval(), record, dataset


def _target_sources(ws: Workspace, config: dict, dataset: PreparedDataset) -> tuple[dict, list]:
    """(model spec over the target's items, the target's opened inputs), checked against the source."""
    kind = ITEM_TOWERS.get(config["model"]["item_tower"]["name"])
    moved = kind.retarget(config, dataset)
    sources = kind.reopen(ws, moved)
    problems = kind.feature_problems(config.get("features", []), [s.record() for s in sources])
    if problems:
        raise UserError(f"dataset {dataset.name}'s store groups cannot feed the run's item tower: "
                        f"{'; '.join(problems)}; extract them with the run's encoder, variant and weights")
    return moved["model"], sources
