"""Issue 26, items 5, 9, 10, 12 and 13: Ctrl-C in tune, numbers checked by click, words and units that fit.

Every numeric option of every CLI carries a range click checks (and shows in --help); NaN and
infinity are refused as numbers; a --space file is checked before the first trial; a SIGINT'd
trial is re-queued with its parameters; tune blames a full disk, not the storage URL.
"""

from __future__ import annotations

import json

import click
import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

import recommend.tune as tune
from eval.cli import cli as eval_cli
from eval.metrics import percent
from featurestore.cli import cli as featurestore_cli
from featurestore.cliutil import UserError
from recommend.cli import cli as recommend_cli
from recommend.trainer import TrainOptions
from recommend.tune import TuneOptions, check_space, run_tune

NUMBERS = (click.types.IntParamType, click.types.FloatParamType)


def _commands(group: click.Group, path: tuple[str, ...]):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_numeric_option_has_a_range_shown_in_help() -> None:
    unranged = [f"{' '.join(path)} {param.opts[0]}"
                for group, prog in ((featurestore_cli, "featurestore"), (recommend_cli, "recommend"), (eval_cli, "eval"))
                for path, command in _commands(group, (prog,)) for param in command.params
                if isinstance(param.type, NUMBERS) and not isinstance(param.type, click.types._NumberRangeBase)]
    assert unranged == []
    help_text = CliRunner().invoke(featurestore_cli, ["adapt", "--help"]).output
    assert "--weight-decay FLOAT RANGE" in help_text and "x>=0" in help_text


@pytest.mark.parametrize("cli,args", [
    (featurestore_cli, ["adapt", "--weight-decay", "-1"]), (featurestore_cli, ["adapt", "--lr", "nan"]),
    (recommend_cli, ["train", "--weight-decay", "nan"]), (recommend_cli, ["train", "--lr", "inf"]),
    (recommend_cli, ["train", "--seed", "-1"]), (recommend_cli, ["tune", "--heartbeat", "0"]),
    (recommend_cli, ["study", "--dim", "0"]), (featurestore_cli, ["dataset", "synth", "--items", "7"]),
])
def test_bad_numbers_are_refused_by_click(cli, args) -> None:
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 2 and "Invalid value for" in out.output, out.output


@pytest.mark.parametrize("space,words", [
    ({"lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "lr needs numbers low <= high"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "lr has log: true, which needs low > 0"),
    ({"weight_decay": {"type": "float", "low": -1.0, "high": 0.1}}, "weight_decay reaches values"),
    ({"dim": {"type": "categorical", "choices": [0, 64]}}, "dim reaches values the option refuses (--dim"),
    ({"dropout": {"type": "float", "low": "a", "high": 0.5}}, "dropout needs numbers"),
])
def test_space_is_checked_before_the_first_trial_naming_the_key(space, words) -> None:
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        check_space(space)


def test_ctrl_c_in_a_trial_requeues_it_with_its_parameters(private_ws, monkeypatch) -> None:
    ws = private_ws("tune-sigint")
    seen = []

    def interrupted(ws, options, **_):
        seen.append(options)
        raise KeyboardInterrupt

    def finished(ws, options, **_):
        seen.append(options)
        return {"status": "completed", "best": {"HR@10": 0.5}, "best_epoch": 1, "message": ""}

    opts = TuneOptions(TrainOptions(dataset="synth", mode="id"), trials=1, study_name="sigint")
    monkeypatch.setattr(tune, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tune(ws, opts, echo=False)
    monkeypatch.setattr(tune, "train", finished)
    result = run_tune(ws, opts, echo=True)
    assert (result["complete"], result["failed"]) == (1, 1)  # as after SIGKILL: the interrupted one, re-queued
    assert seen[1].run_name == seen[0].run_name == "sigint-t0"  # resumes the same run folder ...
    assert seen[1].to_dict() == seen[0].to_dict()  # ... with the same parameters
    states = [t.state for t in optuna.load_study(study_name="sigint", storage=tune.open_storage(ws, None, 60)).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]


def test_tune_prints_percent(private_ws, monkeypatch, capsys) -> None:
    ws = private_ws("tune-percent")
    monkeypatch.setattr(tune, "train", lambda ws, options, **_: {
        "status": "completed", "best": {"HR@10": 0.3469}, "best_epoch": 1, "message": ""})
    out = CliRunner().invoke(recommend_cli, ["tune", "--root", str(ws.root), "--mode", "id", "--trials", "1"])
    assert out.exit_code == 0, out.output
    assert "validation HR@10 34.69%" in out.output and "0.3469" not in out.output
    assert "using dataset synth" in out.output  # --dataset inferred, as its help says


def test_dataset_info_prints_percent_and_its_json_fractions(private_ws) -> None:
    root = str(private_ws("info-percent").root)
    text = CliRunner().invoke(featurestore_cli, ["dataset", "info", "synth", "--root", root])
    baselines = json.loads(CliRunner().invoke(featurestore_cli, ["dataset", "info", "synth", "--root", root,
                                                                 "--json"]).stdout)["baselines"]
    assert text.exit_code == 0 and set(baselines) == {"popularity", "oracle", "oracle_without_links"}
    for row in baselines.values():
        assert 0 < row["HR@10"] < 1  # JSON keeps fractions, as every command's and every saved file
        assert f"test HR@10 {percent(row['HR@10'])}%  NDCG@10 {percent(row['NDCG@10'])}%" in text.stdout
    assert "metrics as fractions" in " ".join(CliRunner().invoke(eval_cli, ["rank", "--help"]).output.split())


def test_full_disk_in_tune_names_the_database_not_the_url(private_ws, monkeypatch) -> None:
    import sqlalchemy.exc

    def full(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(tune, "RDBStorage", full)
    ws = private_ws("tune-full")
    with pytest.raises(UserError) as err:
        tune.open_storage(ws, None, 60)
    assert "no space left" in str(err.value) and "tune.db" in str(err.value) and "--storage" not in str(err.value)


def test_help_texts_say_what_the_commands_do() -> None:
    assert "rank [OPTIONS] [RUN]\n" in CliRunner().invoke(eval_cli, ["rank", "--help"]).output
    study = CliRunner().invoke(recommend_cli, ["study", "--help"]).output
    assert "[default: no warm variants]" in " ".join(study.split())
    out = CliRunner().invoke(recommend_cli, ["study", "--dataset", "x", "--modes", "id,ts"])
    assert isinstance(out.exception, UserError) and "--modes ts need an item encoder" in str(out.exception)
