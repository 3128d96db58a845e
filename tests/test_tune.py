"""recommend tune: Optuna's search over ordinary runs; pruning, kill and resume, two workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from featurestore.cliutil import UserError
from recommend.cli import cli
from recommend.run import read_metrics
from recommend.trainer import TrainOptions
from recommend.tune import TuneOptions, load_space, open_storage, run_tune

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(dataset="synth", mode="id", batch_size=32, patience=20)
GOOD = {"lr": 3e-3, "weight_decay": 0.01, "dropout": 0.1, "dim": 32}


def _cli(ws, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "recommend.cli", "tune", "--root", str(ws.root),
                             "--dataset", "synth", "--mode", "id", "--batch-size", "32", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_trial_on_the_plateau_is_not_pruned_and_every_trial_is_a_run(private_ws):
    """The median pruner sees every trial, but cannot cut one still at popularity's level: it may be a
    late learner (issue 28); the trainer's --plateau-patience ends one that never leaves it."""
    ws = private_ws("tune-prune")
    storage = open_storage(ws, None, 60)
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    for lr in (3e-3, 2e-3, 4e-3, 1e-7):  # three that learn, then one that stays on the plateau
        study.enqueue_trial({**GOOD, "lr": lr})
    result = run_tune(ws, TuneOptions(TrainOptions(**BASE, epochs=6), trials=4, study_name="prune",
                                      pruner="median"), echo=False)
    assert (result["complete"], result["pruned"], result["failed"]) == (4, 0, 0)
    bad = ws.run_dir("prune-t3")
    best = json.loads((bad / "best.json").read_text())
    assert best["status"] == "completed" and best["warning"] and len(read_metrics(bad)) == 6
    assert not any(r["left_plateau"] for r in read_metrics(bad))
    assert result["best"]["run"] in {"prune-t0", "prune-t1", "prune-t2"}
    assert result["best"]["value"] == json.loads(
        (ws.run_dir(result["best"]["run"]) / "best.json").read_text())["metrics"]["HR@10"]
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = CliRunner().invoke(cli, ["eval", "rank", "--root", str(ws.root), "--run", "prune-t0", "--json"])
    assert out.exit_code == 0, out.output  # a trial is an ordinary run folder
    again = run_tune(ws, TuneOptions(TrainOptions(**BASE, epochs=6), trials=4, study_name="prune"), echo=False)
    assert again["trials"] == 4  # done: nothing rerun
    with pytest.raises(UserError, match=r"searches other settings \(epochs: 6 there, 7 here\); give --study-name"):
        run_tune(ws, TuneOptions(TrainOptions(**BASE, epochs=7), trials=5, study_name="prune"), echo=False)


def test_killed_tune_continues_where_it_stopped(private_ws):
    ws = private_ws("tune-kill")
    args = ["--trials", "3", "--epochs", "8", "--patience", "20", "--pruner", "none", "--heartbeat", "1",
            "--study-name", "kill", "--sampler-seed", "0", "--dim", "32"]
    first = _cli(ws, *args)
    metrics = ws.run_dir("kill-t0") / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = metrics.read_text().count("\n")
    assert 2 <= killed_at < 8
    time.sleep(3)  # the killed worker's heartbeat goes stale (2 x --heartbeat)
    second = _cli(ws, *args, "--json")
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    result = json.loads(out)
    assert result["failed"] == 1 and result["complete"] == 3  # the killed trial, re-queued and finished
    runs = sorted(p.name for p in ws.runs.iterdir())
    assert runs == ["kill-t0", "kill-t2", "kill-t3"]  # the retry (trial 1) trained into t0's folder
    assert "resuming after epoch" in (ws.run_dir("kill-t0") / "train.log").read_text()
    assert [r["epoch"] for r in read_metrics(ws.run_dir("kill-t0"))] == list(range(1, 9))


def test_two_workers_share_one_study_and_never_run_a_trial_twice(private_ws):
    ws = private_ws("tune-two")
    args = ["--trials", "4", "--epochs", "2", "--pruner", "none", "--study-name", "two"]
    workers = [_cli(ws, *args), _cli(ws, *args)]
    logs = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n----\n".join(log[-1500:] for log in logs)
    done = [{int(line.split()[1]) for line in log.splitlines() if line.startswith("trial ")} for log in logs]
    assert done[0] and done[1] and not done[0] & done[1]  # both worked, on different trials
    study = optuna.load_study(study_name="two", storage=open_storage(ws, None, 60))
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) >= 4 and {t.number for t in trials} == done[0] | done[1]
    runs = [t.user_attrs["run"] for t in trials]
    assert len(set(runs)) == len(runs)
    for run in runs:  # each trained once, from scratch
        assert [r["epoch"] for r in read_metrics(ws.run_dir(run))] == [1, 2]
        assert "resuming" not in (ws.run_dir(run) / "train.log").read_text()


def test_space_file_and_bad_input(tmp_path, private_ws):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\ndim: {type: categorical, choices: [16]}\n")
    assert load_space(path)["dim"] == {"type": "categorical", "choices": [16]}
    (tmp_path / "space.json").write_text(json.dumps({"layers": {"type": "int", "low": 1, "high": 4}}))
    assert load_space(tmp_path / "space.json")["layers"]["high"] == 4
    path.write_text("learning_rate: {type: float, low: 1, high: 2}\n")
    with pytest.raises(UserError, match="'learning_rate' is no option"):
        load_space(path)
    path.write_text("lr: {type: float, low: 2, high: 1}\n")
    with pytest.raises(UserError, match="low <= high"):
        load_space(path)
    ws = private_ws("tune-bad")
    out = CliRunner().invoke(cli, ["tune", "--root", str(ws.root), "--dataset", "synth", "--trials", "1",
                                   "--storage", "nosuchdb://x"])
    assert isinstance(out.exception, UserError) and "--storage nosuchdb://x" in str(out.exception)


def test_options_given_on_the_command_line_are_fixed_not_searched(tmp_path, private_ws):
    ws = private_ws("tune-fixed")
    out = CliRunner().invoke(cli, ["tune", "--root", str(ws.root), "--dataset", "synth", "--mode", "id",
                                   "--batch-size", "32", "--epochs", "1", "--trials", "1", "--lr", "0.0025",
                                   "--dim", "16", "--study-name", "fixed", "--json"])
    assert out.exit_code == 0, out.output
    assert "fixed, not searched: lr=0.0025, dim=16" in out.stderr
    result = json.loads(out.stdout)
    assert set(result["space"]) == {"weight_decay", "dropout"}
    config = json.loads((ws.run_dir("fixed-t0") / "config.json").read_text())
    assert config["training"]["lr"] == 0.0025 and config["model"]["dim"] == 16
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    for args, says in ((["--space", str(space), "--lr", "1e-3"], "which the command line also fixes; drop --lr"),
                       (["--lr", "1e-3", "--weight-decay", "0", "--dropout", "0", "--dim", "8"], "nothing left to search")):
        out = CliRunner().invoke(cli, ["tune", "--root", str(ws.root), "--dataset", "synth", "--trials", "1", *args])
        assert isinstance(out.exception, UserError) and says in str(out.exception), out.output
