"""``recommend``: train recommenders on stored features and list the runs.

``recommend eval ...`` is the ``eval`` group under another name: in bash and zsh
``eval`` is a shell builtin, so ``recommend eval rank`` is the form that always works.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from eval.cli import cli as eval_cli
from eval.metrics import percent
from featurestore.cliutil import SEED, FloatRange, UserError, emit, json_option, root_option, run_cli
from featurestore.configfile import config_option
from featurestore.workspace import Workspace
from recommend.defaults import Inferred, only_dataset, only_group
from recommend.cli_options import click_options, parse_lists
from recommend.item_towers import ITEM_TOWERS, list_item_towers
from recommend.live_start import LIVE_STARTS
from recommend.options import SHARED_FIELDS, TrainOptions
from recommend.plugins import option_fields
from recommend.run import list_runs
from recommend.tracking import TRACKING_OPTIONS
from recommend.study import DEFAULT_LAYERS, StudyOptions, run_study
from recommend.trainer import Processes, train
from recommend.tune_cli import make_tune_command
from recommend.warm_study import run_warm_study


TRAIN_DEFAULTS = TrainOptions(dataset="")  # one set of defaults: train, study and tune show these


def train_fields() -> list:
    """Every option of `recommend train`: the shared ones, then each plugin's."""
    return [*SHARED_FIELDS.values(), *option_fields().values()]


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="morec-store")
def cli() -> None:
    """Stage two of the pipeline: recommenders trained on stored item vectors.

    \b
    recommend train --dataset HM --mode id
    recommend train --dataset HM --mode ts-dnn --layers 8 --encoder efficientnet-lite0
    recommend runs
    recommend study --dataset HM --encoder efficientnet-lite0 --layers 2,8 --modes id,ts,ts-dnn
    recommend eval rank RUN --full-pool
    """


@cli.command("train")
@click_options(train_fields())
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch log lines on stderr.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch [default: torch's]. On a small machine shared with other jobs, "
                   "1 avoids oversubscription, which can slow small models down many times over.")
@config_option
@root_option
@json_option
def train_command(ws: Workspace, as_json: bool, quiet: bool, threads: int | None, **options) -> None:
    """Train a recommender (IDRec, TS, TS-DNN, E2E, adapters) into ROOT/runs/RUN.

    Validates on the full item pool every epoch (HR@10/NDCG@10, the same scoring as
    `eval rank`), keeps the best checkpoint, stops early, and stops on collapse. A run
    whose best validation HR@10 is not clearly above popularity's ends with a warning
    (also in train.log and best.json).

    Defaults that differ from the papers' (001: --loss bce, --dim 512, --lr 1e-4,
    --dropout 0.1, one patience), and why: at d 64 their setting sat on the popularity
    plateau and stopped there, and it trails RecBole's SASRec. Here: --loss ce (RecBole's
    default, the strongest for SASRec), --dim 64, --lr 2e-3 and --dropout 0.3 (what
    20-trial searches chose; within 0.99-1.03x of them on the demo), and --patience
    counted only once validation is clearly above popularity (--plateau-patience before).
    The papers' setting: --loss bce --dim 512 --lr 1e-4 --dropout 0.1 --plateau-patience 10. `recommend study`
    uses the same defaults (its --live-epochs may cap the e2e and adapter runs). TS-DNN
    stacks differ too (--dnn).
    """
    inferred = []
    options = parse_lists(train_fields(), options)
    if options["dataset"] is None:
        options["dataset"] = _inferred(only_dataset(ws), inferred)
    if not options["encoders"] and not options["features"] and ITEM_TOWERS.get(options["mode"]).reads_store_rows:
        options["features"] = [_inferred(only_group(ws, options["dataset"], options["mode"]), inferred)]
    opts = TrainOptions(**options)
    if threads:
        torch.set_num_threads(threads)  # how fast, not what is trained: kept out of config.json
    try:
        result = train(ws, opts, progress=not quiet, echo=not quiet)
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(err, MemoryError) and "out of memory" not in str(err) \
                and "can't allocate memory" not in str(err):
            raise
        raise UserError(f"out of memory building or training the model (--dim {opts.dim}, --batch-size "
                        f"{opts.batch_size}, --blocks {opts.blocks}: {str(err).splitlines()[0][:160]}); give a "
                        "smaller --dim or --batch-size (finished epochs are kept; rerun to resume)") from None
    result["inferred"] = inferred
    if not Processes.from_env().main:
        return  # under torchrun, process 0 reports for all
    # one line: the trainer's own last log lines (the same message) went to train.log only
    emit(result, as_json, f"run {result['run']} ({result['status']}) in {result['run_dir']}: {result['message']}"
         + (f"\nwarning: {result['warning']}" if result.get("warning") else ""))


cli.add_command(make_tune_command(train_command, train_fields))


@cli.command("runs")
@root_option
@json_option
def runs_command(ws: Workspace, as_json: bool) -> None:
    """List the runs under ROOT/runs with their mode, settings and best validation metrics."""
    runs = list_runs(ws)
    lines = [f"{'run':40} {'mode':14} {'backbone':9} {'loss':7} {'epochs':>6} {'HR@10 (%)':>9} "
             f"{'NDCG@10 (%)':>11}  status"]
    for r in runs:
        if r["status"] == "damaged":
            lines.append(f"{r['run']:40} damaged: {r['problem']}")
            continue
        mode = r["mode"] + (str(r["layers"]) if r["layers"] is not None else "")
        mode += f"+id-{r['with_id']}" if r["with_id"] else ""
        hr, ndcg = r["best"].get("HR@10"), r["best"].get("NDCG@10")
        lines.append(f"{r['run']:40} {mode:14} {r['backbone']:9} {r['loss']:7} {r['epochs']:>6} "
                     f"{percent(hr):>9} {percent(ndcg):>11}  {r['status']}")
    emit({"runs": runs}, as_json, "\n".join(lines) if runs else f"no runs under {ws.runs}")


@cli.command("study")
@click.option("--dataset", required=True, help="Prepared dataset name (under ROOT/datasets).")
@click.option("--encoder", default=None,
              help="Item encoder for the content modes: its store group is extracted if missing "
                   "(ts, ts-dnn) and it runs live in e2e/adapter (list: `featurestore encoders`); "
                   "not needed with --modes id.")
@click.option("--layers", default=",".join(map(str, DEFAULT_LAYERS)), show_default=True,
              help="TS-DNN depths N to train, comma-separated (one run each).")
@click.option("--modes", default=",".join(list_item_towers()), show_default=True,
              help="Item towers to compare: id (IDRec), ts, ts-dnn, e2e, adapter, side (IISAN side "
                   "networks over the per-layer cache, extracted if missing). A mode this installation "
                   "lacks is listed as unavailable in the report.")
@click.option("--top-k", type=click.IntRange(min=1), default=2, show_default=True,
              help="e2e: fine-tune the top K encoder blocks.")
@click.option("--cached/--live", default=True, show_default=True,
              help="e2e: train the top K blocks from states cached once per item (the store variant "
                   "ENC@topK, extracted if missing; same loss and gradients, about 2x faster), or run "
                   "the whole encoder live every step.")
@click.option("--epochs", type=click.IntRange(min=1), default=TRAIN_DEFAULTS.epochs, show_default=True,
              help="Most epochs per run, as `recommend train` (early stopping on validation HR@10 ends "
                   "most runs far sooner).")
@click.option("--live-epochs", type=click.IntRange(min=1), default=None,
              help="Most epochs of the e2e and adapter runs, which run the encoder every step and cost "
                   "tens of times a TS epoch on a CPU; the report states the cap [default: --epochs].")
@click.option("--live-start", type=click.Choice(LIVE_STARTS), default="ts", show_default=True,
              help="e2e and adapter rows: start from the study's own ts row (--init-from: its DT layer and user "
                   "encoder, then fine-tune at a tenth of the study's learning rates; without ts in --modes they "
                   "start cold) or cold, from scratch at the study's rates (the papers'). The report says per row how it started, which catalogue softmax it trained with "
                   "(ce over a cached catalogue by default) and shows its validation curve.")
@click.option("--dim", type=click.IntRange(min=1), default=TRAIN_DEFAULTS.dim, show_default=True,
              help="Hidden width d of every run, as `recommend train` (the papers use 512; 64 keeps a "
                   "CPU study to minutes).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Users per training step.")
@click.option("--lr", type=FloatRange(min=0, min_open=True), default=TRAIN_DEFAULTS.lr, show_default=True,
              help="AdamW learning rate of every run, as `recommend train` (e2e encoder blocks: --lr / 10).")
@click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True,
              help="Stop a run after this many epochs without a better validation HR@10.")
@click.option("--seed", type=SEED, default=42, show_default=True, help="Seed of every run (the first, with --seeds).")
@click.option("--tune", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Tune each configuration of --tune-modes with N Optuna trials on validation (as "
                   "`recommend tune`: lr, weight decay, dropout, d; TS-DNN-N keeps its N), then rank only "
                   "the best trial of each on test (it is the first seed's run; --seeds retrains the "
                   "others). 0: no tuning.")
@click.option("--tune-modes", default=",".join(list_item_towers()), show_default=True,
              help="With --tune: the modes to tune, e.g. id,ts,ts-dnn to keep a CPU study short; the "
                   "others take the lr tuned for TS-DNN (without a tuned TS-DNN: TS's, then IDRec's; "
                   "e2e encoder blocks at lr / 10). The report "
                   "says which rows were tuned.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True, metavar="S",
              help="Train each configuration with S seeds (--seed, --seed + 1, ...) and report the test "
                   "metrics' mean ± sample sd.")
@click.option("--random-init", is_flag=True,
              help="Use an untrained, seeded encoder (for encoders without local weights: tests, "
                   "ablations); recorded in the store group and the runs.")
@click.option("--weights", default=None, metavar="PATH_OR_HUB_ID",
              help="The encoder's weights, as `featurestore extract --weights`: a weights file, a model folder "
                   "(config.json + weights + tokenizer: it stands in for an hf:/st: hub repository that is not "
                   "cached, so a study runs offline) or a hub id. The study's extractions load them, their "
                   "sha256 is in the store group's signature its runs are named by (other weights: new runs; a "
                   "group made with other weights is refused), and e2e/adapter rows run them live. Not with "
                   "--random-init [default: the encoder's bundled or hub weights].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch in extraction, training and ranking [default: torch's]. "
                   "On a small machine shared with other jobs, 1 avoids oversubscription, which "
                   "can slow small models down many times over.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for report.md, study.json and the PNG plots "
                   "[default: ROOT/studies/DATASET-ENCODER].")
@click.option("--warm", default=None, metavar="N[,N]",
              help="Also study warm-N variants DATASET-warmN (items with at least N users; prepared from "
                   "the dataset's raw files if missing) and write one side-by-side report (001 Table 3), "
                   "in --out (there: ROOT/studies/DATASET-ENCODER-warm) [default: no warm variants].")
@click_options([option_fields()[name] for name in TRACKING_OPTIONS])  # every run's --track
@config_option
@root_option
@json_option
def study_command(ws: Workspace, as_json: bool, layers: str, modes: str, tune_modes: str, warm: str | None,
                  **options) -> None:
    """Compare IDRec, TS, TS-DNN-N, E2E and adapters on one dataset (001 Tables 5 and 6).

    Extracts the encoder's store group if missing, trains every configuration (runs
    named by a hash of their settings; finished ones are skipped, killed ones resume),
    ranks each on the full item pool (test split), and writes report.md with HR@10 /
    NDCG@10, trainable parameters, seconds per epoch and peak memory, next to the
    popularity baseline, plus the PNG plots of `eval compare`. Killed and started
    again with the same command, it continues where it stopped.

    \b
    recommend study --dataset demo --encoder efficientnet-lite0 --layers 2,8 --modes id,ts,ts-dnn
    recommend study --dataset demo --encoder minilm-l6 --layers 2,8 --tune 8 --tune-modes id,ts,ts-dnn --seeds 3
    """
    try:
        depths = [int(n) for n in _names(layers)]
    except ValueError:
        raise UserError(f"--layers {layers}: give whole numbers, e.g. --layers 2,6,8") from None
    if options["encoder"] is None:
        content = [m for m in _names(modes) if m != "id"]
        if content:
            raise UserError(f"--encoder: --modes {','.join(content)} need an item encoder; give --encoder ENC "
                            "(list: `featurestore encoders`) or --modes id")
        options["encoder"] = "id"  # an ID-only study: its folder is ROOT/studies/DATASET-id
    opts = StudyOptions(layers=depths, modes=_names(modes), tune_modes=_names(tune_modes), **options)
    command = " ".join(["recommend", *sys.argv[1:]])
    if warm:
        try:
            thresholds = [int(n) for n in _names(warm)]
        except ValueError:
            raise UserError(f"--warm {warm}: give whole numbers, e.g. --warm 20,50,200") from None
        result = run_warm_study(ws, opts, thresholds, progress=not as_json, command=command)
        configurations = [c for v in result["variants"] for c in v["study"]["configurations"]]
    else:
        result = run_study(ws, opts, progress=not as_json, command=command)
        configurations = result["configurations"]
    tables = [result[key].rstrip() for key in ("table", "subset_table") if key in result]  # warm studies: one
    emit(result, as_json, "\n\n".join(tables) + f"\nreport: {result['report']}")
    failed = [c for c in configurations if c["status"] == "failed"]
    if failed:
        raise UserError(f"{len(failed)} configuration(s) failed ({failed[0]['label']}: {failed[0]['reason']}); "
                        f"the others are in {result['report']}")


def _inferred(found: Inferred, notes: list[str]) -> str:
    """Print what was filled in (stderr, so --json stays one object) and keep it for the result."""
    click.echo(f"using {found.note}", err=True)
    notes.append(found.note)
    return found.value


cli.add_command(eval_cli, name="eval")


def main() -> None:
    run_cli(cli, "recommend")


if __name__ == "__main__":
    main()
