"""Exports read back the way MMRec (numpy + its .inter columns) and RecBole (atomic headers,
np.fromfile feature rows) read them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from extract.job import ExtractOptions, run_extraction
from featurestore.cli import cli
from featurestore.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(private_ws, tmp_path_factory):
    ws = private_ws("ecosystem")
    for encoder in ("mae-tiny", "bert-tiny"):
        run_extraction(ws, ExtractOptions(dataset="synth", encoder=encoder, random_init=True, workers=0,
                                          progress=False))
    out = tmp_path_factory.mktemp("exports")
    for fmt in ("mmrec", "recbole"):
        for group in ("synth/image/mae-tiny", "synth/text/bert-tiny"):
            result = CliRunner().invoke(cli, ["export", group, "--format", fmt, "--out", str(out / fmt),
                                              "--root", str(ws.root), "--json"])
            assert result.exit_code == 0, result.output
            assert json.loads(result.output)["format"] == fmt
    return ws, out


def rows(ws, group):
    return FeatureStore(ws.store).open(group).read()


def test_mmrec_features_are_row_aligned_and_x_label_is_our_split(exported, synth_dataset):
    ws, out = exported
    image, text = np.load(out / "mmrec" / "image_feat.npy"), np.load(out / "mmrec" / "text_feat.npy")
    np.testing.assert_array_equal(image, rows(ws, "synth/image/mae-tiny")[1:])  # MMRec item i = our id i + 1
    np.testing.assert_array_equal(text, rows(ws, "synth/text/bert-tiny")[1:])
    inter = pd.read_csv(out / "mmrec" / "synth.inter", sep="\t")
    assert list(inter.columns) == ["userID", "itemID", "rating", "timestamp", "x_label"]
    for label, split in ((2, "test"), (1, "valid")):
        chosen = inter[inter.x_label == label].sort_values("userID")
        np.testing.assert_array_equal(chosen.userID, np.arange(synth_dataset.n_users))
        np.testing.assert_array_equal(chosen.itemID + 1, synth_dataset.targets(split))
    assert (inter.x_label == 0).sum() == synth_dataset.manifest["counts"]["train"]
    assert inter.itemID.between(0, synth_dataset.n_items - 1).all()


def test_recbole_atomic_files_and_the_feature_file_read_back(exported, synth_dataset):
    ws, out = exported
    folder = out / "recbole"
    inter = pd.read_csv(folder / "synth.inter", sep="\t")
    fields = dict(column.split(":") for column in inter.columns)
    assert fields == {"user_id": "token", "item_id": "token", "timestamp": "float"}
    last = inter.sort_values(["user_id:token", "timestamp:float"]).groupby("user_id:token").tail(1)
    np.testing.assert_array_equal(last["item_id:token"], synth_dataset.targets("test"))
    item = pd.read_csv(folder / "synth.item", sep="\t", keep_default_na=False)
    assert list(item.columns) == ["item_id:token", "text:token_seq"]
    assert item["text:token_seq"].iloc[0] == " ".join(synth_dataset.items[0].text.split())
    for suffix, group in (("feat1CLS", "synth/text/bert-tiny"), ("feat2CLS", "synth/image/mae-tiny")):
        stored = rows(ws, group)
        loaded = np.fromfile(folder / f"synth.{suffix}", dtype=np.float32).reshape(-1, stored.shape[1])
        np.testing.assert_array_equal(loaded[item["item_id:token"]], stored[1:])  # UniSRec: row = int(token)


def test_ducho_folder_imports_as_a_group_with_its_provenance(private_ws, tmp_path, synth_dataset):
    from featurestore.store import file_sha256

    ws = private_ws("ducho")
    folder = tmp_path / "visual_embeddings" / "torch" / "ResNet50" / "avgpool"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vectors = {item.id: rng.normal(size=(1, 12)).astype(np.float32) for item in synth_dataset.items[:-3]}
    for item in synth_dataset.items[:-3]:  # Ducho names each file after the item; the last three have none
        np.save(folder / f"{item.orig_id}.npy", vectors[item.id])
    result = CliRunner().invoke(cli, ["import", "--from", "ducho", str(tmp_path / "visual_embeddings"),
                                      "--group", "synth/image/ducho-resnet50", "--root", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    group = FeatureStore(ws.store).open("synth/image/ducho-resnet50", complete=True)
    stored, present = group.read(), group.present()
    for item_id, vector in vectors.items():
        np.testing.assert_array_equal(stored[item_id], vector[0])
    assert present.sum() == len(vectors) and not present[-3:].any()
    assert group.attrs["imported"] == "imported from Ducho"
    assert group.attrs["ducho_folder"] == str((tmp_path / "visual_embeddings").resolve())
    assert group.attrs["imported_sha256"] == file_sha256(sorted(folder.glob("*.npy")))
    missing = CliRunner().invoke(cli, ["import", "--from", "ducho", str(tmp_path), "--root", str(ws.root)])
    assert "--group DATASET/MODALITY/ENCODER" in str(missing.exception)
