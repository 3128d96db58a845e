"""One training loop for every item tower, backbone and loss.

A run is one choice from each registry (item tower = ``--mode``, user encoder =
``--backbone``, loss = ``--loss``); the loop below only calls the Recommender's
public verbs and the loss's one signature. Per epoch: train with AdamW, validate
on the full item pool with the same function as ``eval rank``
(:func:`eval.evaluate.evaluate`), keep the best checkpoint, stop early, and stop
on collapse (a non-finite loss, or validation falling to near zero after being
clearly above it, as 001 Fig. 5 shows for too-high learning rates).

Resumable: every validated epoch ends with ``last.safetensors`` (weights, optimizer
moments, epoch bookkeeping), replaced atomically; negatives and dropout are seeded
from (seed, rank, epoch). Killed at any point and started again with the same
``--run-name``, a run continues after its last saved epoch and ends with the same
weights and metrics as an uninterrupted one (on the CPU); a finished run is not redone.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains on its
shard of users (DistributedSampler) through DDP, NCCL on GPUs and gloo on CPU;
process 0 validates, writes the run folder and decides when to stop. One process
is the default and needs no launcher.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.dataset import PreparedDataset
from eval.metrics import format_metrics, percent
from featurestore.errors import UserError
from featurestore.progress import progress_bar
from featurestore.runtime.device import resolve_device
from featurestore.runtime.processes import Processes, launched
from featurestore.runtime.seeding import epoch_seed
from featurestore.workspace import Workspace, check_name
from recommend import __version__
from recommend.batches import SequenceBatches, model_seq_len, training_rows
from recommend.cloze import check_cloze_options, cloze_loss
from recommend.cost import parameter_breakdown
from recommend.inputs import refuse_foreign_options
from recommend.item_towers import ITEM_TOWERS, FUSIONS, TOKEN_FUSIONS, WITH_ID_MODES
from recommend.losses import LOSSES, Loss, LossContext, check_loss_options, create_loss, embed_step, loss_options
from recommend.model import Recommender, build_recommender
from recommend.objectives import AuxObjectives, Step, attach_objectives, check_objectives
from recommend.transfer import check_transfer_options, init_from_run
from recommend.run import (BEST, CHECKPOINT, FINISHED, LAST, LOG, append_metrics, default_run_name, run_lock,
                           load_training_state, open_run, read_metrics, rewrite_metrics,
                           save_checkpoint, save_training_state, write_json)
from recommend.user_encoders import USER_ENCODERS

MONITOR = ("HR@10", "NDCG@10")  # early stopping: best HR@10, ties broken by NDCG@10
COLLAPSE_FLOOR = 0.01  # a best HR@10 at least this high is "clearly above" zero ...
COLLAPSE_FRACTION = 0.1  # ... and falling below this share of it is a collapse
CLEARLY_ABOVE = 1.1  # a best validation HR@10 under 1.1x popularity's has learned no more than popularity


@dataclass
class TrainOptions:
    """Everything ``recommend train`` accepts; recorded verbatim in config.json."""

    dataset: str
    mode: str = "id"
    layers: int | None = None
    dnn: str | None = None  # ts-dnn: which stack (recommend.item_towers.TS_DNN_STACKS)
    encoders: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    fusion: str | None = None
    with_id: str | None = None
    whiten: bool = False
    backbone: str = "sasrec"
    loss: str = "ce"  # defaults that differ from the papers' (bce, d 512, lr 1e-4, dropout 0.1): see ``recommend train --help``
    negatives: int | None = None  # gbce: sampled negatives per position, sce: per batch; recommend.losses
    gbce_t: float | None = None  # gbce: calibration t
    dim: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.3  # bench/defaults.py: 20-trial searches chose 0.3-0.4 and 2-5x the old lr 1e-3
    lr: float = 2e-3
    weight_decay: float = 0.1
    batch_size: int = 64
    epochs: int = 100
    patience: int = 10
    plateau_patience: int = 30  # patience while validation is not yet clearly above popularity
    seed: int = 42
    device: str = "auto"
    run_name: str | None = None
    # fields of one mode only (its TowerKind's ``options``): live encoders, recommend.e2e / recommend.adapters
    top_k: int | None = None
    encoder_lr: float | None = None
    grad_checkpointing: bool = False
    amp: bool = False
    cached: bool = False
    adapter_dim: int | None = None
    adapter_in: str | None = None
    random_init: bool = False
    weights: str | None = None
    encoder_seed: int = 0
    pooling: str | None = None
    mask_prob: float | None = None  # bert4rec cloze share; recommend.cloze
    init_from: str | None = None  # cross-dataset transfer; recommend.transfer
    transfer: str | None = None
    objectives: list[str] = field(default_factory=list)  # PMMRec's auxiliary terms; recommend.objectives
    side_dim: int | None = None  # --mode side: adapter bottleneck; recommend.side


class Objective(nn.Module):
    """Recommender + loss as one module, so DDP sees the whole step in ``forward``.

    With auxiliary terms (``--objectives``) the step returns their sum with the
    recommendation loss (002 Eq. 12, every weight 1) and keeps each term's detached
    value in ``terms`` (``rec`` = the recommendation loss) for the per-epoch log.
    """

    def __init__(self, model: Recommender, loss: Loss, aux: AuxObjectives | None = None) -> None:
        super().__init__()
        self.model, self.loss, self.aux = model, loss, aux
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if getattr(self.model.user_encoder, "cloze", False):  # bidirectional: fill in masked items
            return cloze_loss(self.model, self.loss, rows)
        vectors, extra, extra_vectors = embed_step(self.model, self.loss, rows)  # one tower call
        hidden = self.model.encode(vectors[:, :-1], rows[:, :-1] > 0)
        value = self.loss(hidden, rows, vectors, extra, extra_vectors)
        if self.aux is None:
            return value
        parts = {"rec": value, **self.aux(Step(self.model, rows, vectors, hidden))}
        self.terms = {name: part.detach() for name, part in parts.items()}
        return torch.stack(list(parts.values())).sum()


def check_options(opts: TrainOptions) -> TrainOptions:
    """Reject combinations that make no sense, each with the fix; fill mode defaults."""
    kind = ITEM_TOWERS.get(opts.mode)
    USER_ENCODERS.get(opts.backbone)
    if opts.run_name is not None:
        check_name("run", opts.run_name)  # refused before any work, not after the model is built
    LOSSES.get(opts.loss)
    refuse_foreign_options({name: ITEM_TOWERS.get(name) for name in ITEM_TOWERS.names()}, opts)
    n_groups = len(opts.encoders) + len(opts.features)
    if opts.fusion is not None:
        known = (*FUSIONS.names(), *TOKEN_FUSIONS)
        if opts.fusion not in known:
            raise UserError(f"unknown fusion {opts.fusion!r}; known: {', '.join(known)}")
        if opts.fusion in TOKEN_FUSIONS and opts.whiten:
            raise UserError(f"--whiten transforms pooled vectors, and --fusion {opts.fusion} reads token states; "
                            "drop --whiten")
        if n_groups != 2:
            raise UserError("--fusion merges two feature groups (text + image); name two with "
                            "--features TEXT_GROUP,IMAGE_GROUP or --encoder TEXT_ENC,IMAGE_ENC")
    elif n_groups == 2:
        opts.fusion = "concat"
    if opts.with_id is not None and opts.with_id not in WITH_ID_MODES:
        raise UserError(f"unknown --with-id {opts.with_id!r}; known: {', '.join(WITH_ID_MODES)}")
    if opts.whiten and n_groups == 0:
        raise UserError("--whiten transforms stored features; it needs --mode ts/ts-dnn with "
                        "--encoder or --features")
    check_cloze_options(opts)
    if opts.backbone in ("sasrec", "bert4rec") and opts.dim % opts.heads:
        raise UserError(f"--dim {opts.dim} must be divisible by --heads {opts.heads}")
    for name in ("dim", "blocks", "heads", "batch_size", "epochs", "patience", "plateau_patience"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if not 0.0 <= opts.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {opts.dropout}")
    if not opts.lr > 0:
        raise UserError(f"--lr must be > 0, got {opts.lr}")
    check_loss_options(opts)
    kind.check(opts)
    check_transfer_options(opts)
    check_objectives(opts)
    return opts


def model_spec(opts: TrainOptions, dataset: PreparedDataset) -> dict:
    """The plain-data description ``build_recommender`` and ``load_run`` rebuild from."""
    tower = {"name": opts.mode, "dropout": opts.dropout, "whiten": opts.whiten}
    if opts.layers is not None:
        tower["layers"] = opts.layers
    if opts.dnn is not None:
        tower["dnn"] = opts.dnn
    if opts.fusion:
        tower["fusion"] = opts.fusion
    if opts.with_id:
        tower["with_id"] = opts.with_id
    tower.update(ITEM_TOWERS.get(opts.mode).spec(opts, dataset.name))
    return {
        "n_items": dataset.n_items,
        "dim": opts.dim,
        "max_seq_len": model_seq_len(dataset),
        "item_tower": tower,
        "user_encoder": {"name": opts.backbone, "blocks": opts.blocks, "heads": opts.heads,
                         "dropout": opts.dropout,
                         **({} if opts.mask_prob is None else {"mask_prob": opts.mask_prob})},
    }


def optimizer_groups(model: Recommender, lr: float, encoder_lr: float | None) -> list[dict]:
    """AdamW parameter groups: the recommender (and new modules) at ``lr``, the pretrained encoder
    weights the item tower fine-tunes at ``encoder_lr``.

    Frozen parameters are left out, so the optimiser neither stores state for them
    nor applies weight decay to them.
    """
    pretrained = {id(p) for p in model.item_tower.pretrained_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "recommender", "params": [p for p in trainable if id(p) not in pretrained], "lr": lr}]
    encoder = [p for p in trainable if id(p) in pretrained]
    if encoder:
        groups.append({"name": "encoder", "params": encoder, "lr": encoder_lr or lr})
    return groups


def parameter_cost(model: nn.Module) -> dict:
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


def validate(model: Recommender, dataset: PreparedDataset) -> dict:
    """Full-pool HR@10 / NDCG@10 on the validation split: the one scoring function.

    Called on every process of a torchrun launch: each ranks its share of the users
    and all get the gathered metrics (:mod:`eval.distributed`).
    """
    from eval.evaluate import evaluate

    model.eval()
    try:
        result = evaluate(model, dataset, split="valid", ks=(10,), exclude_history=True)
    finally:
        model.train()
    return {k: float(v) for k, v in result.items() if "@" in k}


def _better(current: dict, best: dict | None) -> bool:
    if best is None:
        return True
    return tuple(current[k] for k in MONITOR) > tuple(best[k] for k in MONITOR)


def _collapsed(current: dict, best: dict | None) -> bool:
    key = MONITOR[0]
    return (best is not None and best[key] >= COLLAPSE_FLOOR
            and current[key] < COLLAPSE_FRACTION * best[key])


def _peak_rss_mb() -> float:
    """This process's own peak resident memory (Linux: VmHWM).

    ``ru_maxrss`` survives ``exec``: a trainer started by a large process (``recommend
    study`` runs each configuration in a fresh process) would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def _run_logger(run_dir, main: bool, echo: bool) -> Iterator[logging.Logger]:
    """``train.log`` in the run folder (and stderr when ``echo``), on process 0 only."""
    logger = logging.getLogger(f"recommend.train.{id(run_dir)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handlers: list[logging.Handler] = []
    if main:
        handlers.append(logging.FileHandler(run_dir / LOG))
        if echo:
            handlers.append(logging.StreamHandler(sys.stderr))
            handlers[-1].addFilter(lambda record: not getattr(record, "file_only", False))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def build_config(opts: TrainOptions, dataset: PreparedDataset, sources, spec: dict,
                 model: nn.Module, n_rows: int, procs: Processes, device: torch.device) -> dict:
    return {
        "format_version": 1,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "dataset": {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint,
            "interactions_fingerprint": dataset.manifest.get("interactions_fingerprint"),
            "n_items": dataset.n_items,
            "n_users": dataset.n_users,
            "train_sequences": n_rows,
        },
        "features": [s.record() for s in sources],
        "model": spec,
        "training": {
            "loss": opts.loss, "optimizer": "AdamW", "lr": opts.lr,
            "weight_decay": opts.weight_decay, "batch_size": opts.batch_size,
            "epochs": opts.epochs, "patience": opts.patience, "plateau_patience": opts.plateau_patience,
            "seed": opts.seed,
            "device": str(device), "world_size": procs.world_size,
            "monitor": list(MONITOR), "validation": {"split": "valid", "full_pool": True,
                                                     "exclude_history": True},
        },
        "options": asdict(opts),
        "cost": parameter_cost(model),
    }


def train(ws: Workspace, opts: TrainOptions, progress: bool = True, echo: bool = True,
          on_epoch: Callable[[int, dict], bool] | None = None) -> dict:
    """Train one recommender into its run folder (resuming it, see above) and return its summary.

    Args:
        on_epoch: called on process 0 after each validated epoch with ``(epoch, metrics)``;
            returning True stops the run with status ``pruned`` (``recommend tune``).

    Returns:
        ``{"run", "run_dir", "status", "best_epoch", "best", "epochs", "message", "popularity",
        "warning"}``; ``best`` holds the best validation metrics (``HR@10``, ``NDCG@10``),
        ``popularity`` the popularity baseline's on validation, ``warning`` what to do when
        ``best`` is not clearly above it (else None).

    Example:
        >>> train(Workspace(root), TrainOptions(dataset="HM", mode="ts-dnn", layers=8,
        ...                                     encoders=["swin-t"]))["best"]["HR@10"]
    """
    opts = check_options(opts)
    procs = Processes.from_env()
    device = resolve_device(opts.device, procs)
    if launched() and not dist.is_initialized():  # torchrun, even with one process (NCCL on 1 GPU)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = _train(ws, opts, procs, device, progress, echo, on_epoch)
        if dist.is_initialized():
            dist.barrier()  # leave together: a rank tearing gloo down while another still uses it aborts
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(ws: Workspace, opts: TrainOptions, procs: Processes, device: torch.device,
           progress: bool, echo: bool, on_epoch: Callable[[int, dict], bool] | None = None) -> dict:
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    kind = ITEM_TOWERS.get(opts.mode)
    sources = kind.open(ws, opts, dataset)  # opened and checked against the dataset's fingerprint
    spec = model_spec(opts, dataset)
    rows = training_rows(dataset, spec["max_seq_len"])
    if len(rows) == 0:
        raise UserError(f"dataset {dataset.name} has no user with 2+ training items; nothing to train")
    if dataset.n_items <= rows.shape[1]:
        raise UserError(f"dataset {dataset.name} has {dataset.n_items} items, too few to sample "
                        f"negatives outside sequences of {rows.shape[1]}")

    torch.manual_seed(opts.seed)  # identical initial weights on every process
    np.random.seed(opts.seed)
    model = build_recommender(spec, sources, fit=True).to(device)
    transferred = init_from_run(ws, opts, model, spec, sources)  # --init-from: source weights, else None
    context = LossContext(dataset.n_items, dataset.train_counts(), **loss_options(opts))
    loss = create_loss(opts.loss, context).to(device)
    aux = attach_objectives(model, opts.objectives)  # on the model: NID's head trains and saves with it
    objective: nn.Module = Objective(model, loss, aux)
    if dist.is_initialized():
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(optimizer_groups(model, opts.lr, opts.encoder_lr), lr=opts.lr,
                                  weight_decay=opts.weight_decay)
    batches = SequenceBatches(rows, opts.batch_size, opts.seed, procs.rank, procs.world_size)

    config = build_config(opts, dataset, sources, spec, model, len(rows), procs, device)
    config["parameters"] = parameter_breakdown(model)
    kind.describe(config, model)
    if transferred is not None:
        config["transfer"] = transferred
    name = procs.broadcast(_run_name(ws, opts, config) if procs.main else None)
    run_dir = open_run(ws, name, config) if procs.main else ws.run_dir(name)
    finished = procs.broadcast(_finished(run_dir) if procs.main else None)
    if finished is not None:
        return {"run": name, "run_dir": str(run_dir), **finished}
    resume = load_training_state(run_dir, model, optimizer)  # every process: same weights

    with run_lock(run_dir, procs.main), _run_logger(run_dir, procs.main, echo) as log:
        log.info("run %s: %s on %s, %d training sequences, %d items, %s trainable parameters "
                 "(%.2f%% of %s), device %s x%d", name, opts.mode, dataset.name, len(rows), dataset.n_items,
                 f"{config['cost']['trainable_params']:,}", 100 * config["parameters"]["trainable_share"],
                 f"{config['cost']['total_params']:,}", device, procs.world_size)
        if resume is not None and procs.main:
            _restore_run_files(run_dir, model, resume)
            log.info("resuming after epoch %d (from %s)", resume["epoch"], LAST)
        try:
            outcome = _epochs(objective, model, optimizer, batches, dataset, opts, procs, device,
                              run_dir, progress, log, resume, on_epoch)
        except KeyboardInterrupt:
            if procs.main:
                _mark_interrupted(run_dir)
                log.info("interrupted; the best checkpoint so far is kept")
            raise
        if procs.main:
            write_json(run_dir / BEST, {"epoch": outcome["best_epoch"], "metrics": outcome["best"],
                                        "status": outcome["status"], "message": outcome["message"],
                                        "popularity": outcome["popularity"], "warning": outcome["warning"]})
            (run_dir / LAST).unlink(missing_ok=True)  # finished: nothing left to resume
        log.info("%s", outcome["message"], extra={"file_only": True})  # the caller prints it once
        if outcome["warning"]:
            log.warning("warning: %s", outcome["warning"], extra={"file_only": True})
    return {"run": name, "run_dir": str(run_dir), **outcome}


def _epochs(objective, model: Recommender, optimizer, batches: SequenceBatches,
            dataset: PreparedDataset, opts: TrainOptions, procs: Processes,
            device: torch.device, run_dir, progress: bool, log: logging.Logger,
            resume: dict | None = None, on_epoch: Callable[[int, dict], bool] | None = None) -> dict:
    state = resume or {"epoch": 0, "best": None, "best_epoch": None, "since_best": 0,
                       "stopped": None, "records": []}
    best, best_epoch, since_best = state["best"], state["best_epoch"], state["since_best"]
    records = list(state["records"])
    status, message = state["stopped"] or ("completed", "")
    epoch = state["epoch"]
    first = opts.epochs + 1 if state["stopped"] else epoch + 1
    from eval.evaluate import popularity_metrics

    popular = popularity_metrics(dataset, "valid", ks=(10,)) if procs.main else None
    for epoch in range(first, opts.epochs + 1):
        torch.manual_seed(epoch_seed(opts.seed, procs.rank, epoch))  # negatives, dropout
        batches.set_epoch(epoch)
        objective.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start, total, steps = time.perf_counter(), 0.0, 0
        step_seconds: list[float] = []  # float(value) below waits for the device: these are true step times
        term_totals: dict[str, float] = {}
        bar = progress_bar(total=batches.n_sequences, unit="seq", desc=f"epoch {epoch}", leave=False,
                   disable=not (progress and procs.main), file=sys.stderr)
        finite = True
        step_start = start
        for rows in batches:
            value = objective(rows.to(device, non_blocking=True))
            finite = procs.all_true(bool(torch.isfinite(value)), device)
            if not finite:
                break
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total, steps = total + float(value.detach()), steps + 1
            step_seconds.append(time.perf_counter() - step_start)
            step_start = time.perf_counter()
            for name, part in _step_terms(objective).items():
                term_totals[name] = term_totals.get(name, 0.0) + float(part)
            bar.update(len(rows))
            bar.set_postfix(loss=f"{total / steps:.4f}")
        bar.close()
        seconds = time.perf_counter() - start
        if not finite:
            status = "collapsed"
            message = (f"training collapsed at epoch {epoch}, step {steps + 1}: the loss became "
                       f"{float(value.detach())}. {_kept(best_epoch)} Lower --lr (now {opts.lr:g}; try "
                       f"{opts.lr / 10:g}) or raise --weight-decay.")
            break
        mean_loss = procs.mean(total / max(steps, 1), device)
        terms = {name: procs.mean(part / max(steps, 1), device) for name, part in term_totals.items()}

        decision = None
        eval_start = time.perf_counter()
        metrics = validate(model, dataset)  # every process: the users are sharded across them
        if procs.main:
            record = {
                "epoch": epoch, "loss": mean_loss, "valid": metrics, "seconds": seconds,
                "sec_per_step": seconds / max(steps, 1), "steps": steps,
                # the median step, robust to the first step's warm-up and to a loaded machine's spikes
                "sec_per_step_median": statistics.median(step_seconds) if step_seconds else None,
                "first_step_seconds": step_seconds[0] if step_seconds else None,
                "sequences_per_sec": batches.n_sequences * procs.world_size / seconds,
                "eval_seconds": time.perf_counter() - eval_start,
                "peak_rss_mb": _peak_rss_mb(),
                "peak_gpu_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                                if device.type == "cuda" else None),
            }
            if terms:
                record["terms"] = terms
            log.info("epoch %d: loss %.4f%s, valid %s, %.1fs (%.1f seq/s)", epoch, mean_loss,
                     f" ({', '.join(f'{k} {v:.4f}' for k, v in terms.items())})" if terms else "",
                     format_metrics(metrics), seconds,
                     record["sequences_per_sec"])
            if _collapsed(metrics, best):
                decision = ("collapsed",
                            f"training collapsed at epoch {epoch}: validation {MONITOR[0]} fell "
                            f"from {percent(best[MONITOR[0]])}% (epoch {best_epoch}) to "
                            f"{percent(metrics[MONITOR[0]])}%. {_kept(best_epoch)} Lower --lr (now "
                            f"{opts.lr:g}; try {opts.lr / 10:g}).")
            elif _better(metrics, best):
                best, best_epoch, since_best = metrics, epoch, 0
            else:
                since_best += 1
                patience = opts.patience if _left_plateau(best, popular) else opts.plateau_patience
                if since_best >= patience:
                    decision = ("early_stopped",
                                f"early stop at epoch {epoch}: no better validation "
                                f"{MONITOR[0]} for {patience} epochs"
                                + ("." if patience == opts.patience else
                                   " while still at popularity's level (--plateau-patience)."))
            if decision is None and on_epoch is not None and on_epoch(epoch, metrics):
                decision = ("pruned", f"pruned at epoch {epoch} by the hyper-parameter search.")
            records.append(record)
            # resumable state first; the best checkpoint is only ever written after a state
            # that names it (see _restore_run_files), and metrics.jsonl is rebuilt on resume
            save_training_state(run_dir, model, optimizer, {
                "epoch": epoch, "best": best, "best_epoch": best_epoch, "since_best": since_best,
                "stopped": decision, "records": records})
            if best_epoch == epoch:
                save_checkpoint(run_dir, model)
                write_json(run_dir / BEST, {"epoch": epoch, "metrics": metrics, "status": "running"})
            append_metrics(run_dir, record)
        decision = procs.broadcast(decision)
        if decision is not None:
            status, message = decision
            break
    best_epoch, best = procs.broadcast((best_epoch, best))
    if status == "completed":
        message = f"finished {opts.epochs} epochs."
    summary = (f"best validation {format_metrics(best)} at epoch "
               f"{best_epoch}" if best else "no epoch was validated")
    return {"status": status, "best_epoch": best_epoch, "best": best or {}, "epochs": epoch,
            "message": f"{message} {summary}; checkpoint {CHECKPOINT if best else 'none'}.",
            "popularity": popular, "warning": popularity_warning(best, popular, opts) if procs.main else None}


def _left_plateau(best: dict | None, popular: dict) -> bool:
    """Whether the best validation HR@10 so far is clearly above the popularity baseline's.

    Sequential models first learn popularity and sit at its level, sometimes for tens of
    epochs, before they learn sequences (001 Fig. 5; BERT4Rec and SASRec at small lr), so
    early stopping counts ``--patience`` only once this is true, ``--plateau-patience`` before.
    """
    return best is not None and best[MONITOR[0]] >= CLEARLY_ABOVE * popular[MONITOR[0]]


def popularity_warning(best: dict | None, popular: dict, opts: TrainOptions) -> str | None:
    """What to tell the user when the run learned no more than item popularity (else None)."""
    if _left_plateau(best, popular):
        return None
    score = f"{percent(best[MONITOR[0]])}%" if best else "none"
    return (f"best validation {MONITOR[0]} {score} is not clearly above the popularity baseline's "
            f"{percent(popular[MONITOR[0]])}% (under {CLEARLY_ABOVE:g}x): this model has learned no more than "
            f"how popular items are, so its numbers say nothing about its item tower or backbone. It may "
            f"have stopped on the popularity plateau or be set up badly. Try more --epochs or "
            f"--plateau-patience, another --lr (now {opts.lr:g}; try {opts.lr * 3:g} and {opts.lr / 3:g}), "
            f"--loss ce, or search with `recommend tune`.")


def _step_terms(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The last step's separate loss terms (empty without ``--objectives``), DDP-wrapped or not."""
    return (objective.module if isinstance(objective, DistributedDataParallel) else objective).terms


def _finished(run_dir) -> dict | None:
    """The outcome of a run that already ended (best.json says so), else None."""
    path = run_dir / BEST
    best = json.loads(path.read_text()) if path.exists() else {}
    if best.get("status") not in FINISHED:
        return None
    return {"status": best["status"], "best_epoch": best.get("epoch"), "best": best.get("metrics", {}),
            "epochs": len(read_metrics(run_dir)), "popularity": best.get("popularity"),
            "warning": best.get("warning"),
            "message": f"already finished, nothing to do: {best.get('message', '')}".strip()}


def _restore_run_files(run_dir, model: Recommender, state: dict) -> None:
    """Make the run folder agree with the resumed state after a kill at any point of an epoch.

    ``metrics.jsonl`` keeps the resumed epochs only; when the state's own epoch was the best,
    the kill may have come between the state and the checkpoint, so the checkpoint is
    rewritten from the restored weights (an older best was written before its successor state).
    """
    rewrite_metrics(run_dir, state["records"])
    if state["best_epoch"] is not None:
        if state["best_epoch"] == state["epoch"]:
            save_checkpoint(run_dir, model)
        write_json(run_dir / BEST, {"epoch": state["best_epoch"], "metrics": state["best"],
                                    "status": "running"})


def _mark_interrupted(run_dir) -> None:
    path = run_dir / BEST
    best = json.loads(path.read_text()) if path.exists() else {"epoch": None, "metrics": {}}
    write_json(path, {**best, "status": "interrupted"})


def _run_name(ws: Workspace, opts: TrainOptions, config: dict) -> str:
    """The given ``--run-name``, else a generated one made unique with a suffix."""
    if opts.run_name:
        return opts.run_name
    base = name = default_run_name(config)
    suffix = 2
    while ws.run_dir(name).exists():
        name, suffix = f"{base}-{suffix}", suffix + 1
    return name


def _kept(best_epoch: int | None) -> str:
    if best_epoch is None:
        return "No epoch had finished, so there is no checkpoint."
    return f"Kept the best checkpoint (epoch {best_epoch})."
