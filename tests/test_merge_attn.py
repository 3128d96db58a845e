"""Merge-attention fusion: final-layer states in the store, the tower against a hand-built block, a run.

Two workspaces: ``tiny`` (13 items, 3 of them without a readable picture, 4-row
chunks) with float32 final states of bert-tiny (random init) and EfficientNet-Lite0
(its bundled weights; channels x height x width maps), and a copy of the synthetic
dataset with bert-tiny and mae-tiny (random init) final states for a training run.
"""

from __future__ import annotations

import json
import shlex
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from eval.cli import cli as eval_cli
from data.dataset import PreparedDataset
from extract.cache import StateCache, open_state_cache
from extract.job import ExtractOptions, run_extraction
from extract.registry import create_encoder
from extract_helpers import copy_dataset, image_dataset
from featurestore import cli as featurestore_cli
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace
from recommend import cli as recommend_cli
from recommend.features import open_source
from recommend.item_towers import create_item_tower, ts_dnn_stack
from recommend.run import load_run

DIM = 32
TEXT, IMAGE = "tiny/text/bert-tiny", "tiny/image/efficientnet-lite0"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def extract(ws: Workspace, dataset: str, encoder: str, **options) -> None:
    run_extraction(ws, ExtractOptions(dataset=dataset, encoder=encoder, workers=0, progress=False, **options))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("merge_tiny"))
    dataset = image_dataset(ws, "tiny")
    for encoder, extra in (("bert-tiny", {"random_init": True}), ("efficientnet-lite0", {})):
        extract(ws, "tiny", encoder, cache_layer=0, cache_dtype="float32", chunk_rows=4, **extra)
    return ws, dataset


@pytest.fixture(scope="module")
def synth(synth_ws, tmp_path_factory) -> Workspace:
    """The synthetic dataset with a plain bert-tiny group and final states of bert-tiny and mae-tiny."""
    src, name = synth_ws
    ws = Workspace(tmp_path_factory.mktemp("merge_synth"))
    copy_dataset(src, ws, name)
    extract(ws, name, "bert-tiny", random_init=True)
    for encoder in ("bert-tiny", "mae-tiny"):
        extract(ws, name, encoder, random_init=True, cache_layer=0, variant="tokens")
    return ws


def sources(ws: Workspace, dataset, groups=(TEXT, IMAGE)):
    return [open_source(ws, g, dataset.fingerprint, dataset.n_items) for g in groups]


def test_final_states_are_the_last_blocks_output(tiny):
    ws, dataset = tiny
    store = FeatureStore(ws.store)
    text, image = StateCache(store.open(TEXT)), StateCache(store.open(IMAGE))
    assert (text.attrs["cache_layer"], text.attrs["cache_block"]) == (0, 2)
    assert (image.attrs["cache_layer"], image.attrs["cache_block"]) == (0, 7)

    # text: the library model's own last_hidden_state, real tokens only; padding rows stay zero
    encoder = create_encoder("bert-tiny", random_init=True)
    ids = np.arange(1, dataset.n_items + 1)
    batch = encoder.preprocessor.tokenizer([dataset.items[i - 1].text for i in ids], padding="longest",
                                           truncation=True, max_length=30, return_tensors="pt")
    with torch.no_grad():
        last = encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    states, tokens = text.gather(ids)
    assert tokens.tolist() == batch["attention_mask"].sum(1).tolist()
    for row, count in enumerate(tokens):
        np.testing.assert_allclose(states[row, :count], last[row, :count].numpy(), rtol=1e-5, atol=1e-5)
        assert not states[row, count:].any()

    # image: timm's own stem and stages, before the conv head; no picture -> absent, zero states
    encoder = create_encoder("efficientnet-lite0")
    model = encoder.model
    good = np.flatnonzero(image.present)
    assert good.tolist() == list(range(1, 11))
    pixels = torch.stack([encoder.preprocessor.load(dataset.items[i - 1]) for i in good])
    with torch.no_grad():
        maps = model.blocks(model.bn1(model.conv_stem(pixels))).numpy()
    got, none = image.gather(good)
    assert none is None and got.shape == maps.shape == (10, 320, 7, 7)
    np.testing.assert_allclose(got, maps, rtol=1e-4, atol=1e-4)
    assert not image.gather(np.array([11, 12, 13]))[0].any()

    # as token sequences: one token per map position, row-major; text cut to the longest item
    seq, valid = image.sequence(good)
    np.testing.assert_allclose(seq.numpy(), maps.reshape(10, 320, 49).transpose(0, 2, 1), rtol=1e-4, atol=1e-4)
    assert valid.all() and image.token_width == 320
    seq, valid = text.sequence(ids[:3])
    assert seq.shape == (3, int(tokens[:3].max()), 128) and valid.sum(1).tolist() == tokens[:3].tolist()


def reference(tower, ws: Workspace, ids: np.ndarray) -> torch.Tensor:
    """Each item alone: [cls; its real text tokens; its patches if it has a picture] through a fresh
    nn.TransformerEncoderLayer holding the tower's weights, without any mask."""
    store = FeatureStore(ws.store)
    text, image = StateCache(store.open(TEXT)), StateCache(store.open(IMAGE))
    block = nn.TransformerEncoderLayer(DIM, 2, 4 * DIM, 0.1, activation="gelu", batch_first=True, norm_first=True)
    block.load_state_dict(tower.block.state_dict())
    block.eval()
    project_text, project_image = tower.projections
    out = []
    with torch.no_grad():
        for item in ids:
            states, count = text.gather(np.array([item]))
            parts = [tower.cls, project_text(torch.from_numpy(states[0, : count[0]])) + tower.modality.weight[0]]
            if image.present[item]:
                maps = image.gather(np.array([item]))[0][0]
                patches = torch.from_numpy(maps.reshape(maps.shape[0], -1).T.copy())
                parts.append(project_image(patches) + tower.modality.weight[1])
            out.append(block(torch.cat(parts)[None])[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["ts", "ts-dnn"])
def test_tower_equals_a_hand_built_block(tiny, mode):
    ws, dataset = tiny
    spec = {"name": mode, "n_items": dataset.n_items, "dim": DIM, "fusion": "merge-attn", "layers": 2}
    torch.manual_seed(0)
    tower = create_item_tower(spec, sources(ws, dataset)).eval()
    if mode == "ts":
        assert [type(m) for p in tower.projections for m in p] == [nn.Linear, nn.Linear]
    else:  # the TS-DNN stack applied to every token
        widths = [128, 320]
        expected = sum(p.numel() for w in widths for p in ts_dnn_stack(w, DIM, 2).parameters())
        assert sum(p.numel() for p in tower.projections.parameters()) == expected
    ids = np.arange(1, dataset.n_items + 1)
    with torch.no_grad():
        got = tower(torch.from_numpy(ids).reshape(1, -1)).reshape(len(ids), DIM)
    torch.testing.assert_close(got, reference(tower, ws, ids), rtol=1e-5, atol=1e-5)


def test_padding_and_absent_modalities_are_masked(tiny):
    ws, dataset = tiny
    torch.manual_seed(0)
    tower = create_item_tower({"name": "ts", "n_items": dataset.n_items, "dim": DIM, "fusion": "merge-attn"},
                              sources(ws, dataset)).eval()
    text, image = tower.states
    ids = np.array([2, 5, 11, 12])  # 11 and 12 have no picture
    with torch.no_grad():
        base = tower.fuse(torch.from_numpy(ids))
        sequences = [states.sequence(ids) for states in (text, image)]
        valid_image = torch.from_numpy(image.present[ids])[:, None] & sequences[1][1]
        # garbage in every masked slot: text padding and the absent items' patch states
        noisy = []
        for seq, valid in ((sequences[0][0], sequences[0][1]), (sequences[1][0], valid_image)):
            noisy.append((torch.where(valid[..., None], seq, torch.randn_like(seq) * 100), valid))
        torch.testing.assert_close(tower.merge(noisy), base, rtol=1e-5, atol=1e-5)
        # without the mask the garbage would change them: the mask is what protects them
        unmasked = tower.merge([noisy[0], (noisy[1][0], torch.ones_like(valid_image))])
        assert not torch.allclose(unmasked[2:], base[2:], atol=1e-3)
        # an item's vector does not depend on which longer items share its batch
        alone = torch.cat([tower.fuse(torch.tensor([i])) for i in ids])
    torch.testing.assert_close(alone, base, rtol=1e-5, atol=1e-5)
    assert text.tokens[ids].min() < text.tokens[ids].max()  # the batch really pads some of them


def test_merge_attn_run_trains_and_eval_rank_reproduces_it(synth):
    runner = CliRunner()
    args = ["train", "--root", str(synth.root), "--dataset", "synth", "--mode", "ts", "--fusion", "merge-attn",
            "--encoder", "bert-tiny@tokens,mae-tiny@tokens", "--dim", str(DIM), "--batch-size", "128",
            "--lr", "1e-3", "--epochs", "2", "--run-name", "merge", "--quiet", "--json"]
    out = runner.invoke(recommend_cli.cli, args)
    assert out.exit_code == 0, out.output
    run_dir = synth.run_dir("merge")
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and all(np.isfinite(e["loss"]) for e in epochs)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["item_tower"]["fusion"] == "merge-attn"
    states = {f["group"]: f["states"] for f in config["features"]}
    assert states["synth/text/bert-tiny@tokens"]["cache_shape"] == [30, 128]
    assert states["synth/image/mae-tiny@tokens"]["cache_shape"] == [65, 64]  # 8 x 8 patches + [CLS]
    assert {s["cache_layer"] for s in states.values()} == {0}

    best = json.loads((run_dir / "best.json").read_text())
    ranked = runner.invoke(eval_cli, ["rank", "--root", str(synth.root), "--run", "merge", "--split", "valid",
                                      "--k", "10", "--json"])
    assert ranked.exit_code == 0, ranked.output
    result = json.loads(ranked.stdout)
    assert result["HR@10"] == pytest.approx(best["metrics"]["HR@10"], abs=1e-9)
    assert result["NDCG@10"] == pytest.approx(best["metrics"]["NDCG@10"], abs=1e-6)
    model, _ = load_run(run_dir)
    assert type(model.item_tower).__name__ == "MergeAttentionTower"


def test_missing_states_exit_2_with_the_command_that_writes_them(synth, monkeypatch, capsys):
    argv = ["recommend", "train", "--root", str(synth.root), "--dataset", "synth", "--mode", "ts",
            "--fusion", "merge-attn", "--encoder", "bert-tiny,mae-tiny@tokens", "--dim", str(DIM), "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        recommend_cli.main()
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "synth/text/bert-tiny holds no cached states" in error
    command = error.split("`")[1]
    assert command.startswith("featurestore extract --dataset synth --encoder bert-tiny")
    assert "--cache-layer 0" in command and "--variant tokens" in command and "--random-init" in command

    # a group that does not exist at all: the command that creates it also stores the states
    monkeypatch.setattr(sys, "argv", [arg.replace("bert-tiny,", "bert-tiny@absent,") for arg in argv])
    with pytest.raises(SystemExit) as exit_:
        recommend_cli.main()
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "no store group synth/text/bert-tiny@absent" in error
    assert error.split("`")[1].endswith("--variant absent --cache-layer 0")

    # e2e --cached reading final states is refused without suggesting --top-k 0
    dataset = PreparedDataset.load(synth.dataset_dir("synth"))
    with pytest.raises(UserError, match="leaving the last block") as refused:
        open_state_cache(synth.store, "synth/text/bert-tiny@tokens", 1, dataset.fingerprint, dataset.n_items)
    assert "--top-k 0" not in str(refused.value) and str(refused.value).count("--variant") == 1

    # the named command is exact: it describes the bert-tiny@tokens group already there
    monkeypatch.setattr(sys, "argv", [*shlex.split(command), "--root", str(synth.root), "--json"])
    featurestore_cli.main()  # returns on success (a refusal would exit 2)
    result = json.loads(capsys.readouterr().out)
    assert result["group"] == "synth/text/bert-tiny@tokens" and result["computed_chunks"] == 0
