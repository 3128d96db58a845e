"""``torchrun --nproc-per-node 2`` writes exactly what one process writes (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from extract.job import ExtractOptions, run_extraction
from extract_helpers import titles, write_dataset
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"dataset": "texts", "encoder": "bert-tiny", "random_init": True, "batch_size": 3, "chunk_rows": 4,
           "workers": 0}


def test_two_ranks_equal_one_process(tmp_path):
    texts = titles(30)
    texts[9] = ""  # a bad item on one rank's chunk
    one, two = Workspace(tmp_path / "one"), Workspace(tmp_path / "two")
    for ws in (one, two):
        write_dataset(ws, "texts", texts, [None] * len(texts))

    run_extraction(one, ExtractOptions(**OPTIONS, progress=False))

    args = ["--dataset", "texts", "--encoder", "bert-tiny", "--random-init", "--batch-size", "3",
            "--chunk-rows", "4", "--workers", "0", "--json", "--root", str(two.root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in this process: same kernels, same bits
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "featurestore.cli", "extract", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 reports for the job
    assert (summaries[0]["world_size"], summaries[0]["status"], summaries[0]["bad"]) == (2, "complete", 1)

    a = FeatureStore(one.store).open("texts/text/bert-tiny")
    b = FeatureStore(two.store).open("texts/text/bert-tiny")
    assert b.status == "complete" and b.attrs["timings"]["world_size"] == 2
    assert np.array_equal(a.read(), b.read())
    assert np.array_equal(a.present(), b.present())
    assert [(r["id"], r["reason"]) for r in b.attrs["bad_items"]] == [(10, "empty text")]
    assert not FeatureStore(two.store).lock(b.name).path.exists()
