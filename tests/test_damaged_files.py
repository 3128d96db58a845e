"""Damaged files (issue 26, items 4 and 6, and the fuzz test of its "Done when").

Every file of a run folder, of a store group and of a raw folder is damaged in turn (emptied, cut
in half, replaced by random bytes) and every command that reads it is run through ``run_cli``, as
a user would: each ends with exit 0 and the undamaged result, or exit 2 and one ``error:`` line
naming a file; never a traceback. Listing commands mark the damaged entry and go on; removal works.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from eval.cli import cli as eval_cli
from featurestore.cli import cli as featurestore_cli
from featurestore.cliutil import run_cli
from featurestore.workspace import Workspace
from recommend.cli import cli as recommend_cli

pytestmark = pytest.mark.usefixtures("one_thread")
GROUP = "synth/text/clip-tiny-text"
TRAIN = ["train", "--dataset", "synth", "--mode", "ts", "--dim", "16", "--blocks", "1", "--heads", "1",
         "--device", "cpu", "--threads", "1", "--quiet"]
DAMAGES = ("empty", "cut", "random")


def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "cut": data[: len(data) // 2],
                      "random": os.urandom(max(len(data), 64))}[kind])


def cli(group, prog: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a CLI as its console script does (``run_cli``): a traceback fails the test."""
    monkeypatch.setattr(sys, "argv", [prog, *args])
    with pytest.raises(SystemExit) as exit_:
        run_cli(group, prog)
        sys.exit(0)
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def refused(code: int, err: str, *names: str) -> bool:
    """Exit 2 with one ``error:`` line naming one of ``names`` (after any progress lines)."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    return code == 2 and len(errors) == 1 and any(n in errors[0] for n in names) and "Traceback" not in err


@pytest.fixture(scope="module")
def trained(private_ws, synth_ws, tmp_path_factory) -> Workspace:
    """A store group and one finished TS run, with the raw folder copied in, and a backup of all."""
    ws = private_ws("damaged")
    shutil.copytree(synth_ws[0].root / "raw", ws.root / "raw")
    mp = pytest.MonkeyPatch()
    for args in (["extract", "--dataset", "synth", "--encoder", "clip-tiny-text", "--random-init"],):
        mp.setattr(sys, "argv", ["featurestore", *args, "--root", str(ws.root)])
        with pytest.raises(SystemExit) as exit_:
            run_cli(featurestore_cli, "featurestore")
            sys.exit(0)
        assert not exit_.value.code
    mp.setattr(sys, "argv", ["recommend", *TRAIN, "--epochs", "1", "--run-name", "r1", "--root", str(ws.root)])
    with pytest.raises(SystemExit) as exit_:
        run_cli(recommend_cli, "recommend")
        sys.exit(0)
    assert not exit_.value.code
    mp.undo()
    backup = tmp_path_factory.mktemp("damaged_backup")
    shutil.copytree(ws.root, backup / "root")
    return ws


@pytest.fixture()
def root(trained: Workspace, tmp_path: Path) -> Workspace:
    """A fresh copy of the trained root for one test, with the raw paths of the dataset intact."""
    ws = Workspace(tmp_path / "root")
    shutil.copytree(trained.root, ws.root)
    return ws


def rank_json(ws: Workspace, monkeypatch, capsys, *run: str) -> tuple[int, dict | None, str]:
    code, out, err = cli(eval_cli, "eval", ["rank", *run, "--k", "10", "--root", str(ws.root), "--json"],
                         monkeypatch, capsys)
    return code, (json.loads(out) if code == 0 else None), err


def metrics(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith(("HR@", "NDCG@"))}


# -- item 4: run folders -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_checkpoint_is_named_in_rank_and_init_from(root, kind, monkeypatch, capsys) -> None:
    damage(root.run_dir("r1") / "model.safetensors", kind)
    code, _, err = rank_json(root, monkeypatch, capsys, "r1")
    assert refused(code, err, "model.safetensors is damaged") and "recommend train --config" in err, err
    code, _, err = cli(recommend_cli, "recommend", [*TRAIN, "--epochs", "1", "--run-name", "r2", "--init-from", "r1",
                                                     "--root", str(root.root)], monkeypatch, capsys)
    assert refused(code, err, "model.safetensors is damaged"), err
    assert not root.run_dir("r2").exists()  # refused before a folder was made


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_resumable_state_is_named_on_resume(root, kind, monkeypatch, capsys) -> None:
    run = root.run_dir("r1")
    (run / "best.json").write_text(json.dumps({**json.loads((run / "best.json").read_text()),
                                               "status": "interrupted"}))
    shutil.copy(run / "model.safetensors", run / "last.safetensors")
    damage(run / "last.safetensors", kind)
    code, _, err = cli(recommend_cli, "recommend", [*TRAIN, "--epochs", "1", "--run-name", "r1",
                                                     "--root", str(root.root)], monkeypatch, capsys)
    assert refused(code, err, "last.safetensors is damaged") and "delete it" in err, err


def test_runs_marks_a_damaged_folder_and_rank_skips_it(root, monkeypatch, capsys) -> None:
    shutil.copytree(root.run_dir("r1"), root.run_dir("r0"))
    (root.run_dir("r0") / "best.json").touch()  # r0 finished after r1 ...
    damage(root.run_dir("r0") / "config.json", "cut")  # ... but is damaged
    code, out, _ = cli(recommend_cli, "recommend", ["runs", "--root", str(root.root)], monkeypatch, capsys)
    assert code == 0 and "r1 " in out and "r0 " in out and "damaged: " in out and "config.json" in out
    code, out, _ = cli(recommend_cli, "recommend", ["runs", "--root", str(root.root), "--json"], monkeypatch, capsys)
    assert {r["run"]: r["status"] for r in json.loads(out)["runs"]} == {"r0": "damaged", "r1": "completed"}
    code, result, err = rank_json(root, monkeypatch, capsys)
    assert code == 0 and result["run"] == "r1" and "skipped damaged r0" in err, err


# -- item 6: store groups ------------------------------------------------------------------------------

def test_cut_group_metadata_is_listed_named_and_removable(root, monkeypatch, capsys) -> None:
    damage(root.store / GROUP / "zarr.json", "cut")
    code, out, _ = cli(featurestore_cli, "featurestore", ["ls", "--root", str(root.root)], monkeypatch, capsys)
    assert code == 0 and f"{GROUP}" in out and "damaged: " in out and "featurestore rm" in out
    for args in (["info", GROUP], ["verify", GROUP]):
        code, _, err = cli(featurestore_cli, "featurestore", [*args, "--root", str(root.root)], monkeypatch, capsys)
        assert refused(code, err, f"{GROUP}/zarr.json is damaged"), err
    code, _, err = cli(recommend_cli, "recommend", [*TRAIN, "--encoder", "clip-tiny-text", "--epochs", "1",
                                                     "--run-name", "r3", "--root", str(root.root)], monkeypatch, capsys)
    assert refused(code, err, f"{GROUP}/zarr.json is damaged"), err
    code, out, _ = cli(featurestore_cli, "featurestore", ["rm", GROUP, "--root", str(root.root)], monkeypatch, capsys)
    assert code == 0 and not (root.store / GROUP).exists()


# -- the fuzz test: every file, every damage, every reading command ------------------------------------

def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (one image of a raw folder stands for all)."""
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    images = [f for f in found if f.endswith(".jpg")]
    return [f for f in found if not f.endswith(".jpg")] + images[:1]


def _reading_commands(ws: Workspace, place: str) -> list[tuple]:
    """The commands that read files of ``place`` (a run folder, the store group, the raw folder)."""
    root = ["--root", str(ws.root)]
    rank = (eval_cli, "eval", ["rank", "r1", "--k", "10", *root, "--json"])
    return {"run": [(recommend_cli, "recommend", ["runs", *root]), rank,
                    (eval_cli, "eval", ["rank", "--k", "10", *root, "--json"]),
                    (eval_cli, "eval", ["compare", "r1", *root])],
            "store": [(featurestore_cli, "featurestore", ["ls", *root]),
                      (featurestore_cli, "featurestore", ["info", GROUP, *root]),
                      (featurestore_cli, "featurestore", ["verify", GROUP, "--sample", "4", *root]), rank],
            "raw": [(featurestore_cli, "featurestore", ["dataset", "info", "synth", *root]), rank]}[place]


FUZZED = ([("run", f) for f in ("config.json", "model.safetensors", "best.json", "metrics.jsonl", "train.log")]
          + [("store", f) for f in ("zarr.json", "embeddings/zarr.json", "embeddings/c/0/0", "present/zarr.json",
                                    "present/c/0", "chunks_done/c/0", "flat/zarr.json", "flat/c/0/0")]
          + [("raw", f) for f in ("articles.csv", "transactions_train.csv", "world.npz", "truth.json", "image")])


@pytest.mark.parametrize("place,file", FUZZED)
def test_fuzz_damaged_file(trained, root, place, file, monkeypatch, capsys) -> None:
    base = {"run": root.run_dir("r1"), "store": root.store / GROUP, "raw": root.root / "raw" / "synth"}[place]
    if file == "image":
        file = _files(base)[-1]
    code, expected, _ = rank_json(root, monkeypatch, capsys, "r1")
    assert code == 0
    pristine = root.root.parent / "pristine"
    shutil.copytree(root.root, pristine)
    for kind in DAMAGES:
        shutil.rmtree(root.root)
        shutil.copytree(pristine, root.root)
        damage(base / file, kind)
        for group, prog, args in _reading_commands(root, place):
            code, out, err = cli(group, prog, args, monkeypatch, capsys)
            where = f"{prog} {args[0]} over {place} {file} ({kind}): {err[-400:]}"
            assert code in (0, 2) and "Traceback" not in err, where
            if code == 2:
                assert refused(code, err, file.split("/")[-1], GROUP, str(base)), where
            elif args[0] == "rank":  # ranked anyway: the same numbers, never silently other ones
                assert metrics(json.loads(out)) == metrics(expected), where
        if place == "store":
            code, _, err = cli(featurestore_cli, "featurestore", ["rm", GROUP, "--root", str(root.root)],
                               monkeypatch, capsys)
            assert code == 0 and not (root.store / GROUP).exists(), err
