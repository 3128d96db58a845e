"""Store verbs: ``featurestore ls | info | verify | export | import | rm``.

``verify`` is the integrity check the public code never had: a group must be
complete, belong to the prepared dataset as it is now (fingerprint, row count),
have zero rows exactly where items are absent, and a recomputed sample of rows
must match the stored ones.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from featurestore.cliutil import UserError, emit, json_option, root_option
from featurestore.ecosystem import WRITERS
from featurestore.store import (
    DEFAULT_CHUNK_ROWS,
    STATUS_COMPLETE,
    FeatureGroup,
    FeatureStore,
    file_sha256,
    parse_group_name,
)
from featurestore.workspace import Workspace

group_argument = click.argument("group", metavar="GROUP")


@click.command()
@root_option
@json_option
def ls(ws: Workspace, as_json: bool) -> None:
    """List the store's groups (DATASET/MODALITY/ENCODER[@VARIANT]) with status and shape."""
    store = FeatureStore(ws.store)
    rows = []
    for name in store.groups():
        try:
            info = store.open(name).describe()
        except UserError as err:  # one damaged group is listed as such, not the end of the listing
            rows.append({"group": name, "status": "damaged", "problem": str(err)})
            continue
        rows.append({k: info[k] for k in ("group", "status", "rows", "dim", "dtype", "encoder", "pooling",
                                          "chunks_done", "bad_items", "failure", "size_mb")})
    lines = [f"{'group':<44}{'status':<10}{'rows':>9}{'dim':>6}  {'dtype':<8}{'chunks':>9}{'MB':>9}"]
    for r in rows:
        if r["status"] == "damaged":
            lines.append(f"{r['group']:<44}damaged: {r['problem']}")
            continue
        lines.append(f"{r['group']:<44}{r['status']:<10}{r['rows']:>9}{r['dim']:>6}  {r['dtype']:<8}"
                     f"{r['chunks_done']:>9}{r['size_mb']:>9}")
        if r["failure"]:
            lines.append(f"  failed: {r['failure']} (a rerun resumes it; `featurestore rm {r['group']}` removes it)")
    text = "\n".join(lines) if rows else f"no groups in {store.path}; create one with `featurestore extract`"
    emit({"store": str(store.path), "groups": rows}, as_json, text)


BAD_ITEM_FIELDS = ("id", "orig_id", "reason", "file")
BAD_ITEMS_SHOWN = 20  # in text; --json and --bad-items FILE carry all of them


def _bad_item_lines(bad: list[dict], status: str) -> list[str]:
    if status != STATUS_COMPLETE:
        return ["bad items: listed when the extraction completes"]
    lines = [f"bad items ({len(bad)}):" if bad else "bad items: none"]
    lines += [f"  {b['id']} ({b['orig_id']}): {b['reason']}: {b['file']}" for b in bad[:BAD_ITEMS_SHOWN]]
    if len(bad) > BAD_ITEMS_SHOWN:
        lines.append(f"  ... and {len(bad) - BAD_ITEMS_SHOWN} more; --bad-items FILE writes them all")
    return lines


def _write_bad_items(path: Path, bad: list[dict]) -> None:
    """CSV with one row per bad item (a header only when there are none), for a spreadsheet or a fix-up script."""
    try:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=BAD_ITEM_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(bad)
    except OSError as err:
        raise UserError(f"--bad-items {path}: cannot write it ({err.strerror}); pick a writable path") from None


@click.command()
@group_argument
@click.option("--bad-items", "bad_items_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the bad items (id, orig_id, reason, file) to this CSV file.")
@root_option
@json_option
def info(ws: Workspace, as_json: bool, group: str, bad_items_file: Path | None) -> None:
    """Show a group: path, shape, status, encoder, weights, dataset fingerprint, provenance
    and the items that have no row (bad items), each with its reason."""
    described = FeatureStore(ws.store).open(group).describe()
    attrs = described["attrs"]
    bad = attrs.get("bad_items", [])
    text_keys = [k for k in described if k != "attrs" and not (k == "failure" and described[k] is None)]
    lines = [f"{k}: {described[k]}" for k in text_keys]
    prep = attrs.get("preprocessing") or {}
    lines.append(f"preprocessing: {', '.join(f'{k}={v}' for k, v in prep.items())}")
    lines.append(f"timings: {attrs.get('timings')}")
    lines.append(f"command: {attrs.get('command')}")
    lines += _bad_item_lines(bad, described["status"])
    if bad_items_file is not None:
        _write_bad_items(bad_items_file, bad)
        lines.append(f"wrote {len(bad)} bad items to {bad_items_file}")
    emit({**described, "bad_item_list": bad}, as_json, "\n".join(lines))


def _tolerance(attrs: dict) -> float:
    """Relative error allowed between a stored row and its recomputation (precision-dependent)."""
    if attrs.get("autocast") == "bfloat16":
        return 3e-2
    if attrs.get("autocast") == "float16":
        return 5e-3
    return 2e-3 if attrs.get("dtype") == "float16" else 1e-4


def _check(name: str, ok: bool, detail: str) -> dict:
    return {"check": name, "ok": bool(ok), "detail": detail}


def _verify_checks(ws: Workspace, fg: FeatureGroup, sample: int, device: str) -> Iterator[dict]:
    from data.dataset import PreparedDataset

    done = fg.done_chunks()
    yield _check("complete", fg.status == STATUS_COMPLETE and done.all(),
                 f"status {fg.status}, {int(done.sum())}/{len(done)} chunks written")
    present = fg.present()
    zero_ok, absent_zero = True, True
    for start, stop, rows in fg.iter_chunks():
        nonzero = np.abs(rows).max(axis=1) > 0 if rows.size else np.zeros(0, bool)
        absent_zero &= not (nonzero & ~present[start:stop]).any()
        zero_ok &= start > 0 or not (present[0] or nonzero[0])
    yield _check("padding row", zero_ok, "row 0 is zero and absent" if zero_ok else "row 0 is not zero padding")
    yield _check("absent rows zero", absent_zero, "rows of absent items are zero")
    if "flat" in fg._group and fg.status == STATUS_COMPLETE:
        same = fg.flat_whole() and all(np.array_equal(fg.flat_view()[start:stop], rows)
                                       for start, stop, rows in fg.iter_chunks())
        yield _check("flat copy", same, "memory-mapped copy equals the chunked embeddings")
    dataset_dir = ws.dataset_dir(fg.attrs.get("dataset", ""))
    if not (dataset_dir / "manifest.json").exists():
        yield _check("dataset", False, f"prepared dataset {fg.attrs.get('dataset')} not found at {dataset_dir}")
        return
    dataset = PreparedDataset.load(dataset_dir)
    yield _check("fingerprint", dataset.fingerprint == fg.fingerprint,
                 f"group {fg.fingerprint}, prepared dataset {dataset.fingerprint}")
    yield _check("rows", fg.rows == dataset.n_items + 1, f"{fg.rows} rows for {dataset.n_items} items + padding")
    if sample <= 0 or fg.rows != dataset.n_items + 1 or "provenance" not in fg.attrs:
        return
    from extract.job import iter_sample, recompute_rows

    ids = list(iter_sample(present, sample))
    if not ids:
        return
    fresh = recompute_rows(fg, dataset, ids, device=device)
    stored = fg.read(ids, mapped=False)
    error = float(np.abs(fresh - stored).max() / max(float(np.abs(fresh).max()), 1e-6))
    tol = _tolerance(fg.attrs)
    yield _check("recomputed sample", error <= tol,
                 f"{len(ids)} rows recomputed, max relative difference {error:.2e} (allowed {tol:.0e})")


@click.command()
@group_argument
@click.option("--sample", type=click.IntRange(min=0), default=8, show_default=True,
              help="Rows to recompute with the recorded encoder and compare (0: skip).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the sample is recomputed.")
@root_option
@json_option
def verify(ws: Workspace, as_json: bool, group: str, sample: int, device: str) -> None:
    """Check a group: complete, matches the prepared dataset, zero where absent, sample recomputes."""
    fg = FeatureStore(ws.store).open(group)
    checks = list(_verify_checks(ws, fg, sample, device))
    failed = [c for c in checks if not c["ok"]]
    emit({"group": fg.name, "ok": not failed, "checks": checks}, as_json,
         "\n".join(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}" for c in checks))
    if failed:
        raise UserError(f"verify {fg.name}: {len(failed)} check(s) failed: {', '.join(c['check'] for c in failed)}")


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)


@click.command()
@group_argument
@click.option("--format", "fmt", type=click.Choice(["npy", "h5", "mmrec", "recbole"]), required=True,
              help="npy: the embeddings array as stored (row = item id, row 0 padding); "
                   "h5: embeddings, present and the provenance (JSON attribute), re-importable; "
                   "mmrec: image_feat.npy / text_feat.npy (row = MMRec item index = id - 1) and "
                   "DATASET.inter with x_label from our split; recbole: atomic DATASET.inter / .item "
                   "files and the binary DATASET.feat1CLS (text) / .feat2CLS (image) its "
                   "pretrained-text models read.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="File to write (npy, h5), or folder (mmrec, recbole; two groups may share one).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@root_option
@json_option
def export(ws: Workspace, as_json: bool, group: str, fmt: str, out: Path, force: bool) -> None:
    """Write a group to one .npy or .h5 file (streamed chunk by chunk), or MMRec / RecBole files."""
    fg = FeatureStore(ws.store).open(group, complete=fmt in WRITERS)
    if fmt in WRITERS:
        from data.dataset import PreparedDataset

        out.mkdir(parents=True, exist_ok=True)
        files = WRITERS[fmt](fg, PreparedDataset.load(ws.dataset_dir(parse_group_name(fg.name).dataset)), out)
        emit({"group": fg.name, "format": fmt, "out": str(out), "files": [str(f) for f in files]}, as_json,
             f"wrote {fg.name} for {fmt} to {out}: " + ", ".join(f.name for f in files))
        return
    _refuse_existing(out, force)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if fmt == "npy":
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=fg.dtype, shape=(fg.rows, fg.dim))
        for start, stop, rows in fg.iter_chunks():
            target[start:stop] = rows
        target.flush()
        del target
    else:
        import h5py

        with h5py.File(tmp, "w") as h5:
            data = h5.create_dataset("embeddings", shape=(fg.rows, fg.dim), dtype=fg.dtype,
                                     chunks=(min(fg.chunk_rows, fg.rows), fg.dim))
            for start, stop, rows in fg.iter_chunks():
                data[start:stop] = rows
            h5.create_dataset("present", data=fg.present())
            h5.attrs["group"] = fg.name
            h5.attrs["provenance"] = json.dumps(fg.attrs)
    os.replace(tmp, out)
    emit({"group": fg.name, "format": fmt, "out": str(out), "rows": fg.rows, "dim": fg.dim}, as_json,
         f"wrote {fg.name} ({fg.rows} x {fg.dim} {fg.dtype}) to {out}")


def _read_provenance(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a JSON object ({err}); pass the output of `featurestore info GROUP --json`") from None
    if not isinstance(provenance, dict):
        raise UserError(f"{path} holds JSON {type(provenance).__name__}, not an object of attributes")
    return provenance.get("attrs", provenance)  # accept `featurestore info --json` output too


def _read_import(path: Path, provenance_file: Path | None) -> tuple[Any, np.ndarray | None, dict, Any]:
    """(array-like rows, present or None, provenance, file handle to close).

    A file numpy or HDF5 cannot read (empty, cut short, pickled objects, another format)
    is refused in one line, before anything is created in the store.
    """
    provenance = _read_provenance(provenance_file)
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        try:
            h5 = h5py.File(path, "r")
        except OSError as err:
            raise UserError(f"{path} is not a readable HDF5 file ({err}); export it again with "
                            "`featurestore export --format h5`") from None
        if "embeddings" not in h5:
            h5.close()
            raise UserError(f"{path} has no 'embeddings' dataset; export one with `featurestore export --format h5`")
        try:
            stored = {"group": h5.attrs.get("group"), **json.loads(h5.attrs.get("provenance", "{}"))}
        except (TypeError, json.JSONDecodeError):
            h5.close()
            raise UserError(f"{path}: its 'provenance' attribute is not JSON; pass --provenance FILE") from None
        present = np.asarray(h5["present"][:], dtype=bool).reshape(-1) if "present" in h5 else None
        return h5["embeddings"], present, {**stored, **provenance}, h5
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False), None, provenance, None
        except (ValueError, EOFError, OSError) as err:
            raise UserError(f"{path} is not a readable .npy array ({err}); write it with numpy.save "
                            "(a float array, row = item id)") from None
    raise UserError(f"{path}: import reads .npy or .h5 files")


def _check_rows(path: Path, rows: Any, chunk_rows: int, dtype: str) -> None:
    """Refuse non-numeric arrays and NaN/inf values (also those that only appear in the stored
    ``dtype``, like 1e300 in float32), naming the first bad row (item id): checked chunk by
    chunk before the group exists, so a refused import leaves nothing."""
    if np.dtype(rows.dtype).kind not in "fiub":
        raise UserError(f"{path} holds {rows.dtype} values; import needs real numbers (float32 or float16)")
    for start in range(0, rows.shape[0], chunk_rows):
        with np.errstate(over="ignore"):
            block = np.asarray(rows[start:start + chunk_rows], dtype=dtype)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise UserError(f"{path} row {row} (item id {row}) holds NaN or inf; replace those values (e.g. "
                            "numpy.nan_to_num) or zero the row to mark the item absent, then import again")


def _read_ducho(ws: Workspace, folder: Path, group: str | None) -> tuple[np.ndarray, np.ndarray, dict, list[Path]]:
    """Ducho's output (one ``ITEM.npy`` per item, named by the item's original id or its image's
    file name) as store rows: (rows, present, provenance, the files read)."""
    from data.dataset import PreparedDataset

    if not folder.is_dir():
        raise UserError(f"--from ducho reads a folder of per-item .npy files; {folder} is not a folder")
    if not group:
        raise UserError("--from ducho: say which group the vectors become: --group DATASET/MODALITY/ENCODER")
    dataset = PreparedDataset.load(ws.dataset_dir(parse_group_name(group).dataset))
    files = {p.stem: p for p in sorted(folder.rglob("*.npy"))}
    if not files:
        raise UserError(f"{folder} holds no .npy files; point --from ducho at Ducho's embeddings folder")
    found: dict[int, Path] = {}
    for item in dataset.items:
        names = [item.orig_id] + ([Path(item.image).stem] if item.image else [])
        path = next((files[n] for n in names if n in files), None)
        if path is not None:
            found[item.id] = path
    if not found:
        raise UserError(f"none of the {len(files)} files in {folder} is named after an item of {dataset.name} "
                        f"(e.g. {dataset.items[0].orig_id}.npy); import the folder made for this dataset")
    vectors = {}
    for item_id, path in found.items():
        try:
            vectors[item_id] = np.load(path, allow_pickle=False).reshape(-1)
        except (ValueError, OSError) as err:
            raise UserError(f"{path} is not a readable .npy array ({err})") from None
    dims = {v.shape[0] for v in vectors.values()}
    if len(dims) != 1:
        raise UserError(f"{folder}: the per-item vectors have different lengths ({sorted(dims)[:4]}); "
                        "import one Ducho extraction (one model and layer) at a time")
    rows = np.zeros((dataset.n_items + 1, dims.pop()), dtype=np.float32)
    present = np.zeros(dataset.n_items + 1, dtype=bool)
    for item_id, vector in vectors.items():
        rows[item_id], present[item_id] = vector, True
    used = sorted(found.values())
    provenance = {"group": group, "imported": "imported from Ducho", "ducho_folder": str(folder.resolve()),
                  "ducho_files": len(used), "weights": f"Ducho output {folder.resolve()}"}
    return rows, present, provenance, used


@click.command(name="import")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--from", "source", type=click.Choice(["file", "ducho"]), default="file", show_default=True,
              help="file: FILE is an .npy/.h5 array (row = item id); ducho: FILE is Ducho's output folder, "
                   "one ITEM.npy per item named by its original id (or image file name); needs --group.")
@click.option("--group", "group", default=None, metavar="GROUP",
              help="Target group DATASET/MODALITY/ENCODER[@VARIANT] [default for .h5: the group it was exported from].")
@click.option("--provenance", "provenance_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="JSON provenance (a group's attributes, or `featurestore info --json` output); "
                                 "overrides what an .h5 file carries.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=DEFAULT_CHUNK_ROWS, show_default=True,
              help="Rows per store chunk.")
@root_option
@json_option
def import_(ws: Workspace, as_json: bool, file: Path, source: str, group: str | None,
            provenance_file: Path | None, chunk_rows: int) -> None:
    """Create a group from an .npy (rows = item ids, row 0 padding), an exported .h5 file, or
    (--from ducho) Ducho's folder of one .npy per item; items without a file are marked absent.

    The prepared dataset must match: the row count is N + 1, and a recorded
    fingerprint must equal the dataset's (absent one: the dataset's is taken).
    """
    from data.dataset import PreparedDataset

    if source == "ducho":
        rows, present, provenance, read = _read_ducho(ws, file, group)
        provenance, handle = {**provenance, **_read_provenance(provenance_file)}, None
    else:
        rows, present, provenance, handle = _read_import(file, provenance_file)
        read = [file]
    try:
        name = group or provenance.get("group")
        if not name:
            raise UserError(f"say which group {file} becomes: --group DATASET/MODALITY/ENCODER[@VARIANT]")
        parsed = parse_group_name(name)
        dataset = PreparedDataset.load(ws.dataset_dir(parsed.dataset))
        fingerprint = provenance.get("dataset_fingerprint") or dataset.fingerprint
        if fingerprint != dataset.fingerprint:
            raise UserError(f"{file} was computed for dataset fingerprint {fingerprint}, but prepared dataset "
                            f"{dataset.name} has {dataset.fingerprint}; re-extract instead of importing")
        if rows.ndim != 2 or rows.shape[0] != dataset.n_items + 1 or rows.shape[1] < 1:
            raise UserError(f"{file} has shape {rows.shape}; {dataset.name} needs ({dataset.n_items + 1}, dim): "
                            "row = item id, row 0 padding")
        if present is not None and present.shape != (rows.shape[0],):
            raise UserError(f"{file}: 'present' has {present.shape[0]} entries for {rows.shape[0]} rows; "
                            "export the group again")
        dtype = str(rows.dtype) if str(rows.dtype) in ("float32", "float16") else "float32"
        _check_rows(file, rows, chunk_rows, dtype)
        store = FeatureStore(ws.store)
        attrs = {**provenance, "group": str(parsed), "dataset": parsed.dataset, "dataset_fingerprint": fingerprint,
                 "n_items": dataset.n_items, "modality": parsed.modality,
                 "encoder": provenance.get("encoder", parsed.encoder), "variant": parsed.variant, "dtype": dtype,
                 "imported_from": str(file.resolve()), "imported_sha256": file_sha256(read)}
        lock = store.lock(str(parsed))
        lock.acquire(command=f"featurestore import {file}")
        try:
            fg = store.create(str(parsed), rows=rows.shape[0], dim=rows.shape[1], dtype=dtype,
                              chunk_rows=chunk_rows, attrs={**attrs, "status": "partial"})
            for chunk in range(fg.n_chunks):
                start, stop = fg.chunk_bounds(chunk)
                block = np.asarray(rows[start:stop], dtype=dtype)
                mask = present[start:stop] if present is not None else np.abs(block).max(axis=1) > 0
                mask = mask.copy()
                if start == 0:
                    mask[0] = False
                fg.write_chunk(chunk, block, mask)
            fg.write_flat()
            fg.update_attrs(status=STATUS_COMPLETE)
        finally:
            lock.release()
    finally:
        if handle is not None:
            handle.close()
    emit({"group": fg.name, "rows": fg.rows, "dim": fg.dim, "dtype": dtype, "from": str(file)}, as_json,
         f"imported {file} as {fg.name} ({fg.rows} x {fg.dim} {dtype})")


@click.command()
@group_argument
@root_option
@json_option
def rm(ws: Workspace, as_json: bool, group: str) -> None:
    """Delete a group (refused while an extraction holds its lock)."""
    name = FeatureStore(ws.store).remove(group)
    emit({"removed": name}, as_json, f"removed {name}")


COMMANDS = [ls, info, verify, export, import_, rm]
