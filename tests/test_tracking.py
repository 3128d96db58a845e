"""Experiment tracking: TensorBoard's own reader sees what metrics.jsonl holds; the options rename nothing."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from data.dataset import PreparedDataset
from featurestore.errors import UserError
from recommend.callbacks import Callback
from recommend.plugins import check_options
from recommend.study import run_name
from recommend.tracker import epoch_scalars
from recommend.trainer import TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(dataset="synth", mode="id", dim=16, batch_size=64, epochs=3, patience=20, objectives=["nid"])


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_curves_match(run_dir) -> None:
    """Every scalar of every epoch of metrics.jsonl, once, at its epoch, as TensorBoard reads it."""
    events, records = _events(run_dir), _records(run_dir)
    expected = {tag: {r["epoch"]: v for r in records for t, v in epoch_scalars(r).items() if t == tag}
                for tag in epoch_scalars(records[0])}
    assert {"train/loss", "train/rec", "train/nid", "valid/HR@10", "valid/NDCG@10", "lr/recommender",
            "speed/sequences_per_sec", "memory/peak_rss_mb"} <= set(expected)
    for tag, by_epoch in expected.items():
        seen = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in seen] == list(by_epoch), tag
        assert [value for _, value in seen] == pytest.approx(list(by_epoch.values()), rel=1e-6), tag


def test_events_hold_every_epoch_and_the_hparams_row(private_ws):
    ws = private_ws("track-tb")
    result = train(ws, TrainOptions(**SMALL, run_name="tb"), progress=False, echo=False)
    run_dir = ws.run_dir("tb")
    _assert_curves_match(run_dir)
    events, best = _events(run_dir), json.loads((run_dir / "best.json").read_text())
    for name, value in best["metrics"].items():
        assert events.Scalars(f"best/{name}")[-1].value == pytest.approx(value, rel=1e-6)
    assert events.Scalars("best/epoch")[-1].value == result["best_epoch"]
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["mode"].string_value == "id" and start.hparams["dim"].number_value == 16
    assert start.hparams["objectives"].string_value == "nid"
    assert "run_name" not in start.hparams and "track" not in start.hparams
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"best/HR@10", "best/NDCG@10", "best/epoch"}


def test_a_resumed_run_shows_each_epoch_once(private_ws):
    """Killed after epoch 2 was sent to TensorBoard but before it was saved: the resumed run
    redoes epoch 2, and TensorBoard shows the saved values, each epoch once."""
    ws = private_ws("track-resume")
    options = TrainOptions(**SMALL, run_name="resumed")

    class KillAtTwo(Callback):
        def on_epoch_end(self, epoch: int, record: dict) -> bool:
            if epoch == 2:
                raise KeyboardInterrupt
            return False

    with pytest.raises(KeyboardInterrupt):
        train(ws, options, progress=False, echo=False, callbacks=[KillAtTwo()])
    assert [r["epoch"] for r in _records(ws.run_dir("resumed"))] == [1]
    assert [e.step for e in _events(ws.run_dir("resumed")).Scalars("train/loss")] == [1, 2]
    train(ws, options, progress=False, echo=False)
    _assert_curves_match(ws.run_dir("resumed"))


def test_track_none_writes_no_events(private_ws):
    ws = private_ws("track-none")
    train(ws, TrainOptions(**{**SMALL, "epochs": 1, "objectives": []}, run_name="quiet", track="none"),
          progress=False, echo=False)
    assert not list(ws.run_dir("quiet").glob("events.out.tfevents.*"))


def test_tracking_options_are_checked_and_name_no_run(synth_ws):
    with pytest.raises(UserError, match="--tracking-uri points MLflow .* give --track mlflow too"):
        check_options(TrainOptions(dataset="synth", tracking_uri="http://localhost:5000"))
    plain = TrainOptions(dataset="synth")
    assert check_options(plain).track is None  # not filled: None is TensorBoard, config.json stays as before
    dataset = PreparedDataset.load(synth_ws[0].dataset_dir("synth"))
    assert run_name(dataset, "id", plain) == run_name(dataset, "id", plain.replace(track="none"))
