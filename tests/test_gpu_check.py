"""``bench/gpu_check.sh --dry-run`` on the CPU: the plan fits its budget and every command parses."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_passes_and_lists_every_gpu_path(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in ("extraction", "--index torch", "flat-gpu", "E2E", "side-network", "torchrun, NCCL",
                 "NCCL gather", "500K x 87K x 512"):
        assert path in done.stdout, path
    assert not (tmp_path / "gpu_check.md").exists()  # a dry run runs nothing


def test_dry_run_names_a_broken_command_and_an_overdrawn_budget(tmp_path):
    module = gpu_check()
    plan = module.steps(tmp_path)
    rank = next(step for step in plan if "--index torch" in step.name)
    rank.argv[rank.argv.index("--device") + 1] = "tpu"
    ddp = next(step for step in plan if "DDP" in step.name)
    ddp.argv[ddp.argv.index("--mode") + 1 :] = ["ts-dnn", "--no-such-option"]
    launch = next(step for step in plan if "NCCL gather" in step.name)
    launch.argv[launch.argv.index("gpucheck-ddp")] = "--run"  # torchrun's --run-path trap
    plan[0].budget_s = 1000
    problems = module.check_plan(plan)
    assert any("over 480 s" in p for p in problems)
    assert any(p.startswith(rank.name) and "tpu" in p for p in problems)
    assert any(p.startswith(ddp.name) and "--no-such-option" in p for p in problems)
    assert any(p.startswith(launch.name) and "ambiguous option: --run" in p for p in problems)
    assert len(problems) == 4


def test_install_is_offline_and_no_deps(tmp_path):
    module = gpu_check()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "zarr-3.1.6-py3-none-any.whl").touch()  # installed here: not reinstalled
    (wheels / "not_a_real_dist-1.0-py3-none-any.whl").touch()
    commands = module.install_commands(tmp_path)
    assert all("--no-deps" in c and "--no-index" in c for c in commands)
    assert [Path(p).name for p in commands[0] if p.endswith(".whl")] == ["not_a_real_dist-1.0-py3-none-any.whl"]
    assert commands[-1][-2:] == ["-e", str(REPO)]
