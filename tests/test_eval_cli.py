"""The ``eval`` CLI end to end: a trained run ranked, exported, compared and plotted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from eval.cli import cli
from eval.metrics import metrics_from_ranks
from featurestore.workspace import Workspace
from recommend.run import load_run

RUN = "e2e-id"


@pytest.fixture(scope="module")
def trained(synth_ws, tmp_path_factory) -> Workspace:
    """A private workspace holding a copy of the synthetic dataset and one trained run."""
    source_ws, name = synth_ws
    ws = Workspace(tmp_path_factory.mktemp("eval_cli"))
    shutil.copytree(source_ws.dataset_dir(name), ws.dataset_dir(name))
    from recommend.cli import cli as recommend_cli

    result = CliRunner().invoke(recommend_cli, [
        "train", "--root", str(ws.root), "--dataset", name, "--mode", "id", "--epochs", "1",
        "--dim", "32", "--blocks", "1", "--device", "cpu", "--run-name", RUN, "--quiet", "--json",
    ])
    assert result.exit_code == 0, result.output
    return ws


def invoke(ws: Workspace, *args: str) -> dict:
    result = CliRunner().invoke(cli, [*args, "--root", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def metrics_from_export(files: dict, ks) -> dict:
    """Plain numpy over the exported arrays: every item scored, excluded ids removed."""
    items, users = np.load(files["items"]), np.load(files["users"])
    targets = np.load(files["targets"])
    indptr, indices = np.load(files["history_indptr"]), np.load(files["history_indices"])
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    ranks = []
    for u, target in enumerate(targets):
        competitors = np.ones(len(items), dtype=bool)
        competitors[[0, *indices[indptr[u] : indptr[u + 1]]]] = False
        competitors[target] = False
        ranks.append(1 + int(np.sum(scores[u, competitors] >= scores[u, target])))
    return metrics_from_ranks(np.array(ranks), ks)


def test_rank_exports_vectors_that_recompute_the_metrics(trained, tmp_path):
    out = invoke(trained, "rank", "--run", RUN, "--full-pool", "--split", "test",
                 "--k", "10,20,50", "--export", str(tmp_path / "export"))
    for key in ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "HR@50", "NDCG@50"):
        assert 0 <= out[key] <= 1
    assert out["users"] > 300 and out["split"] == "test" and out["exclude_history"] is True
    files = out["export"]["files"]
    assert sorted(Path(p).name for p in files.values()) == sorted(
        ["items.npy", "users.npy", "targets.npy", "history_indptr.npy", "history_indices.npy", "ranks.npy"])
    recomputed = metrics_from_export(files, (10, 20, 50))
    assert metrics_from_ranks(np.load(files["ranks"]), (10, 20, 50)) == pytest.approx(recomputed)
    for key, value in recomputed.items():
        assert out[key] == pytest.approx(value), key

    model, config = load_run(trained.run_dir(RUN))
    with torch.no_grad():
        np.testing.assert_allclose(np.load(files["items"]), model.item_vectors().numpy(), rtol=1e-6)
    assert np.load(files["items"]).shape == (config["dataset"]["n_items"] + 1, 32)
    assert len(np.load(files["history_indptr"])) == out["users"] + 1

    stored = json.loads((trained.run_dir(RUN) / "eval.json").read_text())
    entry = stored["test/all/exclude-history/k=10,20,50"]
    assert entry["HR@10"] == out["HR@10"] and entry["exclude_history"] is True
    assert entry["dataset"]["fingerprint"] == config["dataset"]["fingerprint"]


def test_rank_options_are_recorded_side_by_side(trained, tmp_path):
    kept = invoke(trained, "rank", "--run", RUN, "--split", "valid", "--k", "5,10",
                  "--no-exclude-history", "--export", str(tmp_path / "kept"))
    assert kept["exclude_history"] is False and kept["split"] == "valid"
    assert len(np.load(kept["export"]["files"]["history_indices"])) == 0
    recomputed = metrics_from_export(kept["export"]["files"], (5, 10))
    assert kept["NDCG@5"] == pytest.approx(recomputed["NDCG@5"])
    again = invoke(trained, "rank", "--run", RUN, "--split", "valid", "--k", "5,10",
                   "--no-exclude-history", "--batch-size", "7")
    assert again["HR@10"] == kept["HR@10"]  # batching never changes an exact result
    stored = json.loads((trained.run_dir(RUN) / "eval.json").read_text())
    assert "valid/all/keep-history/k=5,10" in stored
    assert len([k for k in stored if k.startswith("valid/all/keep-history")]) == 1


def test_cold_and_warm_subsets_through_the_recommend_alias(trained, synth_ws):
    from recommend.cli import cli as recommend_cli

    counts = {}
    for subset in ("cold", "warm", "all"):
        result = CliRunner().invoke(recommend_cli, [
            "eval", "rank", "--run", RUN, "--subset", subset, "--k", "10",
            "--root", str(trained.root), "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["subset"] == subset
        counts[subset] = out["users"]
    assert counts["cold"] > 0 and counts["cold"] + counts["warm"] == counts["all"]


def test_several_subsets_from_one_ranking_equal_separate_calls(trained):
    single = {s: invoke(trained, "rank", "--run", RUN, "--subset", s, "--k", "5,10") for s in ("warm", "cold", "all")}
    out = invoke(trained, "rank", "--run", RUN, "--subset", "all,warm,cold", "--k", "5,10")
    joint = list(out["subsets"].values())
    assert list(out["subsets"]) == [r["subset"] for r in joint] == ["all", "warm", "cold"]
    # one shape for one subset or several: the first subset's result at the top level, each under "subsets"
    assert {k: v for k, v in out.items() if k != "subsets"} == joint[0]
    assert single["cold"]["subsets"] == {"cold": {k: v for k, v in single["cold"].items() if k != "subsets"}}
    for result in joint:
        alone = single[result["subset"]]
        for key in ("users", "HR@5", "HR@10", "NDCG@5", "NDCG@10"):
            assert result[key] == alone[key], (result["subset"], key)
        assert result["popularity"]["HR@10"] == alone["popularity"]["HR@10"]
    for bad, says in ((["--subset", "all,lukewarm"], "lukewarm"), (["--subset", "all,cold", "--export", "x"], "--export")):
        proc = subprocess.run([sys.executable, "-m", "eval", "rank", "--run", RUN, *bad, "--root", str(trained.root)],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and says in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_eval_rank_works_as_typed_in_bash(trained):
    """bash's builtin ``eval`` runs ``rank ...``: the ``rank`` console script must be that command."""
    scripts = Path(sys.executable).parent
    assert (scripts / "rank").exists(), "no rank console script; run `pip install -e . --no-deps`"
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
    shown = subprocess.run(["bash", "-c", "eval rank --help"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "Usage: eval rank [OPTIONS] [RUN]" in shown.stdout, shown.stderr
    ranked = subprocess.run(["bash", "-c", f"eval rank --full-pool --run {RUN} --k 10 --root '{trained.root}'"],
                            env=env, capture_output=True, text=True)
    assert ranked.returncode == 0, ranked.stderr
    assert f"run {RUN}: test split" in ranked.stdout and "HR@10" in ranked.stdout


def test_changed_dataset_and_missing_run_are_refused(trained, tmp_path):
    ws = Workspace(tmp_path)
    shutil.copytree(trained.root / "datasets", ws.datasets)
    shutil.copytree(trained.run_dir(RUN), ws.run_dir(RUN))
    config = json.loads((ws.run_dir(RUN) / "config.json").read_text())
    config["dataset"]["fingerprint"] = "0000000000000000"
    (ws.run_dir(RUN) / "config.json").write_text(json.dumps(config))
    for run, says in ((RUN, "fingerprint"), ("no-such-run", "no run")):
        proc = subprocess.run([sys.executable, "-m", "eval", "rank", "--run", run, "--root", str(ws.root)],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and says in last


def test_plot_items_writes_png(trained, tmp_path):
    for method in ("pca", "tsne"):
        out = invoke(trained, "plot-items", "--run", RUN, "--out", str(tmp_path / f"{method}.png"),
                     "--method", method)
        with Image.open(out["plot"]) as image:
            assert image.format == "PNG" and image.size[0] > 300
        assert out["items"] == json.loads(
            (trained.run_dir(RUN) / "config.json").read_text())["dataset"]["n_items"]


def write_run(root: Path, name: str, mode: str, layers: int | None, encoder: str | None,
              seconds: list[float], best_hr: float, test_hr: float | None = None) -> None:
    """A run folder by hand, in the layout the trainer writes."""
    run = Workspace(root).run_dir(name)
    run.mkdir(parents=True)
    tower = {"name": mode, **({"layers": layers} if layers is not None else {})}
    features = [{"group": f"HM/image/{encoder}", "fingerprint": "f", "dim": 768,
                 "provenance": {"encoder": encoder.split("@")[0]}}] if encoder else []
    config = {"dataset": {"name": "HM", "fingerprint": "f"}, "features": features,
              "model": {"item_tower": tower}, "cost": {"trainable_params": 1000 * (1 + (layers or 0)),
                                                      "total_params": 50_000}}
    (run / "config.json").write_text(json.dumps(config))
    lines = [json.dumps({"epoch": i + 1, "seconds": s, "peak_rss_mb": 500.0 + i, "peak_gpu_mb": None,
                         "valid": {"HR@10": best_hr}}) for i, s in enumerate(seconds)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "best.json").write_text(json.dumps({"epoch": 2, "metrics": {"HR@10": best_hr, "NDCG@10": best_hr / 2}}))
    if test_hr is not None:
        (run / "eval.json").write_text(json.dumps({
            "test/all/keep-history/k=10": {"HR@10": 0.01, "NDCG@10": 0.005, "split": "test",
                                           "subset": "all", "exclude_history": False, "users": 9},
            "test/all/exclude-history/k=10": {"HR@10": test_hr, "NDCG@10": test_hr / 3, "split": "test",
                                              "subset": "all", "exclude_history": True, "users": 9},
            "valid/all/exclude-history/k=10": {"HR@10": 0.9, "split": "valid", "subset": "all",
                                               "exclude_history": True}}))


def test_compare_hand_written_runs(tmp_path):
    write_run(tmp_path, "idrec", "id", None, None, [10.0, 14.0], 0.0684, test_hr=0.0700)
    write_run(tmp_path, "ts", "ts", None, "swin-t", [4.0, 4.0], 0.0345)
    write_run(tmp_path, "dnn2", "ts-dnn", 2, "swin-t", [5.0], 0.0450)
    write_run(tmp_path, "dnn8", "ts-dnn", 8, "swin-t", [6.0, 8.0, 7.0], 0.0555, test_hr=0.0560)
    write_run(tmp_path, "dnn8-mae", "ts-dnn", 8, "swin-t@mae", [6.0], 0.0600)
    ws = Workspace(tmp_path)
    report, plot = tmp_path / "report.md", tmp_path / "report.png"
    out = invoke(ws, "compare", "idrec", "ts", "dnn2", str(ws.run_dir("dnn8")), "dnn8-mae",
                 "--out", str(report), "--plot", str(plot))
    rows = {r["name"]: r for r in out["runs"]}
    assert rows["dnn8"]["layers"] == 8 and rows["dnn8"]["encoder"] == "swin-t"
    assert rows["dnn8-mae"]["encoder"] == "swin-t@mae"  # a domain-adapted variant stays told apart
    assert rows["dnn8"]["sec_per_epoch"] == pytest.approx(7.0)
    assert rows["dnn8"]["peak_rss_mb"] == pytest.approx(502.0)
    assert rows["idrec"]["metrics"]["HR@10"] == 0.0700  # test result, history excluded
    assert rows["idrec"]["source"] == "test (history excluded)"
    assert rows["ts"]["metrics"]["HR@10"] == 0.0345 and rows["ts"]["source"] == "valid (best epoch 2)"

    table = report.read_text().splitlines()
    assert table[0].startswith("| run | mode | encoder | layers | trainable params")
    line = next(row for row in table if row.startswith("| dnn8 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:7] == ["dnn8", "ts-dnn", "swin-t", "8", "9,000", "50,000", "7.0"]
    assert "5.60" in cells and "1.87" in cells  # HR@10 and NDCG@10 in percent
    assert next(row for row in table if row.startswith("| ts ")).count("valid (best epoch 2)") == 1
    with Image.open(plot) as image:
        assert image.format == "PNG"

    result = CliRunner().invoke(cli, ["compare", "missing-run", "--root", str(tmp_path)])
    assert result.exit_code != 0


def test_record_result_replaces_same_options_and_sets_a_broken_file_aside(tmp_path):
    from eval.cli import record_result

    (tmp_path / "eval.json").write_text("{cut short")
    first = {"split": "test", "subset": "all", "exclude_history": True, "ks": [10], "HR@10": 0.5}
    record_result(tmp_path, first)
    record_result(tmp_path, {**first, "HR@10": 0.25})
    record_result(tmp_path, {**first, "subset": "cold"})
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert stored["test/all/exclude-history/k=10"]["HR@10"] == 0.25 and len(stored) == 2
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("eval.json.unreadable")]
    assert len(aside) == 1 and aside[0].read_text() == "{cut short"
