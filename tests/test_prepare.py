"""Preparation rules, the exact leave-one-out split, determinism, and the CLI's bad-input paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.cli import dataset
from data.dataset import PreparedDataset
from data.prepare import build_sequences, prepare_dataset, synthetic_dataset
from featurestore.cliutil import UserError, run_cli


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def generic_raw(folder: Path, interactions: list[tuple[str, str, int]], items: list[str]) -> Path:
    write(folder / "interactions.csv",
          "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in interactions))
    write(folder / "items.csv", "item_id,text\n" + "".join(f"{i},text of {i}\n" for i in items))
    return folder


def cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run ``featurestore dataset ARGS`` in-process the way the console script does."""
    monkeypatch.setattr(sys, "argv", ["dataset", *args])
    try:
        run_cli(dataset, "dataset")
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_build_sequences_sort_dedupe_filter_truncate_by_hand() -> None:
    # (user, item, time) in file order, users interleaved.
    events = [(0, 5, 10), (2, 4, 5), (0, 3, 10), (1, 1, 1), (0, 5, 11), (2, 4, 6), (0, 7, 9), (1, 2, 2),
              (2, 6, 4), (0, 8, 12), (1, 3, 3), (2, 2, 7), (0, 9, 13), (2, 1, 8)]
    users, items, times = (np.array(col) for col in zip(*events))
    kept, indptr, seq, stats = build_sequences(users.astype(np.int32), items.astype(np.int32), times,
                                               min_interactions=4, max_seq_len=4)
    # user 0: 7@9, 5@10, 3@10 (tie: file order), 5@11 dup, 8@12, 9@13 -> 7 5 3 8 9 -> last 4
    # user 1: 3 distinct < 4 -> dropped. user 2: 6@4, 4@5, 4@6 dup, 2@7, 1@8.
    assert kept.tolist() == [0, 2]
    assert indptr.tolist() == [0, 4, 8]
    assert seq.tolist() == [5, 3, 8, 9, 6, 4, 2, 1]
    assert stats == {"duplicates_removed": 2, "users_below_min": 1, "users_sampled_out": 0,
                     "interactions_truncated": 1}


def test_user_subsample_is_deterministic_and_exact() -> None:
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(200, dtype=np.int32), 6)
    items = rng.integers(0, 10_000, size=len(users)).astype(np.int32)
    times = rng.integers(0, 100, size=len(users))
    runs = [build_sequences(users, items, times, min_interactions=5, max_seq_len=13, subsample=50, seed=s)[0]
            for s in (1, 1, 2)]
    assert len(runs[0]) == 50 and np.all(np.diff(runs[0]) > 0)
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[0].tolist() != runs[2].tolist()


def test_leave_one_out_split_exactly(tmp_path: Path) -> None:
    raw = generic_raw(tmp_path / "raw", [("x", "p1", 1), ("y", "p3", 1), ("x", "p2", 2), ("y", "p2", 2),
                                         ("x", "p3", 3), ("y", "p1", 3), ("x", "p4", 4)], ["p1", "p2", "p3", "p4"])
    prepare_dataset("generic", raw, tmp_path / "ds", name="ds", min_interactions=3)
    ds = PreparedDataset.load(tmp_path / "ds")
    assert ds.user_ids == ["x", "y"] and [it.orig_id for it in ds.items] == ["p1", "p2", "p3", "p4"]
    assert ds.sequence(0).tolist() == [1, 2, 3, 4] and ds.sequence(1).tolist() == [3, 2, 1]
    indptr, hist = ds.history("train")
    assert indptr.tolist() == [0, 2, 3] and hist.tolist() == [1, 2, 3]
    assert ds.targets("valid").tolist() == [3, 2]
    assert ds.targets("test").tolist() == [4, 1]
    indptr, hist = ds.history("test")
    assert indptr.tolist() == [0, 3, 5] and hist.tolist() == [1, 2, 3, 3, 2]
    assert ds.train_counts().tolist() == [0, 1, 1, 1, 0]
    counts = ds.manifest["counts"]
    assert (counts["train"], counts["valid"], counts["test"], counts["interactions"]) == (3, 2, 2, 7)


def test_truncation_keeps_only_used_items_numbered_by_original_id(tmp_path: Path) -> None:
    # z's oldest item "d" is cut by max_seq_len=3 and so leaves the catalogue; "e" is never used.
    raw = generic_raw(tmp_path / "raw", [("z", "d", 1), ("z", "c", 2), ("z", "a", 3), ("z", "b", 4)],
                      ["a", "b", "c", "d", "e"])
    manifest = prepare_dataset("generic", raw, tmp_path / "ds", name="ds", min_interactions=3, max_seq_len=3)
    ds = PreparedDataset.load(tmp_path / "ds")
    assert [(it.id, it.orig_id) for it in ds.items] == [(1, "a"), (2, "b"), (3, "c")]
    assert ds.sequence(0).tolist() == [3, 1, 2]
    assert manifest["stats"]["interactions_truncated"] == 1
    assert manifest["options"]["max_seq_len"] == 3


def test_chunked_reading_matches_one_chunk(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    synthetic_dataset(root, "a", "hm", users=120, items=60, seed=4, images=False)
    whole = json.loads((root / "datasets/a/manifest.json").read_text())
    small = prepare_dataset("hm", root / "raw/a", tmp_path / "chunked", name="a", seed=4, chunk_rows=7)
    assert small["fingerprint"] == whole["fingerprint"]
    assert small["interactions_fingerprint"] == whole["interactions_fingerprint"]


def test_same_seed_same_fingerprint_other_seed_differs(tmp_path: Path) -> None:
    prints = []
    for root, seed in ((tmp_path / "one", 5), (tmp_path / "two", 5), (tmp_path / "three", 6)):
        ds = PreparedDataset.load(synthetic_dataset(root, "s", "hm", users=100, items=40, seed=seed))
        prints.append((ds.fingerprint, ds.manifest["interactions_fingerprint"]))
    assert prints[0] == prints[1]
    assert prints[0][0] != prints[2][0] and prints[0][1] != prints[2][1]


def test_prepare_and_info_cli_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path / "ws")
    code, out, _ = cli(["synth", "--format", "mind", "--users", "150", "--items", "60", "--root", root, "--json"],
                       monkeypatch, capsys)
    assert code == 0 and json.loads(out)["format"] == "mind"
    code, out, _ = cli(["prepare", "--format", "mind", "--source", f"{root}/raw/mind", "--name", "M",
                        "--users", "40", "--seed", "3", "--text-fields", "title,abstract", "--root", root, "--json"],
                       monkeypatch, capsys)
    assert code == 0
    prepared = json.loads(out)
    assert prepared["users"] == 40 and prepared["max_seq_len"] == 23
    code, out, _ = cli(["info", "M", "--root", root, "--json"], monkeypatch, capsys)
    info = json.loads(out)
    ds = PreparedDataset.load(Path(root) / "datasets/M")
    assert info["users"] == 40 == ds.n_users
    assert info["items"] == ds.n_items and info["interactions"] == len(ds.seq_items)
    assert info["fingerprint"] == prepared["fingerprint"] == ds.fingerprint
    assert info["splits"]["train"] == len(ds.seq_items) - 80
    assert info["cold_items"] == int((ds.train_counts()[1:] < 10).sum())
    assert ds.manifest["options"]["text_fields"] == ["title", "abstract"]
    code, out, _ = cli(["info", "M", "--root", root], monkeypatch, capsys)
    assert code == 0 and "users 40" in out and prepared["fingerprint"] in out


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path / "ws")
    (tmp_path / "empty").mkdir()
    code, _, err = cli(["prepare", "--format", "hm", "--source", str(tmp_path / "empty"), "--name", "x",
                        "--root", root], monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"error: missing H&M articles file: {tmp_path}/empty/articles.csv not found; "
                                        f"check --source"]
    code, _, err = cli(["info", "nothing", "--root", root], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: no prepared dataset")
    code, _, err = cli(["prepare", "--format", "hm", "--source", root, "--name", "x", "--min-interactions", "2"],
                       monkeypatch, capsys)
    assert code == 2 and "--min-interactions" in err


def test_empty_after_filtering_writes_nothing_and_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "ws"
    good = generic_raw(tmp_path / "good", [("x", "a", 1), ("x", "b", 2), ("x", "c", 3)], ["a", "b", "c"])
    thin = generic_raw(tmp_path / "thin", [("x", "a", 1), ("x", "b", 2), ("y", "a", 1)], ["a", "b"])
    args = ["prepare", "--format", "generic", "--name", "d", "--min-interactions", "3", "--root", str(root)]
    code, _, err = cli([*args, "--source", str(thin)], monkeypatch, capsys)
    assert code == 2 and "no users left" in err and "fewer than 3" in err
    assert not (root / "datasets" / "d").exists()
    assert cli([*args, "--source", str(good)], monkeypatch, capsys)[0] == 0
    before = (root / "datasets/d/manifest.json").read_text()
    code, _, _ = cli([*args, "--source", str(thin)], monkeypatch, capsys)
    assert code == 2
    assert (root / "datasets/d/manifest.json").read_text() == before
    assert sorted(p.name for p in (root / "datasets").iterdir()) == ["d"]  # no temporary leftovers


def test_prepare_rejects_bad_options(tmp_path: Path) -> None:
    raw = generic_raw(tmp_path / "raw", [("x", "a", 1), ("x", "b", 2), ("x", "c", 3)], ["a", "b", "c"])
    with pytest.raises(UserError, match="--min-interactions must be at least 3"):
        prepare_dataset("generic", raw, tmp_path / "d", name="d", min_interactions=2)
    with pytest.raises(UserError, match="--max-seq-len must be at least 3"):
        prepare_dataset("generic", raw, tmp_path / "d", name="d", max_seq_len=2)
    with pytest.raises(UserError, match="raw dataset folder .* not found"):
        prepare_dataset("generic", tmp_path / "nope", tmp_path / "d", name="d")
    with pytest.raises(UserError, match="no readable interactions"):
        prepare_dataset("generic", generic_raw(tmp_path / "r2", [("x", "zzz", 1)], ["a"]), tmp_path / "d", name="d")


def test_featurestore_console_script_end_to_end(tmp_path: Path) -> None:
    """The real entry point: synth -> prepare -> info, and a bad input's exit status."""
    entry = [sys.executable, "-c", "from featurestore.cli import main; main()", "dataset"]
    root = ["--root", str(tmp_path)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*entry, *args, *root], capture_output=True, text=True, check=False)

    assert run("synth", "--format", "generic", "--users", "80", "--items", "30").returncode == 0
    prepared = run("prepare", "--format", "generic", "--source", str(tmp_path / "raw/generic"), "--name", "g", "--json")
    assert prepared.returncode == 0, prepared.stderr
    info = json.loads(run("info", "g", "--json").stdout)
    assert info["fingerprint"] == json.loads(prepared.stdout)["fingerprint"]
    assert {"users", "items", "interactions", "fingerprint"} <= set(info)
    failed = run("prepare", "--format", "mind", "--source", str(tmp_path / "raw/generic"), "--name", "m")
    assert failed.returncode == 2
    assert failed.stderr.strip() == f"error: missing MIND news file: {tmp_path}/raw/generic/news.tsv not found; check --source"
