"""``recommend study --tune 2 --seeds 2`` end to end on the session's tiny synthetic dataset.

Two cheap modes are tuned (id, ts-dnn1), ts is left untuned and borrows TS-DNN's lr; each
row is retrained with two seeds. The checks read what the study wrote against Optuna's own
database and the runs' own eval.json files.
"""

from __future__ import annotations

import json
import statistics

import optuna
import pytest
from click.testing import CliRunner

from recommend.cli import cli
from recommend.study_tune import plot_validation
from recommend.tune import open_storage

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--dataset", "synth", "--encoder", "bert-tiny", "--random-init", "--layers", "1", "--modes", "id,ts,ts-dnn",
        "--tune", "2", "--tune-modes", "id,ts-dnn", "--seeds", "2", "--epochs", "2", "--dim", "16",
        "--batch-size", "128", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def studied(private_ws):
    ws = private_ws("study-tune")
    out = CliRunner().invoke(cli, ["study", "--root", str(ws.root), *ARGS, "--json"])
    assert out.exit_code == 0, out.output
    return ws, json.loads(out.output)


def _test_metrics(run_dir) -> dict:
    (entry,) = [e for e in json.loads((run_dir / "eval.json").read_text()).values() if e["subset"] == "all"]
    assert entry["split"] == "test" and entry["exclude_history"]
    return entry


def test_tuned_rows_use_the_best_trial_and_untuned_rows_say_where_their_lr_came_from(studied):
    ws, result = studied
    rows = {c["label"]: c for c in result["configurations"]}
    assert list(rows) == ["id", "ts", "ts-dnn1"]
    assert {k: r["tuned"] for k, r in rows.items()} == {"id": True, "ts": False, "ts-dnn1": True}
    storage = open_storage(ws, None, 60)
    for label in ("id", "ts-dnn1"):
        study = optuna.load_study(study_name=rows[label]["tune_study"], storage=storage)
        assert len(study.trials) == 2
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert rows[label]["params"] == max(done, key=lambda t: t.value).params
        chosen = max(done, key=lambda t: t.value).user_attrs["run"]
        assert rows[label]["run"] == rows[label]["seeds"][0]["run"] == chosen  # reused, not trained again
        assert rows[label]["seeds"][0]["status"] == "finished earlier"
        for trial in study.trials:  # the search saw validation only; test ranks the chosen one
            assert (ws.run_dir(trial.user_attrs["run"]) / "eval.json").exists() == (trial.user_attrs["run"] == chosen)
    assert rows["ts"]["params"] is None
    assert rows["ts"]["borrowed"] == {"from": "ts-dnn1", "lr": rows["ts-dnn1"]["params"]["lr"]}
    for row in rows.values():  # every seed's run trained with the row's stated settings
        assert [s["seed"] for s in row["seeds"]] == [42, 43]
        for s in row["seeds"]:
            options = json.loads((ws.run_dir(s["run"]) / "config.json").read_text())["options"]
            assert {k: options[k] for k in row["hyperparameters"]} == row["hyperparameters"]
            assert options["seed"] == s["seed"]
            if row["params"]:
                assert {k: options[k] for k in row["params"]} == row["params"]
    assert rows["ts"]["hyperparameters"]["lr"] == rows["ts-dnn1"]["params"]["lr"]
    assert rows["ts"]["hyperparameters"]["weight_decay"] == 0.1  # the default, untouched


def test_mean_and_sd_are_those_of_the_seeds_runs(studied):
    ws, result = studied
    for row in result["configurations"]:
        runs = [s["run"] for s in row["seeds"]]
        assert len(set(runs)) == 2 and runs[0] == row["run"]
        per_seed = [_test_metrics(ws.run_dir(run)) for run in runs]
        for metric in ("HR@10", "NDCG@10"):
            values = [m[metric] for m in per_seed]
            assert row["test"][metric] == pytest.approx(statistics.fmean(values))
            assert row["sd"][metric] == pytest.approx(statistics.stdev(values))


def test_report_states_settings_tuned_flag_and_curves_below_popularity(studied):
    ws, result = studied
    report = (ws.studies / "synth-bert-tiny" / "report.md").read_text()
    assert "## Hyper-parameters and seeds" in report and "Tuned: modes id,ts-dnn, 2 Optuna trials" in report
    popularity = result["popularity"]["HR@10"]
    for row in result["configurations"]:
        h = row["hyperparameters"]
        line = next(l for l in report.splitlines() if l.startswith(f"| {row['label']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == ("yes" if row["tuned"] else "no")
        assert float(cells[2]) == pytest.approx(h["lr"], rel=1e-2) and int(cells[5]) == h["dim"]
        assert cells[6] == ("ts-dnn1" if row["label"] == "ts" else "-")
        assert cells[7] == f"{100 * row['test']['HR@10']:.2f} ± {100 * row['sd']['HR@10']:.2f}"
        below = row["test"]["HR@10"] < popularity
        assert (row["curve"] is not None) == below
        if below:
            assert f"[below popularity]({row['curve']})" in cells[10]
            assert (ws.studies / "synth-bert-tiny" / row["curve"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_curve_png(studied, tmp_path):
    ws, result = studied
    runs = [ws.run_dir(s["run"]) for s in result["configurations"][0]["seeds"]]
    path = plot_validation(runs, result["popularity"]["HR@10"], tmp_path / "curve.png", "id")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_trains_nothing_and_bad_options_fail(studied):
    ws, first = studied
    runs = sorted(p.name for p in ws.runs.iterdir())
    out = CliRunner().invoke(cli, ["study", "--root", str(ws.root), *ARGS, "--json"])
    assert out.exit_code == 0, out.output
    again = json.loads(out.output)
    assert [c["status"] for c in again["configurations"]] == ["finished earlier"] * 3
    assert [c["test"] for c in again["configurations"]] == [c["test"] for c in first["configurations"]]
    assert sorted(p.name for p in ws.runs.iterdir()) == runs
    bad = CliRunner().invoke(cli, ["study", "--root", str(ws.root), *ARGS, "--tune-modes", "bert"])
    assert bad.exit_code != 0 and "--tune-modes bert" in str(bad.exception)


def test_a_row_below_popularity_gets_its_curve_linked(studied, tmp_path):
    """Whatever the tiny runs reached: a row scored below popularity is drawn and linked."""
    from recommend.study import Configuration, StudyOptions, _draw_curves, _settings_section
    from recommend.trainer import TrainOptions

    ws, result = studied
    row = result["configurations"][0]
    config = Configuration(row["label"], row["mode"], options=TrainOptions(dataset="synth", **row["hyperparameters"]),
                           run=row["run"], seeds=row["seeds"], test={"HR@10": 0.0, "NDCG@10": 0.0},
                           sd={"HR@10": 0.0, "NDCG@10": 0.0})
    above = Configuration("above", "id", options=config.options, run=row["run"], seeds=row["seeds"],
                          test={"HR@10": 1.0, "NDCG@10": 1.0})
    _draw_curves(ws, [config, above], result["popularity"], tmp_path)
    assert config.curve == f"valid-{row['label']}.png" and above.curve is None
    assert (tmp_path / config.curve).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = _settings_section(StudyOptions(dataset="synth", encoder="bert-tiny", seeds=2), [config, above])
    assert any(l.startswith(f"| {row['label']} |") and l.endswith(f"| [below popularity]({config.curve}) |")
               for l in lines)
    assert any(l.startswith("| above |") and l.endswith("| - |") for l in lines)
