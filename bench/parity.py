"""Parity with RecBole 1.2.1: its SASRec / GRU4Rec against ours on the identical split.

A comparison table is only worth reading if our IDRec baseline is as strong as a peer
library's. This bench trains RecBole's model (its defaults: CE loss over the catalogue,
Adam 1e-3, batch 2048, its early stopping) and ours (``recommend train --mode id`` with
the same backbone and width) on the same prepared dataset, and prints test HR@10 and
NDCG@10 for both under both protocols:

- ``kept``: the user's history stays in the ranking (RecBole's protocol for sequential
  models). RecBole's own evaluator reports it; we also rescore its model with our ranking
  code as a check that the two agree.
- ``excluded``: history removed from the ranking (the papers' protocol and our default):
  RecBole's trained model is rescored with ``eval.ranking`` (its exported item table and
  sequence outputs), ours by ``eval.evaluate``.

The split RecBole sees is built from our prepared sequences (``bench.recbole_split``), not
from its own filtering, and checked target by target and history by history against ours
before any number is printed. RecBole reads the same history window as our model
(``MAX_ITEM_LIST_LENGTH`` = our ``max_seq_len``) and scores the same catalogue (an
``.item`` file lists every item).

RecBole needs numpy < 2 and our zarr 3 needs numpy 2, so RecBole runs in its own
virtualenv (created on first use from :data:`PINS`, outside the repository) as a
subprocess (``bench/recbole_runner.py``); data goes both ways through files.

    python bench/parity.py                                   # synthetic generic, SASRec, seed 0
    python bench/parity.py --model gru4rec --seeds 0,1
    python bench/parity.py --ours "tuned=--lr 1e-3 --loss inbatch" --seeds 0,1,2
    python bench/parity.py --dataset HM --root /data/ws --dim 64   # any prepared dataset
    python bench/parity.py --panel --seeds 0,1,2 --ablation-seeds 0   # issue 28's panel of worlds

``--panel`` (issue 28) runs the comparison on each generated world of :data:`PANEL` (shapes
other than the demo's: long sequences, a heavy popularity head, a wide catalogue): RecBole,
our defaults and ``inbatch`` (ce against inbatch at equal tuning) at every seed, RecBole's
whole protocol (:data:`RECBOLE_PROTOCOL`) and the ablation (each RecBole setting alone on top
of our defaults, :data:`ABLATION`) at ``--ablation-seeds``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import venv
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from recbole_split import check_split, write_inter, write_item  # bench/ is the script folder
from data.dataset import PreparedDataset
from data.prepare import prepare_dataset, synthetic_dataset
from data.synth import Signals, synthesize
from eval.evaluate import EvalVectors, evaluate, popularity_metrics, vector_ranks
from eval.metrics import metrics_from_ranks
from eval.ranking import csr_rows
from featurestore.cliutil import UserError
from featurestore.workspace import Workspace
from recommend.batches import model_seq_len
from recommend.run import FINISHED, load_run
from recommend.trainer import TrainOptions
from recommend.plugins import fill_defaults

# RecBole's environment: known to work with these (numpy < 2 for np.float_, pandas < 2.3;
# torch 2.13.0 is the CPU wheel this machine keeps on disk: no multi-GB CUDA download)
PINS = ("recbole==1.2.1", "torch==2.13.0", "numpy==1.26.4", "pandas==2.2.3")
DEFAULT_VENV = Path.home() / ".cache" / "morec-store" / "recbole-1.2.1"
RUNNER = Path(__file__).with_name("recbole_runner.py")
KS = (10,)
PROTOCOLS = {"kept": False, "excluded": True}  # name -> exclude_history


@dataclass(frozen=True)
class ModelPair:
    """One architecture in both libraries: RecBole's model name and width settings at d, our backbone."""

    recbole: str
    backbone: str
    widths: tuple[tuple[str, int], ...]  # RecBole setting -> multiple of d (its defaults' ratios)


MODELS = {
    "sasrec": ModelPair("SASRec", "sasrec", (("hidden_size", 1), ("inner_size", 4))),
    "gru4rec": ModelPair("GRU4Rec", "gru4rec", (("embedding_size", 1), ("hidden_size", 2))),
}
REPORT_KEYS = ("learning_rate", "train_batch_size", "epochs", "stopping_step", "valid_metric", "weight_decay",
               "loss_type", "MAX_ITEM_LIST_LENGTH", "hidden_size", "embedding_size", "inner_size", "n_layers",
               "num_layers", "hidden_dropout_prob", "attn_dropout_prob", "dropout_prob", "seed")


def ensure_venv(path: Path) -> Path:
    """RecBole's virtualenv at ``path`` with :data:`PINS` installed (created when missing); its python."""
    python = path / "bin" / "python"
    if not _pinned(python):
        click.echo(f"creating RecBole's virtualenv at {path} ({', '.join(PINS)}) ...", err=True)
        venv.create(path, with_pip=True, clear=python.exists())
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
        if not _pinned(python):
            raise UserError(f"the virtualenv {path} does not hold {', '.join(PINS)} after pip install; "
                            "remove it and rerun, or pass --venv")
    return python


def _pinned(python: Path) -> bool:
    if not python.exists():
        return False
    probe = ("import json, recbole, torch, numpy, pandas; print(json.dumps({m.__name__: m.__version__ "
             "for m in (recbole, torch, numpy, pandas)}))")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if done.returncode:
        return False
    found = json.loads(done.stdout)
    return all(found.get(name, "").split("+")[0] == version
               for name, version in (pin.split("==") for pin in PINS))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def run_recbole(python: Path, ws: Workspace, dataset: PreparedDataset, pair: ModelPair, dim: int,
                seed: int, overrides: dict, threads: int, device: str, redo: bool,
                finished_only: bool = False) -> dict | None:
    """Train RecBole's model on our split in its venv; its result and export (cached by settings; None
    when ``finished_only`` and no run with these settings has finished)."""
    data_path = ws.root / "parity" / "recbole-data"
    write_inter(dataset, data_path / dataset.name / f"{dataset.name}.inter")
    write_item(dataset, data_path / dataset.name / f"{dataset.name}.item")
    settings = {"MAX_ITEM_LIST_LENGTH": model_seq_len(dataset),
                **{key: ratio * dim for key, ratio in pair.widths}, **overrides}
    job = {"work_dir": "", "data_path": str(data_path), "dataset": dataset.name, "model": pair.recbole,
           "seed": seed, "threads": threads, "device": device, "n_items": dataset.n_items,
           "overrides": settings, "report_keys": list(REPORT_KEYS),
           "fingerprint": dataset.manifest["interactions_fingerprint"]}
    work = ws.root / "parity" / "recbole" / f"{dataset.name}-{pair.recbole}-d{dim}-s{seed}-{_digest(job)}"
    job["work_dir"] = str(work)
    if finished_only and not (work / "result.json").exists():
        return None
    if redo or not (work / "result.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        (work / "job.json").write_text(json.dumps(job, indent=2))
        with open(work / "runner.log", "w") as log:
            done = subprocess.run([str(python), str(RUNNER), str(work / "job.json")], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if done.returncode:
            raise UserError(f"RecBole's {pair.recbole} failed (exit {done.returncode}); see {work / 'runner.log'}")
    result = json.loads((work / "result.json").read_text())
    with np.load(work / "export.npz") as arrays:
        result["export"] = dict(arrays)
    return result


def rescore(dataset: PreparedDataset, export: dict) -> dict:
    """RecBole's model under both protocols, ranked by our code, after checking its split."""
    for split in ("valid", "test"):
        check_split(dataset, split, export[f"{split}_users"], export[f"{split}_targets"],
                    export[f"{split}_histories"])
    users = export["test_users"]
    order = np.argsort(users)  # our user order, so the excluded CSR rows line up
    metrics = {}
    for protocol, exclude in PROTOCOLS.items():
        hist = csr_rows(*dataset.history("test"), users[order]) if exclude else (
            np.zeros(len(users) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        vectors = EvalVectors(export["items"], export["test_vectors"][order], export["test_targets"][order], *hist)
        metrics[protocol] = metrics_from_ranks(vector_ranks(vectors, max(KS), exclude), KS)
    return metrics


def run_ours(ws: Workspace, dataset: PreparedDataset, pair: ModelPair, dim: int, seed: int,
             variant: str, flags: list[str], threads: int, finished_only: bool = False) -> dict | None:
    """``recommend train --mode id`` with ``flags``, then test metrics under both protocols (None when
    ``finished_only`` and the run has not finished: nothing is trained)."""
    args = ["--dataset", dataset.name, "--mode", "id", "--backbone", pair.backbone, "--dim", str(dim),
            "--seed", str(seed), *flags]
    # named by the flags and train's defaults under them: a changed default is a new run (the plugins'
    # defaults for --mode id included, e.g. sasrec's --init-std 0.02 since 49df4c4)
    plain = TrainOptions(dataset="")
    filled = fill_defaults(plain.replace(mode="id", backbone=pair.backbone))
    own = {k: v for k, v in asdict(filled).items() if k not in ("mode", "backbone") and v != getattr(plain, k)}
    name = f"parity-{dataset.name}-{pair.backbone}-{variant}-{_digest([args, asdict(plain), *([own] if own else [])])}-s{seed}"
    best = ws.run_dir(name) / "best.json"
    if finished_only and not (best.exists() and json.loads(best.read_text()).get("status") in FINISHED):
        return None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "recommend.cli", "train", *args, "--run-name", name,
                           "--root", str(ws.root), "--json"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise UserError(f"recommend train {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(done.stdout)
    model, _ = load_run(ws.run_dir(name))
    metrics = {protocol: evaluate(model, dataset, split="test", ks=KS, exclude_history=exclude)
               for protocol, exclude in PROTOCOLS.items()}
    return {"run": name, "flags": flags, "best_epoch": summary.get("best_epoch"),
            "epochs": summary.get("epochs"), "status": summary.get("status"),
            "seconds": time.perf_counter() - start, "metrics": metrics}


def prepare_synthetic(ws: Workspace, users: int, items: int, seed: int) -> PreparedDataset:
    """The bundled generator in the ``generic`` raw layout, prepared once per size."""
    name = f"parity-generic-u{users}-i{items}-s{seed}"
    if not ws.dataset_dir(name).exists():
        synthetic_dataset(ws.root, name, "generic", users=users, items=items, seed=seed, images=False)
    return PreparedDataset.load(ws.dataset_dir(name))


@dataclass(frozen=True)
class PanelWorld:
    """One generated world of the panel: generator settings and the prepared cut."""

    users: int
    items: int
    mean_length: float = 11.0
    popularity_spread: float = 1.0
    signals: tuple[float, float, float] = (0.55, 0.35, 0.10)  # content, id, popularity
    max_seq_len: int | None = None  # items kept per user (model window = this - 3); None: the format's 13
    note: str = ""


PANEL = {
    "long": PanelWorld(600, 800, mean_length=20.0, max_seq_len=23,
                       note="long sequences: window 20 (the demo's 10); RecBole's 50 costs 25x an epoch of ours "
                            "in prefix instances, beyond a 2-core CPU"),
    "skew": PanelWorld(1500, 2000, mean_length=12.0, popularity_spread=2.0, signals=(0.45, 0.25, 0.30),
                       note="heavy popularity head: log-popularity sd 2 (demo 1), popularity share 0.30 (demo 0.10)"),
    "wide": PanelWorld(1500, 5000, mean_length=12.0,
                       note="wide catalogue: 5,000 items for 1,500 users, window 10"),
}
# RecBole 1.2.1's SASRec settings that differ from our defaults, each one of our options
# (docs/guides/train.md, "RecBole's SASRec, one option at a time")
ABLATION = {
    "prefix": "--instances prefix --batch-size 2048",  # one instance per (prefix, next item), 2048 a batch
    "init": "--init-std 0.02",
    "eps": "--norm-eps 1e-12",
    "positions": "--positions from-oldest",
    "adam": "--weight-decay 0",
    "dropout-lr": "--dropout 0.5 --lr 1e-3",
}
RECBOLE_PROTOCOL = " ".join(ABLATION.values())
PANEL_VARIANTS = {"defaults": "", "inbatch": "--loss inbatch"}  # at --seeds
ABLATION_VARIANTS = {"recbole-protocol": RECBOLE_PROTOCOL, **ABLATION}  # at --ablation-seeds


def prepare_world(ws: Workspace, name: str, world: PanelWorld, seed: int = 0) -> PreparedDataset:
    """A panel world in the ``generic`` raw layout, prepared once."""
    dataset = f"panel-{name}-u{world.users}-i{world.items}-s{seed}"
    if not ws.dataset_dir(dataset).exists():
        raw = ws.root / "raw" / dataset
        synthesize("generic", raw, users=world.users, items=world.items, seed=seed, images=False,
                   signals=Signals(*world.signals), mean_length=world.mean_length,
                   popularity_spread=world.popularity_spread)
        prepare_dataset("generic", raw, ws.dataset_dir(dataset), name=dataset, seed=seed,
                        max_seq_len=world.max_seq_len)
    return PreparedDataset.load(ws.dataset_dir(dataset))


def parse_variants(texts: tuple[str, ...]) -> dict[str, list[str]]:
    variants = {}
    for text in texts:
        name, sep, flags = text.partition("=")
        if not sep or not name:
            raise UserError(f"--ours {text!r}: give NAME=FLAGS, e.g. 'tuned=--lr 1e-3 --loss inbatch'")
        variants[name] = flags.split()
    return variants


def summarise(rows: list[dict]) -> dict:
    """Mean (and sd over seeds) per (library, config, protocol, metric)."""
    table: dict[str, dict] = {}
    for row in rows:
        entry = table.setdefault(row["who"], {})
        for protocol, metrics in row["metrics"].items():
            for key in ("HR@10", "NDCG@10"):
                entry.setdefault(f"{protocol} {key}", []).append(metrics[key])
    return {who: {key: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "values": v} for key, v in entry.items()} for who, entry in table.items()}


@click.command()
@click.option("--dataset", default=None, help="Prepared dataset under ROOT/datasets [default: synthesize one].")
@click.option("--root", type=click.Path(path_type=Path), default=Path("workspace/bench-parity"), show_default=True,
              help="Workspace: datasets, our runs and RecBole's work folders (ROOT/parity).")
@click.option("--users", default=3000, show_default=True, help="Synthetic users to draw (before the 5+ filter).")
@click.option("--items", default=500, show_default=True, help="Synthetic catalogue size.")
@click.option("--model", "model_name", type=click.Choice(sorted(MODELS)), default="sasrec", show_default=True,
              help="Architecture trained in both libraries.")
@click.option("--dim", default=64, show_default=True,
              help="Width d for both (RecBole's default; its other widths keep their default ratios to d).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, each run by both.")
@click.option("--ours", "variants", multiple=True,
              help="NAME=FLAGS: one configuration of ours (recommend train flags); repeatable "
                   "[default: defaults= (every other option at its default)].")
@click.option("--recbole-set", "recbole_sets", multiple=True,
              help="KEY=JSON: a RecBole setting changed from its default, e.g. epochs=50; repeatable.")
@click.option("--venv", "venv_path", type=click.Path(path_type=Path), default=DEFAULT_VENV, show_default=True,
              help="RecBole's virtualenv (created from the pins in this script when missing).")
@click.option("--threads", default=1, show_default=True, help="CPU threads per training process.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--redo", is_flag=True, help="Retrain RecBole even when a finished run with these settings exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--panel", is_flag=True,
              help="Run the panel of generated worlds (PANEL: long, skew, wide) instead of one dataset: RecBole, our "
                   "defaults and inbatch at --seeds, RecBole's whole protocol and each of its settings alone at "
                   "--ablation-seeds; the tables and a summary (issue 28).")
@click.option("--worlds", default=None, help="With --panel: comma-separated worlds [default: all of PANEL].")
@click.option("--ablation-seeds", default=None, help="With --panel: seeds of the ablation rows [default: --seeds].")
@click.option("--no-ablation", is_flag=True, help="With --panel: leave the ablation rows out.")
@click.option("--recbole-seeds", default=None,
              help="Seeds RecBole trains at [default: --seeds]; its run at a seed is kept and reused.")
@click.option("--recbole-only", is_flag=True, help="With --panel: train RecBole's runs only (ours meanwhile in another "
                                                   "process with --ours-only).")
@click.option("--finished-only", is_flag=True,
              help="Report the runs of ours that have finished, training none (a panel cut short by time).")
@click.option("--ours-only", is_flag=True, help="Train our runs only (RecBole's may run meanwhile in another process; "
                                                "a later call without this flag reuses every finished run).")
def main(dataset, root, users, items, model_name, dim, seeds, variants, recbole_sets, venv_path, threads,
         device, redo, as_json, panel, worlds, ablation_seeds, no_ablation, recbole_seeds, ours_only, finished_only,
         recbole_only):
    """Train RecBole's model and ours on one split (checked user by user); test HR@10 / NDCG@10 under
    RecBole's protocol (history kept) and the papers' (history excluded), and ours / RecBole."""
    ws = Workspace(root.resolve())  # RecBole's runner works in its own folder: every path it reads is absolute
    pair = MODELS[model_name]
    seed_list = [int(s) for s in seeds.split(",")]
    overrides = {}
    for text in recbole_sets:
        key, sep, value = text.partition("=")
        if not sep:
            raise UserError(f"--recbole-set {text!r}: give KEY=JSON, e.g. epochs=50")
        overrides[key] = json.loads(value)
    python = None if ours_only else ensure_venv(venv_path)
    recbole_list = [int(s) for s in recbole_seeds.split(",")] if recbole_seeds else None
    if not panel:
        data = (PreparedDataset.load(ws.dataset_dir(dataset)) if dataset
                else prepare_synthetic(ws, users, items, seed=0))
        ours = {name: (flags, seed_list) for name, flags in parse_variants(variants or ("defaults=",)).items()}
        out = compare(python, ws, data, pair, dim, seed_list, ours, overrides, threads, device, redo, recbole_list,
                      finished_only)
        click.echo(json.dumps(out, indent=2, default=str) if as_json else report(out))
        return
    names = [w.strip() for w in worlds.split(",")] if worlds else list(PANEL)
    unknown = sorted(set(names) - set(PANEL))
    if unknown:
        raise UserError(f"--worlds {','.join(unknown)}: unknown; known: {', '.join(PANEL)}")
    extra_seeds = [int(s) for s in ablation_seeds.split(",")] if ablation_seeds else seed_list
    ours = {name: (flags.split(), seed_list) for name, flags in PANEL_VARIANTS.items()}
    if not no_ablation:
        ours.update({name: (flags.split(), extra_seeds) for name, flags in ABLATION_VARIANTS.items()})
    ours.update(parse_variants_with(variants, seed_list))  # --ours NAME=... at every seed, even an ablation's NAME
    if recbole_only:
        ours = {}
    results = {}
    for name in names:
        data = prepare_world(ws, name, PANEL[name])
        click.echo(f"world {name}: {data.name} ({PANEL[name].note})", err=True)
        out = compare(python, ws, data, pair, dim, seed_list, ours, overrides, threads, device, redo, recbole_list,
                      finished_only)
        out["world"] = {"name": name, **asdict(PANEL[name])}
        (ws.root / "parity").mkdir(parents=True, exist_ok=True)
        (ws.root / "parity" / f"panel-{name}-{model_name}{'-ours' if ours_only else ''}.json").write_text(json.dumps(out, indent=2, default=str))
        results[name] = out
        if not as_json:
            click.echo(f"\n== world {name}: {PANEL[name].note}\n" + report(out))
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
        return
    click.echo("\n" + panel_summary(results))


def parse_variants_with(texts: tuple[str, ...], seeds: list[int]) -> dict[str, tuple[list[str], list[int]]]:
    return {name: (flags, seeds) for name, flags in parse_variants(texts).items()}


def compare(python: Path | None, ws: Workspace, data: PreparedDataset, pair: ModelPair, dim: int,
            seed_list: list[int], ours: dict[str, tuple[list[str], list[int]]], overrides: dict, threads: int,
            device: str, redo: bool, recbole_seeds: list[int] | None = None, finished_only: bool = False) -> dict:
    """RecBole at every seed of ``recbole_seeds`` (default ``seed_list``; none when ``python`` is None: our
    runs only) and each of ``ours`` (name -> (flags, its seeds)) on ``data``."""
    recbole_seeds = seed_list if recbole_seeds is None else recbole_seeds
    rows, recbole_info = [], []
    # RecBole and the runs at every seed first, then the rest, those training on prefix instances
    # (about a RecBole run each) last: a run cut short leaves the main comparison whole
    every = {name: flags for name, (flags, seeds) in ours.items() if seeds == seed_list}
    rest = sorted((name for name in ours if name not in every), key=lambda name: "prefix" in ours[name][0])
    for seed in seed_list:
        result = None
        if python is not None and seed in recbole_seeds:
            click.echo(f"seed {seed}: RecBole {pair.recbole} ...", err=True)
            result = run_recbole(python, ws, data, pair, dim, seed, overrides, threads, device, redo, finished_only)
        if result is not None:
            metrics = rescore(data, result.pop("export"))
            rows.append({"who": f"RecBole {pair.recbole}", "seed": seed, "metrics": metrics})
            recbole_info.append({"seed": seed, "own_test": result["test"], "rescored_kept_HR@10":
                                 metrics["kept"]["HR@10"], **{k: result[k] for k in
                                 ("best_epoch", "epochs", "train_seconds", "config")}})
        for variant, flags in every.items():
            click.echo(f"seed {seed}: ours {variant} ({' '.join(flags) or 'defaults'}) ...", err=True)
            run = run_ours(ws, data, pair, dim, seed, variant, flags, threads, finished_only)
            if run is not None:
                rows.append({"who": f"ours {variant}", "seed": seed, **run})
    for variant in rest:
        flags, seeds = ours[variant]
        for seed in seeds:
            click.echo(f"seed {seed}: ours {variant} ({' '.join(flags)}) ...", err=True)
            run = run_ours(ws, data, pair, dim, seed, variant, flags, threads, finished_only)
            if run is not None:
                rows.append({"who": f"ours {variant}", "seed": seed, **run})
    table = summarise(rows)
    base = table.get(f"RecBole {pair.recbole}")
    ratios = {who: {key: entry[key]["mean"] / base[key]["mean"] for key in entry if base[key]["mean"]}
              for who, entry in table.items() if who.startswith("ours") and base}
    popularity = {p: popularity_metrics(data, "test", KS, exclude) for p, exclude in PROTOCOLS.items()}
    lengths = data.lengths()
    return {"dataset": data.name, "users": data.n_users, "items": data.n_items, "model": pair.backbone, "dim": dim,
            "mean_length": float(lengths.mean()), "window": model_seq_len(data),
            "seeds": seed_list, "pins": list(PINS), "split_checked": "valid and test, every user: targets and histories",
            "variants": {name: {"flags": flags, "seeds": seeds} for name, (flags, seeds) in ours.items()},
            "table": table, "ratio_vs_recbole": ratios, "recbole": recbole_info,
            "popularity": {p: {k: m[k] for k in ("HR@10", "NDCG@10")} for p, m in popularity.items()},
            "runs": [{k: r[k] for k in r if k != "metrics"} | {"metrics": r["metrics"]} for r in rows]}


def report(out: dict) -> str:
    """The text table of one comparison."""
    lines = [f"{out['dataset']}: {out['users']} users, {out['items']} items, {out['model']} d={out['dim']}, "
             f"seeds {out['seeds']}; split checked target by target (valid + test)",
             f"{'run':<28} {'n':>2} {'kept HR@10':>13} {'kept NDCG@10':>13} {'excl HR@10':>13} {'excl NDCG@10':>13}"]
    for who, entry in [("popularity", {f"{p} {k}": {"mean": m[k], "sd": 0.0, "values": [m[k]]}
                                       for p, m in out["popularity"].items() for k in ("HR@10", "NDCG@10")}),
                       *out["table"].items()]:
        cells = [f"{entry[key]['mean']:.4f}±{entry[key]['sd']:.3f}"
                 for key in ("kept HR@10", "kept NDCG@10", "excluded HR@10", "excluded NDCG@10")]
        lines.append(f"{who:<28} {len(entry['kept HR@10']['values']):>2} " + " ".join(f"{c:>13}" for c in cells))
    for who, ratio in out["ratio_vs_recbole"].items():
        lines.append(f"{who} / RecBole: " + ", ".join(f"{k} x{v:.3f}" for k, v in ratio.items()))
    for info in out["recbole"]:
        lines.append(f"RecBole seed {info['seed']}: its own test hit@10 {info['own_test'].get('hit@10', float('nan')):.4f}"
                     f" (our rescoring, history kept: {info['rescored_kept_HR@10']:.4f}), best epoch "
                     f"{info['best_epoch']} of {info['epochs']}, {info['train_seconds']:.0f}s")
    for row in out["runs"]:
        if row["who"].startswith("ours"):
            lines.append(f"{row['who']} seed {row['seed']}: {row['status']}, best epoch {row['best_epoch']} of "
                         f"{row['epochs']}, {row['seconds']:.0f}s, run {row['run']}")
    return "\n".join(lines)


def panel_summary(results: dict[str, dict]) -> str:
    """A markdown table, one line per (world, run): the seeds, test HR@10 and NDCG@10 mean ± sd with the
    history kept (RecBole's protocol) and excluded (ours), and HR@10's ratio to RecBole's mean."""
    keys = ("kept HR@10", "kept NDCG@10", "excluded HR@10", "excluded NDCG@10")
    lines = ["| world | run | seeds | kept HR@10 | kept NDCG@10 | excl. HR@10 | excl. NDCG@10 | HR@10 x RecBole (kept / excl.) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, out in results.items():
        base = next((entry for who, entry in out["table"].items() if who.startswith("RecBole")), None)
        seeds_of = {}
        for run in out["runs"]:
            seeds_of.setdefault(run["who"], []).append(run["seed"])
        pop = out["popularity"]
        lines.append(f"| {name} | popularity | - | {pop['kept']['HR@10']:.4f} | {pop['kept']['NDCG@10']:.4f} | "
                     f"{pop['excluded']['HR@10']:.4f} | {pop['excluded']['NDCG@10']:.4f} | |")
        for who, entry in out["table"].items():
            cells = [f"{entry[k]['mean']:.4f} ± {entry[k]['sd']:.4f}" if len(entry[k]["values"]) > 1
                     else f"{entry[k]['mean']:.4f}" for k in keys]
            ratio = (f"x{entry['kept HR@10']['mean'] / base['kept HR@10']['mean']:.3f} / "
                     f"x{entry['excluded HR@10']['mean'] / base['excluded HR@10']['mean']:.3f}") if base else "-"
            lines.append(f"| {name} | {who} | {','.join(map(str, seeds_of.get(who, [])))} | " + " | ".join(cells)
                         + f" | {ratio} |")
    return "\n".join(lines)

if __name__ == "__main__":
    from featurestore.cliutil import run_cli

    run_cli(main, "parity")
