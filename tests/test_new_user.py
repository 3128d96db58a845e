"""What a new user stumbled on (issue 17), each fixed and shown here.

Metrics in one unit (percent, labelled) in every text output while ``--json`` keeps
fractions; one final line from ``recommend train``; plain progress lines when stderr is
not a terminal; Ctrl-C saying what was kept; ``eval rank`` saying that it scored an
unfinished run; ``featurestore encoders`` without ``hub None``; near names suggested;
re-preparing other data under an existing name refused with its dependants listed;
``recommend train --threads``; and one writer per run and per study folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from eval.cli import cli as eval_cli
from featurestore.cli import cli as featurestore_cli
from featurestore.cliutil import INTERRUPTED, UserError, run_cli
from featurestore.progress import PlainProgress, progress_bar
from featurestore.workspace import Workspace
from recommend.cli import cli as recommend_cli
from recommend.run import WRITER_LOCK, writer_lock

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRAIN = ["train", "--dataset", "synth", "--mode", "id", "--dim", "16", "--blocks", "1", "--lr", "1e-3",
         "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(private_ws) -> Workspace:
    ws = private_ws("new_user")
    result = CliRunner().invoke(recommend_cli, [*TRAIN, "--epochs", "2", "--run-name", "r1", "--root", str(ws.root)])
    assert result.exit_code == 0, result.output
    OUTPUT["train"] = result
    return ws


OUTPUT: dict = {}  # what the module's one `recommend train` printed


def test_train_prints_its_result_once_in_percent(trained: Workspace) -> None:
    out = OUTPUT["train"]
    assert (out.stdout + out.stderr).count("finished 2 epochs") == 1, out.stdout + out.stderr
    assert "\r" not in out.stderr  # not a terminal: plain progress lines
    best = json.loads((trained.run_dir("r1") / "best.json").read_text())["metrics"]
    lines = out.stdout.strip().splitlines()  # the result, then at most the popularity warning
    assert lines[0].startswith("run r1 (completed)") and all(l.startswith("warning: ") for l in lines[1:])
    assert f"HR@10 {100 * best['HR@10']:.2f}%" in out.stdout
    assert "best validation" in (trained.run_dir("r1") / "train.log").read_text()  # the log keeps it


def test_runs_and_eval_rank_text_in_percent_json_in_fractions(trained: Workspace) -> None:
    root = ["--root", str(trained.root)]
    runs = json.loads(CliRunner().invoke(recommend_cli, ["runs", *root, "--json"]).stdout)["runs"][0]
    text = CliRunner().invoke(recommend_cli, ["runs", *root]).stdout
    assert "HR@10 (%)" in text and f"{100 * runs['best']['HR@10']:.2f}" in text
    assert 0 <= runs["best"]["HR@10"] <= 1  # --json unchanged: fractions
    ranked = json.loads(CliRunner().invoke(eval_cli, ["rank", "--run", "r1", "--k", "10", *root, "--json"]).stdout)
    text = CliRunner().invoke(eval_cli, ["rank", "--run", "r1", "--k", "10", *root]).stdout
    assert f"HR@10  {100 * ranked['HR@10']:>6.2f}%" in text and "unfinished_run" not in ranked
    table = CliRunner().invoke(eval_cli, ["compare", "r1", *root]).stdout
    assert "HR@10 (%)" in table and f"{100 * ranked['HR@10']:.2f}" in table  # the same unit everywhere


def test_progress_is_plain_lines_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("featurestore.progress.PLAIN_INTERVAL", 0.0)
    stream = io.StringIO()
    with progress_bar(total=300, unit="item", desc="work", file=stream) as bar:
        assert isinstance(bar, PlainProgress)
        for _ in range(3):
            bar.update(100)
    text = stream.getvalue()
    assert "\r" not in text and "\n\n" not in text and text.strip().splitlines()[-1].startswith("work: 100%")
    assert len(text.strip().splitlines()) >= 2


def test_prepare_logs_no_carriage_returns(synth_ws, tmp_path: Path) -> None:
    ws, name = synth_ws
    proc = subprocess.run([sys.executable, "-m", "featurestore.cli", "dataset", "prepare", "--format", "hm",
                           "--source", str(ws.root / "raw" / name), "--name", "p", "--root", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "reading hm interactions" in proc.stderr


def test_ctrl_c_says_what_was_kept(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    @click.command()
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as exit_:
        run_cli(interrupted, "prog")
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {INTERRUPTED}" and "run the same command again to resume" in err[-1]


def test_encoders_never_print_hub_none_and_names_are_suggested() -> None:
    from extract.cli import encoders
    from extract.registry import get_encoder_config
    from recommend.user_encoders import USER_ENCODERS

    assert "None" not in CliRunner().invoke(encoders, []).stdout
    with pytest.raises(UserError, match=r"unknown encoder 'minilm'; did you mean minilm-l6\? known encoders"):
        get_encoder_config("minilm")
    with pytest.raises(UserError, match=r"did you mean sasrec\?"):
        USER_ENCODERS.get("sasrek")


def test_reprepare_from_other_data_is_refused_listing_dependants(trained: Workspace, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from data.synth import synthesize

    ws = Workspace(tmp_path / "root")
    shutil.copytree(trained.root / "datasets", ws.datasets)
    shutil.copytree(trained.run_dir("r1"), ws.run_dir("r1"))
    before = (ws.dataset_dir("synth") / "manifest.json").read_bytes()
    synthesize("hm", tmp_path / "other", users=200, items=60, seed=5, images=False)
    args = ["dataset", "prepare", "--format", "hm", "--source", str(tmp_path / "other"), "--name", "synth",
            "--root", str(ws.root)]
    monkeypatch.setattr(sys, "argv", ["featurestore", *args])
    with pytest.raises(SystemExit) as exit_:
        run_cli(featurestore_cli, "featurestore")
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert exit_.value.code == 2 and err.startswith("error: dataset synth already exists, prepared from other data")
    assert "run r1" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (ws.dataset_dir("synth") / "manifest.json").read_bytes() == before  # kept
    assert not [p for p in ws.datasets.iterdir() if p.name.startswith(".")]  # no temporary left
    assert CliRunner().invoke(featurestore_cli, [*args[:-2], "--root", str(ws.root), "--overwrite"]).exit_code == 0
    assert (ws.dataset_dir("synth") / "manifest.json").read_bytes() != before


def wait_for(condition, seconds: float = 240.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


def test_second_writer_of_a_run_is_refused_and_eval_says_unfinished(private_ws) -> None:
    ws = private_ws("two_writers")
    run = ws.run_dir("shared")
    args = [sys.executable, "-m", "recommend.cli", *TRAIN, "--epochs", "500", "--patience", "500",
            "--run-name", "shared", "--quiet", "--root", str(ws.root)]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    try:
        wait_for(lambda: (run / "model.safetensors").exists() or first.poll() is not None)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(f"error: run shared is being written by pid {first.pid}")
        assert len(second.stderr.strip().splitlines()) == 1
        ranked = CliRunner().invoke(eval_cli, ["rank", "--run", "shared", "--k", "10", "--root", str(ws.root)])
        assert f"note: run shared is still training (pid {first.pid})" in ranked.stdout
        stored = json.loads((run / "eval.json").read_text())
        assert next(iter(stored.values()))["unfinished_run"]["status"] == "training"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    ranked = CliRunner().invoke(eval_cli, ["rank", "--run", "shared", "--k", "10", "--root", str(ws.root), "--json"])
    assert json.loads(ranked.stdout)["unfinished_run"]["status"] == "stopped"
    assert writer_lock(run).live_holder() is None and (run / WRITER_LOCK).exists()  # stale: taken over next time


def test_second_study_on_one_folder_is_refused(private_ws, tmp_path: Path) -> None:
    ws = private_ws("two_studies")
    out = tmp_path / "study"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from featurestore.store import GroupLock; "
        "from recommend.study import LOCK; out = Path(sys.argv[1]); out.mkdir(parents=True); "
        "GroupLock(out / LOCK, str(out), what='study folder').acquire(); print('held', flush=True); time.sleep(120)"),
        str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(recommend_cli, ["study", "--dataset", "synth", "--encoder", "minilm-l6",
                                                    "--modes", "id", "--epochs", "1", "--out", str(out),
                                                    "--root", str(ws.root)])
        assert isinstance(result.exception, UserError)
        assert str(result.exception).startswith(f"study folder {out} is being written by pid {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == ["study.lock"]  # the second study wrote nothing
        assert not ws.runs.exists()
    finally:
        holder.kill()
        holder.wait()
