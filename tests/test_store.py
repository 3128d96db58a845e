"""The Zarr feature store without any encoder: names, reading API, memory map, locks, export/import, rm."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from extract_helpers import titles, write_dataset
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore, extract_command, group_name, parse_group_name
from featurestore.store_cli import export, import_, info, ls, rm
from featurestore.workspace import Workspace

N_ITEMS = 37
DIM = 6


@pytest.fixture
def ws(tmp_path):
    ws = Workspace(tmp_path)
    write_dataset(ws, "toy", titles(N_ITEMS), [None] * N_ITEMS)
    return ws


def filled_group(ws: Workspace, name: str = "toy/text/fake", dtype: str = "float32", finish: bool = True):
    """A group written chunk by chunk the way the job does, with item 5 absent."""
    from data.dataset import PreparedDataset

    dataset = PreparedDataset.load(ws.dataset_dir("toy"))
    rows = np.random.default_rng(0).normal(size=(N_ITEMS + 1, DIM)).astype(dtype)
    rows[0] = 0
    rows[5] = 0
    present = np.ones(N_ITEMS + 1, dtype=bool)
    present[[0, 5]] = False
    fg = FeatureStore(ws.store).create(name, rows=N_ITEMS + 1, dim=DIM, dtype=dtype, chunk_rows=8, attrs={
        "dataset": "toy", "dataset_fingerprint": dataset.fingerprint, "encoder": "fake", "modality": "text"})
    for chunk in range(fg.n_chunks):
        start, stop = fg.chunk_bounds(chunk)
        fg.write_chunk(chunk, rows[start:stop], present[start:stop])
    if finish:
        fg.write_flat()
        fg.update_attrs(status="complete")
    return fg, rows, present


def invoke(command, args, ws):
    result = CliRunner().invoke(command, [*args, "--root", str(ws.root)], catch_exceptions=True)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_group_names_and_the_extract_command():
    assert group_name("HM", "image", "swin-b") == "HM/image/swin-b"
    assert group_name("HM", "text", "bert-base", "mlm") == "HM/text/bert-base@mlm"
    parsed = parse_group_name("HM/text/bert-base@mlm")
    assert (parsed.dataset, parsed.modality, parsed.encoder, parsed.variant) == ("HM", "text", "bert-base", "mlm")
    with pytest.raises(UserError, match="DATASET/MODALITY/ENCODER"):
        parse_group_name("HM/swin-b")
    assert extract_command("HM", "swin-t", modality="image", root="/w s") == (
        "featurestore extract --root '/w s' --dataset HM --encoder swin-t --modality image")


def test_reading_api_and_memory_map(ws):
    fg, rows, present = filled_group(ws)
    fg = FeatureStore(ws.store).open("toy/text/fake")
    assert (fg.status, fg.rows, fg.dim, fg.n_chunks) == ("complete", N_ITEMS + 1, DIM, 5)
    np.testing.assert_array_equal(fg.present(), present)
    np.testing.assert_array_equal(fg.read(), rows)
    ids = [9, 1, 9, 36, 0]
    np.testing.assert_array_equal(fg.read(ids), rows[ids])
    mm = fg.memmap()
    assert isinstance(mm, np.memmap) and mm.shape == (N_ITEMS + 1, DIM)
    np.testing.assert_array_equal(mm[np.array(ids)], rows[ids])
    # the memory-mapped file is a regular zarr array: any Zarr client reads the same bytes
    import zarr

    np.testing.assert_array_equal(zarr.open_array(ws.store / "toy/text/fake/flat", mode="r")[:], rows)


def test_float16_group_reads_float32(ws):
    fg, rows, _ = filled_group(ws, dtype="float16")
    assert fg.dtype == "float16" and fg.memmap().dtype == np.float16
    out = FeatureStore(ws.store).open("toy/text/fake").read([1, 2])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, rows[[1, 2]].astype(np.float32))


def test_partial_group_reads_but_does_not_memory_map(ws):
    filled_group(ws, finish=False)
    fg = FeatureStore(ws.store).open("toy/text/fake")
    assert fg.status == "partial"
    assert fg.read([3]).shape == (1, DIM)
    with pytest.raises(UserError, match="partial.*featurestore extract --dataset toy --encoder fake"):
        fg.memmap()
    with pytest.raises(UserError, match="resume it with"):
        FeatureStore(ws.store).open("toy/text/fake", complete=True)


def test_missing_group_names_the_command_that_creates_it(ws):
    with pytest.raises(UserError, match="featurestore extract --dataset toy --encoder swin-b --modality image"):
        FeatureStore(ws.store).open("toy/image/swin-b")


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(ws):
    store = FeatureStore(ws.store)
    first = store.lock("toy/text/fake")
    first.acquire(command="test")
    with pytest.raises(UserError, match=f"being written by pid {os.getpid()} on {socket.gethostname()}"):
        store.lock("toy/text/fake").acquire()
    first.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first.path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}))
    second = store.lock("toy/text/fake")
    second.acquire()
    assert json.loads(second.path.read_text())["pid"] == os.getpid()
    second.release()
    assert not second.path.exists()


def test_ls_and_info_report_the_essentials(ws):
    filled_group(ws)
    listed = json.loads(invoke(ls, ["--json"], ws).output)
    assert [g["group"] for g in listed["groups"]] == ["toy/text/fake"]
    described = json.loads(invoke(info, ["toy/text/fake", "--json"], ws).output)
    for key in ("path", "rows", "dim", "status", "encoder", "fingerprint"):
        assert key in described
    assert described["path"] == str(ws.store / "toy/text/fake")
    assert (described["rows"], described["dim"], described["status"]) == (N_ITEMS + 1, DIM, "complete")


def test_export_npy_is_the_array_as_stored(ws, tmp_path):
    _, rows, _ = filled_group(ws, dtype="float16")
    out = tmp_path / "out" / "rows.npy"
    invoke(export, ["toy/text/fake", "--format", "npy", "--out", str(out)], ws)
    loaded = np.load(out)
    assert loaded.dtype == np.float16
    np.testing.assert_array_equal(loaded, rows)
    with pytest.raises(UserError, match="exists; pass --force"):
        invoke(export, ["toy/text/fake", "--format", "npy", "--out", str(out)], ws)


def test_h5_round_trip_through_rm_and_import(ws, tmp_path):
    fg, rows, present = filled_group(ws)
    attrs = dict(fg.attrs)
    out = tmp_path / "rows.h5"
    invoke(export, ["toy/text/fake", "--format", "h5", "--out", str(out)], ws)
    with h5py.File(out) as h5:
        np.testing.assert_array_equal(h5["embeddings"][:], rows)
    invoke(rm, ["toy/text/fake"], ws)
    assert FeatureStore(ws.store).groups() == []
    assert not (ws.store / "toy").exists()  # empty parents go too
    invoke(import_, [str(out)], ws)
    back = FeatureStore(ws.store).open("toy/text/fake")
    np.testing.assert_array_equal(back.read(), rows)
    np.testing.assert_array_equal(back.present(), present)
    assert back.status == "complete"
    assert back.fingerprint == attrs["dataset_fingerprint"] and back.attrs["encoder"] == "fake"
    assert back.attrs["imported_from"] == str(out)


def test_import_refuses_a_foreign_fingerprint_or_shape(ws, tmp_path):
    rows = np.ones((N_ITEMS + 1, DIM), dtype=np.float32)
    good = tmp_path / "rows.npy"
    np.save(good, rows)
    provenance = tmp_path / "prov.json"
    provenance.write_text(json.dumps({"dataset_fingerprint": "0123456789abcdef", "encoder": "fake"}))
    with pytest.raises(UserError, match="fingerprint 0123456789abcdef.*re-extract"):
        invoke(import_, [str(good), "--group", "toy/text/fake", "--provenance", str(provenance)], ws)
    np.save(tmp_path / "short.npy", rows[:-1])
    with pytest.raises(UserError, match=r"needs \(38, dim\)"):
        invoke(import_, [str(tmp_path / "short.npy"), "--group", "toy/text/fake"], ws)
    invoke(import_, [str(good), "--group", "toy/text/fake"], ws)  # no provenance: the dataset's fingerprint
    fg = FeatureStore(ws.store).open("toy/text/fake")
    assert not fg.present()[0] and fg.present()[1:].all()
    with pytest.raises(UserError, match="already exists"):
        invoke(import_, [str(good), "--group", "toy/text/fake"], ws)


def test_rm_refuses_while_a_job_holds_the_lock(ws):
    filled_group(ws)
    lock = FeatureStore(ws.store).lock("toy/text/fake")
    lock.acquire()
    try:
        with pytest.raises(UserError, match="being written by"):
            invoke(rm, ["toy/text/fake"], ws)
    finally:
        lock.release()
    invoke(rm, ["toy/text/fake"], ws)
    assert not FeatureStore(ws.store).exists("toy/text/fake")
