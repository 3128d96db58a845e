"""Pruning respects the popularity plateau: a trial is compared, never cut, while it still sits there."""

from __future__ import annotations

import json

import optuna

from recommend.trainer import TrainOptions, train
from recommend.tune import PlateauAwarePruning


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_the_pruner_is_asked_only_after_the_plateau(synth_ws):
    trial = optuna.create_study(direction="maximize", pruner=AlwaysPrune()).ask()
    pruning = PlateauAwarePruning(trial)
    assert not pruning.on_epoch_end(1, {"valid": {"HR@10": 0.05}, "left_plateau": False})
    assert pruning.on_epoch_end(2, {"valid": {"HR@10": 0.30}, "left_plateau": True})
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.05, 2: 0.30}  # both reported


def test_each_epoch_records_whether_it_left_the_plateau(synth_ws):
    ws, name = synth_ws
    result = train(ws, TrainOptions(dataset=name, mode="id", dim=16, epochs=2, lr=1e-3, device="cpu",
                                    run_name="plateau-flag"), progress=False, echo=False)
    records = [json.loads(line) for line in (ws.run_dir(result["run"]) / "metrics.jsonl").read_text().splitlines()]
    popularity = result["popularity"]["HR@10"]
    best = 0.0
    for record in records:
        best = max(best, record["valid"]["HR@10"])
        assert record["left_plateau"] == (best >= 1.1 * popularity)
