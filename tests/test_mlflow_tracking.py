"""--track mlflow against a real ``mlflow server`` (SQLite backend, a free localhost port).

Train, tune and study log runs, parameters, metrics, nesting and artifacts that MlflowClient
reads back; a server stopped mid-run costs the run folder nothing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import pytest

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from featurestore.store import file_sha256  # noqa: E402
from recommend.callbacks import Callback  # noqa: E402
from recommend.mlflow_log import HOME_TAG, KIND_TAG, PARENT_TAG, SHA256_TAG  # noqa: E402
from recommend.study import StudyOptions, run_study  # noqa: E402
from recommend.trainer import TrainOptions, train  # noqa: E402
from recommend.tune import TuneOptions, run_tune  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SMALL = dict(dataset="synth", mode="id", dim=16, batch_size=128, epochs=2, patience=20)
STARTUP_SECONDS = 180  # a loaded CI machine; the server is usually up in 10-20 s


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:  # the server keeps its own copy of the handle
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                    str(port), "--workers", "1", "--backend-store-uri",
                                    f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                                    str(folder / "artifacts")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, process
    process.terminate()
    process.wait(timeout=30)


def _runs(client: MlflowClient, dataset: str = "synth") -> dict:
    experiment = client.get_experiment_by_name(f"recommend-{dataset}")
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def _artifacts(client: MlflowClient, run) -> set[str]:
    return {f.path for f in client.list_artifacts(run.info.run_id)}


def test_train_tune_and_study_are_mlflow_runs(private_ws, server):
    url, _ = server
    ws, client = private_ws("mlflow"), MlflowClient(url)
    tracked = dict(track="mlflow", tracking_uri=url)
    train(ws, TrainOptions(**SMALL, run_name="one", **tracked), progress=False, echo=False)
    run = _runs(client)["one"]
    run_dir = ws.run_dir("one")
    config = json.loads((run_dir / "config.json").read_text())
    assert run.data.params["options.mode"] == "id" and run.data.params["options.dim"] == "16"
    assert run.data.params["dataset.fingerprint"] == config["dataset"]["fingerprint"]
    assert run.data.tags[HOME_TAG] == str(run_dir.resolve()) and run.info.status == "FINISHED"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "valid/HR_at_10")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["valid"]["HR@10"])) for r in records]
    assert run.data.metrics["best/HR_at_10"] == pytest.approx(json.loads((run_dir / "best.json").read_text())["metrics"]["HR@10"])
    assert run.data.tags[SHA256_TAG] == file_sha256([run_dir / "model.safetensors"])
    assert {"config.json", "best.json", "metrics.jsonl", "model.safetensors.sha256"} <= _artifacts(client, run)

    tuned = run_tune(ws, TuneOptions(TrainOptions(**SMALL, **tracked), trials=2, study_name="search",
                                     space={"lr": {"type": "float", "low": 1e-3, "high": 3e-3}}), echo=False)
    runs = _runs(client)
    parent = runs["search"]
    assert parent.data.tags[KIND_TAG] == "tune" and parent.data.params["space.lr.low"] == "0.001"
    assert [runs[f"search-t{n}"].data.tags[PARENT_TAG] for n in (0, 1)] == [parent.info.run_id] * 2
    assert {"summary.json", "search.png"} <= _artifacts(client, parent)
    assert parent.data.metrics["best/valid_HR_at_10"] == pytest.approx(tuned["best"]["value"])

    studied = StudyOptions(dataset="synth", encoder="bert-tiny", modes=["id"], epochs=2, dim=16, batch_size=128,
                           threads=1, device="cpu", out=ws.root / "study")
    first = run_study(ws, studied, progress=False)["configurations"][0]["run"]  # not tracked: TensorBoard only
    study = run_study(ws, replace(studied, seeds=2, **tracked), progress=False)  # seed 42 found, seed 43 trained
    runs = _runs(client)
    parent, (row,) = runs["study"], study["configurations"]
    assert parent.data.tags[KIND_TAG] == "study"
    for seed in row["seeds"]:  # the earlier run copied from its folder; the new one nested from its child process
        nested = runs[seed["run"]]
        assert nested.data.tags[PARENT_TAG] == parent.info.run_id and "eval.json" in _artifacts(client, nested)
    assert row["seeds"][0]["run"] == first and row["seeds"][0]["status"] == "finished earlier"
    history = client.get_metric_history(runs[first].info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert {"report.md", "study.json", "compare-hr10.png"} <= _artifacts(client, parent)
    assert parent.data.metrics["test/id/HR_at_10"] == pytest.approx(row["test"]["HR@10"])

def test_a_server_stopped_mid_run_costs_the_run_nothing(private_ws, server, capfd):
    url, process = server
    ws = private_ws("mlflow-down")

    class StopServer(Callback):
        def on_epoch_end(self, epoch: int, record: dict) -> bool:
            if epoch == 1:
                process.terminate()
                process.wait(timeout=30)
            return False

    options = TrainOptions(**{**SMALL, "epochs": 4}, run_name="down", track="mlflow", tracking_uri=url)
    result = train(ws, options, progress=False, echo=False, callbacks=[StopServer()])
    run_dir = ws.run_dir("down")
    assert result["status"] == "completed" and result["epochs"] == 4
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads((run_dir / "best.json").read_text())["status"] == "completed"
    assert (run_dir / "model.safetensors").is_file()
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("tracking:")]
    assert len(said) == 1 and f"MLflow at {url} failed" in said[0], said
