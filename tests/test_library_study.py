"""Issue 24 offline: a study over an ``hf:`` LLM embedder that only a ``--weights`` folder holds.

The folder is ``bench/library_models.py``'s random-init Qwen3-architecture decoder (tiny here);
the hub is switched off and its cache is empty (tests/conftest.py), so every step that reads
the model's config (extraction, the store group's name, TS, cached and naive E2E, adapters,
reloading a run) must find it through the folder the study was given or the one its store
group records.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from bench import library_models
from bench.library_models import write_random_qwen3
from extract import hub
from extract.adapt import AdaptOptions, run_adaptation
from extract.names import parse_library_name, store_spelling
from extract.registry import create_encoder, encoder_group, get_encoder_config
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from recommend.cli import cli as recommend_cli
from recommend.plugins import check_options as check_train_options
from recommend.run import load_run
from recommend.study import StudyOptions, check_options, plan, run_study
from recommend.trainer import TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = library_models.NAME  # hf:morec/random-qwen3: no hub repository, the folder is the model
SIZE = dict(width=64, layers=2, heads=2, kv_heads=1)
STUDY = dict(encoder=NAME, modes=["ts", "e2e"], top_k=1, epochs=1, dim=16, batch_size=128, threads=1, device="cpu")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "random-qwen3"
    return folder, write_random_qwen3(folder, seed=0, **SIZE)


@pytest.fixture(scope="module")
def studied(decoder, private_ws):
    ws = private_ws("library-study")
    opts = StudyOptions(dataset="synth", weights=os.path.relpath(decoder[0]), **STUDY)
    return ws, opts, run_study(ws, opts, progress=False)


def test_the_hub_is_off_and_knows_nothing_of_the_name():
    assert hub.offline() and not any(hub.cache_dir().glob("models--*"))
    with pytest.raises(UserError, match="--weights FOLDER"):
        get_encoder_config(NAME)


def test_the_demo_decoder_is_a_labelled_random_qwen3_with_grouped_query_attention(decoder, tmp_path):
    folder, summary = decoder
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["morec_random_init"].startswith("random-init") and summary["random_init"]
    assert (folder / "README.md").read_text().startswith("# RANDOM-INIT")
    assert write_random_qwen3(tmp_path / "again", seed=0, **SIZE)["weights_sha256"] == summary["weights_sha256"]
    assert write_random_qwen3(tmp_path / "other", seed=1, **SIZE)["weights_sha256"] != summary["weights_sha256"]
    refused = CliRunner().invoke(library_models.main, ["--out", str(folder)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output


def test_the_decoder_splits_into_its_layers_and_pools_the_last_token_as_the_library(decoder):
    from transformers import AutoModel

    folder, _ = decoder
    encoder = create_encoder(NAME, weights=str(folder))
    assert (encoder.provenance["split"], encoder.pooling, encoder.depth) == ("layers", "last-token", 2)
    assert type(encoder.model).__name__ == "Qwen3Model" and encoder.provenance["weights"] == f"file:{folder}"
    inputs = encoder.preprocessor.collate(["red cotton shirt", "a pair of blue denim jeans", "hat"])
    with torch.no_grad():
        states = AutoModel.from_pretrained(str(folder)).eval()(**inputs).last_hidden_state
        last = inputs["attention_mask"].sum(1) - 1  # right padding: the model card's last_token_pool
        torch.testing.assert_close(encoder(inputs), states[torch.arange(3), last], rtol=1e-4, atol=1e-5)


def test_library_names_give_their_modality_and_store_group_without_a_config():
    assert [parse_library_name(n).modality for n in ("timm:convnext_atto", "hf:a/b", "st:a/b", "hf+a+clip+image")] \
        == ["image", "text", "text", "image"]
    assert store_spelling("hf:morec/random-qwen3@top2") == "hf+morec+random-qwen3@top2"
    assert store_spelling("minilm-l6@top2") == "minilm-l6@top2"
    assert encoder_group("synth", f"{NAME}@top2") == "synth/text/hf+morec+random-qwen3@top2"  # offline, uncached
    assert encoder_group("synth", "timm:convnext_atto") == "synth/image/timm+convnext_atto"


def test_study_weights_are_refused_with_random_init_and_kept_resolved(decoder):
    opts = StudyOptions(dataset="synth", weights=os.path.relpath(decoder[0]), **STUDY)
    with pytest.raises(UserError, match="either --weights or --random-init"):
        check_options(replace(opts, random_init=True))
    assert check_options(opts).weights == str(decoder[0].resolve())
    with pytest.raises(UserError, match="takes no @REVISION.*--encoder hf:morec/random-qwen3 --weights FOLDER"):
        check_options(replace(opts, encoder=f"{NAME}@v2"))


def test_a_study_over_a_weights_folder_runs_every_row_offline(studied, decoder):
    ws, opts, result = studied
    folder = str(decoder[0].resolve())
    rows = {c["label"]: c for c in result["configurations"]}
    assert set(rows) == {"ts", "e2e-top1"}
    assert all(r["status"] == "trained" and r["test"]["HR@10"] >= 0 for r in rows.values()), rows
    assert all("hf+morec+random-qwen3" in r["run"] for r in rows.values())
    store = FeatureStore(ws.store)
    for group in ("synth/text/hf+morec+random-qwen3", "synth/text/hf+morec+random-qwen3@top1"):
        assert store.open(group).attrs["provenance"]["weights_location"] == folder
    e2e = json.loads((ws.run_dir(rows["e2e-top1"]["run"]) / "config.json").read_text())
    assert e2e["item_encoder"]["input"] == "cached states" and e2e["item_encoder"]["weights"] == f"file:{folder}"
    assert e2e["options"]["weights"] == folder and e2e["options"]["init_from"] == rows["ts"]["run"]
    _, config = load_run(ws.run_dir(rows["e2e-top1"]["run"]))  # reopened offline, from the recorded folder
    assert config["item_encoder"]["state_sha256"] == store.open("synth/text/hf+morec+random-qwen3").attrs["state_sha256"]


def test_live_rows_of_a_study_run_the_folder_the_study_was_given(studied, synth_dataset):
    ws, opts, _ = studied
    checked = check_options(replace(opts, modes=["e2e", "adapter"], cached=False))
    rows = {c.label: c.options for c in plan(checked, synth_dataset)}
    assert {label: o.weights for label, o in rows.items()} == {"e2e-top1": checked.weights, "adapter": checked.weights}
    adapter = rows["adapter"].replace(run_name="adapter-from-folder")
    train(ws, adapter, progress=False, echo=False)  # naive: the live tower built from the folder, offline
    config = json.loads((ws.run_dir("adapter-from-folder") / "config.json").read_text())
    assert config["item_encoder"]["input"] == "raw items" and config["item_encoder"]["weights"] == f"file:{checked.weights}"
    _, reloaded = load_run(ws.run_dir("adapter-from-folder"))
    assert reloaded["item_encoder"]["state_sha256"] == config["item_encoder"]["state_sha256"]


def test_other_weights_for_the_same_name_are_refused_not_mixed(studied, tmp_path):
    ws, opts, _ = studied
    other = tmp_path / "other"
    write_random_qwen3(other, seed=1, **SIZE)
    with pytest.raises(UserError, match="written with other settings.*state_sha256"):
        run_study(ws, replace(opts, weights=str(other), modes=["ts"]), progress=False)


def test_cached_e2e_finds_the_folder_its_store_group_records(studied):
    ws, _, _ = studied
    opts = TrainOptions(dataset="synth", mode="e2e", encoders=[f"{NAME}@top1"], cached=True, top_k=1, epochs=1,
                        dim=16, batch_size=128, device="cpu", run_name="cached-without-weights")
    summary = train(ws, opts, progress=False, echo=False)  # no --weights: the group's folder builds the tower
    assert summary["status"] == "completed" and (ws.run_dir("cached-without-weights") / "model.safetensors").exists()
    with pytest.raises(UserError, match="--weights FOLDER"):  # naive: nothing records the folder
        check_train_options(replace(opts, cached=False, encoders=[NAME], run_name=None))


def test_domain_adaptation_reads_the_config_from_the_weights_folder(studied, decoder):
    ws, _, _ = studied
    with pytest.raises(UserError, match="objective mlm adapts text encoders.*not hf\\+morec\\+random-qwen3"):
        run_adaptation(ws, AdaptOptions(dataset="synth", encoder=NAME, objective="mlm", weights=str(decoder[0])))


def test_whole_number_options_refuse_fractions_on_the_command_line():
    result = CliRunner().invoke(recommend_cli, ["train", "--dataset", "synth", "--mode", "e2e", "--top-k", "2.5"])
    assert result.exit_code == 2 and "'2.5' is not a valid integer" in result.output
