"""The oracle: the fast path against a plain per-user reference, alignment through
preparation, and no trained model above it; the ID signal is invisible to content."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.dataset import PreparedDataset
from data.oracle import ORACLE_DIR, WorldFile, align, fast_ranks, oracle_metrics, oracle_ranks
from data.prepare import prepare_dataset
from data.synth import CONTENT_WIDTH, LINK_WEIGHTS, MEMORY_DECAY, synthesize
from eval.evaluate import evaluate, popularity_metrics
from eval.ranking import rank_targets
from recommend.trainer import TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_ranks(ds: PreparedDataset, raw: Path, split: str, links: bool = True) -> np.ndarray:
    """Per prepared user, in plain numpy: find the target in the generated sequence, replay
    the user's state, write out the whole mixture over the raw catalogue, rank the target
    among the prepared items (pessimistic ties, seen items have probability 0).
    ``links=False``: the mixture without the link term."""
    with np.load(raw / "world.npz") as npz:
        w = {k: npz[k] for k in npz.files}
    signals = w["signals"]
    content, id_, popularity = signals[:3] / signals[:3].sum()
    taste = signals[3]
    users = {u.decode(): k for k, u in enumerate(w["user_ids"])}
    items = {i.decode(): k for k, i in enumerate(w["item_ids"])}
    pool = np.array([items[it.orig_id] for it in ds.items])
    pop, region, centres = w["popularity"], w["region"], w["centres"]
    region_pop = np.array([pop[region == r].sum() for r in range(len(centres))])
    ranks = []
    for k, target_id in enumerate(ds.targets(split)):
        u = users[ds.user_ids[k]]
        seq = w["seq_items"][w["indptr"][u]: w["indptr"][u + 1]]
        target = items[ds.items[target_id - 1].orig_id]
        t = int(np.flatnonzero(seq == target)[0])
        memory = w["latent"][seq[0]].astype(float)
        for j in range(1, t):
            memory = MEMORY_DECAY * memory + (1 - MEMORY_DECAY) * w["latent"][seq[j]]
        query = (taste * w["taste"][u] + (1 - taste) * memory) / np.hypot(taste, 1 - taste)
        kernel = np.exp(-((query - centres) ** 2).sum(axis=1) / (2 * CONTENT_WIDTH ** 2)) * region_pop
        kernel /= kernel.sum()
        p = content * kernel[region] * pop / region_pop[region] + popularity * pop
        for follow, weight in zip(w["links"][seq[t - 1]], LINK_WEIGHTS if links else ()):
            p[follow] += id_ * weight / sum(LINK_WEIGHTS)
        p[seq[:t]] = 0
        ranks.append(1 + int(((p[pool] >= p[target]) & (pool != target)).sum()))
    return np.array(ranks)


@pytest.mark.parametrize("fmt", ["hm", "mind"])
def test_fast_path_equals_the_per_user_reference(tmp_path: Path, fmt: str) -> None:
    raw = tmp_path / "raw"
    synthesize(fmt, raw, users=300, items=90, seed=5, images=False)
    prepare_dataset(fmt, raw, tmp_path / "ds", name="o", max_seq_len=6, users=200, seed=1)
    ds = PreparedDataset.load(tmp_path / "ds")
    world = WorldFile.load(raw / "world.npz")
    for split in ("valid", "test"):
        fast = fast_ranks(world, align(ds, world, split), batch_users=37)  # batches that do not divide U
        np.testing.assert_array_equal(fast, reference_ranks(ds, raw, split))
        blind = oracle_ranks(ds, split, links=False)
        np.testing.assert_array_equal(blind, reference_ranks(ds, raw, split, links=False))
        assert np.mean(blind <= 10) < np.mean(fast <= 10)  # the links are worth something
    assert np.mean(fast <= 10) > 0.2  # the ceiling is far from trivial here


def test_preparation_keeps_the_oracle_aligned(tmp_path: Path) -> None:
    """Truncation, the user filter and a subsample change which users and histories are
    kept, never which generated event a user's target is: per user, the same rank."""
    raw = tmp_path / "raw"
    synthesize("hm", raw, users=400, items=120, seed=2, images=False)
    by_user = []
    for name, options in (("full", dict(max_seq_len=60, min_interactions=3)),
                          ("cut", dict(max_seq_len=4, min_interactions=6, users=150, seed=3))):
        prepare_dataset("hm", raw, tmp_path / name, name=name, **options)
        ds = PreparedDataset.load(tmp_path / name)
        ranks = oracle_ranks(ds, "test")
        assert (tmp_path / name / "oracle").is_dir() and not (raw / "oracle").exists() and len(ranks) == ds.n_users
        assert np.array_equal(oracle_ranks(ds, "test"), ranks)  # the cached copy
        by_user.append(dict(zip(ds.user_ids, ranks)))
    full, cut = by_user
    assert len(cut) == 150 and set(cut) <= set(full)
    # the item pool differs (items only the dropped users had), so ranks can only shrink
    assert all(cut[u] <= full[u] for u in cut)
    assert np.mean([cut[u] == full[u] for u in cut]) > 0.5
    truth = json.loads((raw / "truth.json").read_text())
    assert truth["world"] == "world.npz" and truth["signals"]["id"] > 0


@pytest.fixture(scope="module")
def id_run(synth_ws):
    ws, _ = synth_ws
    train(ws, TrainOptions(dataset="synth", mode="id", run_name="oracle-id", seed=3, dim=32, batch_size=32,
                           lr=1e-3, epochs=15, patience=4), progress=False, echo=False)
    from recommend.run import load_run

    model, _ = load_run(ws.run_dir("oracle-id"))
    return model


def test_no_model_beats_the_oracle(synth_dataset, id_run) -> None:
    oracle = oracle_metrics(synth_dataset, "valid", ks=(10,))
    model = evaluate(id_run, synth_dataset, split="valid", ks=(10,))
    popular = popularity_metrics(synth_dataset, "valid", ks=(10,))
    p, n = oracle["HR@10"], oracle["users"]
    margin = 3 * np.sqrt(p * (1 - p) / n)  # sampling error of a hit rate over n users
    print(f"valid HR@10: popularity {popular['HR@10']:.3f}, IDRec {model['HR@10']:.3f}, oracle {p:.3f}")
    assert popular["HR@10"] < model["HR@10"] <= p + margin
    assert model["NDCG@10"] <= oracle["NDCG@10"] + margin


def test_links_are_invisible_to_content_and_learned_by_ids(synth_ws, synth_dataset, id_run) -> None:
    """On validation targets that are one of the last item's follow-up links: a content-only
    model (next item = the most similar texts to the recent items) is near chance; IDRec,
    on warm such targets, is far above it."""
    ws, name = synth_ws
    ds = synth_dataset
    world = WorldFile.load(ws.root / "raw" / name / "world.npz")
    alignment = align(ds, world, "valid")
    last = world.seq_items[world.indptr[alignment.raw_user] + alignment.step - 1]
    target = alignment.pool_raw[ds.targets("valid")]
    linked = (world.links[last] == target[:, None]).any(axis=1)
    warm = ~ds.cold_items()[ds.targets("valid")]

    words = sorted({w for it in ds.items for w in it.text.lower().split()})
    index = {w: k for k, w in enumerate(words)}
    bags = np.zeros((ds.n_items + 1, len(words)), dtype=np.float32)
    for it in ds.items:
        for w in it.text.lower().split():
            bags[it.id, index[w]] = 1.0
    bags /= np.linalg.norm(bags, axis=1, keepdims=True).clip(1e-9)
    indptr, history = ds.history("valid")
    users = np.stack([bags[history[indptr[u]:indptr[u + 1]][-3:]].mean(axis=0) for u in range(ds.n_users)])
    content = rank_targets(users, bags, ds.targets("valid"), indptr, history, max_k=10, progress=False)
    ids = evaluate(id_run, ds, split="valid", ks=(10,), return_vectors=True)["vectors"]
    id_ranks = rank_targets(ids.users, ids.items, ids.targets, ids.history_indptr, ids.history_indices, max_k=10,
                            progress=False)
    chance = 10 / (ds.n_items - 8)  # ~8 history items excluded
    content_hr = float(np.mean(content[linked] <= 10))
    id_hr = float(np.mean(id_ranks[linked & warm] <= 10))
    print(f"link-driven valid targets {linked.sum()} ({(linked & warm).sum()} warm): HR@10 content-only "
          f"{content_hr:.3f}, IDRec on warm {id_hr:.3f}, chance {chance:.3f}")
    assert linked.sum() > 50
    assert content_hr < 2.5 * chance
    assert id_hr > 4 * chance


def test_a_raw_folder_generated_again_drops_the_oracle_row_with_a_note(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    synthesize("hm", raw, users=200, items=60, seed=2, images=False)
    prepare_dataset("hm", raw, tmp_path / "ds", name="again", max_seq_len=6)
    ds = PreparedDataset.load(tmp_path / "ds")
    for other in (dict(users=200, items=60, seed=3), dict(users=150, items=40, seed=2)):  # new events; new ids
        synthesize("hm", raw, images=False, **other)
        assert oracle_metrics(ds, "test", (10,)) is None
        note = capsys.readouterr().err
        assert "no oracle row for dataset again" in note and "prepare the dataset again" in note, note
    assert popularity_metrics(ds, "test", (10,))["users"] == ds.n_users  # the rest of the tables stand


def _cli(*args: str) -> subprocess.CompletedProcess:
    """A real console entry point (``featurestore`` or ``eval``) in a fresh process."""
    module, *rest = args
    return subprocess.run([sys.executable, "-m", module, *rest], capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_a_read_only_raw_folder_is_never_written_and_a_damaged_world_drops_the_row(tmp_path: Path) -> None:
    """dataset info, eval rank and eval compare read the raw folder only (the oracle cache lives
    in the workspace); a cut world.npz leaves the oracle rows out with a note naming it."""
    from click.testing import CliRunner

    from recommend.cli import cli as recommend_cli

    raw, root = tmp_path / "raw", tmp_path / "ws"
    synthesize("hm", raw, users=200, items=60, seed=2, images=False)
    prepare_dataset("hm", raw, root / "datasets" / "demo", name="demo")
    trained = CliRunner().invoke(recommend_cli, ["train", "--root", str(root), "--dataset", "demo", "--mode", "id",
                                                 "--epochs", "1", "--dim", "16", "--blocks", "1", "--device", "cpu",
                                                 "--run-name", "r", "--quiet"])
    assert trained.exit_code == 0, trained.output
    before = _files(raw)
    for path in (raw, *raw.iterdir()):
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        commands = (("featurestore.cli", "dataset", "info", "demo"), ("eval", "rank", "r", "--k", "10"),
                    ("eval", "compare", "r"))
        for command in commands:
            done = _cli(*command, "--root", str(root))
            assert done.returncode == 0, (command, done.stderr)
            assert "oracle" in done.stdout, (command, done.stdout)
        assert _files(raw) == before and (root / "datasets" / "demo" / ORACLE_DIR).is_dir()
        for path in (raw, *raw.iterdir()):
            path.chmod(path.stat().st_mode | 0o200)
        world = raw / "world.npz"
        world.write_bytes(world.read_bytes()[:1000])
        shutil.rmtree(root / "datasets" / "demo" / ORACLE_DIR)
        for command in commands[:2]:
            done = _cli(*command, "--root", str(root), "--json")
            assert done.returncode == 0, (command, done.stderr)
            assert "oracle" not in json.loads(done.stdout), command
            (note,) = [line for line in done.stderr.splitlines() if "oracle" in line]
            assert note.startswith(f"note: no oracle row for dataset demo: {world} is damaged") and "synth" in note
            assert "Traceback" not in done.stderr, done.stderr
    finally:
        for path in (raw, *raw.iterdir()):
            path.chmod(path.stat().st_mode | 0o200)
