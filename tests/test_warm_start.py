"""Warm starts: e2e / adapter ``--init-from`` a TS run start where it ended; mismatched sources are refused.

bert-tiny (random init, seed 0) on the session's synthetic titles: the TS run reads its stored
float32 vectors, the e2e tower computes the same vectors itself, so before any step the warm
e2e model is the TS model and validates to the same metrics.
"""

from __future__ import annotations

import json

import pytest
import torch

from data.dataset import PreparedDataset
from extract.job import ExtractOptions, run_extraction
from featurestore.cliutil import UserError
from featurestore.workspace import Workspace
from recommend.e2e import open_live_inputs
from recommend.model import build_recommender
from recommend.trainer import TrainOptions, check_options, model_spec, train, validate
from recommend.transfer import init_from_run

pytestmark = pytest.mark.usefixtures("one_thread")

ENC = "bert-tiny"
FAST = dict(dim=16, batch_size=64, epochs=2)
E2E = dict(mode="e2e", encoders=[ENC], random_init=True, top_k=1, **FAST)


@pytest.fixture(scope="module")
def ws(private_ws) -> Workspace:
    ws = private_ws("warm_start")
    run_extraction(ws, ExtractOptions(dataset="synth", encoder=ENC, random_init=True, workers=0, progress=False))
    for name, extra in (("src-ts", {}), ("src-whitened", {"whiten": True})):
        train(ws, TrainOptions(dataset="synth", mode="ts", encoders=[ENC], run_name=name, **FAST, **extra),
              progress=False, echo=False)
    return ws


def warm_model(ws: Workspace, **options):
    """The model the trainer would start from: built, seeded, then ``--init-from`` applied."""
    opts = check_options(TrainOptions(dataset="synth", **{**E2E, **options}))
    dataset = PreparedDataset.load(ws.dataset_dir("synth"))
    sources = open_live_inputs(ws, opts, dataset)
    spec = model_spec(opts, dataset)
    torch.manual_seed(opts.seed)
    model = build_recommender(spec, sources, fit=True)
    return model, init_from_run(ws, opts, model, spec, sources), dataset


def test_a_warm_e2e_model_validates_as_the_ts_run_before_any_step(ws):
    model, record, dataset = warm_model(ws, init_from="src-ts")
    best = json.loads((ws.run_dir("src-ts") / "best.json").read_text())["metrics"]
    first = validate(model, dataset)
    assert first["HR@10"] == pytest.approx(best["HR@10"], abs=1e-9)
    assert first["NDCG@10"] == pytest.approx(best["NDCG@10"], rel=1e-5)
    assert record["warm_start"] and record["source_mode"] == "ts" and record["transferred"] == [
        "item_tower", "user_encoder"]
    assert record["renamed"] == {"item_tower.project.0.weight": "item_tower.projections.0.0.weight",
                                 "item_tower.project.0.bias": "item_tower.projections.0.0.bias",
                                 "item_tower.missing": "item_tower.inputs.0.missing"}


def test_warm_adapters_keep_their_fresh_adapters_and_a_run_records_the_start(ws):
    model, record, _ = warm_model(ws, mode="adapter", top_k=None, init_from="src-ts", adapter_dim=4)
    assert any("adapter" in name for name, _ in model.named_parameters())  # fresh, as built
    result = train(ws, TrainOptions(dataset="synth", run_name="warm-e2e", init_from="src-ts", **{**E2E, "epochs": 1}),
                   progress=False, echo=False)
    config = json.loads((ws.run_dir(result["run"]) / "config.json").read_text())
    assert config["transfer"]["source_run"] == "src-ts" and config["transfer"]["warm_start"]


@pytest.mark.parametrize("options, message", [
    ({"dim": 8}, "width d: source 16, target 8"),
    ({"pooling": "mean"}, "pooling: source 'cls', target 'mean'"),
    ({"encoder_seed": 5}, "encoder weights (state sha256): source"),
    ({"backbone": "gru4rec"}, "backbone name: source 'sasrec', target 'gru4rec'"),
    ({"init_from": "src-whitened"}, "source mode ts has no DT layer over one store group's vectors"),
])
def test_a_mismatched_source_is_refused_in_one_line_naming_it(ws, options, message):
    with pytest.raises(UserError, match="cannot warm-start --mode e2e from src-") as refused:
        warm_model(ws, **{"init_from": "src-ts", **options})
    assert message in str(refused.value) and "\n" not in str(refused.value)
