"""Issue 26, item 10: a full disk during ``dataset prepare`` or ``extract`` names the file.

A full disk fails in ``write()``, whose OSError names no file; the CLI then could only say
"a file: no space left". The writes are made to fail that way (ENOSPC, no file name) inside
the real command, which must print one line naming the file, exit 2, and, once space is
"freed", resume when run again.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest
import zarr.storage._local as zarr_local

from data.dataset import PreparedDataset
from featurestore.cli import main
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace
from test_faults import fresh_root, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def featurestore(capsys, monkeypatch, *args: object) -> subprocess.CompletedProcess:
    """``featurestore ARGS`` in this process, the way the console script runs it."""
    monkeypatch.setattr(sys, "argv", ["featurestore", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name


def test_prepare_on_a_full_disk_names_the_file_then_reruns(synth_ws, tmp_path, capsys, monkeypatch):
    ws, name = synth_ws
    root = Workspace(tmp_path)
    args = ("dataset", "prepare", "--format", "hm", "--source", ws.root / "raw" / name, "--name", name,
            "--root", tmp_path)
    with monkeypatch.context() as full:
        full.setattr(np, "save", no_space)
        one_line_error(featurestore(capsys, full, *args), f"{root.dataset_dir(name)}/seq_indptr.npy: no space left")
    assert list(root.datasets.iterdir()) == []  # neither the name nor a temporary folder was left
    assert featurestore(capsys, monkeypatch, *args).returncode == 0
    again, reference = PreparedDataset.load(root.dataset_dir(name)), PreparedDataset.load(ws.dataset_dir(name))
    assert again.fingerprint == reference.fingerprint


def test_extract_on_a_full_disk_names_the_chunk_then_resumes(synth_ws, tmp_path, capsys, monkeypatch):
    ws, name = fresh_root(synth_ws, tmp_path)
    group = f"{name}/text/bert-tiny"
    args = ("extract", "--dataset", name, "--encoder", "bert-tiny", "--random-init", "--chunk-rows", 64,
            "--workers", 0, "--root", tmp_path, "--json")
    real = zarr_local._put

    def second_chunk_fails(path, value, exclusive=False):
        if path.parent.parent.name == "c" and path.parent.name == "1":  # a chunk file of row chunk 1
            no_space()
        return real(path, value, exclusive=exclusive)

    with monkeypatch.context() as full:
        full.setattr(zarr_local, "_put", second_chunk_fails)
        one_line_error(featurestore(capsys, full, *args),
                       f"{ws.store / group}/embeddings/c/1/0: no space left on the device; free some space")
    assert FeatureStore(ws.store).open(group).done_chunks().tolist() == [1, 0, 0]
    rerun = featurestore(capsys, monkeypatch, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["resumed_chunks"] == 1
    assert FeatureStore(ws.store).open(group, complete=True).present()[1:].all()
