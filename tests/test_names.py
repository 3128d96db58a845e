"""Every user-supplied name stays inside ROOT: one rule, checked where the name enters.

Each bad name is given to the real command (in-process, the way the console script
runs it): it must exit 2 with one ``error:`` line, and no file may appear anywhere
under the test's folder (the root and its parent), so nothing escaped the root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import pytest

from featurestore.cli import cli as featurestore_cli
from featurestore.cliutil import UserError, run_cli
from featurestore.workspace import NAME_RULES, Workspace, check_name
from recommend.cli import cli as recommend_cli

CONFUSABLE = "d\u0430ta"  # Cyrillic a: looks like "data"
BAD_NAMES = {
    "parent traversal": "../../evil",
    "absolute path": "/tmp/evil",
    "separator": "a b/c",
    "backslash": "a\\b",
    "dot-dot": "..",
    "hidden": ".hidden",
    "empty": "",
    "space": "a b",
    "newline": "a\nb",
    "over-long": "x" * 201,
    "unicode confusable": CONFUSABLE,
    "fullwidth": "\uff48\uff4d",
}


def invoke(group: click.Group, args: list[str], monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``group ARGS`` through run_cli, as the console script runs: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["prog", *map(str, args)])
    try:
        run_cli(group, "prog")
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("kind", sorted(NAME_RULES))
@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_every_kind_refuses_every_bad_name_in_one_line(kind: str, case: str) -> None:
    name = BAD_NAMES[case]
    if case == "over-long":
        name = "x" * (NAME_RULES[kind].max_len + 1)
    with pytest.raises(UserError) as err:
        check_name(kind, name)
    message = str(err.value)
    assert "\n" not in message and f"bad {NAME_RULES[kind].what} name" in message


def test_reasons_name_the_offending_character() -> None:
    with pytest.raises(UserError, match=r"U\+0430.*not an ASCII character"):
        check_name("dataset", CONFUSABLE)
    with pytest.raises(UserError, match="path separator"):
        check_name("dataset", "a/b")
    with pytest.raises(UserError, match="65 characters long, more than 64"):
        check_name("dataset", "x" * 65)
    with pytest.raises(UserError, match="'@' is not allowed"):
        check_name("variant", "a@b")


@pytest.mark.parametrize("kind,name", [("dataset", "HM"), ("dataset", "MIND-small_v1.2"), ("variant", "mlm"),
                                       ("adapted", "demo-minilm-l6-mlm"), ("run", "demo-ts-minilm-l6@top2-ab12cd34"),
                                       ("study", "demo-minilm-l6"), ("dataset", "x" * 64)])
def test_good_names_pass(kind: str, name: str) -> None:
    assert check_name(kind, name) == name


def tiny_raw(folder: Path) -> Path:
    """A generic-format raw folder with 6 users x 5 items: enough to prepare."""
    folder.mkdir(parents=True)
    rows = "".join(f"u{u},i{(u + k) % 8},{k}\n" for u in range(6) for k in range(5))
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp\n" + rows)
    (folder / "items.csv").write_text("item_id,text\n" + "".join(f"i{i},item {i}\n" for i in range(8)))
    return folder


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_prepare_refuses_bad_names_and_writes_nothing(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    raw = tiny_raw(tmp_path / "raw")
    root = tmp_path / "deep" / "er" / "root"
    before = files_under(tmp_path)
    name = f"{tmp_path}/evil" if case == "absolute path" else BAD_NAMES[case]
    code, err = invoke(featurestore_cli, ["dataset", "prepare", "--format", "generic", "--source", raw,
                                          "--name", name, "--root", root], monkeypatch, capsys)
    assert_refused(code, err, "bad dataset name")
    assert files_under(tmp_path) == before


def test_symlink_out_of_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    raw = tiny_raw(tmp_path / "raw")
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    args = ["dataset", "prepare", "--format", "generic", "--source", raw, "--root", root]
    os.symlink(outside, root / "datasets")  # the whole datasets folder leads out
    code, err = invoke(featurestore_cli, [*args, "--name", "ok"], monkeypatch, capsys)
    assert_refused(code, err, "outside the workspace root", "symbolic link")
    assert list(outside.iterdir()) == []
    (root / "datasets").unlink()
    (root / "datasets").mkdir()
    os.symlink(outside, root / "datasets" / "linked")  # one dataset's folder leads out
    code, err = invoke(featurestore_cli, [*args, "--name", "linked"], monkeypatch, capsys)
    assert_refused(code, err, "outside the workspace root")
    assert list(outside.iterdir()) == []
    code, _ = invoke(featurestore_cli, [*args, "--name", "fine"], monkeypatch, capsys)
    assert code == 0 and (root / "datasets" / "fine" / "manifest.json").exists()


@pytest.fixture
def prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Path:
    root = tmp_path / "root"
    code, err = invoke(featurestore_cli, ["dataset", "prepare", "--format", "generic", "--source",
                                          tiny_raw(tmp_path / "raw"), "--name", "tiny", "--root", root],
                       monkeypatch, capsys)
    assert code == 0, err
    return root


ENTRY_POINTS = {
    "train --run-name": (recommend_cli, ["train", "--dataset", "tiny", "--run-name", "{bad}"], "bad run name"),
    "train --dataset": (recommend_cli, ["train", "--dataset", "{bad}"], "bad dataset name"),
    "study --dataset": (recommend_cli, ["study", "--dataset", "{bad}", "--encoder", "minilm-l6", "--modes", "id"],
                        "bad dataset name"),
    "extract --variant": (featurestore_cli, ["extract", "--dataset", "tiny", "--encoder", "minilm-l6",
                                             "--variant", "{bad}"], "bad store variant name"),
    "extract --adapted": (featurestore_cli, ["extract", "--dataset", "tiny", "--encoder", "minilm-l6",
                                             "--adapted", "{bad}"], "bad adapted-encoder name"),
    "adapt --name": (featurestore_cli, ["adapt", "--dataset", "tiny", "--encoder", "minilm-l6", "--objective",
                                        "mlm", "--name", "{bad}"], "bad adapted-encoder name"),
    "dataset info": (featurestore_cli, ["dataset", "info", "{bad}"], "bad dataset name"),
    "store info": (featurestore_cli, ["info", "{bad}/text/minilm-l6"], "bad "),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("bad", ["../../evil", "a b/c", CONFUSABLE])
def test_every_entry_point_refuses_before_writing(entry: str, bad: str, prepared: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    group, args, words = ENTRY_POINTS[entry]
    before = files_under(tmp_path)
    code, err = invoke(group, [a.replace("{bad}", bad) for a in args] + ["--root", prepared], monkeypatch, capsys)
    assert_refused(code, err, words)
    assert files_under(tmp_path) == before


def test_import_refuses_a_group_outside_root(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    array = tmp_path / "rows.npy"
    np.save(array, np.ones((9, 4), dtype=np.float32))
    before = files_under(tmp_path)
    for group in ("../../evil/text/enc", "tiny/text/enc@../x", "tiny/../enc"):
        code, err = invoke(featurestore_cli, ["import", array, "--group", group, "--root", prepared],
                           monkeypatch, capsys)
        assert_refused(code, err, "bad")
    assert files_under(tmp_path) == before


def test_run_folders_by_path_still_resolve(prepared: Path, tmp_path: Path) -> None:
    """``--run PATH`` (a run folder anywhere) is a path, not a name: still accepted for reading."""
    from recommend.run import CONFIG, resolve_run

    folder = tmp_path / "elsewhere" / "some run"
    folder.mkdir(parents=True)
    (folder / CONFIG).write_text("{}")
    assert resolve_run(Workspace(prepared), str(folder)) == folder
