"""``recommend study``: the whole comparison in one call, checked against independent numbers.

One small study (bert-tiny, random init, so no weights are needed; every mode) runs
once for the module on a copy of the session's synthetic dataset; the tests read its
report, its runs and a second, resumed invocation.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from data.dataset import PreparedDataset
from eval.metrics import format_metrics
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace
from recommend import study as study_module
from recommend.run import load_run
from recommend.study import StudyOptions, plan, run_name, run_study
from recommend.live_start import start_live_rows
from recommend.catalogue_cache import refresh_schedule
from recommend.losses import LIVE_REFRESH
from recommend.trainer import TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = dict(encoder="bert-tiny", random_init=True, layers=[2], modes=["id", "ts", "ts-dnn", "e2e", "adapter"],
               top_k=1, epochs=1, dim=16, batch_size=128, threads=1, device="cpu")



@pytest.fixture(scope="module")
def studied(private_ws):
    ws, name = private_ws("study"), "synth"
    opts = StudyOptions(dataset=name, **OPTIONS)
    return ws, opts, run_study(ws, opts, progress=False)


def hr_ndcg_at_10(scores: np.ndarray, targets: np.ndarray, excluded: list[set[int]]) -> tuple[float, float]:
    """Reference metrics with plain numpy: the target's rank counts every other non-excluded
    item scoring at least as high (ties rank the target last)."""
    hits, gains = [], []
    for row, target, seen in zip(scores, targets, excluded):
        others = np.ones(len(row), dtype=bool)
        others[0] = others[target] = False
        others[list(seen - {target})] = False
        rank = 1 + int((row[others] >= row[target]).sum())
        hits.append(rank <= 10)
        gains.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    return float(np.mean(hits)), float(np.mean(gains))


def test_every_mode_is_trained_ranked_and_reported(studied):
    ws, opts, result = studied
    labels = [c["label"] for c in result["configurations"]]
    assert labels == ["id", "ts", "ts-dnn2", "e2e-top1", "adapter"]
    assert all(c["status"] == "trained" for c in result["configurations"]), result["configurations"]
    report = (ws.studies / f"{opts.dataset}-{opts.encoder}" / "report.md").read_text()
    for c in result["configurations"]:
        assert f"| {c['run']} | {c['mode']} |" in report
        assert (ws.run_dir(c["run"]) / "eval.json").exists()
    assert "| popularity | popularity |" in report
    assert "## Warm and cold users" in report and result["subset_table"] in report
    assert [line.split(" | ")[0] for line in result["subset_table"].splitlines()[2:]] == \
        ["| popularity", "| oracle", "| oracle without links"] + [f"| {label}" for label in labels]
    for png in result["plots"]:
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "## Not run" not in report


def test_e2e_trains_from_states_cached_once(studied):
    ws, opts, result = studied
    run = next(c["run"] for c in result["configurations"] if c["mode"] == "e2e")
    config = json.loads((ws.run_dir(run) / "config.json").read_text())
    assert config["options"]["cached"] and config["options"]["encoders"] == [f"{opts.encoder}@top1"]
    group = FeatureStore(ws.store).open(f"{opts.dataset}/text/{opts.encoder}@top1")
    assert group.status == "complete" and group.attrs["cache_layer"] == 1


def test_live_rows_start_from_the_ts_row_and_the_report_shows_their_curves(studied):
    ws, opts, result = studied
    rows = {c["label"]: c for c in result["configurations"]}
    for label in ("e2e-top1", "adapter"):
        config = json.loads((ws.run_dir(rows[label]["run"]) / "config.json").read_text())
        assert config["transfer"]["source_run"] == rows["ts"]["run"] and config["transfer"]["warm_start"]
        assert config["options"]["catalogue_refresh"] == LIVE_REFRESH
        assert rows[label]["start"] == f"from the ts row ({rows['ts']['run']}), lr x0.1"
        assert config["options"]["lr"] == pytest.approx(0.1 * opts.lr)  # fine-tuned at a tenth of the rate
    out = ws.studies / f"{opts.dataset}-{opts.encoder}"
    report = (out / "report.md").read_text()
    assert "## Live rows (e2e, adapter)" in report
    assert f"| e2e-top1 | from the ts row ({rows['ts']['run']}), lr x0.1, at its validation HR@10" in report
    assert f"cached, {refresh_schedule(LIVE_REFRESH)}" in report and "(its validation curve above" in report
    assert (out / "valid-e2e-top1.png").read_bytes()[:4] == b"\x89PNG"
    assert rows["id"]["start"] is None


def test_cold_live_rows_keep_their_own_names(synth_dataset):
    opts = StudyOptions(dataset="synth", encoder="minilm-l6", modes=["ts", "e2e"], live_start="cold")
    configs = plan(opts, synth_dataset)
    start_live_rows(configs, "cold", lambda c, o: "renamed")
    assert [c.start for c in configs] == [None, "cold"] and configs[1].options.init_from is None
    start_live_rows(configs[1:], "ts", lambda c, o: "renamed")  # no ts row: cold, said so
    assert configs[1].start.startswith("cold (no ts row") and configs[1].run != "renamed"


def test_test_metrics_match_a_numpy_ranking(studied):
    ws, opts, result = studied
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    indptr, items = dataset.history("test")
    targets = dataset.targets("test")
    excluded = [set(items[indptr[u]:indptr[u + 1]].tolist()) for u in range(dataset.n_users)]
    for config in result["configurations"]:
        if config["mode"] not in ("ts-dnn", "e2e"):
            continue
        model, _ = load_run(ws.run_dir(config["run"]), ws=ws)
        length = model.max_seq_len
        history = torch.zeros((dataset.n_users, length), dtype=torch.long)
        for u in range(dataset.n_users):
            seq = items[indptr[u]:indptr[u + 1]][-length:]
            if len(seq):
                history[u, length - len(seq):] = torch.from_numpy(seq.astype(np.int64))
        with torch.no_grad():
            scores = (model.user_vectors(history) @ model.item_vectors().T).numpy()
        hr, ndcg = hr_ndcg_at_10(scores, targets, excluded)
        assert config["test"]["HR@10"] == pytest.approx(hr, abs=1e-6)
        assert config["test"]["NDCG@10"] == pytest.approx(ndcg, abs=1e-6)
        cold = dataset.train_counts()[targets] < 10
        for subset, users in (("warm", ~cold), ("cold", cold)):
            rows = np.flatnonzero(users)
            hr, ndcg = hr_ndcg_at_10(scores[rows], targets[rows], [excluded[u] for u in rows])
            assert config["subsets"][subset]["HR@10"] == pytest.approx(hr, abs=1e-6)
            assert config["subsets"][subset]["NDCG@10"] == pytest.approx(ndcg, abs=1e-6)


def test_popularity_row_matches_counting(studied):
    ws, opts, result = studied
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    counts = dataset.train_counts().astype(float)
    indptr, items = dataset.history("test")
    excluded = [set(items[indptr[u]:indptr[u + 1]].tolist()) for u in range(dataset.n_users)]
    hr, ndcg = hr_ndcg_at_10(np.tile(counts, (dataset.n_users, 1)), dataset.targets("test"), excluded)
    assert result["popularity"]["HR@10"] == pytest.approx(hr)
    assert result["popularity"]["NDCG@10"] == pytest.approx(ndcg)


def test_cost_columns_show_what_each_mode_trains(studied):
    ws, _, result = studied
    cost = {c["mode"]: json.loads((ws.run_dir(c["run"]) / "config.json").read_text())["cost"]
            for c in result["configurations"]}
    assert cost["ts"]["trainable_params"] == cost["ts"]["total_params"]  # no frozen encoder
    # live modes carry the whole bert-tiny (4.4M); e2e trains its top block, adapters far less
    assert cost["e2e"]["total_params"] > 4_000_000 and cost["adapter"]["total_params"] > 4_000_000
    assert cost["ts"]["trainable_params"] < cost["adapter"]["trainable_params"] < cost["e2e"]["trainable_params"]
    for c in result["configurations"]:
        metrics = (ws.run_dir(c["run"]) / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1 and json.loads(metrics[0])["peak_rss_mb"] > 0


def test_second_run_reuses_everything(studied):
    ws, opts, first = studied
    stamps = {c["run"]: (ws.run_dir(c["run"]) / "model.safetensors").stat().st_mtime_ns
              for c in first["configurations"]}
    again = run_study(ws, opts, progress=False)
    assert [c["status"] for c in again["configurations"]] == ["finished earlier"] * 5
    assert [c["test"] for c in again["configurations"]] == [c["test"] for c in first["configurations"]]
    assert {c["run"]: (ws.run_dir(c["run"]) / "model.safetensors").stat().st_mtime_ns
            for c in again["configurations"]} == stamps
    assert sorted(p.name for p in ws.runs.iterdir()) == sorted(stamps)


def test_a_missing_mode_is_reported_not_fatal(studied, monkeypatch):
    ws, opts, _ = studied
    monkeypatch.setattr(study_module, "list_item_towers", lambda: ["id", "ts", "ts-dnn"])
    result = run_study(ws, replace(opts, modes=["id", "adapter"]), progress=False)
    status = {c["label"]: c["status"] for c in result["configurations"]}
    assert status == {"id": "finished earlier", "adapter": "unavailable"}
    report = (ws.studies / f"{opts.dataset}-{opts.encoder}" / "report.md").read_text()
    assert "- adapter: unavailable: `recommend train --mode adapter` is not available" in report


def test_run_names_follow_settings_data_and_features(synth_dataset):
    base = TrainOptions(dataset="synth", mode="ts-dnn", layers=8, encoders=["minilm-l6"], dim=64)
    name = run_name(synth_dataset, "ts-dnn8", base, {"state_sha256": "a"})
    assert name == run_name(synth_dataset, "ts-dnn8", replace(base, device="cuda"), {"state_sha256": "a"})
    assert name.startswith("synth-ts-dnn8-minilm-l6-")
    assert name != run_name(synth_dataset, "ts-dnn8", replace(base, lr=3e-4), {"state_sha256": "a"})
    assert name != run_name(synth_dataset, "ts-dnn8", base, {"state_sha256": "b"})
    # the backbone's defaults name a run too: an old run under another default is not reused
    assert name == run_name(synth_dataset, "ts-dnn8", base.replace(init_std=0.02), {"state_sha256": "a"})
    assert name != run_name(synth_dataset, "ts-dnn8", base.replace(init_std=0), {"state_sha256": "a"})


def test_plan_and_bad_options(synth_dataset):
    opts = StudyOptions(dataset="synth", encoder="minilm-l6", layers=[8, 2, 8], modes=["ts-dnn", "id"])
    assert [c.label for c in plan(opts, synth_dataset)] == ["id", "ts-dnn2", "ts-dnn8"]
    capped = plan(replace(opts, modes=["id", "e2e", "adapter", "side"], epochs=30, live_epochs=3), synth_dataset)
    assert {c.label: c.options.epochs for c in capped} == {"id": 30, "e2e-top2": 3, "adapter": 3, "side": 30}
    ws = Workspace(synth_dataset.path.parent.parent)
    with pytest.raises(UserError, match="--modes"):
        run_study(ws, replace(opts, modes=["e2e", "bert"]), progress=False)
    with pytest.raises(UserError, match="--layers"):
        run_study(ws, replace(opts, modes=["ts-dnn"], layers=[]), progress=False)


def test_progress_shows_each_epochs_validation_and_one_line_per_configuration(private_ws, tmp_path, capfd):
    ws = private_ws("study_progress")
    opts = StudyOptions(dataset="synth", **{**OPTIONS, "modes": ["id"], "epochs": 2}, out=tmp_path / "study")
    result = run_study(ws, opts, progress=True)
    err = capfd.readouterr().err  # the training process writes to the same stderr
    config, = result["configurations"]
    records = [json.loads(line) for line in (ws.run_dir(config["run"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:  # each epoch's validation line, with the numbers the run recorded
        assert re.search(rf"epoch {r['epoch']}: loss {r['loss']:.4f}, valid {re.escape(format_metrics(r['valid']))}",
                         err), err
    assert [line for line in err.splitlines() if line.startswith("study: [1/1] id: ")] == [
        f"study: [1/1] id: run {config['run']}", f"study: [1/1] id: trained; test {format_metrics(config['test'])}"]
