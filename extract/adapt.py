"""Domain-adapted encoders: a second round of self-supervised pretraining on a dataset's own items.

Paper 001 (Table 8) continues BERT's masked-language-model pretraining on MIND titles
and MAE's masked-patch reconstruction on HM pictures before extracting features, and
TS accuracy rises (BERT-MLM 13.93 -> 14.68 HR@10, MAE 2.50 -> 2.79). This module runs
that second round and hands the result to the normal extraction path.

What is trained on: the *content* of every item of the prepared dataset (titles for
``mlm``, pictures for ``mae``), including items that are validation or test targets.
No interaction is read, so no user's held-out choice leaks into the encoder; learning
the catalogue's own vocabulary and look is exactly what adaptation is for, and it is
the standard practice of the papers.

The objectives are a small registry (``mlm`` in :mod:`extract.adapt_mlm`, ``mae`` in
:mod:`extract.adapt_mae`; protocol and :func:`register_objective` in :mod:`extract.adapt_objective`).
Each wraps the encoder built by :func:`extract.registry.create_encoder` (so base
weights resolve exactly as for extraction: bundled package, ``--weights``, hub id or
``--random-init``) in transformers' own pretraining head (``AutoModelForMaskedLM``,
``ViTMAEForPreTraining``), taking the head's weights from the base checkpoint when it
has them. Only the encoder part is kept.

Output, ``ROOT/adapted/NAME``: a transformers ``save_pretrained`` folder (``config.json``,
``model.safetensors``, plus the tokenizer for text) that
``create_encoder(ENC, weights=ROOT/adapted/NAME)`` loads for extraction, and
``adapt.json``: base weights and their sha256, dataset and fingerprint, objective,
every setting, the per-epoch loss curve and the status. ``loss.png`` plots the curve.

Resumable: after every epoch the whole training state (model with head, optimiser,
loss curve) is written atomically to ``checkpoint/last.safetensors``; rerunning the
same command continues after the last finished epoch, and since every epoch reseeds
its shuffling, masking and dropout from (seed, epoch), a resumed run ends with the
same weights as an uninterrupted one on the same device. A completed run is not redone.

Extraction: :func:`resolve_adapted` gives ``featurestore extract`` the weights folder,
the base encoder and the store variant tag (the objective, e.g. ``HM/text/bert-base@mlm``,
for a default-named run; NAME otherwise) plus the provenance to record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from data.dataset import PreparedDataset
from extract.adapt_objective import Masker, Objective, _seeded, get_objective, list_objectives, register_objective
from extract.encoder import Encoder, move_inputs, read_state_dict, state_sha256
from extract.job import ItemDataset, autocast_dtype
from extract.registry import EncoderConfig, create_encoder, get_encoder_config, resolve_weights
from featurestore.errors import UserError
from featurestore.progress import progress_bar
from featurestore.runtime.checkpoint import load_checkpoint, save_checkpoint
from featurestore.runtime.device import resolve_device
from featurestore.runtime.files import write_json
from featurestore.runtime.processes import Processes
from featurestore.runtime.seeding import epoch_seed
from featurestore.runtime.versions import versions
from featurestore.store import GroupLock
from featurestore.workspace import Workspace

__all__ = ["AdaptOptions", "AdaptResult", "get_objective", "list_objectives", "read_record", "register_objective",
           "resolve_adapted", "run_adaptation"]

RECORD = "adapt.json"
CHECKPOINT = "checkpoint/last.safetensors"
STATUS_PARTIAL = "partial"
STATUS_COMPLETE = "complete"
CONTENT_NOTE = ("trained on the content (text or image) of every item, validation/test targets included; "
                "no interactions are read")


# --------------------------------------------------------------------------- options and records


@dataclass
class AdaptOptions:
    """Everything ``featurestore adapt`` takes (see its ``--help``); None = the objective's default."""

    dataset: str
    encoder: str
    objective: str
    epochs: int = 5
    mask_ratio: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    warmup: float = 0.05
    grad_clip: float = 1.0
    device: str = "auto"
    workers: int | None = None
    name: str | None = None
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    max_text_tokens: int = 30
    probe_items: int = 256
    progress: bool = True


def default_workers(modality: str) -> int:
    """Loader processes: images need decoding in parallel; tokenising titles is cheap next to a backward pass."""
    return 0 if modality == "text" else min(2, os.cpu_count() or 1)


def default_name(dataset: str, encoder: str, objective: str) -> str:
    return f"{dataset}-{encoder}-{objective}"


def _settings(opts: AdaptOptions, objective: Objective) -> dict:
    """The resolved hyper-parameters: what a resumed run must match."""
    d = objective.defaults
    settings = {
        "objective": objective.name, "epochs": opts.epochs,
        "mask_ratio": opts.mask_ratio if opts.mask_ratio is not None else d.mask_ratio,
        "lr": opts.lr if opts.lr is not None else d.lr,
        "batch_size": opts.batch_size or d.batch_size,
        "weight_decay": opts.weight_decay if opts.weight_decay is not None else d.weight_decay,
        "betas": list(d.betas), "optimizer": "AdamW (no decay on biases and norms)",
        "schedule": "linear warmup, then cosine to 0", "warmup": opts.warmup, "grad_clip": opts.grad_clip,
        "seed": opts.seed, "probe_items": opts.probe_items,
    }
    if objective.modality == "text":
        settings["max_text_tokens"] = opts.max_text_tokens
    if not 0 < settings["mask_ratio"] < 1:
        raise UserError(f"--mask-ratio {settings['mask_ratio']}: must lie strictly between 0 and 1")
    if settings["lr"] <= 0 or opts.epochs < 1 or not 0 <= opts.warmup < 1:
        raise UserError("--lr must be > 0, --epochs >= 1 and --warmup in [0, 1)")
    return settings


def _command(opts: AdaptOptions, name: str, settings: dict) -> str:
    words = [f"featurestore adapt --dataset {opts.dataset} --encoder {opts.encoder} --objective {opts.objective}",
             f"--name {name} --epochs {settings['epochs']} --mask-ratio {settings['mask_ratio']}",
             f"--lr {settings['lr']} --batch-size {settings['batch_size']} --weight-decay {settings['weight_decay']}",
             f"--warmup {settings['warmup']} --seed {settings['seed']}"]
    if opts.weights:
        words.append(f"--weights {opts.weights}")
    if opts.random_init:
        words.append("--random-init")
    if opts.max_text_tokens != 30:
        words.append(f"--max-text-tokens {opts.max_text_tokens}")
    return " ".join(words)


def read_record(folder: Path) -> dict | None:
    """The adapt.json of an adapted folder, or None if there is none."""
    path = folder / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def _signature(encoder: str, objective: str, base_weights: str, dataset: str, fingerprint: str,
               settings: dict) -> dict:
    """What must match for a rerun to continue (or skip) the run under the same name."""
    return {"encoder": encoder, "objective": objective, "base weights": base_weights, "dataset": dataset,
            "dataset fingerprint": fingerprint, **settings}


def _check_same_run(old: dict, new: dict, folder: Path) -> None:
    """A UserError naming every difference between a recorded run and the requested one."""
    theirs = _signature(old["encoder"], old["objective"], old["base"]["weights"], old["dataset"],
                        old["dataset_fingerprint"], old["settings"])
    differ = [k for k in new if new[k] != theirs.get(k)]
    if differ:
        detail = "; ".join(f"{k}: recorded {theirs.get(k)!r:.80} vs now {new[k]!r:.80}" for k in differ)
        raise UserError(f"adapted run {folder.name} was started with other settings ({detail}); "
                        f"pass another --name, or remove {folder} to start over")


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, run: _Training, record: dict, base_state_sha256: str) -> None:
    """The resumable state after an epoch (:mod:`featurestore.runtime.checkpoint`): the model with its
    head, the AdamW moments, and the loss curve so far with the base weights it continues from."""
    save_checkpoint(path, run.model, run.optimizer,
                    {"epochs": record["epochs"], "probe_loss_before": record["probe_loss_before"],
                     "skipped": sorted(run.skipped), "base_state_sha256": base_state_sha256})


# --------------------------------------------------------------------------- base weights of the head


def _base_files(encoder: Encoder) -> list[Path]:
    """Local files of the base weights (for hub ids: the copy transformers cached when loading)."""
    prov = encoder.provenance
    if prov["weights_kind"] != "hub":
        return [Path(p) for p in prov["weights_files"]]
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(prov["weights_location"], filename)
        if isinstance(cached, str):
            return [Path(cached)]
    return []


def _load_head(model: nn.Module, files: list[Path]) -> dict:
    """Load the pretraining head (MLM head, MAE decoder) from the base weights when they carry it.

    A sentence-transformers model (MiniLM) or a random init has none: the head then
    starts fresh (seeded) and says so in adapt.json.
    """
    base = getattr(model, model.base_model_prefix)
    tied = {p.data_ptr() for p in base.parameters()}
    head: dict[int, list[str]] = {}  # storage -> its names (a head may tie two names to one tensor)
    for key, value in model.state_dict().items():
        if not key.startswith(f"{model.base_model_prefix}.") and value.data_ptr() not in tied:
            head.setdefault(value.data_ptr(), []).append(key)
    names = {key for keys in head.values() for key in keys}
    found: dict[str, torch.Tensor] = {}
    for path in files:
        for key, value in read_state_dict(path).items():
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if key in names:
                found[key] = value
    if found:
        try:
            model.load_state_dict(found, strict=False)
        except RuntimeError as err:
            raise UserError(f"the pretraining head in {files[0]} does not fit the model: {str(err)[:200]}") from err
    loaded = sum(any(k in found for k in keys) for keys in head.values())
    kind = "pretrained" if loaded == len(head) else ("fresh" if not loaded else "partial")
    return {"head": kind, "head_tensors_loaded": loaded, "head_tensors": len(head)}


# --------------------------------------------------------------------------- the job


def _lr_at(step: int, total: int, settings: dict) -> float:
    warm = max(1, int(settings["warmup"] * total))
    if step < warm:
        return settings["lr"] * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return settings["lr"] * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, settings: dict) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=settings["lr"], betas=tuple(settings["betas"]))


def _seed_epoch(seed: int, epoch: int) -> None:
    """Shuffling, masks, dropout, augmentation and worker seeds of an epoch depend on (seed, epoch) only
    (the runtime's one scheme, :func:`featurestore.runtime.seeding.epoch_seed`; one process is rank 0)."""
    drawn = epoch_seed(seed, 0, epoch)
    torch.manual_seed(drawn)
    random.seed(drawn)


@dataclass
class _Training:
    """The pieces one epoch needs."""

    objective: Objective
    model: nn.Module
    optimizer: torch.optim.Optimizer
    masker: Masker
    items: ItemDataset
    settings: dict
    device: torch.device
    workers: int
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler
    progress: bool
    name: str
    skipped: set[int] = field(default_factory=set)

    def loss(self, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        amp = torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)
        with amp:
            return self.objective.loss(self.model, move_inputs(kwargs, self.device)).float()


def _train_epoch(run: _Training, epoch: int) -> dict:
    """One pass over the items in a (seed, epoch)-determined order; returns the epoch's record."""
    started = time.perf_counter()
    settings = run.settings
    _seed_epoch(settings["seed"], epoch)
    order = (torch.randperm(len(run.items) - 1) + 1).tolist()
    size = settings["batch_size"]
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    loader = DataLoader(run.items, batch_sampler=batches, collate_fn=run.items.collate, num_workers=run.workers,
                        pin_memory=run.device.type == "cuda")
    total_steps = settings["epochs"] * len(batches)
    run.model.train()
    weighted, targets, items = 0.0, 0, 0
    bar = progress_bar(loader, total=len(batches), unit="batch", desc=f"{run.name} epoch {epoch}/{settings['epochs']}",
               disable=not run.progress, dynamic_ncols=True)
    for index, batch in enumerate(bar):
        run.skipped.update(item_id for item_id, _, _ in batch.bad)
        if batch.inputs is None:
            continue
        kwargs, n_targets = run.masker(batch.inputs)
        if n_targets == 0:  # a tiny batch can draw no masked token: nothing to predict
            continue
        lr = _lr_at((epoch - 1) * len(batches) + index, total_steps, settings)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss = run.loss(kwargs)
        if not torch.isfinite(loss):
            raise UserError(f"the {settings['objective']} loss became non-finite in epoch {epoch} "
                            f"(batch {index}); lower --lr and rerun under another --name")
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings["grad_clip"])
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        weighted += loss.item() * n_targets
        targets += n_targets
        items += len(batch.ids)
        bar.set_postfix(loss=f"{weighted / targets:.4f}", lr=f"{lr:.2e}")
    bar.close()
    if not targets:
        raise UserError(f"no item could be read for {settings['objective']} ({len(run.skipped)} unreadable, "
                        "listed in adapt.json under skipped_items); check the dataset's texts or images")
    return {"epoch": epoch, "loss": weighted / targets, "items": items, "targets": targets, "lr_last": lr,
            "seconds": round(time.perf_counter() - started, 3)}


def _probe_batches(encoder: Encoder, masker: Masker, dataset: PreparedDataset, settings: dict) -> list[dict]:
    """A fixed, seeded masking of up to ``probe_items`` items (evenly spread over the catalogue).

    Its loss, in eval mode, before training and after every epoch, is a curve whose
    points are comparable (same items, same masks), unlike the noisy training loss.
    """
    n = min(settings["probe_items"], dataset.n_items)
    if n == 0:
        return []
    ids = np.unique(np.linspace(1, dataset.n_items, n).round().astype(int)).tolist()
    items = ItemDataset(dataset.items, encoder.preprocessor)
    size = settings["batch_size"]
    probes = []
    with _seeded(settings["seed"] + 7):
        for start in range(0, len(ids), size):
            batch = items.collate([items[i] for i in ids[start : start + size]])
            if batch.inputs is not None:
                kwargs, n_targets = masker(batch.inputs)
                if n_targets:
                    probes.append({"kwargs": kwargs, "targets": n_targets})
    return probes


def _probe_loss(run: _Training, probes: list[dict]) -> float | None:
    if not probes:
        return None
    run.model.eval()
    with torch.no_grad():
        total = sum(run.loss(p["kwargs"]).item() * p["targets"] for p in probes)
    return total / sum(p["targets"] for p in probes)


def _plot(folder: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = record["epochs"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([e["epoch"] for e in epochs], [e["loss"] for e in epochs], "o-", label="training (mean of epoch)")
    probe = [(0, record["probe_loss_before"])] + [(e["epoch"], e["probe_loss"]) for e in epochs]
    probe = [(x, y) for x, y in probe if y is not None]
    if probe:
        ax.plot(*zip(*probe), "s--", label="probe (fixed items and masks)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{record['objective']} loss")
    ax.set_title(f"{record['name']}: {record['encoder']} on {record['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)


@dataclass
class AdaptResult:
    """What a run did; ``summary()`` is the line the CLI prints."""

    name: str
    folder: str
    status: str
    encoder: str
    objective: str
    variant: str
    epochs_done: int
    epochs: int
    resumed_from: int
    computed_epochs: int
    losses: list[float]
    probe_losses: list[float | None]
    seconds: float

    def summary(self) -> str:
        if self.computed_epochs == 0:
            head = f"adapted/{self.name}: already complete ({self.epochs} epochs); nothing to do"
        else:
            resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
            head = (f"adapted/{self.name}: {self.status}; {self.objective} on {self.encoder}, "
                    f"{self.computed_epochs} epochs in {self.seconds:.1f}s{resumed}")
        curve = " -> ".join(f"{x:.4f}" for x in self.losses)
        probe = " -> ".join(f"{x:.4f}" for x in self.probe_losses if x is not None)
        return (f"{head}\n  training loss per epoch: {curve}\n  probe loss (before, after each epoch): {probe}\n"
                f"  weights: {self.folder}\n  extract: featurestore extract --encoder {self.encoder} "
                f"--weights {self.folder} --variant {self.variant} --dataset DATASET")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _result(record: dict, folder: Path, resumed_from: int, computed: int, seconds: float) -> AdaptResult:
    return AdaptResult(
        name=record["name"], folder=str(folder), status=record["status"], encoder=record["encoder"],
        objective=record["objective"], variant=record["variant"], epochs_done=len(record["epochs"]),
        epochs=record["settings"]["epochs"], resumed_from=resumed_from, computed_epochs=computed,
        losses=[e["loss"] for e in record["epochs"]],
        probe_losses=[record["probe_loss_before"]] + [e["probe_loss"] for e in record["epochs"]],
        seconds=round(seconds, 3),
    )


def run_adaptation(ws: Workspace, opts: AdaptOptions) -> AdaptResult:
    """Run, resume, or (if complete) skip one adaptation run into ``ws.adapted / NAME``.

    Example:
        >>> run_adaptation(ws, AdaptOptions(dataset="HM", encoder="minilm-l6", objective="mlm")).summary()
    """
    started = time.perf_counter()
    objective = get_objective(opts.objective)
    config = get_encoder_config(opts.encoder, weights=opts.weights)  # a model folder stands in for an uncached repo
    objective.check(config)
    name = opts.name or default_name(opts.dataset, config.name, objective.name)
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    settings = _settings(opts, objective)
    spec = resolve_weights(config, opts.weights, opts.random_init, opts.seed)
    folder = ws.adapted_dir(name).resolve()
    lock = GroupLock(ws.adapted / ".locks" / f"{name}.lock", name, what="adapted encoder")
    lock.acquire(command=_command(opts, name, settings))
    try:
        old = read_record(folder)
        if old is not None:
            new = _signature(config.name, objective.name, spec.source, dataset.name, dataset.fingerprint, settings)
            _check_same_run(old, new, folder)
            if old["status"] == STATUS_COMPLETE:
                return _result(old, folder, len(old["epochs"]), 0, time.perf_counter() - started)
        return _train(opts, objective, config, dataset, settings, folder, old, started)
    finally:
        lock.release()


def _train(opts: AdaptOptions, objective: Objective, config: EncoderConfig, dataset: PreparedDataset,
           settings: dict, folder: Path, old: dict | None, started: float) -> AdaptResult:
    """Build the pretraining model, resume from the checkpoint if there is one, train the remaining epochs."""
    name = folder.name
    encoder = create_encoder(config.name, weights=opts.weights, random_init=opts.random_init, seed=opts.seed,
                             max_text_tokens=opts.max_text_tokens)
    settings = {**settings, **objective.extra_settings(encoder)}
    device = resolve_device(opts.device, Processes.from_env())
    model = objective.pretraining_model(encoder, settings)
    head = _load_head(model, _base_files(encoder))
    model.to(device)
    masker = objective.masker(encoder, settings)
    amp = autocast_dtype(device)
    workers = opts.workers if opts.workers is not None else default_workers(config.modality)
    run = _Training(objective=objective, model=model, optimizer=_optimizer(model, settings), masker=masker,
                    items=ItemDataset(dataset.items, objective.train_preprocessor(encoder)), settings=settings,
                    device=device, workers=workers, amp=amp,
                    scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                    progress=opts.progress, name=name)
    prov = encoder.provenance
    record = {
        "name": name, "status": STATUS_PARTIAL, "objective": objective.name, "modality": config.modality,
        "encoder": config.name,
        "variant": objective.name if name == default_name(opts.dataset, config.name, objective.name) else name,
        "base": {"weights": prov["weights"], "weights_kind": prov["weights_kind"],
                 "weights_location": prov["weights_location"], "weights_seed": prov["weights_seed"],
                 "weights_sha256": prov["weights_sha256"], "state_sha256": prov["state_sha256"], **head},
        "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint, "n_items": dataset.n_items,
        "content": CONTENT_NOTE, "settings": settings, "preprocessing": prov["preprocessing"],
        "device": str(device), "autocast": str(amp).removeprefix("torch.") if amp else None,
        "command": _command(opts, name, settings), "versions": versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "epochs": [], "probe_loss_before": None,
    }
    if old is not None:
        record["created"] = old["created"]
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / CHECKPOINT
    resumed_from = 0
    meta = load_checkpoint(checkpoint, run.model, run.optimizer)
    if meta is not None:
        if meta["base_state_sha256"] != prov["state_sha256"]:
            raise UserError(f"the base weights of adapted run {name} changed since it started "
                            f"({prov['weights']}); remove {folder} to start over")
        record.update(epochs=meta["epochs"], probe_loss_before=meta["probe_loss_before"])
        run.skipped.update(meta["skipped"])
        resumed_from = len(meta["epochs"])
    probes = _probe_batches(encoder, masker, dataset, settings)
    if not resumed_from:
        record["probe_loss_before"] = _probe_loss(run, probes)
    write_json(folder / RECORD, record)
    for epoch in range(resumed_from + 1, settings["epochs"] + 1):
        entry = _train_epoch(run, epoch)
        entry["probe_loss"] = _probe_loss(run, probes)
        record["epochs"].append(entry)
        record["skipped_items"] = sorted(run.skipped)
        _save_checkpoint(checkpoint, run, record, prov["state_sha256"])
        write_json(folder / RECORD, record)
    _finish(encoder, objective, run.model, folder, record)
    return _result(record, folder, resumed_from, settings["epochs"] - resumed_from, time.perf_counter() - started)


def _finish(encoder: Encoder, objective: Objective, model: nn.Module, folder: Path, record: dict) -> None:
    """Keep the encoder part only, prove the registry loads it back, then mark the run complete."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" would interleave with our own output
    base = getattr(model, model.base_model_prefix)
    encoder.model.load_state_dict({k: v.detach().cpu() for k, v in base.state_dict().items()})
    encoder.model.save_pretrained(str(folder))
    objective.save_extras(encoder, folder)
    reloaded = create_encoder(encoder.name, weights=str(folder), max_text_tokens=encoder.provenance[
        "preprocessing"].get("max_tokens", 30))
    trained = state_sha256(encoder.model)
    if reloaded.provenance["state_sha256"] != trained:
        raise UserError(f"the adapted weights in {folder} do not load back into {encoder.name} unchanged; "
                        "this is a bug, please report it with adapt.json")
    record.update(
        status=STATUS_COMPLETE, completed=time.strftime("%Y-%m-%d %H:%M:%S"),
        weights={"path": str(folder), "files": [Path(p).name for p in reloaded.provenance["weights_files"]],
                 "sha256": reloaded.provenance["weights_sha256"], "state_sha256": trained,
                 "kept": f"encoder only ({type(encoder.model).__name__})"},
    )
    write_json(folder / RECORD, record)
    _plot(folder, record)
    shutil.rmtree((folder / CHECKPOINT).parent, ignore_errors=True)


def resolve_adapted(ws: Workspace, name: str) -> dict:
    """What ``featurestore extract --adapted NAME`` needs: weights folder, base encoder, variant tag, provenance.

    Returns:
        ``{"name", "weights": folder path, "encoder": base encoder name, "modality",
        "variant": store variant tag (the objective for a default-named run, else NAME),
        "provenance": adaptation record to copy into the store group's attributes}``.

    Example:
        >>> resolve_adapted(ws, "HM-minilm-l6-mlm")["variant"]
        'mlm'
    """
    folder = ws.adapted_dir(name).resolve()
    record = read_record(folder)
    if record is None:
        known = sorted(p.name for p in ws.adapted.iterdir() if (p / RECORD).exists()) if ws.adapted.exists() else []
        raise UserError(f"no adapted weights named {name!r} under {ws.adapted} (known: {', '.join(known) or 'none'}); "
                        "create them with `featurestore adapt`")
    if record["status"] != STATUS_COMPLETE:
        raise UserError(f"adapted run {name} is {record['status']} ({len(record['epochs'])} of "
                        f"{record['settings']['epochs']} epochs); rerun `{record['command']}` to finish it")
    return {
        "name": name, "weights": str(folder), "encoder": record["encoder"], "modality": record["modality"],
        "variant": record["variant"],
        "provenance": {
            "adapted": name, "adapted_path": str(folder), "objective": record["objective"],
            "base_encoder": record["encoder"], "base_weights": record["base"]["weights"],
            "base_weights_sha256": record["base"]["weights_sha256"],
            "base_state_sha256": record["base"]["state_sha256"], "dataset": record["dataset"],
            "dataset_fingerprint": record["dataset_fingerprint"], "settings": record["settings"],
            "epochs": len(record["epochs"]), "final_loss": record["epochs"][-1]["loss"],
            "final_probe_loss": record["epochs"][-1]["probe_loss"], "weights_sha256": record["weights"]["sha256"],
            "state_sha256": record["weights"]["state_sha256"], "command": record["command"],
        },
    }
