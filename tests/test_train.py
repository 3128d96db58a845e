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

from PIL import Image

from eval.evaluate import evaluate, popularity_metrics
from extract.job import ExtractOptions, run_extraction
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from recommend import trainer as trainer_module
from recommend.batches import model_seq_len, training_rows
from recommend.cli import cli
from recommend.losses import SampledBCE
from recommend.run import load_run
from recommend.trainer import TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(dim=32, batch_size=32, lr=1e-3, dropout=0.1, epochs=15, patience=4)  # learns in a few epochs



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


@pytest.mark.parametrize(("loss", "extra"), [("ce", {}), ("sce", {"negatives": 64})])
def test_catalogue_ce_and_its_sampled_estimate_beat_popularity(synth_ws, pop_hr, loss, extra):
    ws, _ = synth_ws
    result = run(ws, mode="id", loss=loss, epochs=8, run_name=f"loss-{loss}", **extra)
    assert result["best"]["HR@10"] > pop_hr + 0.05, (result["best"], pop_hr)


def test_gbce_with_one_negative_and_no_calibration_trains_exactly_as_bce(synth_ws):
    """gBCE at K = 1, t = 0 is the papers' BCE (half of it: the mean over K + 1 terms, which
    Adam does not see); the same seed draws the same negatives, so the runs agree."""
    ws, _ = synth_ws
    bce = run(ws, mode="id", loss="bce", epochs=3, run_name="loss-bce-3")
    gbce = run(ws, mode="id", loss="gbce", negatives=1, gbce_t=0.0, epochs=3, run_name="loss-gbce-3")
    assert gbce["best"]["HR@10"] == pytest.approx(bce["best"]["HR@10"], abs=1e-9)
    assert gbce["best"]["NDCG@10"] == pytest.approx(bce["best"]["NDCG@10"], rel=1e-4)
    options = json.loads((ws.run_dir("loss-gbce-3") / "config.json").read_text())["options"]
    assert options["negatives"] == 1 and options["gbce_t"] == 0.0
    default = run(ws, mode="id", loss="gbce", negatives=8, epochs=1, run_name="loss-gbce-default")
    assert json.loads((ws.run_dir("loss-gbce-default") / "config.json").read_text())["options"]["gbce_t"] == 0.75
    assert default["epochs"] == 1


def test_cloze_training_with_ce_gbce_and_sce(synth_ws):
    ws, _ = synth_ws
    for loss, extra in (("ce", {}), ("gbce", {"negatives": 4}), ("sce", {"negatives": 16})):
        result = run(ws, mode="id", backbone="bert4rec", loss=loss, epochs=2, run_name=f"cloze-{loss}", **extra)
        assert result["epochs"] == 2 and 0 < result["best"]["HR@10"] <= 1


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


def _scripted_validation(monkeypatch, scores):
    scores = iter(scores)
    monkeypatch.setattr(trainer_module, "validate",
                        lambda model, dataset: {"HR@10": (s := next(scores)), "NDCG@10": s / 2})


def test_patience_waits_out_the_popularity_plateau(synth_ws, monkeypatch, pop_hr):
    """Nine epochs at popularity's level, then the model learns: a patience of 4 would have
    stopped at epoch 5 on the plateau; counted from leaving it, the run reaches epoch 10."""
    ws, _ = synth_ws
    _scripted_validation(monkeypatch, [pop_hr] * 9 + [2 * pop_hr] * 11)
    result = run(ws, mode="id", epochs=20, patience=4, plateau_patience=12, run_name="plateau-left")
    assert result["status"] == "early_stopped" and result["best_epoch"] == 10 and result["epochs"] == 14
    assert result["warning"] is None
    assert json.loads((ws.run_dir("plateau-left") / "best.json").read_text())["warning"] is None


def test_a_run_no_better_than_popularity_ends_with_a_warning(synth_ws, monkeypatch, pop_hr):
    ws, _ = synth_ws
    _scripted_validation(monkeypatch, [1.05 * pop_hr] + [pop_hr] * 9)
    out = CliRunner().invoke(cli, ["train", "--root", str(ws.root), "--dataset", "synth", "--mode", "id",
                                   "--dim", "16", "--epochs", "10", "--patience", "2", "--plateau-patience",
                                   "5", "--run-name", "plateau-stuck", "--quiet"])
    assert out.exit_code == 0, out.output
    assert "plateau-patience" in out.output and "at epoch 1" in out.output
    assert "warning: best validation HR@10" in out.output and "recommend tune" in out.output
    best = json.loads((ws.run_dir("plateau-stuck") / "best.json").read_text())
    assert best["epoch"] == 1 and "not clearly above the popularity baseline" in best["warning"]
    assert best["popularity"]["HR@10"] == pytest.approx(pop_hr)
    assert "warning: best validation HR@10" in (ws.run_dir("plateau-stuck") / "train.log").read_text()
    assert len((ws.run_dir("plateau-stuck") / "metrics.jsonl").read_text().splitlines()) == 6


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
    result = run(ws, mode="id", loss="bce", epochs=5, run_name="collapse-nan")
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
    (dict(mode="ts", features=["synth/text/a"], dnn="paper"), "--dnn picks the TS-DNN stack"),
    (dict(mode="ts-dnn", features=["synth/text/a"], dnn="resnet"), "unknown TS-DNN stack 'resnet'"),
    (dict(mode="ts"), "--encoder ENC or --features"),
    (dict(mode="id", whiten=True), "--whiten transforms stored features"),
    (dict(mode="ts", features=["synth/text/a"], fusion="gate"), "--fusion merges two"),
    (dict(mode="ts", features=["other/text/a"]), "belongs to dataset other"),
    (dict(mode="ts-dnn", encoders=["minilm-l6@absent"]),
     r"`featurestore extract --dataset synth --encoder minilm-l6 --modality text --variant absent`"),
    (dict(mode="ts", encoders=["nosuch"]), "unknown encoder 'nosuch'"),
    (dict(mode="id", backbone="bert5rec"), "unknown backbone 'bert5rec'"),
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


# --- two-stage modes on stored features ------------------------------------------------

TEXT = "minilm-l6@rectest"  # a variant tag keeps these groups apart from other tests' groups
PIXELS = "synth/image/pixels@rectest"


@pytest.fixture(scope="module")
def text_group(synth_ws) -> str:
    """Real MiniLM-L6 title vectors, extracted once into the fixture's store."""
    ws, name = synth_ws
    result = run_extraction(ws, ExtractOptions(dataset=name, encoder="minilm-l6", variant="rectest",
                                               workers=0, progress=False))
    assert result.status == "complete"
    return result.group


def write_group(ws, name: str, rows: np.ndarray, present: np.ndarray, fingerprint: str) -> None:
    """Write a complete group through the store API, as an import would."""
    group = FeatureStore(ws.store).create(name, rows=rows.shape[0], dim=rows.shape[1], dtype="float32",
                                          chunk_rows=64, attrs={"dataset_fingerprint": fingerprint,
                                                                "encoder": name.split("/")[-1]})
    for chunk in range(group.n_chunks):
        start, stop = group.chunk_bounds(chunk)
        group.write_chunk(chunk, rows[start:stop], present[start:stop])
    group.write_flat()
    group.update_attrs(status="complete")


@pytest.fixture(scope="module")
def pixel_group(synth_ws, synth_dataset) -> str:
    """An image group of 8x8 RGB thumbnails; items without a picture are present=false."""
    ws, _ = synth_ws
    rows = np.zeros((synth_dataset.n_items + 1, 192), dtype=np.float32)
    present = np.zeros(synth_dataset.n_items + 1, dtype=bool)
    for item in synth_dataset.items:
        if item.image:
            try:
                with Image.open(item.image) as im:
                    rows[item.id] = np.asarray(im.convert("RGB").resize((8, 8)), np.float32).ravel() / 255
                present[item.id] = True
            except OSError:
                pass
    assert not present[1:].all()  # the synthetic catalogue has items with no picture
    write_group(ws, PIXELS, rows, present, synth_dataset.fingerprint)
    return PIXELS


def test_ts_dnn_beats_popularity_on_real_text_vectors(synth_ws, text_group, pop_hr):
    ws, _ = synth_ws
    result = run(ws, mode="ts-dnn", layers=2, encoders=[TEXT], run_name="tsdnn-text", seed=1)
    assert result["best"]["HR@10"] > pop_hr + 0.1, (result["best"], pop_hr)
    config = json.loads((ws.run_dir("tsdnn-text") / "config.json").read_text())
    (feature,) = config["features"]
    group = FeatureStore(ws.store).open(text_group)
    assert feature["group"] == text_group == "synth/text/minilm-l6@rectest"
    assert feature["fingerprint"] == group.fingerprint and feature["dim"] == 384
    assert feature["provenance"]["weights_sha256"] == group.attrs["weights_sha256"]
    assert config["cost"]["trainable_params"] == (384 * 32 + 32) + 2 * (32 * 32 + 3 * 32) + 384 + \
        sum(p.numel() for p in load_run(ws.run_dir("tsdnn-text"))[0].user_encoder.parameters())


def test_ts_with_whitening_reloads_exactly(synth_ws, synth_dataset, text_group):
    ws, _ = synth_ws
    result = run(ws, mode="ts", encoders=[TEXT], whiten=True, epochs=3, run_name="ts-white")
    assert result["epochs"] == 3 and result["best"]["HR@10"] > 0
    model, config = load_run(ws.run_dir("ts-white"))
    assert config["model"]["item_tower"]["whiten"] is True
    assert float(model.item_tower.inputs[0].white_proj.abs().sum()) > 0  # restored, not refitted
    again = evaluate(model, synth_dataset, split="valid", ks=(10,))
    assert {k: again[k] for k in result["best"]} == result["best"]


@pytest.mark.parametrize("fusion, with_id", [("gate", None), ("film", "concat")])
def test_text_image_fusion_trains(synth_ws, synth_dataset, text_group, pixel_group, fusion, with_id):
    ws, _ = synth_ws
    result = run(ws, mode="ts-dnn", layers=1, features=[text_group, pixel_group], fusion=fusion,
                 with_id=with_id, epochs=2, run_name=f"fusion-{fusion}")
    assert result["epochs"] == 2 and result["best"]["HR@10"] > 0
    model, config = load_run(ws.run_dir(f"fusion-{fusion}"))
    assert [f["group"] for f in config["features"]] == [text_group, pixel_group]
    assert config["features"][1]["missing"] == int((~FeatureStore(ws.store).open(pixel_group).present()[1:]).sum())
    missing = np.flatnonzero(~FeatureStore(ws.store).open(pixel_group).present()[1:]) + 1
    vectors = model.item_vectors()
    assert torch.isfinite(vectors).all() and vectors[missing].abs().sum() > 0


def test_group_for_another_dataset_version_is_refused(synth_ws, synth_dataset):
    ws, _ = synth_ws
    rows = np.ones((synth_dataset.n_items + 1, 4), dtype=np.float32)
    write_group(ws, "synth/image/stale@rectest", rows,
                np.ones(len(rows), dtype=bool), fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match="built for dataset fingerprint 0123456789abcdef"):
        run(ws, mode="ts", features=["synth/image/stale@rectest"], epochs=1)


def test_unfinished_group_is_refused_with_the_command_that_finishes_it(synth_ws, synth_dataset):
    ws, _ = synth_ws
    FeatureStore(ws.store).create("synth/text/minilm-l6@halfdone", rows=synth_dataset.n_items + 1,
                                  dim=4, dtype="float32", chunk_rows=64,
                                  attrs={"dataset_fingerprint": synth_dataset.fingerprint})
    with pytest.raises(UserError, match="partial.*featurestore extract --dataset synth --encoder "
                                        "minilm-l6 --modality text --variant halfdone"):
        run(ws, mode="ts", encoders=["minilm-l6@halfdone"], epochs=1)


def test_torchrun_two_processes_on_cpu(synth_ws):
    ws, _ = synth_ws
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "recommend.cli",
         "train", "--root", str(ws.root), "--dataset", "synth", "--mode", "id", "--dim", "32",
         "--epochs", "2", "--lr", "1e-3", "--run-name", "ddp", "--quiet", "--json"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.strip().splitlines()  # one report, from process 0
    assert json.loads(line)["run"] == "ddp"
    config = json.loads((ws.run_dir("ddp") / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert len((ws.run_dir("ddp") / "metrics.jsonl").read_text().splitlines()) == 2
