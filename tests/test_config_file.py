"""``--config FILE`` (YAML or JSON) through click's default_map: the file sets, the command line wins."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from featurestore.configfile import config_option
from recommend.cli import cli as recommend_cli
from recommend.cli import study_command

pytestmark = pytest.mark.usefixtures("one_thread")


@click.command()
@click.option("--batch-size", type=int, default=64)
@click.option("--mode", type=click.Choice(["id", "ts"]), default="id")
@click.option("--cached/--live", default=False)
@click.option("--encoder", default=None)
@config_option
def probe(**options) -> None:
    click.echo(json.dumps(options))


def run_probe(*args: str):
    return CliRunner().invoke(probe, list(args))


def test_yaml_keys_are_option_names_and_the_command_line_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch-size: 8\nmode: ts\n--cached: true\nencoder: [minilm-l6, efficientnet-lite0]\n")
    assert json.loads(run_probe("--config", str(path)).output) == {
        "batch_size": 8, "mode": "ts", "cached": True, "encoder": "minilm-l6,efficientnet-lite0"}
    # the command line overrides, wherever --config stands
    out = json.loads(run_probe("--batch-size", "2", "--config", str(path), "--live").output)
    assert (out["batch_size"], out["cached"], out["mode"]) == (2, False, "ts")


def test_json_file_and_its_values_pass_the_options_own_checks(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch_size": 4}))
    assert json.loads(run_probe("--config", str(path)).output)["batch_size"] == 4
    path.write_text(json.dumps({"mode": "tss"}))
    result = run_probe("--config", str(path))
    assert result.exit_code == 2 and "'tss' is not one of 'id', 'ts'" in result.output


def test_unknown_keys_and_bad_files_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch-sise: 8\n")
    result = run_probe("--config", str(path))
    assert "unknown option 'batch-sise' (did you mean 'batch-size'?)" in str(result.exception)
    path.write_text("- a\n- b\n")
    assert "expected a mapping" in str(run_probe("--config", str(path)).exception)
    path.write_text("mode: [unclosed\n")
    assert "not valid YAML" in str(run_probe("--config", str(path)).exception)


def test_study_reads_its_options_from_a_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("dataset: demo\nencoder: minilm-l6\nlayers: [2, 8]\nmodes: id,ts\nlive: true\n")
    ctx = study_command.make_context("study", ["--config", str(path), "--epochs", "3"])
    params = ctx.params
    assert (params["dataset"], params["encoder"], params["layers"], params["modes"]) == ("demo", "minilm-l6",
                                                                                         "2,8", "id,ts")
    assert (params["cached"], params["epochs"]) == (False, 3)


def test_a_runs_config_json_reruns_it_with_one_change(private_ws):
    ws = private_ws("config_rerun")
    settings = ws.root / "first.yaml"
    settings.write_text("dataset: synth\nmode: id\ndim: 16\nblocks: 1\nepochs: 1\ndevice: cpu\nrun-name: first\n")
    common = ["--root", str(ws.root), "--quiet", "--json"]
    first = CliRunner().invoke(recommend_cli, ["train", "--config", str(settings), "--lr", "0.002", *common])
    assert first.exit_code == 0, first.output
    original = json.loads((ws.run_dir("first") / "config.json").read_text())
    assert (original["options"]["dim"], original["options"]["lr"]) == (16, 0.002)
    again = CliRunner().invoke(recommend_cli, ["train", "--config", str(ws.run_dir("first") / "config.json"),
                                               "--seed", "2", "--run-name", "second", *common])
    assert again.exit_code == 0, again.output
    rerun = json.loads((ws.run_dir("second") / "config.json").read_text())["options"]
    changed = {k for k in rerun if rerun[k] != original["options"][k]}
    assert changed == {"seed", "run_name"} and rerun["seed"] == 2


def test_tune_reads_train_and_its_own_options_from_a_file(tmp_path):
    from recommend.cli import cli as recommend_cli

    path = tmp_path / "tune.yaml"
    path.write_text("dataset: demo\nmode: ts-dnn\nencoder: minilm-l6\ntrials: 7\nepochs: 3\n")
    ctx = recommend_cli.commands["tune"].make_context("tune", ["--config", str(path), "--trials", "9"])
    params = ctx.params
    assert (params["dataset"], params["mode"], params["encoder"], params["epochs"], params["trials"]) == (
        "demo", "ts-dnn", "minilm-l6", 3, 9)
