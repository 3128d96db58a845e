"""A change's cost in training steps: ``bench/train.py`` at a base revision and at the working tree, in one run.

Refactors must not slow the loop. Absolute step times drift with the machine's load, so the two
code versions run alternately, round after round, each in its own process on the same settings,
and the ratio of their median seconds per step (and per epoch) is what is reported, per mode.
The base revision is checked out into a temporary git worktree and imported from there.

    python bench/revisions.py --base 8c878fb --rounds 5
    python bench/revisions.py --base HEAD~3 --rounds 3 -- --users 4000 --dim 128
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARGS = ("--users", "2000", "--items", "800", "--dim", "64", "--feat-dim", "384", "--epochs", "1",
                "--rounds", "1", "--threads", "1")


def _bench(tree: Path, args: tuple[str, ...]) -> dict:
    """One ``bench/train.py --json`` run of the code in ``tree``: seconds per step and per epoch, by mode."""
    out = subprocess.run([sys.executable, str(tree / "bench" / "train.py"), *args, "--json"], cwd=tree,
                         env={**os.environ, "PYTHONPATH": str(tree)}, check=True, capture_output=True, text=True)
    return {r["mode"]: (r["sec_per_step"], r["epoch_seconds"]) for r in json.loads(out.stdout)["results"]}


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--base", default="HEAD", show_default=True, help="The revision to compare the working tree with.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Alternating runs of each version.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def main(base: str, rounds: int, as_json: bool, bench_args: tuple[str, ...]) -> None:
    """Median seconds per step of each mode at BASE and now, and their ratio (now / base)."""
    args = bench_args or DEFAULT_ARGS
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            times: dict[str, dict[str, list]] = {"base": {}, "now": {}}
            for _ in range(rounds):
                for label, tree in (("base", old), ("now", REPO)):
                    for mode, value in _bench(tree, args).items():
                        times[label].setdefault(mode, []).append(value)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=True)
    result = {"base": base, "rounds": rounds, "args": list(args), "modes": {}}
    for mode in times["now"]:
        step = {label: statistics.median(v[0] for v in times[label][mode]) for label in times}
        epoch = {label: statistics.median(v[1] for v in times[label][mode]) for label in times}
        result["modes"][mode] = {"sec_per_step": step, "epoch_seconds": epoch,
                                 "step_ratio": step["now"] / step["base"], "epoch_ratio": epoch["now"] / epoch["base"]}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"bench/train.py {' '.join(args)}; {rounds} alternating rounds; base {base}")
    for mode, r in result["modes"].items():
        click.echo(f"{mode:10} s/step base {r['sec_per_step']['base']:.4f} now {r['sec_per_step']['now']:.4f} "
                   f"(x{r['step_ratio']:.3f}); s/epoch x{r['epoch_ratio']:.3f}")


if __name__ == "__main__":
    main()
