"""``recommend study``: which item tower is worth its cost on one dataset (001 Tables 5 and 6).

One command runs the papers' comparison: IDRec, TS, TS-DNN-N for each depth N, E2E
(top-K blocks fine-tuned), adapters and IISAN's side networks, all on the same dataset, backbone, loss and
budget, each ranked against the full item pool on the test split, next to the
popularity baseline, with what each cost (trainable parameters, seconds per epoch,
peak memory).

Why it is built from the pieces a user would run by hand: every step is already
resumable on its own, so the study is too. Extraction resumes from its finished
chunks; each configuration trains into a run folder whose name is derived from a
hash of its settings (the same study finds the same runs again), resumes from
``last.safetensors`` and is skipped once finished; a run's test result is kept in its
``eval.json``. Killed and started again, the study redoes at most one epoch.

The report reuses :mod:`eval.compare` (the table) and :mod:`eval.plots` (the PNGs of
``eval compare``), so a study and a hand-made comparison read the same way.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import signal
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click
import torch

from data.dataset import COLD_THRESHOLD, PreparedDataset
from eval.results import load_run_and_dataset, record_result, result_key, stamp
from eval.compare import markdown_table, reference_summaries, summarize_run
from eval.evaluate import evaluate_subsets, subset_users
from eval.metrics import format_metrics
from eval.ranking import TIES_RULE
from featurestore.errors import UserError
from featurestore.store import GroupLock
from featurestore.workspace import Workspace
from extract.layers import states_variant
from extract.names import parse_library_name, store_spelling
from extract.registry import weights_location
from recommend.item_towers import ITEM_TOWERS, list_item_towers
from recommend.live_start import LIVE_STARTS, live_rows_report, start_live_rows
from recommend.plugins import fill_defaults
from recommend.run import BEST, CHECKPOINT, FINISHED, write_atomic
from recommend.study_tune import plot_validation, seed_options, seed_statistics, tune_configurations
from recommend.tracker import Parent
from recommend.tracking import TRACKING_OPTIONS, parent_run
from recommend.trainer import TrainOptions, train

DEFAULT_LAYERS = (2, 6, 8, 10, 12)
KS = (10,)  # 001 Table 5 reports HR@10 and NDCG@10
REPORT = "report.md"
SUMMARY = "study.json"
PLOTS = {"HR@10": "compare-hr10.png", "NDCG@10": "compare-ndcg10.png"}
PR_SET_PDEATHSIG = 1  # prctl(2)
LOCK = "study.lock"
SUBSET_TABLE = ("warm", "cold")  # the user subsets of the report's second table


@dataclass
class StudyOptions:
    """Everything ``recommend study`` takes (see its ``--help``)."""

    dataset: str
    encoder: str
    layers: list[int] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    modes: list[str] = field(default_factory=list_item_towers)
    top_k: int = 2
    cached: bool = True
    epochs: int = TrainOptions.epochs
    live_epochs: int | None = None  # e2e / adapter runs stop at this many epochs (None: --epochs)
    dim: int = TrainOptions.dim  # one set of defaults with ``recommend train``
    batch_size: int = TrainOptions.batch_size
    lr: float = TrainOptions.lr
    patience: int = TrainOptions.patience
    seed: int = 42
    random_init: bool = False
    weights: str | None = None  # the encoder's weights file / model folder / hub id, as `featurestore extract --weights`
    device: str = "auto"
    threads: int | None = None
    out: Path | None = None
    tune: int = 0  # Optuna trials per configuration on validation (0: no tuning); recommend.study_tune
    tune_modes: list[str] = field(default_factory=list_item_towers)
    seeds: int = 1  # runs per configuration, seeds seed .. seed + seeds - 1
    live_start: str = "ts"  # e2e / adapter rows start from the study's TS run (recommend.live_start), or cold
    track: str | None = None  # every run's --track (recommend.tracking); mlflow: the study is their parent run
    tracking_uri: str | None = None


@dataclass
class Configuration:
    """One row of the study: a mode (and depth or top-K) and what became of it."""

    label: str
    mode: str
    options: TrainOptions | None = None
    run: str | None = None
    status: str = "planned"  # planned, trained, finished earlier, failed, unavailable
    reason: str | None = None
    test: dict | None = None  # mean over the seeds' runs
    group: dict | None = None  # signature of the store group its runs read (see run_name)
    tuned: dict | None = None  # the parameters Optuna chose, when tuned
    tune_study: str | None = None
    borrowed: dict | None = None  # {"from": label, "lr": ...} for an untuned mode under --tune
    sd: dict | None = None  # sample sd over the seeds (None for one seed)
    seeds: list[dict] = field(default_factory=list)  # per seed: seed, run, status, test
    curve: str | None = None  # validation-curve PNG, for a row below popularity
    subsets: dict | None = None  # SUBSETS -> test metrics of those users, mean over the seeds
    start: str | None = None  # live rows: how they started (recommend.live_start)

    def to_dict(self) -> dict:
        return {"label": self.label, "mode": self.mode, "run": self.run, "status": self.status,
                "reason": self.reason, "test": self.test, "sd": self.sd, "tuned": self.tuned is not None,
                "tune_study": self.tune_study, "params": self.tuned, "borrowed": self.borrowed,
                "hyperparameters": None if self.options is None else hyperparameters(self.options),
                "seeds": self.seeds, "curve": self.curve, "subsets": self.subsets, "start": self.start}


def check_options(opts: StudyOptions) -> StudyOptions:
    modes = ITEM_TOWERS.names()
    unknown = [m for m in opts.modes if m not in modes]
    if unknown or not opts.modes:
        raise UserError(f"--modes {','.join(opts.modes) or '(empty)'}: choose from {','.join(modes)}")
    if "ts-dnn" in opts.modes and not opts.layers:
        raise UserError("--modes has ts-dnn but --layers is empty; give depths, e.g. --layers 2,8")
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"--threads must be >= 1, got {opts.threads}")
    if opts.tune < 0 or opts.seeds < 1:
        raise UserError(f"--tune must be >= 0 and --seeds >= 1, got --tune {opts.tune} --seeds {opts.seeds}")
    unknown = [m for m in opts.tune_modes if m not in modes]
    if unknown:
        raise UserError(f"--tune-modes {','.join(opts.tune_modes)}: choose from {','.join(modes)}")
    if any(n < 0 for n in opts.layers):
        raise UserError(f"--layers must be >= 0, got {','.join(map(str, opts.layers))}")
    if opts.live_start not in LIVE_STARTS:
        raise UserError(f"--live-start {opts.live_start}: choose from {', '.join(LIVE_STARTS)}")
    if opts.weights and opts.random_init:
        raise UserError("pass either --weights or --random-init, not both")
    library = parse_library_name(opts.encoder)
    if library is not None and library.revision:  # the rows' names read '@' as a store variant
        raise UserError(f"--encoder {opts.encoder}: a study takes no @REVISION (its runs read '@' as a store "
                        f"variant); study --encoder {library.scheme}:{library.model} --weights FOLDER with that "
                        "revision's model folder (a hub snapshot)")
    if opts.weights:  # as the extraction records it
        opts = replace(opts, weights=weights_location(opts.weights))
    return opts


def run_name(dataset: PreparedDataset, label: str, options: TrainOptions,
             features: dict | None = None) -> str:
    """``DATASET-LABEL[-ENCODER]-HASH``: the same settings on the same data, the same name.

    The hash covers every training option (but where it runs), the dataset fingerprint
    and, for runs on stored vectors, how the store group was made (``features``: its
    signature), so a rerun finds its runs and a changed setting, dataset or re-extracted
    group gets new ones. An ID run names no encoder: studies of several encoders share it.
    """
    filled = fill_defaults(options)  # every plugin's defaults name it too (TS-DNN depth, sasrec's --init-std)
    settings = {k: v for k, v in filled.to_dict().items()  # every value: a changed default is a new run
                if k not in ("run_name", "device", *TRACKING_OPTIONS) and v is not None}
    identity = {"options": settings, "dataset": dataset.fingerprint, "features": features}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    encoder = "-" + store_spelling(options.encoders[0]) if options.encoders else ""  # hf:ORG/NAME as hf+ORG+NAME
    return f"{dataset.name}-{label}{encoder}-{digest}"


def plan(opts: StudyOptions, dataset: PreparedDataset, inputs: dict | None = None) -> list[Configuration]:
    """The configurations in report order, each mode's rows as the mode lists them; a mode this
    installation lacks is one row marked unavailable.

    ``inputs`` maps a mode to the signature of what its rows read (the kind's ``study_inputs``; see
    :func:`run_name`); a row hashes it into its run name.
    """
    common = TrainOptions(dataset=opts.dataset, dim=opts.dim, batch_size=opts.batch_size,
                          epochs=opts.epochs, patience=opts.patience, lr=opts.lr, seed=opts.seed,
                          device=opts.device, track=opts.track, tracking_uri=opts.tracking_uri)
    configs, available = [], set(list_item_towers())
    for mode in (m for m in ITEM_TOWERS.names() if m in opts.modes):
        if mode not in available:
            configs.append(Configuration(mode, mode, status="unavailable",
                                         reason=f"`recommend train --mode {mode}` is not available in this installation"))
            continue
        kind = ITEM_TOWERS.get(mode)
        group = (inputs or {}).get(mode)
        for label, settings in kind.study_rows(mode, opts):
            options = common.replace(mode=mode, **settings)
            if kind.runs_encoder_live and opts.live_epochs is not None:
                options = options.replace(epochs=min(options.epochs, opts.live_epochs))
            options = options.replace(run_name=run_name(dataset, label, options, group))
            configs.append(Configuration(label, mode, options=options, run=options.run_name, group=group))
    return configs


def _live_modes() -> list[str]:
    return [m for m in list_item_towers() if ITEM_TOWERS.get(m).runs_encoder_live]


def ensure_features(ws: Workspace, opts: StudyOptions, progress: bool,
                    cache_layer: int | str | None = None) -> tuple[dict, dict]:
    """Extract the encoder's store group if it is missing or unfinished (resumes a killed job).

    Always goes through the extraction job, which checks that an existing group was
    written with the same weights and settings (so a random-init group is never
    mistaken for a pretrained one) and returns at once when the group is complete.
    ``opts.weights`` (``--weights``) are the weights it loads: a model folder stands in for an ``hf:``
    name's uncached hub repository, so a study runs offline; their ``state_sha256`` (and a folder's
    tokenizer, in ``preprocessing``) is in the signature, so other weights make other runs.
    With ``cache_layer`` K it is the variant ``ENC@topK`` that also keeps, per item, the
    states entering the top K blocks: cached e2e trains from them and gets the same loss
    and gradients as the live encoder, about twice as fast (BENCHMARKS.md).

    Returns:
        ``(the job's summary, the group's signature: encoder, pooling, weights hash, ...)``.
    """
    from extract.job import SIGNATURE_KEYS, ExtractOptions, run_extraction
    from featurestore.store import FeatureStore

    cache = {} if cache_layer is None else {"cache_layer": cache_layer, "variant": states_variant(cache_layer)}
    result = run_extraction(ws, ExtractOptions(dataset=opts.dataset, encoder=opts.encoder, weights=opts.weights,
                                               random_init=opts.random_init, progress=progress, **cache))
    attrs = FeatureStore(ws.store).open(result.group).attrs
    return result.to_dict(), {key: attrs.get(key) for key in SIGNATURE_KEYS}


def rank_on_test(ws: Workspace, run_dir: Path) -> dict[str, dict]:
    """Full-pool test metrics of a finished run for all users and for each of
    :data:`SUBSET_TABLE`, as ``eval rank --subset`` computes and stores them.

    Reuses the run's ``eval.json`` entries when they exist for these options; otherwise the
    model is loaded and every user ranked once, each subset's metrics taken from those ranks
    (a user's rank does not depend on which other users are ranked).
    """
    subsets = ("all", *SUBSET_TABLE)
    keys = {subset: result_key({"split": "test", "subset": subset, "exclude_history": True, "ks": list(KS)})
            for subset in subsets}
    stored = run_dir / "eval.json"
    try:
        previous = json.loads(stored.read_text()) if stored.exists() else {}
    except json.JSONDecodeError:
        previous = {}  # record_result sets the unreadable file aside
    found = {subset: previous.get(key) for subset, key in keys.items()}
    if all(r is not None and "unfinished_run" not in r for r in found.values()):  # not scores of a checkpoint so far
        return found
    model, _config, dataset = load_run_and_dataset(ws, run_dir)
    results = evaluate_subsets(model, dataset, subsets, "test", ks=KS, exclude_history=True)
    for result in results.values():
        record_result(run_dir, stamp(result, dataset))
    return results


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the study dies, so a killed study leaves no trainer running
    on into the folder its restart will resume."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _train_child(conn, root: Path, options: TrainOptions, progress: bool, threads: int | None) -> None:
    _die_with_parent()
    if threads:
        torch.set_num_threads(threads)
    try:
        # echo: each epoch's loss and validation metrics reach the study's stderr as they come
        conn.send(("ok", train(Workspace(root), options, progress=progress, echo=progress)))
    except (UserError, OSError) as err:
        conn.send(("error", err))
    except BaseException:  # a bug: keep its traceback for the study's error
        conn.send(("bug", traceback.format_exc()))


def train_in_child(ws: Workspace, options: TrainOptions, progress: bool, threads: int | None = None) -> dict:
    """:func:`recommend.trainer.train` in a fresh process: each run's peak memory (Table 6)
    is its own, as with ``recommend train``, not the study's high-water mark so far."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_train_child, args=(send, ws.root, options, progress, threads))
    child.start()
    send.close()
    try:
        kind, value = receive.recv()
    except EOFError:
        child.join()
        raise UserError(f"training run {options.run_name} ended without a result (exit code "
                        f"{child.exitcode}); run the study again to resume it") from None
    child.join()
    if kind == "bug":
        raise RuntimeError(f"training run {options.run_name} failed:\n{value}")
    if kind == "error":
        raise value
    return value


def _finished_message(run_dir: Path) -> str | None:
    """best.json's message when the run has ended (its name pins its settings), else None."""
    path = run_dir / BEST
    if not path.exists():
        return None
    best = json.loads(path.read_text())
    return best.get("message", "") if best.get("status") in FINISHED else None


def _train_and_rank(ws: Workspace, config: Configuration, runs: list[TrainOptions], progress: bool,
                    threads: int | None) -> None:
    """Train (or find finished) each seed's run and rank it on test; the row's test is their mean."""
    config.seeds = []
    for options in runs:
        run_dir = ws.run_dir(options.run_name)
        message = _finished_message(run_dir)
        if message is None:
            message = train_in_child(ws, options, progress, threads)["message"]
            status = "trained"
        else:
            status = "finished earlier"
        if not (run_dir / CHECKPOINT).exists():
            config.status, config.reason = "failed", f"no checkpoint in {options.run_name}: {message}"
            return
        ranked = rank_on_test(ws, run_dir)
        config.seeds.append({"seed": options.seed, "run": options.run_name, "status": status,
                             "test": _metrics(ranked["all"]),
                             "subsets": {subset: _metrics(ranked[subset]) for subset in SUBSET_TABLE}})
    config.status = "trained" if any(s["status"] == "trained" for s in config.seeds) else "finished earlier"
    config.test, config.sd = seed_statistics([s["test"] for s in config.seeds])
    config.subsets = {subset: seed_statistics([s["subsets"][subset] for s in config.seeds])[0]
                      for subset in SUBSET_TABLE}


def _metrics(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith(("HR@", "NDCG@"))}


def subset_table(dataset: PreparedDataset, configs: list[Configuration]) -> str:
    """Markdown: test HR@10 / NDCG@10 of warm and cold users (their target's training count at
    least / under COLD_THRESHOLD), popularity and oracle rows first: where IDRec and content differ."""
    from data.oracle import reference_rows

    users = {subset: len(subset_users(dataset, "test", subset)) for subset in SUBSET_TABLE}
    head = " | ".join(f"{subset} ({users[subset]} users) {metric} (%)" for subset in SUBSET_TABLE
                      for metric in ("HR@10", "NDCG@10"))
    lines = [f"| run | {head} |", "|---" * (1 + 2 * len(SUBSET_TABLE)) + "|"]
    references = {subset: reference_rows(dataset, "test", KS, True, subset) for subset in SUBSET_TABLE}
    rows = [(row["model"], {subset: references[subset][name] for subset in SUBSET_TABLE})
            for name, row in references[SUBSET_TABLE[0]].items()]
    rows += [(c.label, c.subsets) for c in configs if c.subsets]
    for name, metrics in rows:
        cells = " | ".join("-" if metrics[subset][metric] is None else f"{100 * metrics[subset][metric]:.2f}"
                           for subset in SUBSET_TABLE for metric in ("HR@10", "NDCG@10"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def _row_summary(ws: Workspace, config: Configuration, seeds: int):
    """The table row of a configuration: its first seed's run, with the mean over the seeds."""
    first = summarize_run(ws.run_dir(config.run))
    if seeds == 1:
        return first
    return replace(first, metrics=config.test, source=f"test mean of {seeds} seeds (history excluded)")


def _draw_curves(ws: Workspace, configs: list[Configuration], popularity: dict, out: Path) -> None:
    """A validation-curve PNG for each configuration whose mean test HR@10 is below popularity's."""
    metric = f"HR@{KS[0]}"
    for config in configs:
        if config.test[metric] >= popularity[metric]:
            continue
        runs = [ws.run_dir(s["run"]) for s in config.seeds]
        valid = json.loads((runs[0] / BEST).read_text()).get("popularity") or {}
        name = f"valid-{config.label}.png"
        plot_validation(runs, valid.get(metric), out / name, f"{config.label}: below popularity on test")
        config.curve = name


def hyperparameters(options: TrainOptions) -> dict:
    """The searched hyper-parameters and width a report row states."""
    return {k: getattr(options, k) for k in ("lr", "weight_decay", "dropout", "dim")}


def _outcome(config: Configuration) -> str:
    """The one line a configuration gets once it is done: its test metrics, or why it has none."""
    if config.test is None:
        return f"{config.status}: {config.reason}"
    return f"{config.status}; test {format_metrics(config.test)}"


def default_out(ws: Workspace, opts: StudyOptions) -> Path:
    return opts.out or ws.study_dir(f"{opts.dataset}-{store_spelling(opts.encoder)}")


def write_report(out: Path, opts: StudyOptions, dataset: PreparedDataset, configs: list[Configuration],
                 table: str, features: dict | None, command: str, subsets: str, live: list[str] = ()) -> Path:
    """``report.md``: setup, the accuracy/cost table, what was not run and why, figures."""
    lines = [
        f"# Study: {dataset.name} with {opts.encoder}",
        "",
        "Which item tower is worth its cost on this dataset: IDRec, TS (stored vectors + DT layer), "
        "TS-DNN-N (stored vectors + N dense layers), E2E (top-K encoder blocks fine-tuned) and "
        "adapters, against the popularity baseline (001 Tables 5 and 6) and, on a generated dataset, "
        "the oracle: the world's true next-item distribution ranked by the same protocol.",
        "",
        f"- dataset: `{dataset.name}`, {dataset.n_users} users, {dataset.n_items} items, "
        f"fingerprint `{dataset.fingerprint}`",
    ]
    if features:
        lines.append(f"- features: store group `{features['group']}` ({features['status']}, "
                     f"{features['embedded']}/{features['items']} items embedded)")
    lines += [
        f"- training: SASRec, loss {TrainOptions.loss}, d = {opts.dim}, batch {opts.batch_size}, "
        f"lr {opts.lr:g}, at most {opts.epochs} epochs"
        + (f" ({opts.live_epochs} for {' and '.join(_live_modes())}, which run the encoder every step)"
           if opts.live_epochs is not None else "")
        + f", early stopping after {opts.patience} epochs without a better validation HR@10 "
        f"({TrainOptions.plateau_patience} while still at popularity's level), seed {opts.seed}",
        f"- evaluation: test split (last item), ranked against all {dataset.n_items} items, the user's "
        f"history excluded, ties rank the target last ({TIES_RULE}); metrics in percent",
        f"- command: `{command}`",
        "",
        "## Accuracy and cost",
        "",
        table.rstrip("\n"),
        "",
        "`s/epoch` is training time per epoch without validation; `peak RSS MB` the largest resident "
        "memory of the training process; `source` says where the metrics come from.",
        "",
    ]
    lines += _settings_section(opts, configs)
    lines += live
    lines += [
        "## Warm and cold users",
        "",
        f"Test users split by their target item's training interactions: warm at least {COLD_THRESHOLD}, "
        f"cold fewer (001 §4.3: IDRec is strong on warm items, content is needed on cold ones).",
        "",
        subsets.rstrip("\n"),
        "",
    ]
    missing = [c for c in configs if c.status in ("unavailable", "failed")]
    if missing:
        lines += ["## Not run", ""]
        lines += [f"- {c.label}: {c.status}: {c.reason}" for c in missing]
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{metric} against TS-DNN depth and training cost]({name})" for metric, name in PLOTS.items()]
    lines.append("")
    path = out / REPORT
    write_atomic(path, "\n".join(lines).encode())
    return path


def _settings_section(opts: StudyOptions, configs: list[Configuration]) -> list[str]:
    """Per row: the hyper-parameters used, whether they were tuned, mean ± sd over the seeds,
    and the validation curve of a row below popularity."""
    if opts.tune:
        tuned = ",".join(m for m in opts.tune_modes if m in opts.modes) or "none"
        how = (f"Tuned: modes {tuned}, {opts.tune} Optuna trials each (TPE, median pruning) on validation "
               "HR@10 over lr, weight decay, dropout and d; the test split ranks only each one's best. "
               "Untuned modes take the lr tuned for the row named under `lr from` (e2e encoder blocks at "
               "that lr / 10) and keep the other defaults.")
    else:
        how = "Not tuned: every row uses the options above (`--tune N` searches them per row)."
    spread = (f"mean ± sample sd over seeds {opts.seed}..{opts.seed + opts.seeds - 1}" if opts.seeds > 1
              else f"seed {opts.seed}")
    lines = ["## Hyper-parameters and seeds", "", how, "",
             "| configuration | tuned | lr | weight decay | dropout | d | lr from | test HR@10 (%) | "
             "test NDCG@10 (%) | runs | validation curve |", "|" + "---|" * 11]
    for c in configs:
        if c.options is None or c.test is None:
            continue
        h = hyperparameters(c.options)
        cells = [f"{100 * c.test[m]:.2f}" + (f" ± {100 * c.sd[m]:.2f}" if c.sd else "") for m in ("HR@10", "NDCG@10")]
        lines.append(f"| {c.label} | {'yes' if c.tuned else 'no'} | {h['lr']:.3g} | {h['weight_decay']:.3g} | "
                     f"{h['dropout']:.3g} | {h['dim']} | {c.borrowed['from'] if c.borrowed else '-'} | "
                     f"{cells[0]} | {cells[1]} | {', '.join(s['run'] for s in c.seeds)} | "
                     f"{f'[below popularity]({c.curve})' if c.curve else '-'} |")
    return [*lines, "", f"Test metrics: {spread}.", ""]


def run_study(ws: Workspace, opts: StudyOptions, progress: bool = True,
              command: str = "recommend study") -> dict:
    """Extract, train, rank and report; every step resumes or is skipped when done.

    Returns:
        ``{"report", "out", "table", "popularity", "configurations": [...], "features"}``.

    Example:
        >>> run_study(ws, StudyOptions(dataset="demo", encoder="efficientnet-lite0",
        ...                            layers=[2, 8], modes=["id", "ts", "ts-dnn"]))["report"]
    """
    opts = check_options(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dataset = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    out = default_out(ws, opts)
    out.mkdir(parents=True, exist_ok=True)
    # one study per folder: a second one would train the same runs and rewrite the same report
    with GroupLock(out / LOCK, str(out), what="study folder", command=command), \
            parent_run(ws.root, opts.track, opts.tracking_uri, opts.dataset, out, "study", asdict(opts)) as parent:
        result = _study(ws, opts, dataset, out, progress, command)
        _track(ws, parent, result, out)
        return result


def _track(ws: Workspace, parent: Parent, result: dict, out: Path) -> None:
    """The study's parent run: every row's runs nested with their eval.json, each row's test
    metrics, the report, study.json and the figures."""
    rows = result["configurations"]
    for row in rows:
        for seed in row["seeds"]:
            parent.nest(ws.run_dir(seed["run"]))
    parent.record({f"test/{row['label']}/{k}": v for row in rows if row["test"] for k, v in row["test"].items()},
                  [out / REPORT, out / SUMMARY, *sorted(out.glob("*.png"))])


def _study(ws: Workspace, opts: StudyOptions, dataset: PreparedDataset, out: Path, progress: bool,
           command: str) -> dict:
    from eval.plots import plot_compare

    say = (lambda text: click.echo(text, err=True)) if progress else (lambda text: None)

    extracted: dict = {}  # --cache-layer -> (the job's summary, the group's signature), once per study

    def extract(cache_layer: int | str | None, purpose: str) -> dict:
        if cache_layer not in extracted:
            say(f"study: {purpose}")
            extracted[cache_layer] = ensure_features(ws, opts, progress, cache_layer=cache_layer)
        return extracted[cache_layer][1]

    inputs = {mode: ITEM_TOWERS.get(mode).study_inputs(ws, opts, extract, progress)
              for mode in list_item_towers() if mode in opts.modes}
    features = extracted.get(None, (None, None))[0]
    configs = plan(opts, dataset, inputs)
    todo = [c for c in configs if c.options is not None]

    def rename(config: Configuration, options: TrainOptions) -> str:
        return run_name(dataset, config.label, options, config.group)

    if opts.tune:
        tune_configurations(ws, todo, opts.tune, opts.tune_modes, opts.seed, rename, say, progress)
    start_live_rows(todo, opts.live_start, rename)  # after tuning: the TS row's run is final
    for number, config in enumerate(todo, 1):
        say(f"study: [{number}/{len(todo)}] {config.label}: run {config.run}")
        try:
            _train_and_rank(ws, config, seed_options(config, opts.seeds, rename), progress, opts.threads)
        except UserError as err:  # this configuration cannot run here; the others still can
            config.status, config.reason = "failed", str(err)
        say(f"study: [{number}/{len(todo)}] {config.label}: {_outcome(config)}")

    summaries = reference_summaries(dataset, KS)
    ranked = [c for c in configs if c.test is not None]
    summaries += [_row_summary(ws, c, opts.seeds) for c in ranked]
    table = markdown_table(summaries)
    _draw_curves(ws, ranked, summaries[0].metrics, out)
    for metric, name in PLOTS.items():
        plot_compare(summaries, out / name, metric=metric)
    subsets = subset_table(dataset, ranked)
    live = live_rows_report(ws, ranked, out)
    report = write_report(out, opts, dataset, configs, table, features, command, subsets, live)
    result = {"report": str(report), "out": str(out), "table": table, "subset_table": subsets,
              "popularity": summaries[0].metrics,
              "oracle": next((s.metrics for s in summaries if s.mode == "oracle"), None), "configurations": [c.to_dict() for c in configs],
              "features": features, "plots": [str(out / name) for name in PLOTS.values()]}
    write_atomic(out / SUMMARY, (json.dumps(result, indent=2, default=str) + "\n").encode())
    return result
