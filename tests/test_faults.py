"""Faults: SIGKILL in the middle of each long command, a full disk, an unwritable root.

A kill is a real SIGKILL of a real command process, at a chosen point: the command
runs under a small launcher that wraps one function so that the process kills itself
right after the N-th call (e.g. after the first ``.npy`` of a prepared dataset, after
the second store chunk, right after an epoch's resumable state). The same command is
then run again, and its result must equal an uninterrupted run's, while nothing may
claim to be complete in between.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import pytest

from data.dataset import PreparedDataset
from featurestore.cliutil import UserError, run_cli
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace
from data.prepare import prepare_dataset
from extract.job import ExtractOptions, run_extraction
from recommend import run as run_module
from recommend.study import StudyOptions, run_study
from recommend.trainer import TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs ENTRY (a CLI module) with ARGS, after wrapping MODULE.ATTR so that the process
# SIGKILLs itself right after the AFTER-th call returns.
KILLER = """
import importlib, os, signal, sys
module, attr, after, entry, *args = sys.argv[1:]
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def then_die(*a, **k):
    out = real(*a, **k)
    calls[0] += 1
    if calls[0] == int(after):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(owner, name, then_die)
sys.argv = [entry, *args]
importlib.import_module(entry).main()
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models: one thread is fastest



def command(entry: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", entry, *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def killed(entry: str, target: str, after: int, *args: object) -> None:
    """Run the command and SIGKILL it right after the ``after``-th call of ``target``."""
    module, _, attr = target.partition(":")
    proc = subprocess.run([sys.executable, "-c", KILLER, module, attr, str(after), entry, *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed (exit {proc.returncode}): {proc.stderr[-2000:]}"


def fresh_root(synth_ws, root: Path) -> tuple[Workspace, str]:
    ws, name = synth_ws
    mine = Workspace(root)
    shutil.copytree(ws.dataset_dir(name), mine.dataset_dir(name))
    return mine, name


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: 'intact' means this does not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- SIGKILL, then the same command again ---------------------------------------------------

def test_prepare_killed_mid_write_then_rerun(synth_ws, tmp_path):
    ws, name = synth_ws
    raw, root = ws.root / "raw" / name, Workspace(tmp_path)
    args = ("dataset", "prepare", "--format", "hm", "--source", raw, "--name", name, "--root", tmp_path)
    killed("featurestore.cli", "numpy:save", 1, *args)  # after the first array of the new folder
    assert not root.dataset_dir(name).exists()  # the half-written folder never took the name
    prepare_dataset("hm", raw, root.dataset_dir(name), name=name)  # what the command runs
    again = PreparedDataset.load(root.dataset_dir(name))
    reference = PreparedDataset.load(ws.dataset_dir(name))
    assert (again.fingerprint, again.manifest["interactions_fingerprint"]) == \
        (reference.fingerprint, reference.manifest["interactions_fingerprint"])
    before = digest(root.dataset_dir(name))
    killed("featurestore.cli", "numpy:save", 1, *args)  # a re-prepare killed: the old one stays
    assert digest(root.dataset_dir(name)) == before


def test_extract_killed_between_chunks_then_rerun(synth_ws, tmp_path):
    ws, name = fresh_root(synth_ws, tmp_path)
    args = ("extract", "--dataset", name, "--encoder", "bert-tiny", "--random-init", "--chunk-rows", 32,
            "--workers", 0, "--root", tmp_path, "--json")
    killed("featurestore.cli", "featurestore.store:FeatureGroup.write_chunk", 2, *args)
    group = FeatureStore(ws.store).open(f"{name}/text/bert-tiny")
    assert group.status == "partial" and group.done_chunks().sum() == 2
    with pytest.raises(UserError):  # a partial group is refused for training
        train(ws, TrainOptions(dataset=name, mode="ts", encoders=["bert-tiny"], epochs=1, dim=8))
    job = ExtractOptions(dataset=name, encoder="bert-tiny", random_init=True, chunk_rows=32, workers=0,
                         progress=False)  # what the command runs
    assert run_extraction(ws, job).resumed_chunks == 2
    run_extraction(ws, replace(job, variant="ref"))  # uninterrupted
    store = FeatureStore(ws.store)
    np.testing.assert_array_equal(store.open(f"{name}/text/bert-tiny").read(),
                                  store.open(f"{name}/text/bert-tiny@ref").read())


def train_args(root: Path, name: str, run: str) -> tuple:
    """``recommend train`` arguments matching ``TrainOptions(mode="id", dim=16, epochs=5, lr=1e-3)``."""
    return ("train", "--dataset", name, "--mode", "id", "--dim", 16, "--batch-size", 64, "--epochs", 5,
            "--lr", "1e-3", "--device", "cpu", "--run-name", run, "--quiet", "--root", root, "--json")


def test_train_killed_twice_resumes_to_the_same_result(synth_ws, tmp_path):
    ws, name = fresh_root(synth_ws, tmp_path)
    options = TrainOptions(dataset=name, mode="id", dim=16, batch_size=64, epochs=5, lr=1e-3, device="cpu")
    train(ws, replace(options, run_name="whole"), progress=False, echo=False)  # uninterrupted
    args = train_args(tmp_path, name, "killed")
    # right after epoch 2's resumable state, before its checkpoint and metrics line
    killed("recommend.cli", "recommend.run_folder:save_training_state", 2, *args)
    best = json.loads((ws.run_dir("killed") / "best.json").read_text())
    assert best["status"] == "running"  # not complete, and `recommend runs` says so
    # resumed after epoch 2, killed again after epoch 4's validation (its state not yet saved)
    killed("recommend.cli", "recommend.trainer:validate", 2, *args)
    train(ws, replace(options, run_name="killed"), progress=False, echo=False)  # what the command runs
    whole, resumed = ws.run_dir("whole"), ws.run_dir("killed")

    def epochs(run_dir: Path) -> list:
        return [(r["epoch"], r["loss"], r["valid"]) for r in map(json.loads, (run_dir / "metrics.jsonl").open())]

    assert epochs(resumed) == epochs(whole) and len(epochs(whole)) == 5
    assert (resumed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    ends = [json.loads((d / "best.json").read_text()) for d in (whole, resumed)]
    assert [(b["status"], b["epoch"], b["metrics"]) for b in ends] == [("completed", ends[0]["epoch"], ends[0]["metrics"])] * 2
    assert not (resumed / "last.safetensors").exists()
    rerun = train(ws, replace(options, run_name="killed"), progress=False, echo=False)
    assert rerun["message"].startswith("already finished")  # a finished run is not redone
    assert (resumed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_checkpoint_written_after_its_state_is_repaired_on_resume(synth_ws, tmp_path, monkeypatch):
    """Kill between an epoch's state (which says 'this epoch is the best') and its checkpoint:
    the resumed run rewrites the checkpoint from the state instead of keeping the older one."""
    ws, name = fresh_root(synth_ws, tmp_path)
    opts = dict(dataset=name, mode="id", dim=16, epochs=3, lr=1e-3, device="cpu")
    train(ws, TrainOptions(**opts, run_name="whole"), progress=False, echo=False)
    real, calls = run_module.save_checkpoint, []

    class Killed(BaseException):
        pass

    def checkpoint_or_die(run_dir, model):
        calls.append(1)
        if len(calls) == 2:
            raise Killed  # like SIGKILL: no handler runs
        real(run_dir, model)

    monkeypatch.setattr("recommend.run_folder.save_checkpoint", checkpoint_or_die)
    with pytest.raises(Killed):
        train(ws, TrainOptions(**opts, run_name="cut"), progress=False, echo=False)
    monkeypatch.undo()
    train(ws, TrainOptions(**opts, run_name="cut"), progress=False, echo=False)
    assert (ws.run_dir("cut") / "model.safetensors").read_bytes() == \
        (ws.run_dir("whole") / "model.safetensors").read_bytes()


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, ...), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (_stat(int(p.name)) or [None, None])[1] == str(pid)]


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def test_study_killed_mid_training_then_rerun(synth_ws, tmp_path):
    ws, name = fresh_root(synth_ws, tmp_path / "killed")
    reference_ws, _ = fresh_root(synth_ws, tmp_path / "whole")
    settings = dict(encoder="bert-tiny", random_init=True, modes=["id", "ts"], epochs=3, dim=8,
                    batch_size=128, lr=1e-3, threads=1, device="cpu")
    reference = run_study(reference_ws, StudyOptions(dataset=name, **settings), progress=False)
    args = ["study", "--dataset", name, "--encoder", "bert-tiny", "--random-init", "--modes", "id,ts",
            "--epochs", 3, "--dim", 8, "--batch-size", 128, "--lr", "1e-3", "--threads", 1, "--device", "cpu",
            "--root", ws.root, "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "recommend.cli", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ts_run = reference["configurations"][1]["run"]  # same settings, same run names
    deadline = time.time() + 300
    while not (ws.run_dir(ts_run) / "last.safetensors").exists():  # the ts run is mid-training
        assert proc.poll() is None and time.time() < deadline, "the study ended before it could be killed"
        time.sleep(0.02)
    trainers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert trainers
    for _ in range(500):  # the training process dies with the study (no orphan writing the run)
        if not any(_running(pid) for pid in trainers):
            break
        time.sleep(0.02)
    else:
        pytest.fail("a training process outlived the killed study")
    assert json.loads((ws.run_dir(ts_run) / "best.json").read_text())["status"] == "running"
    result = run_study(ws, StudyOptions(dataset=name, **settings), progress=False)  # what the command runs
    assert [c["status"] for c in result["configurations"]] == ["finished earlier", "trained"]
    assert [c["test"] for c in result["configurations"]] == [c["test"] for c in reference["configurations"]]
    assert result["popularity"] == reference["popularity"]


# ---- an unwritable root, a full disk ----------------------------------------------------------

@contextmanager
def read_only(folder: Path):
    """``folder`` read-only: a read-only bind mount as root (who ignores file modes), else chmod."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,bind,ro", folder, folder], capture_output=True).returncode == 0
    try:
        if not mounted:
            pytest.skip("cannot make a read-only bind mount here")
        yield
    finally:
        subprocess.run(["umount", folder], capture_output=True)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-2000:]
    for word in words:
        assert word in errors[0]
    return errors[0]


def test_root_under_a_file_is_a_clear_error(synth_ws, tmp_path):
    ws, name = synth_ws
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = command("featurestore.cli", "dataset", "prepare", "--format", "hm", "--source", ws.root / "raw" / name,
                   "--name", name, "--root", blocker / "ws")
    one_line_error(proc, str(blocker), "not a folder", "--root")


def test_read_only_runs_folder_is_a_clear_error_and_keeps_earlier_runs(synth_ws, tmp_path):
    ws, name = fresh_root(synth_ws, tmp_path)
    train(ws, TrainOptions(dataset=name, mode="id", dim=8, epochs=1, run_name="earlier", device="cpu"),
          progress=False, echo=False)
    before = digest(ws.runs)
    with read_only(ws.runs):
        proc = command("recommend.cli", *train_args(tmp_path, name, "later"))
        one_line_error(proc, str(ws.run_dir("later")))
        study = command("recommend.cli", "study", "--dataset", name, "--encoder", "bert-tiny", "--modes", "id",
                        "--epochs", 1, "--dim", 8, "--root", tmp_path)
        one_line_error(study, str(ws.runs))
    assert digest(ws.runs) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs under ``tmp_path`` (needs root; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", disk], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", disk], capture_output=True)


def test_full_disk_names_the_file_and_keeps_earlier_results(synth_ws, small_disk):
    ws, name = fresh_root(synth_ws, small_disk)
    train(ws, TrainOptions(dataset=name, mode="id", dim=8, epochs=1, run_name="earlier", device="cpu"),
          progress=False, echo=False)
    before = digest(small_disk)
    # d = 256: the first epoch's state (~20 MB with the optimizer moments) cannot fit
    args = list(train_args(small_disk, name, "big"))
    args[args.index("--dim") + 1] = 256
    proc = command("recommend.cli", *args)
    one_line_error(proc, str(ws.run_dir("big")), "no space left")
    after = digest(small_disk)
    assert {k: v for k, v in after.items() if not k.startswith("runs/big/")} == before
    assert not any(k.endswith(".tmp") for k in after)  # the half-written file was removed


def test_os_errors_become_one_line_at_the_cli_boundary(capsys, monkeypatch):
    @click.group()
    def cli() -> None:
        pass

    @cli.command()
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/model.safetensors")

    @cli.command()
    def other() -> None:
        raise OSError(errno.EIO, "Input/output error", "/dev/sdz")

    monkeypatch.setattr(sys, "argv", ["prog", "full"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli, "prog")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: /data/runs/x/model.safetensors: no space left on the device; free some space and run the "
        "same command again (finished results are kept)")
    monkeypatch.setattr(sys, "argv", ["prog", "other"])
    with pytest.raises(OSError):  # not the user's to fix: the traceback stays
        run_cli(cli, "prog")
