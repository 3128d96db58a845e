"""Ranking under ``torchrun --nproc-per-node 2`` (gloo on the CPU) equals one process, user by user.

Each process ranks its block of users against the whole catalogue and process 0 writes
the one result: the exported ranks must equal a one-process run's, and a torchrun
training run's validation must equal a one-process evaluation of its best checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from eval.distributed import Shard
from eval.evaluate import evaluate
from featurestore.workspace import Workspace
from recommend.run import load_run

RUN = "shard-id"


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 $(which recommend) ARGS`` as the README gives it.

    The console script next to this interpreter (a pyenv shim on PATH is a bash script,
    which torchrun would hand to python).
    """
    script = Path(sys.executable).with_name("recommend")
    target = [str(script)] if script.exists() else ["-m", "recommend.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *target, *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(synth_ws, tmp_path_factory) -> Workspace:
    source_ws, name = synth_ws
    ws = Workspace(tmp_path_factory.mktemp("shard"))
    shutil.copytree(source_ws.dataset_dir(name), ws.dataset_dir(name))
    from recommend.cli import cli as recommend_cli

    result = CliRunner().invoke(recommend_cli, [
        "train", "--root", str(ws.root), "--dataset", name, "--mode", "id", "--epochs", "1",
        "--dim", "32", "--blocks", "1", "--device", "cpu", "--run-name", RUN, "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return ws


def test_shard_blocks_cover_every_user_once():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            blocks = [Shard(r, world).block(n) for r in range(world)]
            covered = np.concatenate([np.arange(n)[b] for b in blocks])
            np.testing.assert_array_equal(covered, np.arange(n))


@pytest.mark.parametrize("index", ["flat", "torch"])
def test_torchrun_eval_rank_equals_one_process(trained, tmp_path, index):
    from eval.cli import cli

    one = CliRunner().invoke(cli, ["rank", RUN, "--full-pool", "--index", index, "--device", "cpu",
                                   "--export", str(tmp_path / "one"), "--root", str(trained.root), "--json"])
    assert one.exit_code == 0, one.output
    proc = torchrun("eval", "rank", RUN, "--full-pool", "--index", index, "--device", "cpu",
                    "--export", str(tmp_path / "two"), "--root", str(trained.root), "--json")
    (line,) = proc.stdout.strip().splitlines()  # one result, from process 0
    two, one = json.loads(line), json.loads(one.stdout)
    ranks_one, ranks_two = np.load(tmp_path / "one" / "ranks.npy"), np.load(tmp_path / "two" / "ranks.npy")
    assert len(ranks_one) == one["users"] > 100
    np.testing.assert_array_equal(ranks_two, ranks_one)
    np.testing.assert_allclose(np.load(tmp_path / "two" / "users.npy"), np.load(tmp_path / "one" / "users.npy"),
                               rtol=1e-5, atol=1e-6)
    assert {k: v for k, v in two.items() if "@" in k} == {k: v for k, v in one.items() if "@" in k}
    assert 0 < one["HR@50"] < 1  # ranks spread: a comparison that could fail


def test_torchrun_training_validation_equals_one_process(trained):
    proc = torchrun("train", "--root", str(trained.root), "--dataset", "synth", "--mode", "id", "--dim", "32",
                    "--blocks", "1", "--epochs", "2", "--lr", "1e-3", "--device", "cpu", "--run-name", "shard-ddp",
                    "--quiet", "--json")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run"] == "shard-ddp"
    best = json.loads((trained.run_dir("shard-ddp") / "best.json").read_text())
    from data.dataset import PreparedDataset

    model, _ = load_run(trained.run_dir("shard-ddp"), device="cpu", ws=trained)
    dataset = PreparedDataset.load(trained.dataset_dir("synth"))
    with torch.no_grad():
        alone = evaluate(model, dataset, split="valid", ks=(10,), exclude_history=True)
    assert best["metrics"] == {k: float(v) for k, v in alone.items() if "@" in k}
    assert best["metrics"]["HR@10"] > 0
