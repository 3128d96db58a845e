"""``featurestore codes``: quantise a complete store group into L codes per item, as a store group of its own.

The codes (an item's semantic ID, TIGER / Singh et al., see :mod:`extract.quantise`) are
written to ``DATASET/codes/ENCODER@[VARIANT+]METHOD-LxK`` with the same machinery as every
group (:mod:`featurestore.store`): one writer under the group's lock, row chunks marked done,
the flat copy, then ``status = complete`` last (the atomic publish), and a refusal of a source
that is partial or was built for another dataset fingerprint. The ``embeddings`` array holds
the codes as float32 (exact for codebooks below 2**24), so ``featurestore ls / info / verify /
export`` read a codes group like any other; ``present`` is false where the source had no vector
(the recommender gives those items a "no content" code).

Resuming refits the quantiser (deterministic for a seed) and writes only the chunks a killed
job left; a group written from other source rows or with other settings is refused rather
than mixed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass

import numpy as np

from data.dataset import PreparedDataset
from extract.names import store_spelling
from extract.quantise import QUANTISERS, check_sizes, code_usage, collisions, disambiguate
from featurestore.errors import UserError
from featurestore.runtime.versions import versions
from featurestore.store import (DEFAULT_CHUNK_ROWS, STATUS_COMPLETE, STATUS_PARTIAL, FeatureGroup, FeatureStore,
                                group_name, parse_group_name)
from featurestore.workspace import Workspace

CODES = "codes"  # the group's modality part and its ``kind`` attribute
# what must match for a rerun to resume a group instead of refusing it
SIGNATURE_KEYS = ("kind", "source", "method", "levels", "codebook", "seed", "iterations", "disambiguate")


@dataclass(frozen=True)
class CodesOptions:
    """Everything ``featurestore codes`` takes."""

    dataset: str
    encoder: str  # ENC[@VARIANT]: the source group DATASET/<its modality>/ENC[@VARIANT]
    levels: int = 3
    codebook: int = 256
    method: str = "rq-kmeans"
    seed: int = 0
    iterations: int | None = None  # k-means iterations per level / rq-vae epochs [default: the method's]
    disambiguate: bool = False
    variant: str | None = None  # the codes group's variant [default: [VARIANT+]METHOD-LxK]
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def command(self) -> str:
        words = ["featurestore", "codes", "--dataset", self.dataset, "--encoder", self.encoder,
                 "--levels", str(self.levels), "--codebook", str(self.codebook), "--method", self.method,
                 "--seed", str(self.seed)]
        for flag, value in (("--iterations", self.iterations), ("--variant", self.variant)):
            if value is not None:
                words += [flag, str(value)]
        return " ".join(words + (["--disambiguate"] if self.disambiguate else []))


def source_group(dataset: str, encoder: str) -> str:
    """The store group an ``ENC[@VARIANT]`` names for ``dataset`` (its modality from the encoder registry)."""
    from extract.registry import encoder_group

    return encoder_group(dataset, encoder)


def codes_group(dataset: str, encoder: str, method: str, levels: int, codebook: int,
                variant: str | None = None) -> str:
    """``DATASET/codes/ENC@[VARIANT+]METHOD-LxK``, or ``DATASET/codes/ENC@TAG`` for ``variant`` TAG.

    Example:
        >>> codes_group("HM", "minilm-l6", "rq-kmeans", 3, 256)
        'HM/codes/minilm-l6@rq-kmeans-3x256'
    """
    name, _, source_variant = encoder.partition("@")
    name = store_spelling(name)  # hf:ORG/NAME under its store key hf+ORG+NAME
    tag = variant or "+".join(filter(None, [source_variant, f"{method}-{levels}x{codebook}"]))
    return group_name(dataset, CODES, name, tag)


def codes_command(group: str) -> str:
    """The ``featurestore codes`` command that writes a default-named codes group (for error messages)."""
    parsed = parse_group_name(group)
    *source_variant, setting = (parsed.variant or "").split("+")
    method, _, size = setting.rpartition("-")
    levels, _, codebook = size.partition("x")
    encoder = "@".join([parsed.encoder, *source_variant])
    if not (method and levels.isdigit() and codebook.isdigit()):
        return f"featurestore codes --dataset {parsed.dataset} --encoder {encoder} --variant {parsed.variant}"
    return CodesOptions(parsed.dataset, encoder, int(levels), int(codebook), method).command()


@dataclass
class CodesResult:
    """What a codes job did; ``summary()`` is the line the CLI prints."""

    group: str
    source: str
    status: str
    method: str
    levels: int
    codebook: int
    items: int
    reconstruction_error: list[float]
    code_usage: list[int]
    collisions: dict
    computed_chunks: int
    seconds: float

    def summary(self) -> str:
        if self.computed_chunks == 0:
            return f"{self.group}: already complete; nothing to do"
        errors = ", ".join(f"{e:.3f}" for e in self.reconstruction_error)
        return (f"{self.group}: {self.status}; {self.items} items of {self.source} -> {self.levels} x "
                f"{self.codebook} codes by {self.method} in {self.seconds:.1f}s; error per level {errors}; "
                f"codes used per level {self.code_usage}; {self.collisions['collisions']} collisions")

    def to_dict(self) -> dict:
        return asdict(self)


def _source(store: FeatureStore, name: str, dataset: PreparedDataset) -> FeatureGroup:
    """The complete source group of this dataset version."""
    source = store.open(name, complete=True)
    if source.fingerprint != dataset.fingerprint:
        raise UserError(f"store group {name} was built for dataset fingerprint {source.fingerprint or 'unknown'}, "
                        f"but the prepared dataset {dataset.name} has {dataset.fingerprint}; re-extract it "
                        f"(`featurestore rm {name}`, then `featurestore extract`) before quantising")
    if source.rows != dataset.n_items + 1:
        raise UserError(f"store group {name} has {source.rows} rows for {dataset.n_items} items + padding; "
                        "re-extract it")
    return source


def _job_attrs(name: str, source: FeatureGroup, rows: np.ndarray, dataset: PreparedDataset,
               opts: CodesOptions) -> dict:
    return {
        "kind": CODES, "group": name, "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint,
        "n_items": dataset.n_items, "modality": CODES, "encoder": source.attrs.get("encoder"),
        "variant": parse_group_name(name).variant, "dtype": "float32",
        "source": {"group": source.name, "dataset_fingerprint": source.fingerprint,
                   "state_sha256": source.attrs.get("state_sha256"),
                   "rows_sha256": hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()},
        "method": opts.method, "levels": opts.levels, "codebook": opts.codebook, "seed": opts.seed,
        "iterations": opts.iterations, "disambiguate": opts.disambiguate,
        "versions": versions(), "command": opts.command(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _open_or_create(store: FeatureStore, name: str, attrs: dict, dataset: PreparedDataset,
                    opts: CodesOptions) -> FeatureGroup:
    """A new codes group, or the existing one when the same job wrote it (a resume)."""
    width = opts.levels + int(opts.disambiguate)
    if not store.exists(name):
        return store.create(name, rows=dataset.n_items + 1, dim=width, dtype="float32",
                            chunk_rows=opts.chunk_rows, attrs=attrs)
    group = store.open(name)
    if group.fingerprint != dataset.fingerprint:
        raise UserError(f"store group {name} was built for dataset fingerprint {group.fingerprint}, but the "
                        f"prepared dataset {dataset.name} has {dataset.fingerprint}; remove it (`featurestore rm "
                        f"{name}`) or write another with --variant TAG")
    theirs = {key: group.attrs.get(key) for key in SIGNATURE_KEYS}
    differ = [key for key in SIGNATURE_KEYS if theirs[key] != attrs[key]]
    if differ:
        what = ("codes of another group or of other rows of it" if "source" in differ
                else "other settings (" + ", ".join(f"{k} {theirs[k]!r}, now {attrs[k]!r}" for k in differ) + ")")
        raise UserError(f"store group {name} holds {what} (made from {(theirs['source'] or {}).get('group')}); "
                        f"keep both with --variant TAG, or replace it: `featurestore rm {name}`")
    return group


def run_codes(ws: Workspace, opts: CodesOptions) -> CodesResult:
    """Quantise the source group into its codes group (or resume / confirm it).

    Example:
        >>> run_codes(ws, CodesOptions(dataset="HM", encoder="minilm-l6", levels=3, codebook=256)).summary()
    """
    started = time.perf_counter()
    quantiser = QUANTISERS.get(opts.method)
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    store = FeatureStore(ws.store)
    source = _source(store, source_group(dataset.name, opts.encoder), dataset)
    name = codes_group(dataset.name, opts.encoder, opts.method, opts.levels, opts.codebook, opts.variant)
    rows = source.read()
    present = source.present()
    present[0] = False
    ids = np.flatnonzero(present)
    check_sizes(len(ids), opts.levels, opts.codebook)  # before a group exists
    attrs = _job_attrs(name, source, rows, dataset, opts)
    lock = store.lock(name)
    lock.acquire(command=opts.command())
    try:
        group = _open_or_create(store, name, attrs, dataset, opts)
        todo = [int(c) for c in np.flatnonzero(~group.done_chunks())]
        if not todo and group.status == STATUS_COMPLETE:
            return _result(group, 0, time.perf_counter() - started)
        group.drop_flat()
        group.update_attrs(status=STATUS_PARTIAL, versions=attrs["versions"])
        fitted = quantiser(rows[ids], opts.levels, opts.codebook, opts.seed, opts.iterations)
        codes = disambiguate(fitted.codes) if opts.disambiguate else fitted.codes
        table = np.zeros((dataset.n_items + 1, codes.shape[1]), dtype=np.float32)
        table[ids] = codes
        for chunk in todo:
            start, stop = group.chunk_bounds(chunk)
            group.write_chunk(chunk, table[start:stop], present[start:stop])
        group.write_flat()
        seconds = time.perf_counter() - started
        group.update_attrs(
            status=STATUS_COMPLETE, settings=fitted.settings, quantiser_sha256=fitted.state_sha256,
            codes_sha256=hashlib.sha256(table.tobytes()).hexdigest(),
            reconstruction_error=fitted.errors, code_usage=code_usage(fitted.codes),
            collisions=collisions(fitted.codes), coded_items=len(ids),
            timings={"seconds": round(seconds, 3)}, completed=time.strftime("%Y-%m-%d %H:%M:%S"))
        return _result(group.refresh(), len(todo), seconds)
    finally:
        lock.release()


def _result(group: FeatureGroup, computed: int, seconds: float) -> CodesResult:
    a = group.attrs
    return CodesResult(group=group.name, source=a["source"]["group"], status=group.status, method=a["method"],
                       levels=a["levels"], codebook=a["codebook"], items=a["coded_items"],
                       reconstruction_error=a["reconstruction_error"], code_usage=a["code_usage"],
                       collisions=a["collisions"], computed_chunks=computed, seconds=round(seconds, 3))
