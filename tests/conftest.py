"""Shared fixtures: one small prepared synthetic HM dataset for the whole session.

``synth_ws`` -> ``(Workspace, "synth")``; ``synth_dataset`` -> its PreparedDataset.
About 400 users (560 drawn) and 150 items in 12 clusters with real JPEGs and English titles;
built once (a couple of seconds) under a session temporary folder. The raw files,
including ``truth.json`` (item orig id -> cluster), are in ``ws.root / "raw" / "synth"``.
"""

from __future__ import annotations

import pytest

from data.dataset import PreparedDataset
from data.prepare import synthetic_dataset
from featurestore.workspace import Workspace

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
