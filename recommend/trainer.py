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

import logging
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.dataset import PreparedDataset
from eval.metrics import format_metrics
from featurestore.errors import UserError
from featurestore.progress import progress_bar
from featurestore.runtime.device import resolve_device
from featurestore.runtime.processes import Processes, process_group
from featurestore.runtime.seeding import epoch_seed
from featurestore.workspace import Workspace
from recommend import __version__
from recommend.batches import SequenceBatches, model_seq_len
from recommend.cost import parameter_breakdown
from recommend.instances import instance_rows, last_only
from recommend.item_towers import ITEM_TOWERS
from recommend.losses import LOSSES, Loss, LossContext, create_loss
from recommend.model import Recommender, build_recommender
from recommend.objectives import AuxObjectives, Step, attach_objectives
from recommend.options import TrainOptions
from recommend.plugins import check_options, feature_callbacks
from recommend.steps import last_item_step
from recommend.stopping import MONITOR, EarlyStopping
from recommend.transfer import init_from_run
from recommend.callbacks import Callback
from recommend.run import CHECKPOINT, LAST, LOG
from recommend.run_folder import RunFolder
from recommend.user_encoders import USER_ENCODERS


class Objective(nn.Module):
    """Recommender + loss as one module, so DDP sees the whole step in ``forward``.

    With auxiliary terms (``--objectives``) the step returns their sum with the
    recommendation loss (002 Eq. 12, every weight 1) and keeps each term's detached
    value in ``terms`` (``rec`` = the recommendation loss) for the per-epoch log.
    ``last_only`` (``--instances prefix``): the loss at each row's last position only.
    """

    def __init__(self, model: Recommender, loss: Loss, aux: AuxObjectives | None = None,
                 last_only: bool = False) -> None:
        super().__init__()
        self.model, self.loss, self.aux, self.last_only = model, loss, aux, last_only
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.last_only:
            step = last_item_step(self.model, self.loss, rows)
        else:
            step = self.model.user_encoder.training_step(self.model, self.loss, rows)  # the backbone's own step
        if self.aux is None:
            return step.value
        parts = {"rec": step.value, **self.aux(Step(self.model, rows, step.vectors, step.hidden))}
        self.terms = {name: part.detach() for name, part in parts.items()}
        return torch.stack(list(parts.values())).sum()


def model_spec(opts: TrainOptions, dataset: PreparedDataset) -> dict:
    """The plain-data description ``build_recommender`` and ``load_run`` rebuild from: the
    checked options' item tower (its mode's spec) and user encoder (its backbone's)."""
    return {
        "n_items": dataset.n_items,
        "dim": opts.dim,
        "max_seq_len": model_seq_len(dataset),
        "item_tower": ITEM_TOWERS.get(opts.mode).spec(opts, dataset.name),
        "user_encoder": USER_ENCODERS.get(opts.backbone).spec(opts),
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
        "options": opts.to_dict(),
        "cost": parameter_cost(model),
    }


def train(ws: Workspace, opts: TrainOptions, progress: bool = True, echo: bool = True,
          callbacks: Sequence[Callback] = ()) -> dict:
    """Train one recommender into its run folder (resuming it, see above) and return its summary.

    Args:
        callbacks: observers of the run (:class:`recommend.callbacks.Callback`), on process 0; one
            whose ``on_epoch_end`` returns True stops the run as ``pruned`` (``recommend tune``).

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
    device = resolve_device(opts.device, Processes.from_env())
    callbacks = [*feature_callbacks(opts), *callbacks]  # observers see an epoch before a caller stops the run
    with process_group(str(device)) as procs:  # torchrun, even with one process (NCCL on 1 GPU)
        return _train(ws, opts, procs, device, progress, echo, callbacks)


def _train(ws: Workspace, opts: TrainOptions, procs: Processes, device: torch.device,
           progress: bool, echo: bool, callbacks: Sequence[Callback]) -> dict:
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    kind = ITEM_TOWERS.get(opts.mode)
    sources = kind.open(ws, opts, dataset)  # opened and checked against the dataset's fingerprint
    spec = model_spec(opts, dataset)
    rows = instance_rows(opts, dataset, spec["max_seq_len"])
    if len(rows) == 0:
        raise UserError(f"dataset {dataset.name} has no user with 2+ training items; nothing to train")
    if dataset.n_items <= rows.shape[1]:
        raise UserError(f"dataset {dataset.name} has {dataset.n_items} items, too few to sample "
                        f"negatives outside sequences of {rows.shape[1]}")

    torch.manual_seed(opts.seed)  # identical initial weights on every process
    np.random.seed(opts.seed)
    model = build_recommender(spec, sources, fit=True).to(device)
    transferred = init_from_run(ws, opts, model, spec, sources)  # --init-from: source weights, else None
    context = LossContext(dataset.n_items, dataset.train_counts(), **LOSSES.get(opts.loss).context_options(opts))
    loss = create_loss(opts.loss, context).to(device)
    aux = attach_objectives(model, opts.objectives)  # on the model: NID's head trains and saves with it
    objective: nn.Module = Objective(model, loss, aux, last_only(opts))
    if dist.is_initialized():
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(optimizer_groups(model, opts.lr, kind.encoder_lr(opts)), lr=opts.lr,
                                  weight_decay=opts.weight_decay)
    batches = SequenceBatches(rows, opts.batch_size, opts.seed, procs.rank, procs.world_size)

    config = build_config(opts, dataset, sources, spec, model, len(rows), procs, device)
    config["parameters"] = parameter_breakdown(model)
    kind.describe(config, model)
    if transferred is not None:
        config["transfer"] = transferred
    run = RunFolder.open(ws, opts.run_name, config, procs)
    finished = run.finished(procs)
    if finished is not None:
        return {"run": run.name, "run_dir": str(run.path), **finished}
    resume = run.resume(model, optimizer)  # every process: the same weights

    with run.lock(), _run_logger(run.path, procs.main, echo) as log:
        log.info("run %s: %s on %s, %d training sequences, %d items, %s trainable parameters "
                 "(%.2f%% of %s), device %s x%d", run.name, opts.mode, dataset.name, len(rows), dataset.n_items,
                 f"{config['cost']['trainable_params']:,}", 100 * config["parameters"]["trainable_share"],
                 f"{config['cost']['total_params']:,}", device, procs.world_size)
        if resume is not None:
            log.info("resuming after epoch %d (from %s)", resume["epoch"], LAST)
        callbacks = callbacks if procs.main else []
        for callback in callbacks:
            callback.on_train_start(run.path, config)
        try:
            outcome = _epochs(objective, model, optimizer, batches, dataset, opts, procs, device,
                              run, progress, log, resume, callbacks)
        except KeyboardInterrupt:
            run.interrupted()
            log.info("interrupted; the best checkpoint so far is kept")
            raise
        run.finish(outcome)
        for callback in callbacks:
            callback.on_train_end(outcome)
        log.info("%s", outcome["message"], extra={"file_only": True})  # the caller prints it once
        if outcome["warning"]:
            log.warning("warning: %s", outcome["warning"], extra={"file_only": True})
    return {"run": run.name, "run_dir": str(run.path), **outcome}


def _epochs(objective, model: Recommender, optimizer, batches: SequenceBatches,
            dataset: PreparedDataset, opts: TrainOptions, procs: Processes, device: torch.device,
            run: RunFolder, progress: bool, log: logging.Logger, resume: dict | None,
            callbacks: Sequence[Callback]) -> dict:
    from eval.evaluate import popularity_metrics

    state = resume or {"epoch": 0, "best": None, "best_epoch": None, "since_best": 0, "stopped": None,
                       "records": []}
    stopping = EarlyStopping(opts.patience, opts.plateau_patience, opts.lr,
                             popularity_metrics(dataset, "valid", ks=(10,)) if procs.main else None)
    stopping.load_state_dict(state)
    records = list(state["records"])
    status, message = state["stopped"] or ("completed", "")
    epoch = state["epoch"]
    first = opts.epochs + 1 if state["stopped"] else epoch + 1
    for epoch in range(first, opts.epochs + 1):
        torch.manual_seed(epoch_seed(opts.seed, procs.rank, epoch))  # negatives, dropout
        trained = _train_epoch(objective, optimizer, batches, procs, device, epoch, progress)
        if trained["collapsed"] is not None:
            status, message = stopping.non_finite(epoch, *trained["collapsed"])
            break
        decision = None
        eval_start = time.perf_counter()
        metrics = validate(model, dataset)  # every process: the users are sharded across them
        if procs.main:
            record = _epoch_record(epoch, trained, metrics, batches, procs, device, eval_start, optimizer)
            log.info("epoch %d: loss %.4f%s, valid %s, %.1fs (%.1f seq/s)", epoch, record["loss"],
                     f" ({', '.join(f'{k} {v:.4f}' for k, v in trained['terms'].items())})"
                     if trained["terms"] else "", format_metrics(metrics), record["seconds"],
                     record["sequences_per_sec"])
            decision = stopping.update(epoch, metrics)
            record["left_plateau"] = stopping.left_plateau()  # clearly above popularity (a pruner's cue)
            stop = [callback.on_epoch_end(epoch, record) for callback in callbacks]
            if decision is None and any(stop):
                decision = ("pruned", f"pruned at epoch {epoch} by the hyper-parameter search.")
            records.append(record)
            run.epoch_done(model, optimizer, {"epoch": epoch, **stopping.state_dict(), "stopped": decision,
                                              "records": records}, record, stopping.improved(epoch))
        decision = stopping.agree(procs, decision)
        if decision is not None:
            status, message = decision
            break
    best = stopping.best
    if status == "completed":
        message = f"finished {opts.epochs} epochs."
    summary = (f"best validation {format_metrics(best)} at epoch "
               f"{stopping.best_epoch}" if best else "no epoch was validated")
    return {"status": status, "best_epoch": stopping.best_epoch, "best": best or {}, "epochs": epoch,
            "message": f"{message} {summary}; checkpoint {CHECKPOINT if best else 'none'}.",
            "popularity": stopping.popular, "warning": stopping.warning() if procs.main else None}


def _train_epoch(objective, optimizer, batches: SequenceBatches, procs: Processes, device: torch.device,
                 epoch: int, progress: bool) -> dict:
    """One pass over the training rows: mean loss and terms (over every process), step times, and
    ``collapsed`` = (step, loss value) if a step's loss was not finite on any process."""
    batches.set_epoch(epoch)
    objective.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, total, steps = time.perf_counter(), 0.0, 0
    step_seconds: list[float] = []  # float(value) below waits for the device: these are true step times
    term_totals: dict[str, float] = {}
    bar = progress_bar(total=batches.n_sequences, unit="seq", desc=f"epoch {epoch}", leave=False,
                       disable=not (progress and procs.main), file=sys.stderr)
    collapsed = None
    step_start = start
    for rows in batches:
        value = objective(rows.to(device, non_blocking=True))
        if not procs.all_true(bool(torch.isfinite(value)), device):
            collapsed = (steps + 1, float(value.detach()))
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
    if collapsed is not None:
        return {"collapsed": collapsed}
    return {"collapsed": None, "seconds": time.perf_counter() - start, "steps": steps, "step_seconds": step_seconds,
            "loss": procs.mean(total / max(steps, 1), device), "loss_stats": _unwrapped(objective).loss.epoch_stats(),
            "terms": {name: procs.mean(part / max(steps, 1), device) for name, part in term_totals.items()}}


def _epoch_record(epoch: int, trained: dict, metrics: dict, batches: SequenceBatches, procs: Processes,
                  device: torch.device, eval_start: float, optimizer: torch.optim.Optimizer) -> dict:
    """The epoch's line of ``metrics.jsonl``."""
    seconds, steps, step_seconds = trained["seconds"], trained["steps"], trained["step_seconds"]
    record = {
        "epoch": epoch, "loss": trained["loss"], "valid": metrics, "seconds": seconds,
        "sec_per_step": seconds / max(steps, 1), "steps": steps,
        # the median step, robust to the first step's warm-up and to a loaded machine's spikes
        "sec_per_step_median": statistics.median(step_seconds) if step_seconds else None,
        "first_step_seconds": step_seconds[0] if step_seconds else None,
        "sequences_per_sec": batches.n_sequences * procs.world_size / seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "lr": {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)},
    }
    if trained["terms"]:
        record["terms"] = trained["terms"]
    record.update(trained["loss_stats"])  # e.g. the cached catalogue's refreshes and their seconds
    return record


def _unwrapped(objective: nn.Module) -> nn.Module:
    """The Objective itself, DDP-wrapped or not."""
    return objective.module if isinstance(objective, DistributedDataParallel) else objective


def _step_terms(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The last step's separate loss terms (empty without ``--objectives``)."""
    return _unwrapped(objective).terms
