"""Per-layer cache and IISAN side networks: equal to the library layer by layer, resumable, encoder-free
training, gradients only where they belong, runs that reload to the same metrics, refusals with the fix.

Small encoders: bert-tiny (random init, 2 blocks, 128 wide) on the synthetic titles and
mae-tiny (random init, 2 blocks, 64 wide, 64 px) on the synthetic JPEGs.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from eval.cli import cli as eval_cli
from extract.encoder import Encoder
from extract.job import ExtractOptions, run_extraction
from extract.layers import LayerCache
from extract.registry import create_encoder
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace
from recommend.batches import training_rows
from recommend.cli import cli as recommend_cli
from recommend.losses import LossContext, create_loss
from recommend.model import build_recommender
from recommend.run import load_run
from recommend.side import SideTower
from recommend.trainer import Objective, TrainOptions, check_options, model_spec, train
from test_faults import killed

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODERS = {"bert-tiny": "text", "mae-tiny": "image"}
SIDE = {"mode": "side", "encoders": ["bert-tiny@layers", "mae-tiny@layers"], "dim": 32, "lr": 1e-3}


def layers_job(encoder: str, **options) -> ExtractOptions:
    return ExtractOptions(dataset="synth", encoder=encoder, random_init=True, cache_layer="all",
                          cache_dtype="float32", variant="layers", workers=0, progress=False, **options)


@pytest.fixture(scope="module")
def ws(private_ws) -> Workspace:
    ws = private_ws("side")
    for encoder in ENCODERS:
        run_extraction(ws, layers_job(encoder))
    return ws


def library_layers(encoder: Encoder, items) -> list[np.ndarray]:
    """Each layer's pooled state straight from the library model's ``output_hidden_states``."""
    inputs = encoder.preprocessor.collate([encoder.preprocessor.load(item) for item in items])
    with torch.no_grad():
        if encoder.config.modality == "text":
            states = encoder.model(**inputs, output_hidden_states=True).hidden_states
            return [s[:, 0].numpy() for s in states]  # bert-tiny pools by [CLS]
        noise = torch.arange(encoder.model.embeddings.patch_embeddings.num_patches, dtype=torch.float32)
        states = encoder.model(inputs, noise=noise.expand(len(items), -1), output_hidden_states=True).hidden_states
        return [s[:, 1:].mean(1).numpy() for s in states]  # mae-tiny pools by the mean of its patches


@pytest.mark.parametrize("name", list(ENCODERS))
def test_per_layer_cache_equals_the_library_forward_layer_by_layer(ws, synth_dataset, name):
    group = FeatureStore(ws.store).open(f"synth/{ENCODERS[name]}/{name}@layers")
    cache = LayerCache(group)
    encoder = create_encoder(name, random_init=True).eval()
    assert len(cache.widths) == encoder.depth + 1 and group.attrs["cache_layer"] == "all"
    ids = np.flatnonzero(cache.present)[:12]
    expected = library_layers(encoder, [synth_dataset.items[i - 1] for i in ids])
    stored = np.split(cache.gather(ids), np.cumsum(cache.widths)[:-1], axis=1)
    assert len(stored) == len(expected)
    for layer, (mine, theirs) in enumerate(zip(stored, expected)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5, err_msg=f"layer {layer}")
    if name == "bert-tiny":  # its pooling has no head: the group's embeddings are the last layer's state
        np.testing.assert_allclose(group.read(ids), stored[-1], atol=1e-5)
    # float16, the default, holds the same states rounded
    half = run_extraction(ws, replace(layers_job(name), cache_dtype="float16", variant="half"))
    halves = LayerCache(FeatureStore(ws.store).open(half.group))
    assert halves.attrs["cache_dtype"] == "float16"
    np.testing.assert_array_equal(halves.gather(ids), cache.gather(ids).astype(np.float16).astype(np.float32))


def test_killed_per_layer_extraction_resumes_bit_identical(ws, tmp_path):
    args = ("extract", "--dataset", "synth", "--encoder", "bert-tiny", "--random-init", "--cache-layer", "all",
            "--cache-dtype", "float32", "--variant", "killed", "--chunk-rows", 32, "--workers", 0,
            "--root", ws.root, "--json")
    killed("featurestore.cli", "featurestore.store:FeatureGroup.write_chunk", 2, *args)
    store = FeatureStore(ws.store)
    assert store.open("synth/text/bert-tiny@killed").done_chunks().sum() == 2
    job = replace(layers_job("bert-tiny"), chunk_rows=32, variant="killed")
    assert run_extraction(ws, job).resumed_chunks == 2
    run_extraction(ws, replace(job, variant="unkilled"))
    a, b = (LayerCache(store.open(f"synth/text/bert-tiny@{v}")) for v in ("killed", "unkilled"))
    ids = np.arange(a.states.rows)
    assert a.gather(ids).tobytes() == b.gather(ids).tobytes()
    np.testing.assert_array_equal(store.open("synth/text/bert-tiny@killed").read(),
                                  store.open("synth/text/bert-tiny@unkilled").read())


def test_side_training_never_runs_an_encoder(ws, monkeypatch):
    from transformers.models.bert import modeling_bert
    from transformers.models.vit_mae import modeling_vit_mae

    calls = []
    for module, cls in ((modeling_bert, "BertLayer"), (modeling_bert, "BertEmbeddings"),
                        (modeling_vit_mae, "ViTMAELayer"), (modeling_vit_mae, "ViTMAEEmbeddings")):
        real = getattr(module, cls).forward
        monkeypatch.setattr(getattr(module, cls), "forward",
                            lambda self, *a, _real=real, **k: calls.append(type(self).__name__) or _real(self, *a, **k))
    monkeypatch.setattr(Encoder, "forward", lambda self, *a, **k: calls.append("Encoder") or None)
    create_encoder("bert-tiny", random_init=True).model(input_ids=torch.tensor([[101, 102]]))
    assert calls, "the counter does not see a forward of the library model"
    calls.clear()
    result = train(ws, TrainOptions(dataset="synth", epochs=2, run_name="side-count", **SIDE),
                   progress=False, echo=False)
    assert result["epochs"] == 2 and calls == []


def test_gradients_reach_only_side_networks_dt_layers_and_user_encoder(ws, synth_dataset):
    opts = check_options(TrainOptions(dataset="synth", **SIDE))
    from recommend.item_towers import ITEM_TOWERS

    sources = ITEM_TOWERS.get("side").open(ws, opts, synth_dataset)
    torch.manual_seed(0)
    model = build_recommender(model_spec(opts, synth_dataset), sources)
    assert isinstance(model.item_tower, SideTower) and model.item_tower.inter is not None
    assert not any(isinstance(m, Encoder) for m in model.modules())
    loss = create_loss("bce", LossContext(synth_dataset.n_items, synth_dataset.train_counts()))
    rows = torch.from_numpy(training_rows(synth_dataset, model.max_seq_len)[:32])
    model.train()
    Objective(model, loss)(rows).backward()
    allowed = ("item_tower.intra.", "item_tower.inter.", "item_tower.inputs.", "item_tower.align.",
               "item_tower.project.", "item_tower.inter_project.", "item_tower.fuse.", "item_tower.missing.",
               "user_encoder.")
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(n.startswith(allowed) for n in got), sorted(n for n in got if not n.startswith(allowed))
    for part in ("item_tower.intra.0.adapters.0.down.weight", "item_tower.intra.1.gates",
                 "item_tower.inter.adapters.1.up.weight", "item_tower.project.0.0.weight", "item_tower.fuse.weight",
                 "user_encoder."):
        assert any(n.startswith(part) for n in got), part


def test_side_run_reloads_and_eval_rank_reproduces_its_best_validation(ws):
    runner = CliRunner()
    out = runner.invoke(recommend_cli, ["train", "--root", str(ws.root), "--dataset", "synth", "--mode", "side",
                                        "--encoder", "bert-tiny@layers,mae-tiny@layers", "--dim", "32",
                                        "--lr", "1e-3", "--epochs", "3", "--side-dim", "16", "--run-name", "side",
                                        "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    config = json.loads((ws.run_dir("side") / "config.json").read_text())
    assert config["model"]["item_tower"]["side_dim"] == 16
    assert [f["group"] for f in config["features"]] == ["synth/text/bert-tiny@layers", "synth/image/mae-tiny@layers"]
    best = json.loads((ws.run_dir("side") / "best.json").read_text())
    ranked = runner.invoke(eval_cli, ["rank", "--root", str(ws.root), "--run", "side", "--split", "valid",
                                      "--k", "10", "--json"])
    assert ranked.exit_code == 0, ranked.output
    result = json.loads(ranked.stdout)
    assert (result["HR@10"], result["NDCG@10"]) == (best["metrics"]["HR@10"], best["metrics"]["NDCG@10"])
    model, _ = load_run(ws.run_dir("side"))
    assert isinstance(model.item_tower, SideTower)


def test_refusals_name_the_fix(ws):
    def refused(match: str, **options) -> None:
        with pytest.raises(UserError, match=match):
            train(ws, TrainOptions(dataset="synth", epochs=1, **{**SIDE, **options}), progress=False, echo=False)

    run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, variant="plain",
                                      workers=0, progress=False))
    refused(r"holds no cached states.*--cache-layer all.*--encoder bert-tiny@layers", encoders=["bert-tiny@plain"])
    run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, variant="top1",
                                      cache_layer=1, workers=0, progress=False))
    refused(r"caches the input of the top 1 blocks.*every layer.*--cache-layer all", encoders=["bert-tiny@top1"])
    refused(r"no store group synth/text/bert-tiny@absent.*--cache-layer all", encoders=["bert-tiny@absent"])
    run_extraction(ws, replace(layers_job("bert-tiny"), variant="old"))
    FeatureStore(ws.store).open("synth/text/bert-tiny@old").update_attrs(dataset_fingerprint="0123456789abcdef")
    refused(r"fingerprint 0123456789abcdef.*re-extract it.*--cache-layer all", encoders=["bert-tiny@old"])
    refused("--side-dim sets the side networks", mode="ts", encoders=["bert-tiny@layers"], side_dim=8)
    run_extraction(ws, replace(layers_job("bert-tiny"), variant="twin"))
    refused("one text and one image", encoders=["bert-tiny@layers", "bert-tiny@twin"])
    refused("drop --whiten and --fusion", fusion="gate")


def test_study_adds_the_side_row_with_its_cost(private_ws):
    from recommend.study import StudyOptions, run_study

    ws = private_ws("side-study")
    result = run_study(ws, StudyOptions(dataset="synth", encoder="bert-tiny", random_init=True, layers=[2],
                                        modes=["ts", "side"], epochs=1, dim=16, batch_size=128, threads=1,
                                        device="cpu"), progress=False)
    side = next(c for c in result["configurations"] if c["mode"] == "side")
    assert side["status"] == "trained", side
    config = json.loads((ws.run_dir(side["run"]) / "config.json").read_text())
    assert config["options"]["encoders"] == ["bert-tiny@layers"]
    assert FeatureStore(ws.store).open("synth/text/bert-tiny@layers").attrs["cache_layer"] == "all"
    row = next(line for line in result["table"].splitlines() if f"| {side['run']} |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "side" and cells[4] == f"{config['cost']['trainable_params']:,}", cells
    assert float(cells[6]) > 0 and float(cells[7]) > 0  # s/epoch and peak RSS MB are filled in
