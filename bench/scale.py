"""The whole pipeline at the papers' HM scale on this machine, stage by stage.

A synthetic H&M (001: 500K users, 87K items, the 13 most recent items each) goes
through the commands a user runs, each in its own process so its peak RSS is its
own (``os.wait4``):

  1. ``featurestore dataset synth``    raw CSVs (+ one JPEG per item, streamed to disk)
  2. ``featurestore dataset prepare``  streaming CSV -> sequences, sampled to --users
  3. ``featurestore extract``          a small real encoder over the whole catalogue
                                       (EfficientNet-Lite0 on pictures; MiniLM-L6 on
                                       texts with --no-images); a chunk in memory at a time
  4. ``recommend train``               TS-DNN-8 for --epochs epochs (+ full-pool validation)
  5. ``recommend eval rank``           full-pool HR/NDCG@10 on the whole test split, for all,
                                       warm and cold targets from one ranking, beside
                                       popularity and the synthetic world's oracle

Training deviates from the paper's d = 512 / batch 64 so one epoch fits in minutes on
2 cores: ``--dim 64 --batch-size 512 --lr 1e-3`` by default (all three flags; at the
papers' lr 1e-4 one epoch of 977 steps leaves the model far below popularity). The loss
is ``inbatch`` rather than train's default ``ce``: exact ce scores all 87K items through
the tower every step, about x55 an inbatch step for TS-DNN-8 on this CPU (BENCHMARKS.md). The ratio printed at the
end is training one TS-DNN epoch against extracting once: the two-stage path pays the
encoder once, then every recommender costs only its own epochs.

Resumable like the tools it drives: stage results are kept in ``stages.json`` in the
work folder and a rerun skips recorded stages (``--fresh`` starts over).

    python bench/scale.py                               # full scale (~30-60 min here)
    python bench/scale.py --users 20000 --items 5000    # a quick look
    python bench/scale.py --no-images --json            # texts + MiniLM-L6
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from data.oracle import WITHOUT_LINKS

OUT = Path(__file__).resolve().parent / "out"
RUN_NAME = "scale-ts-dnn8"
STAGES = ("synth", "prepare", "extract", "train", "rank")
SUBSETS = ("all", "warm", "cold")  # the rank stage's users: one ranking, three tables
REFERENCE_ROWS = ("popularity", "oracle", WITHOUT_LINKS)  # eval rank's rows beside the run's


def run_stage(name: str, argv: list[str], log: Path, threads: int) -> dict:
    """Run one command to completion; wall time and that process tree's peak RSS."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as fh:
        fh.write(f"\n$ OMP_NUM_THREADS={threads} {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=fh, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise click.ClickException(f"stage {name} failed (exit {proc.returncode}); see {log}")
    # wait4's ru_maxrss: the largest single process of the tree (DataLoader workers
    # included), not their sum
    return {"stage": name, "seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "threads": threads, "command": " ".join(argv[2:] if argv[1] == "-m" else argv)}


def tool(module: str, *args: object) -> list[str]:
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def stage_commands(work: Path, users: int, items: int, images: bool, encoder: str, dim: int,
                   batch_size: int, lr: float, seed: int, epochs: int = 1,
                   loss: str = "inbatch") -> dict[str, list[str]]:
    root, raw = work / "root", work / "raw"
    synth_users = int(users * 1.3) + 100  # about 21% fall under the 5-interaction filter
    return {
        "synth": tool("featurestore.cli", "dataset", "synth", "--format", "hm", "--out", raw,
                      "--users", synth_users, "--items", items, "--seed", seed,
                      "--images" if images else "--no-images", "--root", root),
        "prepare": tool("featurestore.cli", "dataset", "prepare", "--format", "hm", "--source", raw,
                        "--name", "scale", "--users", users, "--seed", seed, "--root", root, "--json"),
        "extract": tool("featurestore.cli", "extract", "--dataset", "scale", "--encoder", encoder,
                        "--batch-size", 64, "--root", root, "--json"),
        "train": tool("recommend.cli", "train", "--dataset", "scale", "--mode", "ts-dnn", "--layers", 8,
                      "--encoder", encoder, "--loss", loss, "--dim", dim, "--batch-size", batch_size, "--lr", lr, "--epochs", epochs,
                      "--run-name", RUN_NAME, "--device", "cpu", "--quiet", "--root", root, "--json"),
        "rank": tool("eval.cli", "rank", "--run", RUN_NAME, "--split", "test", "--k", "10",
                     "--subset", ",".join(SUBSETS), "--device", "cpu", "--root", root, "--json"),
    }


def stage_details(work: Path) -> dict:
    """What the stages produced: sizes, training epoch figures, test metrics."""
    root = work / "root"
    details: dict = {}
    manifest = root / "datasets" / "scale" / "manifest.json"
    if manifest.exists():
        counts = json.loads(manifest.read_text())["counts"]
        details["dataset"] = {k: counts[k] for k in ("users", "items", "interactions", "train")}
    zarr_json = next((root / "store.zarr" / "scale").glob("*/*/zarr.json"), None)
    if zarr_json is not None:  # the group's own timings: a resumed job computed only what was left
        timings = json.loads(zarr_json.read_text())["attributes"].get("timings", {})
        details["extract"] = {k: timings.get(k) for k in ("items_per_s", "computed_items", "extract_s")}
    metrics = root / "runs" / RUN_NAME / "metrics.jsonl"
    if metrics.exists():
        epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
        details["epoch"] = {k: epochs[0].get(k) for k in ("seconds", "eval_seconds", "sequences_per_sec",
                                                          "peak_rss_mb", "valid")}
        details["valid_per_epoch"] = [e["valid"].get("HR@10") for e in epochs]
    eval_json = root / "runs" / RUN_NAME / "eval.json"
    if eval_json.exists():
        results = {r.get("subset", "all"): r for r in json.loads(eval_json.read_text()).values()}
        details["test"] = {subset: test_rows(results[subset]) for subset in SUBSETS if subset in results}
    return details


def test_rows(result: dict) -> dict:
    """TS-DNN-8, popularity and oracle on one subset's users (eval rank's reference rows)."""
    rows = {"users": result["users"], "TS-DNN-8": {k: result[k] for k in ("HR@10", "NDCG@10")}}
    for row in REFERENCE_ROWS:
        if result.get(row):
            rows[row] = {k: result[row][k] for k in ("HR@10", "NDCG@10")}
    if result.get("percent_of_oracle"):
        rows["percent_of_oracle"] = result["percent_of_oracle"]
    return rows


@click.command()
@click.option("--users", type=click.IntRange(min=100), default=500_000, show_default=True,
              help="Users after preparation (about 1.3x as many are synthesized, then sampled).")
@click.option("--items", type=click.IntRange(min=100), default=87_000, show_default=True,
              help="Catalogue size.")
@click.option("--images/--no-images", default=True, show_default=True,
              help="Pictures + EfficientNet-Lite0, or texts + MiniLM-L6 (faster on a busy CPU).")
@click.option("--dim", type=int, default=64, show_default=True,
              help="Recommender width d (the paper's 512 takes hours per epoch on 2 cores).")
@click.option("--batch-size", type=int, default=512, show_default=True, help="Training users per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate of the training epochs.")
@click.option("--loss", default="inbatch", show_default=True,
              help="Training loss (a `recommend train --loss` name); exact ce is about x55 slower a step here.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training epochs of the train stage (the time ratio below is per epoch).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic data.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="OMP/MKL threads of every stage. On a 2-core machine shared with other jobs, torch's "
                   "default 2 threads can make small models many times slower (spinning OpenMP threads).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work folder [default: bench/out/scale-<users>u-<items>i-<images|texts>].")
@click.option("--fresh", is_flag=True, help="Delete the work folder first instead of resuming.")
@click.option("--redo", default="", metavar="STAGE[,STAGE]",
              help=f"Run these recorded stages again (e.g. train,rank after changing --lr); one of {', '.join(STAGES)}.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(users: int, items: int, images: bool, dim: int, batch_size: int, lr: float, loss: str, epochs: int, seed: int,
         threads: int, work: Path | None, fresh: bool, redo: str, as_json: bool) -> None:
    """Synthesize, prepare, extract, train TS-DNN-8 and rank at HM scale; time and memory per stage."""
    encoder = "efficientnet-lite0" if images else "minilm-l6"
    work = work or OUT / f"scale-{users}u-{items}i-{'images' if images else 'texts'}"
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    record_path, log = work / "stages.json", work / "stages.log"
    done = json.loads(record_path.read_text()) if record_path.exists() else {}
    for stage in (s.strip() for s in redo.split(",") if s.strip()):
        if stage not in STAGES:
            raise click.BadParameter(f"unknown stage {stage!r}; one of {', '.join(STAGES)}", param_hint="--redo")
        done.pop(stage, None)
        if stage == "train":  # a finished run is never retrained: start it over
            shutil.rmtree(work / "root" / "runs" / RUN_NAME, ignore_errors=True)
    commands = stage_commands(work, users, items, images, encoder, dim, batch_size, lr, seed, epochs, loss)
    for name in STAGES:
        if name in done:
            click.echo(f"{name}: recorded earlier ({done[name]['seconds']} s), skipped", err=True)
            continue
        click.echo(f"{name}: running (log: {log})", err=True)
        done[name] = run_stage(name, commands[name], log, threads)
        record_path.write_text(json.dumps(done, indent=2))
        click.echo(f"{name}: {done[name]['seconds']} s, peak RSS {done[name]['peak_rss_mb']} MB", err=True)

    details = stage_details(work)
    rate = (details.get("extract") or {}).get("items_per_s")
    # a resumed extraction stage timed only its remainder: price the whole catalogue at its rate
    extract_seconds = items / rate if rate else done["extract"]["seconds"]
    ratio = done["train"]["seconds"] / epochs / extract_seconds
    result = {"users": users, "items": items, "encoder": encoder, "dim": dim, "batch_size": batch_size, "lr": lr,
              "loss": loss, "epochs": epochs,
              "stages": [done[name] for name in STAGES], "details": details,
              "train_epoch_over_extract": round(ratio, 3), "work": str(work)}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"HM-scale pipeline: {users} users, {items} items, encoder {encoder}, TS-DNN-8 d={dim} "
               f"batch {batch_size} lr {lr:g} loss {loss}, {epochs} epoch(s)")
    click.echo(f"{'stage':10}{'seconds':>10}{'peak RSS MB':>14}{'threads':>9}")
    for name in STAGES:
        click.echo(f"{name:10}{done[name]['seconds']:>10.1f}{done[name]['peak_rss_mb']:>14.0f}"
                   f"{done[name].get('threads', '-'):>9}")
    click.echo(f"details: {json.dumps(details)}")
    for subset, rows in details.get("test", {}).items():
        click.echo(f"test, {subset} targets ({rows['users']} users):")
        for row in (*REFERENCE_ROWS, "TS-DNN-8"):
            if row in rows:
                click.echo(f"  {row:20} HR@10 {100 * rows[row]['HR@10']:7.3f}%  NDCG@10 {100 * rows[row]['NDCG@10']:7.3f}%")
        if "percent_of_oracle" in rows:
            click.echo("  TS-DNN-8 % of oracle: " + "  ".join(f"{k} {v:.1f}" for k, v in rows["percent_of_oracle"].items()))
    click.echo(f"one TS-DNN epoch (train stage / epochs, incl. validation) / one extraction: {ratio:.2f}x")


if __name__ == "__main__":
    main()
