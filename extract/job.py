"""The extraction job: one encoder over a prepared catalogue, rows into a store group.

Why it is built this way:

- **Streaming.** DataLoader workers decode pictures / check texts; one batch at a
  time goes through the model under ``torch.inference_mode`` (bf16/fp16 autocast
  on a GPU); memory holds one row chunk, never the catalogue.
- **Whole chunks, one writer each.** Work is planned in the store's row chunks and
  every batch lies inside one chunk. A process writes a chunk only once all its
  rows are computed, then marks it done. Zarr has no inter-process locking, so under
  ``torchrun`` every rank owns disjoint chunks.
- **Resumable, bit for bit.** A rerun with the same arguments skips done chunks;
  since the batches of a chunk never depend on which chunks ran before, a
  killed-then-resumed job writes exactly the bytes an uninterrupted one would.
- **Honest status.** The group says ``partial`` until rank 0 has seen every chunk
  done; only then ``complete``, with bad items, timings and versions recorded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.dataset import Item, PreparedDataset
from data.images import refuse_changed
from extract.cache import CachingForward, ensure_cache_arrays, plan_cache
from extract.layers import ALL_LAYERS, LayerForward, plan_layers
from extract.encoder import BadItem, Encoder, move_inputs
from extract.options import ExtractOptions
from extract.registry import create_encoder, get_encoder_config
from featurestore.errors import UserError
from featurestore.progress import progress_bar
from featurestore.runtime.device import resolve_device
from featurestore.runtime.processes import Processes, process_group
from featurestore.runtime.versions import versions
from featurestore.store import (
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_PARTIAL,
    FeatureGroup,
    FeatureStore,
    GroupLock,
    group_name,
)
from featurestore.workspace import Workspace

# Settings that change the numbers in a row: a resumed or repeated job must match
# the group on all of them, or it would mix rows from two different setups.
SIGNATURE_KEYS = ("encoder", "pooling", "state_sha256", "preprocessing", "dtype", "autocast", "cache_layer",
                  "cache_dtype", "compute_dtype")


CACHING = (CachingForward, LayerForward)  # forwards that also keep states for the group's cache

# torchrun's processes finish their chunks at different times; the final barrier may wait long.
# Only small control messages travel, so the group is gloo even beside GPUs.
GROUP_TIMEOUT = dt.timedelta(hours=48)


@dataclass
class ExtractResult:
    """What a job did; ``summary()`` is the line the CLI prints."""

    group: str
    path: str
    status: str
    items: int
    embedded: int
    bad: int
    computed_chunks: int
    resumed_chunks: int
    seconds: float
    items_per_second: float
    world_size: int = 1
    bad_items: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        if self.computed_chunks == 0 and self.status == STATUS_COMPLETE:
            return f"{self.group}: already complete ({self.embedded} items embedded, {self.bad} bad); nothing to do"
        resumed = f", resumed after {self.resumed_chunks} done chunks" if self.resumed_chunks else ""
        return (f"{self.group}: {self.status}; {self.embedded}/{self.items} items embedded, {self.bad} bad "
                f"skipped; {self.computed_chunks} chunks in {self.seconds:.1f}s "
                f"({self.items_per_second:.1f} items/s{resumed})")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    """A collated batch: inputs for the items that loaded, and the ones that did not."""

    ids: list[int]
    inputs: Any
    bad: list[tuple[int, str, str | None]]

    def __len__(self) -> int:
        return len(self.ids) + len(self.bad)


class ItemDataset(Dataset):
    """Item id -> preprocessed sample, or the reason it cannot be read (runs in workers)."""

    def __init__(self, items: list[Item], preprocessor: Any) -> None:
        self.items = items
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.items) + 1

    def __getitem__(self, item_id: int) -> tuple[int, Any, tuple[str, str | None] | None]:
        try:
            return item_id, self.preprocessor.load(self.items[item_id - 1]), None
        except BadItem as bad:
            return item_id, None, (bad.reason, bad.file)

    def collate(self, samples: list) -> Batch:
        good = [(i, s) for i, s, err in samples if err is None]
        bad = [(i, err[0], err[1]) for i, _, err in samples if err is not None]
        inputs = self.preprocessor.collate([s for _, s in good]) if good else None
        return Batch([i for i, _ in good], inputs, bad)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16; full fp32 on the CPU (where autocast gains nothing)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def id_batches(ids: list[int], batch_size: int, length: Callable[[int], int] | None = None) -> list[list[int]]:
    """``ids`` in batches; with ``length`` (texts) sorted by it first, so a batch pads its titles to similar
    lengths (``bench/extraction.py --sorting`` measures the gain in tokens/s)."""
    ids = sorted(ids, key=length) if length is not None else ids
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def batch_plan(group: FeatureGroup, chunks: list[int], batch_size: int,
               length: Callable[[int], int] | None = None) -> list[list[list[int]]]:
    """Per chunk, its batches of item ids (a batch never crosses a chunk boundary; see :func:`id_batches`)."""
    plan = []
    for chunk in chunks:
        start, stop = group.chunk_bounds(chunk)
        plan.append(id_batches(list(range(max(start, 1), stop)), batch_size, length))
    return plan


class Forward:
    """Batched inference: inputs -> numpy rows in the stored dtype."""

    def __init__(self, encoder: Encoder, device: torch.device, dtype: str, precision: str | None = None) -> None:
        """``precision`` (``--dtype``): run the model in that dtype (weights cast once, no autocast); None:
        float32 on a CPU, bf16/fp16 autocast on a GPU."""
        self.cast = None if precision in (None, "float32") else getattr(torch, precision)
        self.encoder = encoder.to(device, dtype=self.cast).eval() if self.cast else encoder.to(device).eval()
        self.device = device
        self.amp = autocast_dtype(device) if precision is None else None
        self.dtype = np.dtype(dtype)

    def __call__(self, inputs: Any) -> np.ndarray:
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        inputs = move_inputs(inputs, self.device)
        if self.cast is not None:
            inputs = cast_floating(inputs, self.cast)
        with torch.inference_mode(), amp:
            out = self.encoder(inputs)
        return out.float().cpu().numpy().astype(self.dtype)


def cast_floating(inputs: Any, dtype: torch.dtype) -> Any:
    """Pixels in the model's dtype (token ids and masks stay integers)."""
    if isinstance(inputs, dict):
        return {k: cast_floating(v, dtype) for k, v in inputs.items()}
    return inputs.to(dtype) if inputs.is_floating_point() else inputs


def _bad_record(dataset: PreparedDataset, item_id: int, reason: str, file: str | None) -> dict:
    item = dataset.items[item_id - 1]
    return {"id": item_id, "orig_id": item.orig_id, "reason": reason,
            "file": file or item.image or str(dataset.path / "items.jsonl")}


def _run_chunks(group: FeatureGroup, dataset: PreparedDataset, encoder: Encoder, forward: Forward,
                chunks: list[int], opts: ExtractOptions, procs: Processes) -> dict:
    """Compute and write ``chunks`` (this rank's share); returns counts for the summary."""
    length = getattr(encoder.preprocessor, "length", None)
    plan = batch_plan(group, chunks, opts.batch_size, length and (lambda i: length(dataset.items[i - 1])))
    items = ItemDataset(dataset.items, encoder.preprocessor)
    loader = DataLoader(
        items, batch_sampler=[batch for chunk in plan for batch in chunk], collate_fn=items.collate,
        num_workers=opts.workers, pin_memory=forward.device.type == "cuda",
    )
    total = sum(len(batch) for chunk in plan for batch in chunk)
    bad: list[dict] = []
    batches = iter(loader)
    with progress_bar(total=total, unit="item", desc=group.name, disable=not (opts.progress and procs.main),
              dynamic_ncols=True, smoothing=0.1) as bar:
        for chunk, chunk_batches in zip(chunks, plan):
            start, stop = group.chunk_bounds(chunk)
            rows = np.zeros((stop - start, group.dim), dtype=forward.dtype)
            present = np.zeros(stop - start, dtype=bool)
            states = forward.chunk(start, stop) if isinstance(forward, CACHING) else None
            for _ in chunk_batches:
                batch = next(batches)
                for item_id, reason, file in batch.bad:
                    record = _bad_record(dataset, item_id, reason, file)
                    if opts.on_bad_item == "fail":
                        raise UserError(
                            f"item {item_id} ({record['orig_id']}): {reason}: {record['file']}; fix it, or "
                            "rerun with --on-bad-item skip to leave its row empty"
                        )
                    bad.append(record)
                if batch.ids:
                    out = forward(batch.inputs)
                    if not np.isfinite(out).all():
                        raise UserError(f"{encoder.name} produced non-finite values for items {batch.ids[:5]}...; "
                                        "the weights may be broken (try --dtype float32 or other --weights)")
                    rows[np.asarray(batch.ids) - start] = out
                    present[np.asarray(batch.ids) - start] = True
                    if states is not None:
                        states.put(batch.ids)
                bar.update(len(batch))
            if states is not None:
                states.write(group)  # before the chunk is marked done: no done rows without states
            group.write_chunk(chunk, rows, present)
    return {"items": total, "bad": bad}


def _signature(attrs: dict) -> dict:
    return {key: attrs.get(key) for key in SIGNATURE_KEYS}


def _open_or_create(store: FeatureStore, name: str, dataset: PreparedDataset, job_attrs: dict,
                    opts: ExtractOptions, dim: int) -> FeatureGroup:
    """The group to write into: a new one, or an existing one built the same way."""
    if not store.exists(name):
        return store.create(name, rows=dataset.n_items + 1, dim=dim, dtype=opts.dtype,
                            chunk_rows=opts.chunk_rows, attrs=job_attrs)
    group = store.open(name)
    if group.fingerprint != dataset.fingerprint:
        raise UserError(
            f"store group {name} was built for dataset fingerprint {group.fingerprint}, but the prepared "
            f"dataset {dataset.name} now has fingerprint {dataset.fingerprint}; remove the old rows "
            f"(`featurestore rm {name}`) or write a new group with --variant TAG"
        )
    ours, theirs = _signature(job_attrs), _signature(group.attrs)
    differ = [key for key in SIGNATURE_KEYS if ours[key] != theirs[key]]
    if differ or group.rows != dataset.n_items + 1 or group.dim != dim:
        detail = "; ".join(f"{k}: stored {theirs[k]!r:.80} vs now {ours[k]!r:.80}" for k in differ) or "shape"
        raise UserError(
            f"store group {name} was written with other settings ({detail}); keep both with --variant TAG, "
            f"or replace it: `featurestore rm {name}`"
        )
    return group


def _finalise(group: FeatureGroup, dataset: PreparedDataset, encoder: Encoder, bad_seen: list[dict],
              timings: dict) -> None:
    """Rank 0, all chunks done: record bad items, write the flat copy, mark complete."""
    present = group.present()
    known = {record["id"]: record for record in bad_seen}
    bad = []
    for item_id in np.flatnonzero(~present[1:]) + 1:
        item_id = int(item_id)
        if item_id not in known:  # written by another rank or an earlier, killed run: ask again
            try:
                encoder.preprocessor.load(dataset.items[item_id - 1])
                known[item_id] = _bad_record(dataset, item_id, "unreadable during extraction", None)
            except BadItem as err:
                known[item_id] = _bad_record(dataset, item_id, err.reason, err.file)
        bad.append(known[item_id])
    group.write_flat()
    group.update_attrs(status=STATUS_COMPLETE, bad_items=bad, n_bad=len(bad), timings=timings,
                       completed=time.strftime("%Y-%m-%d %H:%M:%S"))


def run_extraction(ws: Workspace, opts: ExtractOptions) -> ExtractResult:
    """Run (or resume) one extraction; under torchrun every rank calls this.

    Example:
        >>> run_extraction(ws, ExtractOptions(dataset="HM", encoder="efficientnet-lite0")).summary()
    """
    with process_group(timeout=GROUP_TIMEOUT) as procs:
        return _run(ws, opts, procs)


def _job_attrs(name: str, dataset: PreparedDataset, encoder: Encoder, forward: Forward,
               opts: ExtractOptions) -> dict:
    """The group's provenance, as this job would write it."""
    provenance = encoder.provenance
    return {
        "group": name, "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint,
        "n_items": dataset.n_items, "modality": encoder.config.modality, "encoder": encoder.name,
        "variant": opts.variant, "pooling": encoder.pooling, "weights": provenance["weights"],
        "weights_sha256": provenance["weights_sha256"], "state_sha256": provenance["state_sha256"],
        "preprocessing": provenance["preprocessing"], "dtype": opts.dtype,
        "autocast": str(forward.amp).removeprefix("torch.") if forward.amp else None,
        "compute_dtype": opts.precision,
        "provenance": provenance, "versions": versions(), "command": opts.command(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _claim(store: FeatureStore, lock: GroupLock, dataset: PreparedDataset, job_attrs: dict,
           opts: ExtractOptions, dim: int, procs: Processes) -> list[int]:
    """Rank 0 takes the lock, checks or creates the group and lists the chunks left; every rank gets the list.

    Rank 0's UserError (lock held, fingerprint, settings) is sent to the other ranks so
    that all of them stop with the same message.
    """
    name = lock.name
    todo: list[int] | UserError = []
    if procs.main:
        try:
            lock.acquire(command=opts.command())
            group = _open_or_create(store, name, dataset, job_attrs, opts, dim)
            ensure_cache_arrays(group)
            todo = [int(c) for c in np.flatnonzero(~group.done_chunks())]
            if todo:
                group.drop_flat()
                group.update_attrs(status=STATUS_PARTIAL, failure=None, versions=job_attrs["versions"])
        except UserError as err:
            todo = err
    todo = procs.broadcast(todo)
    if isinstance(todo, UserError):
        raise todo
    return todo


def _run(ws: Workspace, opts: ExtractOptions, procs: Processes) -> ExtractResult:
    started = time.perf_counter()
    if opts.on_bad_item not in ("skip", "fail"):
        raise UserError(f"--on-bad-item {opts.on_bad_item}: choose skip or fail")
    config = get_encoder_config(opts.encoder, opts.modality, opts.weights)
    if opts.modality and opts.modality != config.modality:
        raise UserError(f"encoder {config.name} reads {config.modality}, not {opts.modality}; drop --modality "
                        f"or pick a {opts.modality} encoder ({', '.join(_names(opts.modality))})")
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    if config.modality != "text":
        refuse_changed(dataset)  # before any picture is read: stored rows must be of the prepared ones
    name = group_name(dataset.name, config.modality, config.name, opts.variant)
    encoder = create_encoder(config.name, weights=opts.weights, random_init=opts.random_init,
                             pooling=opts.pooling, seed=opts.seed, max_text_tokens=opts.max_text_tokens,
                             prompt=opts.prompt)
    forward = Forward(encoder, resolve_device(opts.device, procs), opts.dtype, opts.precision)
    if opts.cache_layer == ALL_LAYERS:
        forward = LayerForward(forward, plan_layers(encoder, opts.cache_dtype))
    elif opts.cache_layer is not None:
        forward = CachingForward(forward, plan_cache(encoder, opts.cache_layer, opts.cache_dtype))
    loaded = time.perf_counter()
    job_attrs = _job_attrs(name, dataset, encoder, forward, opts)
    job_attrs.update(forward.plan.attrs() if isinstance(forward, CACHING) else {})
    store = FeatureStore(ws.store)
    lock = store.lock(name)
    try:
        todo = _claim(store, lock, dataset, job_attrs, opts, encoder.width, procs)
        group = store.open(name)
        mine = todo[procs.rank :: procs.world_size]
        try:
            counts = _run_chunks(group, dataset, encoder, forward, mine, opts, procs) if mine else {"items": 0, "bad": []}
        except UserError as err:  # a bad item under --on-bad-item fail, broken weights: say so in `ls`
            group.update_attrs(status=STATUS_FAILED, failure=str(err))
            raise
        everyone = procs.gather_objects(counts)  # also the barrier: every rank's chunks are written
        seconds = time.perf_counter() - loaded
        computed = sum(c["items"] for c in everyone)
        rate = round(computed / seconds, 2) if seconds > 0 else 0.0
        timings = {"model_load_s": round(loaded - started, 3), "extract_s": round(seconds, 3),
                   "items_per_s": rate, "world_size": procs.world_size, "batch_size": opts.batch_size,
                   "workers": opts.workers, "device": str(forward.device), "computed_items": computed}
        # also after a kill between the last chunk and the final attributes: nothing is left
        # to compute, but the group still says partial
        if procs.main and group.refresh().status != STATUS_COMPLETE and group.done_chunks().all():
            _finalise(group, dataset, encoder, [r for c in everyone for r in c["bad"]], timings)
        group.refresh()
        embedded = int(group.present()[1:].sum())
        return ExtractResult(
            group=name, path=str(group.path), status=group.status, items=dataset.n_items, embedded=embedded,
            bad=dataset.n_items - embedded, computed_chunks=len(todo), resumed_chunks=group.n_chunks - len(todo),
            seconds=round(seconds, 3), items_per_second=rate, world_size=procs.world_size,
            bad_items=group.attrs.get("bad_items", []),
        )
    finally:
        lock.release()


def _names(modality: str) -> list[str]:
    from extract.registry import list_encoders

    return list_encoders(modality=modality)


def recompute_rows(group: FeatureGroup, dataset: PreparedDataset, ids: list[int], device: str = "cpu") -> np.ndarray:
    """Recompute rows of ``ids`` with the encoder and settings the group records (for ``verify``).

    Rebuilds the model from the provenance (bundled package, local file, hub id, or
    the recorded random-init seed) and runs exactly the job's preprocessing.
    """
    prov = group.attrs["provenance"]
    kind = prov["weights_kind"]
    encoder = create_encoder(
        group.attrs["encoder"],
        weights=prov["weights_location"] if kind in ("file", "hub") else None,
        random_init=kind == "random-init", seed=prov.get("weights_seed") or 0, pooling=group.attrs["pooling"],
        max_text_tokens=group.attrs["preprocessing"].get("max_tokens", 30),
        prompt=group.attrs["preprocessing"].get("prompt"),
    )
    if encoder.provenance["state_sha256"] != group.attrs["state_sha256"]:
        raise UserError(f"the weights for {group.name} changed since extraction "
                        f"({kind}: {prov['weights_location']}); re-extract the group")
    items = ItemDataset(dataset.items, encoder.preprocessor)
    batch = items.collate([items[i] for i in ids])
    if batch.bad:
        raise UserError(f"items {[b[0] for b in batch.bad]} of {group.name} can no longer be read")
    return Forward(encoder, torch.device(device), "float32")(batch.inputs).astype(np.float32)


def iter_sample(present: np.ndarray, n: int, seed: int = 0) -> Iterator[int]:
    """A reproducible sample of ``n`` present item ids."""
    ids = np.flatnonzero(present)
    ids = ids[ids > 0]
    rng = np.random.default_rng(seed)
    yield from (int(i) for i in np.sort(rng.choice(ids, size=min(n, len(ids)), replace=False)))
