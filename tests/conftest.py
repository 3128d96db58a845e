"""Shared fixtures: one small prepared synthetic HM dataset for the whole session.

``synth_ws`` -> ``(Workspace, "synth")``; ``synth_dataset`` -> its PreparedDataset;
``private_ws(tag)`` -> a new Workspace holding a copy of it (a store and runs of one's own);
``one_thread``: one torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).
About 400 users (560 drawn) and 150 items in 18 latent regions with real JPEGs and English titles;
built once (a couple of seconds) under a session temporary folder. The raw files,
including ``truth.json`` (item orig id -> cluster), are in ``ws.root / "raw" / "synth"``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from data.dataset import PreparedDataset
from data.prepare import synthetic_dataset
from featurestore.workspace import Workspace

# Tests never touch the network: the model hub is switched off and its cache is an empty folder of
# the session's own (a developer's real cache must not change what a test sees); subprocesses inherit both.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_home_")
os.environ.pop("HF_HUB_CACHE", None)

SYNTH_USERS = 560  # about 400 remain after the 5-interaction filter
SYNTH_ITEMS = 150


@pytest.fixture(scope="session")
def synth_ws(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, str]:
    root = tmp_path_factory.mktemp("synth_ws")
    synthetic_dataset(root, "synth", "hm", users=SYNTH_USERS, items=SYNTH_ITEMS, seed=0)
    return Workspace(root), "synth"


@pytest.fixture(scope="session")
def synth_dataset(synth_ws: tuple[Workspace, str]) -> PreparedDataset:
    ws, name = synth_ws
    return PreparedDataset.load(ws.dataset_dir(name))


@pytest.fixture(scope="session")
def private_ws(synth_ws: tuple[Workspace, str], tmp_path_factory: pytest.TempPathFactory):
    """``private_ws(tag)``: a fresh root holding only the prepared synthetic dataset.

    Tests that extract or train get their own store and runs folder, so no module sees
    another's groups; the dataset's image paths point at the session's raw files.
    """
    src, name = synth_ws

    def make(tag: str) -> Workspace:
        ws = Workspace(tmp_path_factory.mktemp(tag))
        shutil.copytree(src.dataset_dir(name), ws.dataset_dir(name))
        return ws

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models gain nothing from a second one, OpenMP threads spin badly
    on a busy 2-core machine, and bit-for-bit comparisons need one thread count everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
