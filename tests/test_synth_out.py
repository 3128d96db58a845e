"""``featurestore dataset synth --out DIR`` never writes over files it did not write, and never
leaves an earlier generation's pictures beside the new ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from data.cli import dataset
from featurestore.errors import UserError


def synth(root: Path, out: Path, *args: str):
    return CliRunner().invoke(dataset, ["synth", "--format", "hm", "--out", str(out), "--root", str(root),
                                        "--json", *args])


def pictures(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.jpg")}


def test_files_it_did_not_write_are_refused_by_the_real_command(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "articles.csv").write_text("my own catalogue\n")
    (out / "notes.txt").write_text("keep me\n")
    proc = subprocess.run([sys.executable, "-m", "featurestore.cli", "dataset", "synth", "--format", "hm", "--out",
                           str(out), "--users", "30", "--items", "40", "--root", str(tmp_path / "ws")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"error: --out {out} holds files `dataset synth` did not write (articles.csv, notes.txt); "
                    "choose an empty folder, or pass --overwrite to delete everything in it first")
    assert (out / "articles.csv").read_text() == "my own catalogue\n" and sorted(p.name for p in out.iterdir()) == [
        "articles.csv", "notes.txt"]


def test_a_new_generation_replaces_its_own_earlier_one_entirely(tmp_path):
    root, out = tmp_path / "ws", tmp_path / "raw"
    first = synth(root, out, "--users", "30", "--items", "64", "--seed", "1")
    assert first.exit_code == 0, first.output
    before = pictures(out)
    second = synth(root, out, "--users", "30", "--items", "40", "--seed", "2")
    assert second.exit_code == 0, second.output
    summary = json.loads(second.stdout)
    after = pictures(out)
    assert len(after) == summary["images"] and len(before) > len(after)  # no picture of the first left
    articles = (out / "articles.csv").read_text()
    assert all(Path(name).stem in articles for name in after)


def test_a_changed_file_or_failed_generation_keeps_the_folder(tmp_path):
    root, out = tmp_path / "ws", tmp_path / "raw"
    assert synth(root, out, "--users", "30", "--items", "40").exit_code == 0
    (out / "articles.csv").write_text("edited by hand\n")
    refused = synth(root, out, "--users", "30", "--items", "40")
    assert isinstance(refused.exception, UserError) and "(articles.csv)" in str(refused.exception)
    failed = synth(root, out, "--users", "30", "--items", "10", "--clusters", "6", "--overwrite")  # generation fails
    assert isinstance(failed.exception, UserError) and "need at least" in str(failed.exception)
    assert (out / "articles.csv").read_text() == "edited by hand\n" and pictures(out)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no leftover temporary folder


def test_overwrite_replaces_everything_and_the_workspace_is_never_emptied(tmp_path):
    root, out = tmp_path / "ws", tmp_path / "raw"
    (out / "images" / "old").mkdir(parents=True)
    (out / "images" / "old" / "x.jpg").write_bytes(b"not ours")
    done = synth(root, out, "--users", "30", "--items", "40", "--overwrite")
    assert done.exit_code == 0, done.output
    assert "images/old/x.jpg" not in pictures(out) and len(pictures(out)) == json.loads(done.stdout)["images"]
    (root / "datasets").mkdir(parents=True)
    holding = synth(root, tmp_path, "--users", "30", "--items", "40", "--overwrite")
    assert isinstance(holding.exception, UserError) and "holds the workspace" in str(holding.exception)
    assert (root / "datasets").is_dir()
