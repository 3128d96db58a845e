"""Every registered mode and backbone, through the same checks (as timm's tests run over ``list_models()``).

A plugin is tested the day it is registered: options -> checked copy -> one epoch of training ->
run folder -> reopened -> the same validation metrics; retargeted; its own inputs fit it
(``feature_problems``); an option it does not declare is refused with what it is for. A mode
without an example here fails :func:`test_every_mode_has_an_example`, naming itself.
"""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from eval.evaluate import evaluate
from extract.codes import CodesOptions, run_codes
from extract.job import ExtractOptions, run_extraction
from featurestore.errors import UserError
from recommend.item_towers import ITEM_TOWERS
from recommend.plugins import FAMILIES, FEATURES, option_fields
from recommend.run import load_run, read_config
from recommend.trainer import TrainOptions, check_options, train
from recommend.user_encoders import USER_ENCODERS

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODER = {"encoders": ["bert-tiny"]}
LIVE = {"encoders": ["bert-tiny"], "random_init": True}
EXAMPLES = {  # mode -> the options of a small run of it on the synthetic dataset
    "id": {},
    "ts": ENCODER,
    "ts-dnn": {**ENCODER, "layers": 1},
    "e2e": {**LIVE, "top_k": 1},
    "adapter": {**LIVE, "adapter_in": "item", "adapter_dim": 4},
    "side": {"encoders": ["bert-tiny@layers"], "side_dim": 4},
    "sid": {"codes": "synth/codes/bert-tiny@rq-kmeans-2x8"},
    "id-init": ENCODER,
}
COMMON = {"dataset": "synth", "dim": 16, "epochs": 1, "batch_size": 128, "lr": 1e-3, "device": "cpu"}


@pytest.fixture(scope="module")
def ws(private_ws):
    ws = private_ws("conformance")
    for cache in ({}, {"cache_layer": "all", "cache_dtype": "float32", "variant": "layers"}):
        run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, workers=0,
                                          progress=False, **cache))
    run_codes(ws, CodesOptions(dataset="synth", encoder="bert-tiny", levels=2, codebook=8))  # what sid reads
    return ws


def _own_fields(*plugins) -> set[str]:
    return {f.name for p in plugins if getattr(p, "options", None) for f in fields(p.options)}


def test_every_mode_has_an_example():
    assert sorted(ITEM_TOWERS.names()) == sorted(EXAMPLES), "add the new mode's small run to EXAMPLES"


@pytest.mark.parametrize("mode", ITEM_TOWERS.names())
def test_mode_trains_saves_reopens_and_ranks_the_same(ws, synth_dataset, mode):
    given = TrainOptions(mode=mode, run_name=f"conform-{mode}", **COMMON, **EXAMPLES[mode])
    checked = check_options(given)
    assert checked.given.items() >= given.given.items() and given == TrainOptions(
        mode=mode, run_name=f"conform-{mode}", **COMMON, **EXAMPLES[mode])  # filled in a copy, never in place
    assert check_options(checked) == checked  # a checked run's options are final

    result = train(ws, given, progress=False, echo=False)
    run_dir = ws.run_dir(result["run"])
    config = read_config(run_dir)
    assert config["options"] == checked.to_dict() and config["model"]["item_tower"]["name"] == mode
    model, _ = load_run(run_dir)
    metrics = evaluate(model, synth_dataset, split="valid", ks=(10,), exclude_history=True)
    best = json.loads((run_dir / "best.json").read_text())["metrics"]
    assert (metrics["HR@10"], metrics["NDCG@10"]) == (best["HR@10"], best["NDCG@10"])

    kind = ITEM_TOWERS.get(mode)
    moved = kind.retarget(config, synth_dataset)
    assert moved["dataset"]["fingerprint"] == synth_dataset.fingerprint
    assert moved["model"]["n_items"] == synth_dataset.n_items
    assert kind.feature_problems(config["features"], config["features"]) == []


@pytest.mark.parametrize("mode", ITEM_TOWERS.names())
def test_mode_refuses_options_it_does_not_declare(mode):
    own = _own_fields(ITEM_TOWERS.get(mode), *FEATURES, *(registry.get(getattr(TrainOptions(), attr))
                                                           for registry, attr in FAMILIES.values()))
    foreign = [f for name, f in option_fields().items() if name not in own and not f.metadata["is_flag"]]
    if not foreign:
        pytest.skip(f"--mode {mode} declares every option")
    f = foreign[0]
    value = f.metadata["min"] if f.metadata["min"] is not None else 1
    with pytest.raises(UserError, match=f"{f.metadata['flag']} .*not --"):
        check_options(TrainOptions(mode=mode, **COMMON, **EXAMPLES[mode], **{f.name: value}))


@pytest.mark.parametrize("backbone", USER_ENCODERS.names())
def test_backbone_trains_saves_reopens_and_ranks_the_same(ws, synth_dataset, backbone):
    result = train(ws, TrainOptions(mode="id", backbone=backbone, run_name=f"conform-{backbone}", **COMMON),
                   progress=False, echo=False)
    run_dir = ws.run_dir(result["run"])
    model, config = load_run(run_dir)
    assert config["model"]["user_encoder"] == USER_ENCODERS.get(backbone).spec(
        check_options(TrainOptions(backbone=backbone, **COMMON)))
    metrics = evaluate(model, synth_dataset, split="valid", ks=(10,), exclude_history=True)
    best = json.loads((run_dir / "best.json").read_text())["metrics"]
    assert (metrics["HR@10"], metrics["NDCG@10"]) == (best["HR@10"], best["NDCG@10"])
