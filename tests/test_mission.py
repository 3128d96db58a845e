"""The three commands the product is known by, typed exactly as a new user types them.

A workspace (``./workspace``, the default root) holds one prepared dataset ``HM``, and
the hub cache holds swin-b's repository (a tiny Swin of that architecture, saved by
timm itself): nothing else is named on the command lines. Then what happens when the
workspace leaves a choice open: the error lists the candidates and the option.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from extract.registry import get_encoder_config
from featurestore.workspace import Workspace
from recommend.cli import cli as recommend_cli
from tests.extract_helpers import draw_picture, titles, write_dataset
from tests.hub_helpers import cache_tiny_swin

pytestmark = pytest.mark.usefixtures("one_thread")

MISSION = (
    "featurestore extract --encoder swin-b --dataset HM",
    "recommend train --mode ts-dnn --layers 8",
    "recommend eval rank --full-pool",
)
N_ITEMS = 30


def hm_workspace(folder) -> Workspace:
    ws = Workspace(folder / "workspace")
    pictures = [draw_picture(folder / "raw" / f"{i}.jpg", seed=i) for i in range(N_ITEMS)]
    write_dataset(ws, "HM", titles(N_ITEMS), pictures)
    return ws


@pytest.fixture(scope="module")
def mission(tmp_path_factory):
    """Run the three commands verbatim in a shell; returns (workspace, [(command, completed process)])."""
    folder = tmp_path_factory.mktemp("mission")
    ws = hm_workspace(folder)
    cache_tiny_swin(folder / "hf", get_encoder_config("swin-b").hub_id)
    env = {**os.environ, "HF_HOME": str(folder / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FEATURESTORE_ROOT", None)
    done = []
    for command in MISSION:
        proc = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        done.append((command, proc))
    return ws, done


def test_extract_uses_the_cached_hub_weights(mission):
    ws, done = mission
    from featurestore.store import FeatureStore

    group = FeatureStore(ws.store).open("HM/image/swin-b", complete=True)
    prov = group.attrs["provenance"]
    assert prov["weights_kind"] == "hub" and prov["weights_revision"]
    assert group.dim == 128 and group.rows == N_ITEMS + 1


def test_train_infers_the_dataset_and_the_store_group(mission):
    ws, done = mission
    stderr = done[1][1].stderr
    assert "using dataset HM (the only one in workspace)" in stderr
    assert "using store group HM/image/swin-b (the only complete one of HM)" in stderr
    (run,) = [d for d in ws.runs.iterdir()]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["item_tower"] == {**config["model"]["item_tower"], "name": "ts-dnn", "layers": 8}
    assert [f["group"] for f in config["features"]] == ["HM/image/swin-b"]


def test_eval_rank_ranks_the_run_that_finished_last(mission):
    ws, done = mission
    (run,) = [d.name for d in ws.runs.iterdir()]
    proc = done[2][1]
    assert f"using run {run} (the only finished one" in proc.stderr
    assert f"run {run}: test split" in proc.stdout
    stored = json.loads((ws.run_dir(run) / "eval.json").read_text())
    assert list(stored) == ["test/all/exclude-history/k=10,20,50"]
    assert 0.0 <= stored["test/all/exclude-history/k=10,20,50"]["HR@10"] <= 1.0
    shell_safe = subprocess.run([sys.executable, "-m", "eval", "rank", "--full-pool", "--root", str(ws.root)],
                                capture_output=True, text=True, timeout=300)
    assert shell_safe.returncode == 0, shell_safe.stderr
    assert f"using run {run}" in shell_safe.stderr


def invoke(*args: str):
    return CliRunner().invoke(recommend_cli, list(args))


def test_two_datasets_are_listed_with_the_option(tmp_path):
    ws = hm_workspace(tmp_path)
    write_dataset(ws, "MIND", titles(N_ITEMS), [None] * N_ITEMS)
    result = invoke("train", "--root", str(ws.root), "--mode", "id")
    assert result.exit_code != 0
    assert "holds 2 prepared datasets (HM, MIND); choose one with --dataset NAME" in str(result.exception)


def test_two_store_groups_are_listed_with_the_options(tmp_path):
    ws = hm_workspace(tmp_path)
    from extract.job import ExtractOptions, run_extraction

    for variant in ("a", "b"):
        run_extraction(ws, ExtractOptions(dataset="HM", encoder="mae-tiny", random_init=True, variant=variant,
                                          workers=0, progress=False))
    result = invoke("train", "--root", str(ws.root), "--mode", "ts")
    assert "HM has 2 (HM/image/mae-tiny@a, HM/image/mae-tiny@b); choose with --encoder" in str(result.exception)
    assert "--features GROUP" in str(result.exception)


def test_no_finished_run_is_refused_with_the_fix(tmp_path):
    from eval.cli import cli as eval_cli

    ws = hm_workspace(tmp_path)
    result = CliRunner().invoke(eval_cli, ["rank", "--root", str(ws.root)])
    assert "no finished run in" in str(result.exception) and "--run RUN" in str(result.exception)
