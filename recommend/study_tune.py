"""``recommend study --tune N --seeds S``: a fair, repeated comparison.

Why: one learning rate for every mode makes a study say more about that rate than
about the modes (paper 001 §3 searches lr and weight decay per model), and one seed
cannot tell a difference from noise. So, per configuration:

1. **tune** (:func:`tune_configurations`): ``recommend tune``'s Optuna search
   (:func:`recommend.tune.run_tune`) with N trials on validation only, around the
   configuration's own options; its depth N (TS-DNN-N) and mode stay fixed, so the
   search is over lr, weight decay, dropout and d. Expensive modes left out of
   ``--tune-modes`` borrow the lr found for TS-DNN (the best tuned content tower on
   validation); E2E's encoder blocks then train at that lr / 10, as the papers scale it;
2. **repeat** (:func:`seed_options`): the chosen options retrained with seeds
   ``seed .. seed + S - 1``, each an ordinary run ranked on test;
3. **report** (:func:`seed_statistics`, :func:`plot_validation`): mean ± sd (sample sd,
   n - 1) over the seeds, and for a configuration whose mean test HR@10 ends below
   popularity's, its validation curves, so a reader sees whether it stopped on the
   popularity plateau or never learned.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from featurestore.workspace import Workspace
from recommend.item_towers import ITEM_TOWERS, list_item_towers
from recommend.run import read_metrics
from recommend.options import TrainOptions
from recommend.stopping import MONITOR
from recommend.tune import DEFAULT_SPACE, TuneOptions, run_tune

BORROWED = ("lr",)


def tune_configurations(ws: Workspace, configs: list, trials: int, modes: list[str], sampler_seed: int,
                        rename: Callable[[object, TrainOptions], str], say: Callable[[str], None],
                        echo: bool = False) -> None:
    """Tune each configuration of ``modes`` (``trials`` trials), then give the others the lr
    of the best tuned one of :func:`donor_modes`; sets ``options``, ``run``, ``tuned`` and
    ``borrowed`` of every configuration in place; ``echo``: one line per trial on stderr.
    A tuned configuration's run is its best trial's run folder.

    Each search is the Optuna study ``study-RUN`` (RUN: the configuration's untuned run
    name) in ROOT's tune database, so a rerun continues it and more trials extend it.
    Every search's TPE sampler has the same seed, so each configuration's random start-up
    trials try the same candidate points: no configuration is luckier in its draw.
    """
    best: dict[str, tuple[float, dict]] = {}  # label -> (validation metric, params)
    for config in configs:
        if config.mode not in modes:
            continue
        name = f"study-{config.run}"
        say(f"study: tuning {config.label}: {trials} trials on validation (Optuna study {name})")
        result = run_tune(ws, TuneOptions(config.options.replace(run_name=None), trials=trials, study_name=name,
                                          space=dict(DEFAULT_SPACE), sampler_seed=sampler_seed), echo=echo)
        if result["best"] is None:  # every trial pruned or failed: keep the defaults, say so
            config.reason = f"tuning found no complete trial in {result['trials']}; defaults kept"
            continue
        config.tuned = dict(result["best"]["params"])
        config.tune_study = name
        best[config.label] = (result["best"]["value"], config.tuned)
        _apply(config, config.tuned, rename)
        # the chosen trial was trained with exactly these options and the first seed: it is that
        # seed's run, not trained a second time (test is first looked at after the choice)
        config.options = config.options.replace(run_name=result["best"]["run"])
        config.run = config.options.run_name
    donor = _donor(configs, best)
    for config in configs:
        if config.mode in modes or donor is None:
            continue
        label, params = donor
        config.borrowed = {"from": label, **{k: params[k] for k in BORROWED if k in params}}
        _apply(config, {k: params[k] for k in BORROWED if k in params}, rename)


def donor_modes() -> list[str]:
    """The modes whose tuned lr an untuned mode takes, in order of preference (each mode's ``lr_donor``)."""
    donors = [m for m in list_item_towers() if ITEM_TOWERS.get(m).lr_donor is not None]
    return sorted(donors, key=lambda m: ITEM_TOWERS.get(m).lr_donor)


def _donor(configs: list, best: dict[str, tuple[float, dict]]) -> tuple[str, dict] | None:
    """The tuned configuration of the first of :func:`donor_modes` that has one: the best on validation."""
    for mode in donor_modes():
        tuned = [(best[c.label][0], c.label) for c in configs if c.mode == mode and c.label in best]
        if tuned:
            label = max(tuned)[1]
            return label, best[label][1]
    return None


def _apply(config, params: dict, rename: Callable[[object, TrainOptions], str]) -> None:
    config.options = config.options.replace(**params)
    config.options = config.options.replace(run_name=rename(config, config.options))
    config.run = config.options.run_name


def seed_options(config, seeds: int, rename: Callable[[object, TrainOptions], str]) -> list[TrainOptions]:
    """The configuration's options once per seed; the first seed is the configuration's own run."""
    runs = [config.options]
    for offset in range(1, seeds):
        options = config.options.replace(seed=config.options.seed + offset)
        runs.append(options.replace(run_name=rename(config, options)))
    return runs


def seed_statistics(tests: list[dict]) -> tuple[dict, dict | None]:
    """Mean and sample sd (n - 1; None for one seed) of each metric over the seeds' test results;
    a metric of no users (None: an empty warm or cold subset) stays None."""
    values = {k: [t[k] for t in tests if t[k] is not None] for k in tests[0]}
    mean = {k: statistics.fmean(v) if v else None for k, v in values.items()}
    sd = {k: statistics.stdev(v) if len(v) > 1 else None for k, v in values.items()} if len(tests) > 1 else None
    return mean, sd


def plot_validation(run_dirs: list[Path], popularity: float | None, path: Path, title: str) -> Path:
    """PNG: validation HR@10 per epoch of each seed's run (metrics.jsonl), with the
    popularity baseline's validation HR@10 as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run_dir in run_dirs:
        records = [r for r in read_metrics(run_dir) if r.get("valid")]
        ax.plot([r["epoch"] for r in records], [100 * r["valid"][MONITOR[0]] for r in records],
                marker="o", label=run_dir.name)
    if popularity is not None:
        ax.axhline(100 * popularity, ls="--", c="k", label="popularity (valid)")
    ax.set(xlabel="epoch", ylabel=f"validation {MONITOR[0]} (%)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
