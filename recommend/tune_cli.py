"""``recommend tune``: the search options, plus every option of ``recommend train``.

The training options are taken from the ``train`` command itself (not retyped), so
tune accepts exactly what train accepts; those given are fixed for every trial, the
searched ones (the space) are set per trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click
import torch
from click.core import ParameterSource

from eval.metrics import percent
from featurestore.cliutil import SEED, FloatRange, UserError, emit, json_option, root_option
from featurestore.configfile import config_option
from featurestore.workspace import Workspace
from recommend.trainer import TrainOptions
from recommend.cli_options import parse_lists
from recommend.defaults import only_dataset
from recommend.item_towers import ITEM_TOWERS, list_item_towers
from recommend.tune import DEFAULT_SPACE, PRUNERS, TuneOptions, default_space, load_space, run_tune

NOT_FROM_TRAIN = {"run_name", "quiet", "root", "as_json", "config"}  # tune's own, or per trial

HELP = f"""Search hyper-parameters of one configuration with Optuna (TPE, pruning), on validation.

Every trial trains an ordinary run folder ROOT/runs/STUDY-tN (so `eval rank` and `eval
compare` work on it) and reports its full-pool validation HR@10 after every epoch to the
pruner; the test split is never looked at. Default space: {', '.join(DEFAULT_SPACE)}, and
what a mode searches besides ({', '.join(f"{n} for --mode {m}" for m in list_item_towers()
                                  for n in ITEM_TOWERS.get(m).search_space) or "none"}). Training options given here are fixed
for every trial; one of the space's given here (e.g. --layers 8, --lr 1e-3) is fixed, not
searched.

Many workers share one search when given the same --storage and --study-name (Optuna's
distributed mode); each trial runs in exactly one of them. Killed and started again, tune
continues: the killed trial is re-queued with its parameters and resumes its run folder.

\b
recommend tune --dataset demo --mode ts-dnn --encoder minilm-l6 --trials 20 --epochs 20
recommend tune --dataset HM --mode id --trials 50 --storage postgresql://user@db/optuna --study-name hm-id
"""


def make_tune_command(train_command: click.Command, train_fields: Callable[[], list]) -> click.Command:
    """``recommend tune``, carrying a copy of every option of ``train_command``; ``train_fields``
    lists the option fields those were made from (to read them back as ``train`` does)."""

    @click.command("tune", help=HELP)
    @click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
                  help="Trials to finish (complete, pruned or failed), counted over every worker and restart.")
    @click.option("--timeout", type=FloatRange(min=0, min_open=True), default=None, help="Stop starting trials after this many seconds.")
    @click.option("--storage", default=None, metavar="URL",
                  help="Optuna storage, any SQLAlchemy URL (postgresql://…, mysql://…, sqlite:///…) "
                       "[default: sqlite:///ROOT/tune.db].")
    @click.option("--study-name", default=None,
                  help="Optuna study name; the same name and storage continue or share a search "
                       "[default: tune-DATASET-MODE[N]-GROUPS-BACKBONE-LOSS].")
    @click.option("--space", "space_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="YAML/JSON search space {option: {type: float|int|categorical, low, high, log | "
                       "choices}} replacing the default one.")
    @click.option("--pruner", type=click.Choice(PRUNERS), default="median", show_default=True,
                  help="median: stop a trial below the median of earlier trials at the same epoch (after 3 "
                       "trials and 2 epochs); hyperband: Optuna's Hyperband over epochs; none.")
    @click.option("--sampler-seed", type=SEED, default=None,
                  help="Seed of the TPE sampler (one worker: a reproducible search). Give each worker of a "
                       "shared search its own seed or none.")
    @click.option("--heartbeat", type=click.IntRange(min=1), default=60, show_default=True,
                  help="Seconds between a worker's heartbeats; a trial silent for twice this is taken as "
                       "killed and re-queued.")
    @config_option
    @root_option
    @json_option
    def tune_command(ws: Workspace, as_json: bool, trials: int, timeout: float | None, storage: str | None,
                     study_name: str | None, space_file: Path | None, pruner: str, sampler_seed: int | None,
                     heartbeat: int, threads: int | None = None, **options) -> None:
        if options["dataset"] is None:
            found = only_dataset(ws)
            click.echo(f"using {found.note}", err=True)
            options["dataset"] = found.value
        if threads:
            torch.set_num_threads(threads)  # how fast, not what is trained
        given = _given(options)
        base = TrainOptions(**parse_lists(train_fields(), options))
        space = searched_space(load_space(space_file) if space_file else default_space(base.mode),
                               given=parse_lists(train_fields(), given), from_file=space_file is not None)
        opts = TuneOptions(base, trials=trials, timeout=timeout, storage=storage, study_name=study_name,
                           space=space, pruner=pruner,
                           sampler_seed=sampler_seed, heartbeat=heartbeat)
        result = run_tune(ws, opts, echo=not as_json)
        best = result["best"]
        text = (f"study {result['study']}: {result['trials']} trials ({result['complete']} complete, "
                f"{result['pruned']} pruned, {result['failed']} failed)\n"
                + (f"best: trial {best['trial']}, validation HR@10 {percent(best['value'])}%, run {best['run']}, "
                   + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in best["params"].items()) if best else "best: none finished")
                + f"\nplot: {result['plot']}")
        emit(result, as_json, text)

    own = {p.name for p in tune_command.params}
    tune_command.params.extend(p for p in train_command.params if p.name not in own | NOT_FROM_TRAIN)
    return tune_command


def _given(options: dict) -> dict:
    """The training options the user set (command line, environment or --config), not defaults."""
    ctx = click.get_current_context()
    return {name: value for name, value in options.items()
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT,
                                                  ParameterSource.DEFAULT_MAP)}


def searched_space(space: dict, given: dict, from_file: bool) -> dict:
    """``space`` less the options the user fixed: a value typed on the command line is meant,
    so the search must not overwrite it. A --space file that names one is a contradiction
    and is refused; the default space just leaves it out (said on stderr)."""
    fixed = {name: given[name] for name in space if name in given}
    if fixed and from_file:
        raise UserError(f"--space searches {', '.join(fixed)}, which the command line also fixes; "
                        f"drop {' '.join('--' + n.replace('_', '-') for n in fixed)} or take it out of the space file")
    left = {name: dist for name, dist in space.items() if name not in fixed}
    if not left:
        raise UserError(f"nothing left to search: the command line fixes every option of the space "
                        f"({', '.join(fixed)}); drop one, or give --space FILE")
    if fixed:
        click.echo("fixed, not searched: " + ", ".join(f"{k}={v}" for k, v in fixed.items()), err=True)
    return left

