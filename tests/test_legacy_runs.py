"""Run folders written before the plugin redesign (by the code of 8c878fb) still load and rank the same.

``tests/fixtures/legacy`` holds what that code wrote: the synthetic dataset as it prepared it
(``data.prepare.synthetic_dataset``: 560 users, 150 items, seed 0) and three runs trained on it (IDRec, TS-DNN-2 over a
random-init ``bert-tiny`` store group, which extraction rebuilds bit for bit, and BERT4Rec). Their
``best.json`` holds the validation metrics the old trainer measured; the current code must reopen
each run and measure exactly those again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data.dataset import PreparedDataset
from eval.evaluate import evaluate
from extract.job import ExtractOptions, run_extraction
from featurestore.workspace import Workspace
from recommend.run import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("legacy"))
    shutil.copytree(FIXTURES / "datasets", ws.datasets)
    shutil.copytree(FIXTURES / "runs", ws.runs)
    run_extraction(ws, ExtractOptions(dataset="synth", encoder="bert-tiny", random_init=True, workers=0,
                                      progress=False))
    return ws


@pytest.mark.parametrize("run", sorted(p.name for p in (FIXTURES / "runs").iterdir()))
def test_a_run_of_the_old_layout_reopens_and_ranks_to_its_recorded_metrics(ws, run):
    dataset = PreparedDataset.load(ws.dataset_dir("synth"))
    model, config = load_run(ws.run_dir(run))
    assert config["dataset"]["fingerprint"] == dataset.fingerprint
    metrics = evaluate(model, dataset, split="valid", ks=(10,), exclude_history=True)
    recorded = json.loads((ws.run_dir(run) / "best.json").read_text())["metrics"]
    assert metrics["HR@10"] == pytest.approx(recorded["HR@10"], abs=1e-12)
    assert metrics["NDCG@10"] == pytest.approx(recorded["NDCG@10"], abs=1e-9)
