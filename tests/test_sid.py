"""``--mode sid`` (semantic IDs from a codes group) and ``--mode id-init`` (an ID table started from PCA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from codes_helpers import ABSENT, write_vectors
from sklearn.decomposition import PCA

from eval.cli import cli as eval_cli
from extract.codes import CodesOptions, run_codes
from featurestore.errors import UserError
from featurestore.store import FeatureStore
from recommend.features import open_source
from recommend.item_towers import ITEM_TOWERS, create_item_tower
from recommend.run import load_run, read_config
from recommend.sid import CodeSource, open_codes
from recommend.study import StudyOptions, plan
from recommend.trainer import TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")

CODES = "synth/codes/bert-tiny@rq-kmeans-2x8"
COMMON = {"dataset": "synth", "dim": 16, "epochs": 2, "batch_size": 128, "device": "cpu"}


@pytest.fixture(scope="module")
def ws(private_ws, synth_dataset):
    ws = private_ws("sid")
    write_vectors(ws, synth_dataset, "synth/text/bert-tiny")
    run_codes(ws, CodesOptions(dataset="synth", encoder="bert-tiny", levels=2, codebook=8))
    return ws


def hand_source() -> CodeSource:
    codes = np.array([[0, 0], [1, 2], [1, 3], [0, 2], [1, 2], [9, 9], [1, 3]])  # item 5 has no vector
    present = np.array([False, True, True, True, True, False, True])
    return CodeSource("hand", codes, present, "fp")


@pytest.mark.parametrize("how", ["prefix", "sum"])
def test_sid_vectors_equal_a_hand_computation_from_the_code_tables(how):
    source = hand_source()
    tower = ITEM_TOWERS.create("sid", {"name": "sid", "n_items": 6, "dim": 4, "sid_embed": how}, [source], True)
    assert all(float(t.weight.detach().abs().sum()) == 0 for t in tower.tables[1:])  # deeper levels start at zero
    torch.manual_seed(0)
    with torch.no_grad():
        for table in tower.tables:
            torch.nn.init.normal_(table.weight)
            table.weight[-1] = 0  # the padding row, as training keeps it
    keys = [[(-1,) * (level + 1) if not source.present[i] else
             tuple(source.codes[i, level:level + 1] if how == "sum" else source.codes[i, :level + 1])
             for i in range(1, 7)] for level in range(2)]
    expected = torch.zeros(7, 4)
    for level, table in enumerate(tower.tables):
        rows = sorted(set(keys[level]))
        for item in range(1, 7):
            expected[item] += table.weight[rows.index(keys[level][item - 1])]
    got = tower(torch.arange(7)).detach()
    assert torch.allclose(got, expected) and float(got[0].abs().sum()) == 0  # item 0: padding
    assert torch.equal(got[1], got[4]) and torch.equal(got[2], got[6])  # same codes, same vector
    assert torch.allclose(tower(torch.tensor([[2, 5]])).detach()[0], expected[[2, 5]])


def test_with_id_add_is_the_sum_of_the_codes_vector_and_the_id_row():
    tower = create_item_tower({"name": "sid", "n_items": 6, "dim": 4, "sid_embed": "prefix", "with_id": "add"},
                              [hand_source()])
    ids = torch.arange(7)
    assert torch.allclose(tower(ids), tower.content(ids) + tower.ids.table.weight)
    assert not torch.equal(tower(ids)[1], tower(ids)[4])  # the ID tells items with the same codes apart


def test_id_init_table_before_the_first_step_is_the_pca_projection(ws, synth_dataset):
    source = open_source(ws, "synth/text/bert-tiny", synth_dataset.fingerprint, synth_dataset.n_items)
    n, dim = synth_dataset.n_items, 16
    tower = ITEM_TOWERS.create("id-init", {"name": "id-init", "n_items": n, "dim": dim}, [source], True)
    table = tower.table.weight.detach().numpy().astype(np.float64)
    ids = np.array([i for i in range(1, n + 1) if i != ABSENT])
    scores = PCA(n_components=dim).fit_transform(source.gather(ids).astype(np.float64))
    scale = np.sqrt(2.0 / (n + 1 + dim)) / scores.std()  # the spread of IDRec's Xavier start
    assert np.allclose(table[ids], scores * scale, atol=1e-6)
    assert table[0].tolist() == [0.0] * dim and np.abs(table[ABSENT]).sum() > 0  # padding; Xavier row


def _rank_valid(ws, run: str) -> dict:
    result = CliRunner().invoke(eval_cli, ["rank", "--run", run, "--split", "valid", "--k", "10", "--root",
                                           str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_sid_run_reloads_and_eval_rank_reproduces_its_best_validation_metrics(ws):
    result = train(ws, TrainOptions(mode="sid", codes=CODES, with_id="add", sid_embed="sum", run_name="sid-id",
                                    **COMMON), progress=False, echo=False)
    config = read_config(ws.run_dir(result["run"]))
    assert config["model"]["item_tower"] == {"name": "sid", "dropout": 0.3, "whiten": False, "with_id": "add",
                                             "sid_embed": "sum"}
    assert config["features"][0]["provenance"]["source"]["group"] == "synth/text/bert-tiny"
    assert config["parameters"]["code_tables"]["total"] == 16 * (8 + 1 + 1 + 8 + 1 + 1)  # L x (K + no content + pad)
    ranked = _rank_valid(ws, "sid-id")
    assert (ranked["HR@10"], ranked["NDCG@10"]) == (result["best"]["HR@10"], result["best"]["NDCG@10"])


def test_sid_refuses_vectors_partial_or_foreign_codes_and_rewritten_codes(ws, synth_dataset):
    fp, n = synth_dataset.fingerprint, synth_dataset.n_items
    with pytest.raises(UserError, match="holds vectors, not codes; quantise it first: `featurestore codes"):
        open_codes(ws, "synth/text/bert-tiny", fp, n)
    with pytest.raises(UserError, match="no codes group .*write it with `featurestore codes --dataset synth "
                                        "--encoder bert-tiny --levels 3 --codebook 4 --method rq-vae"):
        open_codes(ws, "synth/codes/bert-tiny@rq-vae-3x4", fp, n)
    with pytest.raises(UserError, match="made for dataset fingerprint"):
        open_codes(ws, CODES, "0123456789abcdef", n)
    group = FeatureStore(ws.store).open(CODES)
    group.update_attrs(status="partial")
    try:
        with pytest.raises(UserError, match="is partial; finish it with `featurestore codes"):
            open_codes(ws, CODES, fp, n)
    finally:
        group.update_attrs(status="complete")
    with pytest.raises(UserError, match="--mode sid needs --codes GROUP"):
        train(ws, TrainOptions(mode="sid", **COMMON), progress=False, echo=False)
    with pytest.raises(UserError, match="--codes names the semantic-ID codes; it needs --mode sid, not --mode ts"):
        train(ws, TrainOptions(mode="ts", codes=CODES, encoders=["bert-tiny"], **COMMON), progress=False, echo=False)

    result = train(ws, TrainOptions(mode="sid", codes=CODES, run_name="sid-plain", **COMMON),
                   progress=False, echo=False)
    config = read_config(ws.run_dir(result["run"]))
    kind = ITEM_TOWERS.get("sid")
    other = [{**f, "provenance": {**f["provenance"], "quantiser_sha256": "another"}} for f in config["features"]]
    assert "another quantiser" in kind.feature_problems(config["features"], other)[0]
    group.update_attrs(codes_sha256="rewritten")
    with pytest.raises(UserError, match="rewritten after this run trained on it"):
        load_run(ws.run_dir(result["run"]))


def test_a_study_plans_sid_sid_with_id_and_id_init_rows(synth_dataset):
    rows = plan(StudyOptions(dataset="synth", encoder="minilm-l6", modes=["id", "sid", "id-init"]), synth_dataset)
    by_label = {row.label: row.options for row in rows}
    assert sorted(by_label) == ["id", "id-init", "sid", "sid+id"]
    assert by_label["sid"].codes == by_label["sid+id"].codes == "synth/codes/minilm-l6@rq-kmeans-3x256"
    assert by_label["sid+id"].with_id == "add" and by_label["id-init"].encoders == ["minilm-l6"]
    assert len({options.run_name for options in by_label.values()}) == 4


def test_a_study_makes_its_codes_and_a_rerun_finds_the_same_sid_runs(private_ws, monkeypatch):
    """sid rows read codes no extraction makes: the mode's own study hook runs `featurestore codes` once
    (after the study's store group), and the codes' hash names the runs."""
    from recommend import sid
    from recommend.study import run_study

    monkeypatch.setitem(sid.STUDY_CODES, "codebook", 8)  # the synthetic catalogue is small
    ws = private_ws("sid-study")
    opts = StudyOptions(dataset="synth", encoder="bert-tiny", random_init=True, modes=["sid"], epochs=1, dim=16,
                        batch_size=128, threads=1, device="cpu")
    first = run_study(ws, opts, progress=False)
    assert [(c["label"], c["status"]) for c in first["configurations"]] == [("sid", "trained"), ("sid+id", "trained")]
    assert FeatureStore(ws.store).open("synth/codes/bert-tiny@rq-kmeans-3x8").status == "complete"
    again = run_study(ws, opts, progress=False)
    assert [c["status"] for c in again["configurations"]] == ["finished earlier"] * 2
    assert [c["run"] for c in again["configurations"]] == [c["run"] for c in first["configurations"]]
