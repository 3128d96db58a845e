"""Warm-N datasets (001 Table 3): the item filter, its k-core iteration, the manifest and the histogram."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from click.testing import CliRunner
from PIL import Image

from data.cli import dataset as dataset_cli
from data.dataset import PreparedDataset
from data.prepare import build_sequences


def random_log(seed: int = 0, n: int = 5000, users: int = 400, items: int = 150):
    """Log-normal item popularity and user activity: a long tail on both sides, so the user
    filter re-opens the item filter and iterating changes the result."""
    rng = np.random.default_rng(seed)
    popularity, activity = np.exp(rng.normal(0, 1.5, items)), np.exp(rng.normal(0, 1.5, users))
    item = rng.choice(items, size=n, p=popularity / popularity.sum()).astype(np.int32)
    user = rng.choice(users, size=n, p=activity / activity.sum()).astype(np.int32)
    return user, item, rng.integers(0, 10**6, n).astype(np.int64)


def pandas_reference(users, items, min_item, min_user, iterate):
    """The filters written the obvious way, on a deduplicated frame."""
    frame = pd.DataFrame({"u": users, "i": items}).drop_duplicates()
    while True:
        size = len(frame)
        frame = frame[frame.groupby("i")["u"].transform("size") >= min_item]
        frame = frame[frame.groupby("u")["i"].transform("size") >= min_user]
        if not iterate or len(frame) == size:
            return frame


def test_warm_filter_matches_pandas_once_and_to_a_fixed_point():
    users, items, times = random_log()
    once = pandas_reference(users, items, 20, 5, False)
    assert once.groupby("i").size().min() < 20  # one pass leaves items below N: iterating matters
    for iterate in (False, True):
        kept, indptr, seq, stats = build_sequences(users, items, times, min_interactions=5, max_seq_len=10**6,
                                                   min_item_interactions=20, iterate=iterate)
        ours = pd.DataFrame({"u": np.repeat(kept, np.diff(indptr)), "i": seq})
        ref = pandas_reference(users, items, 20, 5, iterate)
        assert sorted(map(tuple, ours.values)) == sorted(map(tuple, ref.values))
        assert stats["items_below_min"] == np.unique(items).size - pandas_reference(
            users, items, 20, 1 if not iterate else 5, iterate)["i"].nunique()
    core = ours.groupby("i").size()
    assert core.min() >= 20 and ours.groupby("u").size().min() >= 5 and stats["warm_rounds"] > 1


def test_prepare_records_warm_n_and_info_draws_the_histogram(synth_ws, tmp_path):
    ws, name = synth_ws
    raw = ws.root / "raw" / name
    root = ["--root", str(tmp_path)]
    result = CliRunner().invoke(dataset_cli, ["prepare", "--format", "hm", "--source", str(raw), "--name", "warm",
                                              "--min-item-interactions", "20", "--iterate", "--max-seq-len", "500",
                                              *root, "--json"])
    assert result.exit_code == 0, result.output
    warm = PreparedDataset.load(tmp_path / "datasets" / "warm")
    assert (warm.manifest["options"]["min_item_interactions"], warm.manifest["options"]["iterate"]) == (20, True)
    counts = np.bincount(warm.seq_items, minlength=warm.n_items + 1)[1:]
    assert counts.min() >= 20 and warm.n_items < PreparedDataset.load(ws.dataset_dir(name)).n_items
    plot = tmp_path / "pop.png"
    result = CliRunner().invoke(dataset_cli, ["info", "warm", "--plot", str(plot), *root, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert sum(b["items"] for b in info["popularity"]) == warm.n_items
    assert all(b["items"] == 0 for b in info["popularity"] if b["to"] < 20)
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_study_warm_prepares_the_variants_and_reports_them_side_by_side(private_ws):
    from recommend.cli import cli as recommend_cli

    ws = private_ws("warm_study")
    args = ["study", "--root", str(ws.root), "--dataset", "synth", "--encoder", "minilm-l6", "--modes", "id",
            "--epochs", "1", "--dim", "16", "--device", "cpu", "--threads", "1", "--warm", "20,50", "--json"]
    result = CliRunner().invoke(recommend_cli, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    sizes = [(v["dataset"], v["min_item_interactions"], v["items"]) for v in out["variants"]]
    assert [s[:2] for s in sizes] == [("synth", 1), ("synth-warm20", 20), ("synth-warm50", 50)]
    assert sizes[0][2] > sizes[1][2] > sizes[2][2]
    for variant in out["variants"][1:]:
        warm = PreparedDataset.load(ws.dataset_dir(variant["dataset"]))
        assert warm.manifest["options"]["min_item_interactions"] == variant["min_item_interactions"]
    report = (ws.root / "studies" / "synth-minilm-l6-warm" / "report.md").read_text()
    assert "synth-warm50 HR@10" in report and "| popularity |" in report and "| id |" in report
    id_row = next(line for line in report.splitlines() if line.startswith("| id |"))
    assert "-" not in id_row.split("|")[2:-1]  # every variant's IDRec run was trained and ranked
    again = CliRunner().invoke(recommend_cli, args)  # resumes: nothing re-prepared or retrained
    assert again.exit_code == 0 and json.loads(again.output)["table"] == out["table"]
