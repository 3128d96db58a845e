"""The trainer end to end on the planted synthetic dataset: learning, run folders,
reproducibility, collapse guard, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from eval.evaluate import evaluate, popularity_metrics
from featurestore.cliutil import UserError
from recommend import trainer as trainer_module
from recommend.batches import model_seq_len, training_rows
from recommend.cli import cli
from recommend.losses import SampledBCE
from recommend.run import list_runs, load_run
from recommend.trainer import TrainOptions, train

FAST = dict(dim=32, batch_size=32, lr=1e-3, epochs=15, patience=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pop_hr(synth_dataset) -> float:
    return popularity_metrics(synth_dataset, "valid", ks=(10,))["HR@10"]


def run(ws, **options):
    return train(ws, TrainOptions(dataset="synth", **{**FAST, **options}), progress=False, echo=False)


@pytest.fixture(scope="module")
def id_run(synth_ws):
    ws, _ = synth_ws
    return run(ws, mode="id", run_name="id-sasrec", seed=1)


def test_idrec_beats_popularity(id_run, pop_hr):
    assert id_run["best"]["HR@10"] > pop_hr + 0.1, (id_run["best"], pop_hr)


def test_run_folder_holds_everything_to_rerun(id_run, synth_ws, synth_dataset):
    ws, _ = synth_ws
    run_dir = ws.run_dir("id-sasrec")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == {**config["dataset"], "name": "synth",
                                 "fingerprint": synth_dataset.fingerprint}
    assert config["package_version"] and config["training"]["seed"] == 1
    assert config["options"]["mode"] == "id" and config["options"]["lr"] == 1e-3
    model, _ = load_run(run_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert config["cost"] == {"trainable_params": n_params, "total_params": n_params}

    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
    for e in epochs:
        assert {"loss", "valid", "seconds", "sec_per_step", "peak_rss_mb", "peak_gpu_mb"} <= e.keys()
        assert set(e["valid"]) == {"HR@10", "NDCG@10"} and e["peak_rss_mb"] > 0
    best = json.loads((run_dir / "best.json").read_text())
    assert best["metrics"] == max((e["valid"] for e in epochs),
                                  key=lambda m: (m["HR@10"], m["NDCG@10"]))
    assert best["status"] in ("completed", "early_stopped") and "epoch" in (run_dir / "train.log").read_text()


def test_reloading_reproduces_the_best_scores_exactly(id_run, synth_ws, synth_dataset):
    ws, _ = synth_ws
    model, config = load_run(ws.run_dir("id-sasrec"))
    again = evaluate(model, synth_dataset, split="valid", ks=(10,))
    best = json.loads((ws.run_dir("id-sasrec") / "best.json").read_text())["metrics"]
    assert {k: again[k] for k in best} == best
    state = load_file(str(ws.run_dir("id-sasrec") / "model.safetensors"))
    torch.testing.assert_close(model.item_vectors()[1:], state["item_tower.table.weight"][1:],
                               rtol=0, atol=0)


def test_same_seed_same_metrics_other_seed_other_metrics(synth_ws):
    ws, _ = synth_ws
    runs = [run(ws, mode="id", epochs=2, seed=seed, run_name=f"seed-{seed}-{i}")
            for i, seed in enumerate((7, 7, 8))]
    lines = [(ws.run_dir(r["run"]) / "metrics.jsonl").read_text().splitlines() for r in runs]
    strip = lambda ls: [{k: json.loads(x)[k] for k in ("loss", "valid")} for x in ls]  # noqa: E731
    assert strip(lines[0]) == strip(lines[1])
    assert strip(lines[0]) != strip(lines[2])


@pytest.mark.parametrize("backbone", ["dssm", "gru4rec", "nextitnet"])
def test_other_backbones_and_inbatch_train_end_to_end(synth_ws, backbone, pop_hr):
    ws, _ = synth_ws
    result = run(ws, mode="id", backbone=backbone, loss="inbatch", epochs=3,
                 run_name=f"bb-{backbone}")
    assert result["epochs"] == 3 and 0 < result["best"]["HR@10"] <= 1


def test_validation_collapse_stops_and_keeps_the_best(synth_ws, monkeypatch):
    ws, _ = synth_ws
    scores = iter([0.20, 0.30, 0.001, 0.5])
    monkeypatch.setattr(trainer_module, "validate",
                        lambda model, dataset: {"HR@10": (s := next(scores)), "NDCG@10": s / 2})
    result = run(ws, mode="id", epochs=4, run_name="collapse-valid")
    assert result["status"] == "collapsed" and result["epochs"] == 3
    assert result["best_epoch"] == 2 and result["best"]["HR@10"] == 0.30
    assert "--lr" in result["message"] and "epoch 2" in result["message"]
    assert (ws.run_dir("collapse-valid") / "model.safetensors").exists()
    assert json.loads((ws.run_dir("collapse-valid") / "best.json").read_text())["status"] == "collapsed"


def test_nan_loss_stops_and_keeps_the_best(synth_ws, synth_dataset, monkeypatch):
    ws, _ = synth_ws
    steps_per_epoch = -(-len(training_rows(synth_dataset, model_seq_len(synth_dataset))) // 32)
    calls = {"n": 0}
    forward = SampledBCE.forward

    def poisoned(self, *args):
        calls["n"] += 1
        value = forward(self, *args)
        return value * float("nan") if calls["n"] > steps_per_epoch + 2 else value  # in epoch 2

    monkeypatch.setattr(SampledBCE, "forward", poisoned)
    result = run(ws, mode="id", epochs=5, run_name="collapse-nan")
    assert result["status"] == "collapsed" and result["best_epoch"] == 1
    assert "nan" in result["message"] and "--lr" in result["message"]
    model, _ = load_run(ws.run_dir("collapse-nan"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_train_json_and_runs_listing(synth_ws):
    ws, _ = synth_ws
    runner = CliRunner()
    out = runner.invoke(cli, ["train", "--root", str(ws.root), "--dataset", "synth", "--mode", "id",
                              "--dim", "32", "--epochs", "1", "--lr", "1e-3", "--run-name", "cli-id",
                              "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["run"] == "cli-id" and set(result["best"]) == {"HR@10", "NDCG@10"}
    listed = json.loads(runner.invoke(cli, ["runs", "--root", str(ws.root), "--json"]).stdout)
    row = next(r for r in listed["runs"] if r["run"] == "cli-id")
    assert row["mode"] == "id" and row["backbone"] == "sasrec" and row["best"] == result["best"]
    assert "cli-id" in runner.invoke(cli, ["runs", "--root", str(ws.root)]).stdout


@pytest.mark.parametrize("options, message", [
    (dict(mode="id", layers=4), "--layers sets the TS-DNN depth"),
    (dict(mode="ts"), "--encoder ENC or --features"),
    (dict(mode="id", whiten=True), "--whiten transforms stored features"),
    (dict(mode="ts", features=["synth/text/a"], fusion="gate"), "--fusion merges two"),
    (dict(mode="ts", features=["other/text/a"]), "belongs to dataset other"),
    (dict(mode="ts-dnn", encoders=["minilm-l6"]),
     r"`featurestore extract --dataset synth --encoder minilm-l6`"),
    (dict(mode="ts", encoders=["nosuch"]), "unknown encoder 'nosuch'"),
    (dict(mode="id", backbone="bert4rec"), "unknown backbone 'bert4rec'"),
    (dict(mode="id", dim=30, heads=4), "divisible by --heads"),
])
def test_bad_options_are_one_line_user_errors(synth_ws, options, message):
    ws, _ = synth_ws
    with pytest.raises(UserError, match=message):
        run(ws, **options)


def test_cli_bad_input_exits_2_with_the_fix(synth_ws, tmp_path):
    ws, _ = synth_ws
    proc = subprocess.run([sys.executable, "-m", "recommend.cli", "train", "--root", str(ws.root),
                           "--dataset", "nope", "--mode", "id"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no prepared dataset") and "Traceback" not in proc.stderr


def test_existing_run_name_is_refused(id_run, synth_ws):
    ws, _ = synth_ws
    with pytest.raises(UserError, match="already exists"):
        run(ws, mode="id", run_name="id-sasrec", epochs=1)
