"""``recommend study --live-start ts|cold``: how the study's live rows (e2e, adapter) start, and what they did.

Trained from scratch within a CPU study's budget, E2E and adapters end far below TS (README
main job: 7.9 % and 4.5 % HR@10 after 5 capped epochs, TS 49 %): rows that say nothing about
E2E. Started from the study's own TS row instead (``--init-from``: the DT layer and the user
encoder where TS ended, :func:`recommend.transfer.warm_start`), a live row begins at TS's
validation and its epochs are spent on what only it can learn: tuning the encoder (e2e) or
its adapters, at a tenth of the study's learning rates (:data:`WARM_LR_FACTOR`: fine-tuning a
converged model at the rate that trained it from scratch undid a third of its accuracy in one
epoch). ``cold`` keeps the papers' from-scratch comparison and rates.

The report's section on these rows gives, per row, how it started, the catalogue softmax it
trained with, its validation curve, and whether E2E beat the best TS-DNN row on test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from featurestore.workspace import Workspace
from recommend.catalogue_cache import refresh_schedule
from recommend.item_towers import ITEM_TOWERS
from recommend.run import BEST, CONFIG, read_metrics
from recommend.study_tune import plot_validation

LIVE_STARTS = ("ts", "cold")
SOURCE_MODE = "ts"
WARM_LR_FACTOR = 0.1  # a warm row fine-tunes a converged model: at 2,895 items the study's lr took one
# epoch from TS's 12.7 % validation HR@10 to 9.3 %, a tenth of it to 12.8 % (BENCHMARKS.md, issue 29)


def _live(config: Any) -> bool:
    return config.options is not None and ITEM_TOWERS.get(config.mode).runs_encoder_live


def start_live_rows(configs: list, how: str, rename: Callable[[Any, Any], str]) -> None:
    """Point every live row at the TS row's run (``--init-from``, renamed: its settings changed), or
    mark it cold; sets ``start`` of each live row in place. Without a TS row the live rows start cold."""
    source = next((c for c in configs if c.mode == SOURCE_MODE and c.options is not None), None)
    for config in filter(_live, configs):
        if how == "cold":
            config.start = "cold"
            continue
        if source is None:
            config.start = "cold (no ts row in --modes to start from)"
            continue
        rates = {"lr": config.options.lr * WARM_LR_FACTOR}
        if config.options.encoder_lr is not None:  # tuned or given; unset, it follows lr (a tenth of it)
            rates["encoder_lr"] = config.options.encoder_lr * WARM_LR_FACTOR
        config.options = config.options.replace(init_from=source.run, **rates)
        config.options = config.options.replace(run_name=rename(config, config.options))
        config.run = config.options.run_name
        config.start = f"from the ts row ({source.run}), lr x{WARM_LR_FACTOR:g}"


def _read(run_dir: Path, name: str) -> dict:
    path = run_dir / name
    return json.loads(path.read_text()) if path.exists() else {}


def live_rows_report(ws: Workspace, configs: list, out: Path) -> list[str]:
    """The report section on the live rows (empty without any): start, loss, epochs, validation curve
    (a PNG in ``out``), and E2E against the best TS-DNN row on test."""
    rows = [c for c in configs if _live(c) and c.test is not None]
    if not rows:
        return []
    lines = ["## Live rows (e2e, adapter)", "",
             "| configuration | start | catalogue softmax | epochs (best) | test HR@10 (%) | validation curve |",
             "|---|---|---|---|---|---|"]
    for config in rows:
        run_dir = ws.run_dir(config.run)
        recorded = _read(run_dir, CONFIG)
        refresh = recorded.get("options", {}).get("catalogue_refresh")
        loss = f"cached, {refresh_schedule(refresh)}" if refresh else "exact"
        best = _read(run_dir, BEST)
        source = recorded.get("transfer", {}).get("source_run")
        start = config.start if source is None else (
            f"{config.start}, at its validation HR@10 "
            f"{100 * _read(ws.run_dir(source), BEST)['metrics']['HR@10']:.2f} % before any step")
        name = f"valid-{config.label}.png"
        plot_validation([ws.run_dir(s["run"]) for s in config.seeds], (best.get("popularity") or {}).get("HR@10"),
                        out / name, f"{config.label}: validation, started {config.start}"[:70])
        lines.append(f"| {config.label} | {start} | {loss} | {len(read_metrics(run_dir))} "
                     f"({best.get('epoch', '-')}) | {100 * config.test['HR@10']:.2f} | [curve]({name}) |")
    lines += ["", *_e2e_against_ts_dnn(configs), ""]
    return lines


def _e2e_against_ts_dnn(configs: list) -> list[str]:
    """One sentence: does E2E beat the best TS-DNN row on test HR@10 here (001 Table 5's claim)?"""
    e2e = [c for c in configs if c.mode == "e2e" and c.test is not None]
    dnn = [c for c in configs if c.mode == "ts-dnn" and c.test is not None]
    if not e2e or not dnn:
        return []
    ours, theirs = max(e2e, key=lambda c: c.test["HR@10"]), max(dnn, key=lambda c: c.test["HR@10"])
    verdict = "beats" if ours.test["HR@10"] > theirs.test["HR@10"] else "does not beat"
    return [f"E2E {verdict} TS-DNN here: {ours.label} {100 * ours.test['HR@10']:.2f} % test HR@10 against "
            f"{theirs.label}'s {100 * theirs.test['HR@10']:.2f} % (its validation curve above shows how it got there)."]
