"""``eval``: full-pool ranking of a trained run, comparison tables and figures.

Also mounted as ``recommend eval ...`` (``python -m eval`` works too). In bash/zsh ``eval`` is a
shell builtin that runs ``rank ...``: the ``rank`` console script (:func:`rank_main`) is ``eval rank``.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from eval.compare import markdown_table, run_mode, summarize_run
from eval.distributed import local_device, process_group
from eval.evaluate import SUBSETS, evaluate_subsets
from eval.metrics import parse_ks, percent
from eval.ranking import INDEXES
from eval.results import load_run_and_dataset, record_result, stamp
from featurestore.cliutil import SEED, UserError, emit, json_option, root_option, run_cli
from featurestore.workspace import Workspace
from recommend.defaults import latest_finished_run
from recommend.run import read_config, resolve_run, unfinished


def run_argument(command):
    """The run as the argument ``RUN`` or as ``--run``: torchrun's own parser takes ``--run``
    for an abbreviation of its ``--run-path`` and stops, so under torchrun give ``RUN``."""
    command = click.option("--run", "run_option", default=None, metavar="RUN",
                           help="Run name under ROOT/runs, or a run folder (the same as the "
                                "argument RUN; under torchrun give RUN, as torchrun takes "
                                "--run for its own --run-path).")(command)
    return click.argument("run_arg", metavar="[RUN]", required=False)(command)


def one_run(run_arg: str | None, run_option: str | None) -> str:
    if run_arg and run_option and run_arg != run_option:
        raise UserError(f"two runs given, {run_arg} and --run {run_option}; give one")
    if not (run_arg or run_option):
        raise UserError("no run given: name it, e.g. `recommend eval rank RUN --full-pool`")
    return run_arg or run_option


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="morec-store")
def cli() -> None:
    """Stage three: rank every user's target against the full item pool, compare runs.

    \b
    recommend eval rank RUN --full-pool --split test
    torchrun --nproc-per-node 8 $(which recommend) eval rank RUN --index torch
    recommend eval compare RUN1 RUN2 --out report.md --plot report.png
    recommend eval plot-items RUN --out items.png
    """


def _subsets(_ctx, _param, value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in SUBSETS]
    if unknown or not names:
        raise click.BadParameter(f"{','.join(unknown) or value!r} is not a subset; give one or more of "
                                 f"{', '.join(SUBSETS)}, comma-separated")
    return list(dict.fromkeys(names))


@cli.command("rank")
@run_argument
@click.option("--dataset", "target", default=None, metavar="TARGET",
              help="Zero-shot: rank another prepared dataset's users and items with the run's model, "
                   "untrained on them (needs TARGET's store groups from the run's encoder and variant).")
@click.option("--untrained", is_flag=True,
              help="With --dataset: the same architecture freshly initialised (the run's seed), the "
                   "random baseline of the zero-shot ranking.")
@click.option("--full-pool", is_flag=True, default=True,
              help="Rank against every item (always on: sampled-negative scoring is not offered).")
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True,
              help="Leave-one-out target: last item (test) or second-to-last (valid).")
@click.option("--k", "ks", default="10,20,50", show_default=True,
              help="Cut-offs K for HR@K and NDCG@K, comma-separated.")
@click.option("--exclude-history/--no-exclude-history", default=True, show_default=True,
              help="Remove the user's past items from the ranking (papers' code) or keep them "
                   "(RecBole). Every result records which.")
@click.option("--subset", "subsets", default="all", show_default=True, callback=_subsets,
              help="Users whose target is cold (< 10 training interactions), warm, or all; several, "
                   "comma-separated (all,warm,cold), are read from one ranking, each saved as its own result "
                   "(--json: the first subset's at the top level, each one's under \"subsets\").")
@click.option("--index", type=click.Choice(INDEXES), default="flat", show_default=True,
              help="Exact ranker: flat (faiss, CPU), flat-gpu (faiss-gpu on every GPU, or this "
                   "process's under torchrun), torch (matmul + top-k on --device, no faiss needed), "
                   "torch-twopass (bf16 first pass with a proven error bound, exact rescoring of "
                   "the candidates; same ranks, faster where bf16 is).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Users per model call (bounds memory); FAISS searches take at least 4096 "
                   "users per call, below which it leaves its fast BLAS path.")
@click.option("--device", default=None,
              help="Torch device for the model and the torch rankers [default: cuda if available, "
                   "else cpu]; under torchrun cuda means each process's own GPU.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write items.npy, users.npy, targets.npy, history_indptr.npy and "
                   "history_indices.npy here, to recompute the metrics independently, and "
                   "ranks.npy (each user's rank, capped at max K + 1).")
@root_option
@json_option
def rank(ws: Workspace, as_json: bool, run_arg: str | None, run_option: str | None, target: str | None,
         untrained: bool, full_pool: bool, split: str, ks: str,
         exclude_history: bool, subsets: list[str], index: str, batch_size: int, device: str | None,
         export_dir: Path | None) -> None:
    """Exact full-pool HR@K / NDCG@K of a trained run RUN; saved in the run's eval.json.

    Without RUN (or --run): the run under ROOT/runs that finished last, named on stderr.

    Ties rank the target below every item with an equal score. With --dataset TARGET
    (zero-shot) the result goes into the eval.json section "zero-shot".

    Under torchrun (`torchrun --nproc-per-node N $(which recommend) eval rank RUN ...`)
    the users are sharded across the processes, each ranks its share against the whole
    catalogue, and process 0 writes the one result, the same as one process's.
    """
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if export_dir is not None and len(subsets) > 1:
        raise UserError(f"--export writes one subset's users; give one --subset, not {','.join(subsets)}")
    if not (run_arg or run_option):
        latest = latest_finished_run(ws)
        click.echo(f"using {latest.note}", err=True)
        run_arg = latest.value
    run_dir = resolve_run(ws, one_run(run_arg, run_option))
    device = local_device(device or _default_device())
    with process_group(device) as shard:
        _rank(ws, as_json, run_dir, target, untrained, split, ks, exclude_history, subsets, index,
              batch_size, device, export_dir, main=shard.rank == 0)


def _rank(ws: Workspace, as_json: bool, run_dir: Path, target: str | None, untrained: bool, split: str,
          ks: str, exclude_history: bool, subsets: list[str], index: str, batch_size: int, device: str,
          export_dir: Path | None, main: bool) -> None:
    zero_shot = None
    if target is not None and target != read_config(run_dir)["dataset"]["name"]:
        from recommend.transfer import zero_shot_model

        model, zero_shot, dataset = zero_shot_model(ws, run_dir, target, untrained, device)
    elif untrained:
        raise UserError("--untrained is the random baseline of a zero-shot ranking; give --dataset TARGET, "
                        "a dataset other than the run's own")
    else:
        model, _config, dataset = load_run_and_dataset(ws, run_dir, device)
    state = unfinished(run_dir)  # checked before ranking: the run may finish meanwhile
    options = dict(ks=parse_ks(ks), exclude_history=exclude_history, batch_size=batch_size, index=index,
                   progress=main, device=device)
    results = evaluate_subsets(model, dataset, subsets, split, return_vectors=export_dir is not None, **options)
    if not main:
        return  # process 0 writes the one result
    outs = {subset: _record(run_dir, dataset, result, zero_shot, state, export_dir)
            for subset, result in results.items()}
    # One shape for one subset or several: the first subset's result at the top level (what one
    # --subset has always printed), every subset's under "subsets".
    emit({**next(iter(outs.values())), "subsets": outs}, as_json, "\n".join(_rank_text(out) for out in outs.values()))


def _record(run_dir: Path, dataset, result: dict, zero_shot: dict | None, state: dict | None,
            export_dir: Path | None) -> dict:
    """Save one subset's result in the run's eval.json (with its reference rows); what rank prints."""
    vectors, ranks = result.pop("vectors", None), result.pop("ranks", None)
    stamp(result, dataset)
    if zero_shot is not None:
        result["zero_shot"] = zero_shot
    else:
        result.update(_references(dataset, result))
    if state is not None:
        result["unfinished_run"] = state
    eval_path = record_result(run_dir, result)
    out = {"run": run_dir.name, **result, "eval_json": str(eval_path)}
    if vectors is not None:
        files = vectors.save(export_dir)
        np.save(export_dir / "ranks.npy", ranks)
        out["export"] = {"dir": str(export_dir), "files": {**files, "ranks": str(export_dir / "ranks.npy")}}
    return out


def _references(dataset, result: dict) -> dict:
    """Popularity and (generated datasets) oracle rows on the same users and protocol, and
    the run's metrics as a percentage of the oracle's."""
    from data.oracle import percent_of_oracle, reference_rows

    rows = reference_rows(dataset, result["split"], result["ks"], result["exclude_history"], result["subset"])
    if "oracle" in rows:
        rows["percent_of_oracle"] = percent_of_oracle(result, rows["oracle"])
    return rows


def _rank_text(out: dict) -> str:
    from data.oracle import WITHOUT_LINKS  # lazily, as _references: the oracle pulls in the generator

    history = "excluded" if out["exclude_history"] else "kept"
    lines = [f"run {out['run']}: {out['split']} split, {out['subset']} users ({out['users']}), "
             f"history {history}, full pool"]
    zero_shot = out.get("zero_shot")
    if zero_shot:
        target = zero_shot["target"]
        lines.insert(0, f"zero-shot baseline on {target}: the run's architecture freshly initialised (seed "
                        f"{zero_shot['seed']}), trained on nothing" if zero_shot["weights"] == "untrained" else
                        f"zero-shot on {target}: the run's model as trained on {zero_shot['source_dataset']}, "
                        f"never trained on {target}")
    state = out.get("unfinished_run")
    if state:
        doing = (f"still training (pid {state['pid']})" if state["status"] == "training"
                 else f"{state['status']} before finishing")
        lines.append(f"note: run {out['run']} is {doing}; this scores its best checkpoint so far (epoch "
                     f"{state['best_epoch']} of {state['epochs_done']} done); rank it again when training has ended")
    for k in out["ks"]:
        hr, ndcg = out[f"HR@{k}"], out[f"NDCG@{k}"]
        lines.append(f"  HR@{k:<3} {percent(hr):>6}%   NDCG@{k:<3} {percent(ndcg):>6}%")
    for row in ("popularity", "oracle", WITHOUT_LINKS):
        if out.get(row) and out[row]["users"]:
            lines.append(f"  {out[row]['model']}: " + "  ".join(f"HR@{k} {percent(out[row][f'HR@{k}'])}%"
                                                            for k in out["ks"]))
    if out.get("percent_of_oracle"):
        lines.append("  % of oracle: " + "  ".join(f"{name} {value:.1f}"
                                                  for name, value in out["percent_of_oracle"].items()))
    lines.append(f"saved in {out['eval_json']}")
    if "export" in out:
        lines.append(f"vectors exported to {out['export']['dir']}")
    return "\n".join(lines)


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the markdown table to this file (it is printed either way).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: HR@10 against TS-DNN depth and against seconds per epoch.")
@root_option
@json_option
def compare(ws: Workspace, as_json: bool, runs: tuple[str, ...], out: Path | None,
            plot: Path | None) -> None:
    """A table of runs (names under ROOT/runs or folders): mode, encoder, layers, trainable
    parameters, time per epoch, peak memory and HR/NDCG@K (test results from eval.json if
    present, else best validation)."""
    summaries = [summarize_run(resolve_run(ws, run)) for run in runs]
    summaries = _dataset_rows(ws, summaries) + summaries
    table = markdown_table(summaries)
    result: dict = {"runs": [s.__dict__ for s in summaries]}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        result["report"] = str(out)
    if plot is not None:
        from eval.plots import plot_compare

        result["plot"] = str(plot_compare(summaries, plot))
    emit(result, as_json, table.rstrip("\n"))


def _dataset_rows(ws: Workspace, summaries: list) -> list:
    """Popularity and oracle rows for each generated dataset the runs were trained on."""
    from data.dataset import PreparedDataset
    from data.oracle import is_synthetic
    from eval.compare import reference_summaries

    ks = sorted({int(name.split("@")[1]) for s in summaries for name in s.metrics}) or [10]
    rows = []
    for name in dict.fromkeys(s.dataset for s in summaries if s.dataset):
        folder = ws.dataset_dir(name)
        if (folder / "manifest.json").exists() and is_synthetic(dataset := PreparedDataset.load(folder)):
            rows += reference_summaries(dataset, ks)
    return rows


@cli.command("plot-items")
@run_argument
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG file to write.")
@click.option("--method", type=click.Choice(["pca", "tsne"]), default="pca", show_default=True,
              help="2-D projection (scikit-learn).")
@click.option("--max-items", type=click.IntRange(min=3), default=5000, show_default=True,
              help="Plot a random sample of at most this many items (t-SNE is quadratic).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the sample and projection.")
@root_option
@json_option
def plot_items(ws: Workspace, as_json: bool, run_arg: str | None, run_option: str | None, out: Path,
               method: str, max_items: int, seed: int) -> None:
    """A 2-D map of the run RUN's item vectors coloured by training popularity (003 Fig. 4)."""
    import torch

    from eval.plots import plot_item_map, project_2d

    run_dir = resolve_run(ws, one_run(run_arg, run_option))
    model, config, dataset = load_run_and_dataset(ws, run_dir, "cpu")
    with torch.no_grad():  # load_run returns the model in eval mode
        vectors = model.item_vectors(batch_size=4096).float().cpu().numpy()[1:]
    counts = dataset.train_counts()[1:]
    ids = np.arange(len(vectors))
    if max_items > 0 and len(ids) > max_items:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=max_items, replace=False))
    if len(ids) < 3:
        raise UserError(f"run {run_dir.name} has {len(ids)} items; a 2-D map needs at least 3")
    coords = project_2d(vectors[ids], method, seed)
    title = f"{run_dir.name} ({run_mode(config)}): item vectors, {method.upper()}"
    path = plot_item_map(coords, counts[ids].astype(np.float64), out, title)
    emit({"run": run_dir.name, "plot": str(path), "items": int(len(ids)), "method": method},
         as_json, f"wrote {path} ({len(ids)} items, {method})")


def main() -> None:
    run_cli(cli, "eval")


def rank_main() -> None:
    """The ``rank`` console script: in bash and zsh ``eval rank ...`` runs the builtin ``eval``,
    which runs ``rank ...``, so this makes the command work as typed."""
    run_cli(rank, "eval rank")


if __name__ == "__main__":
    main()
