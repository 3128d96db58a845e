"""The runtime at the bottom: the device rule, atomic writes, the resumable checkpoint (and the
adaptation checkpoints written before it), epoch seeds, versions, and the process group's
collectives under ``torchrun --nproc-per-node 2`` (gloo on the CPU)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from featurestore.errors import UserError
from featurestore.runtime import versions as versions_module
from featurestore.runtime.checkpoint import load_checkpoint, save_checkpoint
from featurestore.runtime.device import local_device, resolve_device
from featurestore.runtime.files import write_atomic, write_json
from featurestore.runtime.processes import Processes
from featurestore.runtime.seeding import epoch_seed

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the device rule ----------------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_rule_without_cuda(no_cuda):
    assert resolve_device("auto", Processes()) == torch.device("cpu")
    assert resolve_device("cpu", Processes(1, 2, 1)) == torch.device("cpu")
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(UserError, match=f"--device {name}: no CUDA device is available here; use --device cpu"):
            resolve_device(name, Processes())


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:", "cuda:x", "cuda1", "CPU", ""])
def test_unknown_devices_are_refused_naming_the_valid_ones(name, two_gpus):
    with pytest.raises(UserError, match=r"unknown --device .*; use auto, cpu, cuda or cuda:N"):
        resolve_device(name, Processes())


def test_cuda_is_the_process_own_gpu(two_gpus):
    assert resolve_device("auto", Processes()) == torch.device("cuda", 0)
    assert [resolve_device("cuda", Processes(r, 4, r)).index for r in range(4)] == [0, 1, 0, 1]
    assert resolve_device("cuda:1", Processes(0, 2, 0)) == torch.device("cuda", 1)  # named: taken as is
    with pytest.raises(UserError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2", Processes())


def test_local_device_only_names_the_gpu_under_torchrun(two_gpus, monkeypatch):
    for key in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert local_device("cuda") == "cuda"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("cuda") == "cuda:1"
    assert local_device("cpu") == "cpu" and local_device("cuda:0") == "cuda:0"


# ---- atomic writes ------------------------------------------------------------------------------


def test_a_directory_in_the_way_is_named_and_leaves_no_debris(tmp_path):
    target = tmp_path / "config.json"
    target.mkdir()
    with pytest.raises(OSError) as caught:
        write_json(target, {"a": 1})
    assert caught.value.filename == str(target)
    assert str(target) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.safetensors"
    target.write_bytes(b"previous")
    real = Path.write_bytes

    def half_then_full_disk(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full_disk)
    with pytest.raises(OSError, match="No space left on device") as caught:
        write_atomic(target, b"0123456789")
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]


def test_write_json_replaces_and_stringifies_what_json_cannot_hold(tmp_path):
    target = tmp_path / "adapt.json"
    write_json(target, {"old": True})
    write_json(target, {"path": tmp_path, "n": 2})
    assert json.loads(target.read_text()) == {"path": str(tmp_path), "n": 2}
    assert target.read_text().endswith("}\n")


# ---- checkpoints ---------------------------------------------------------------------------------


class Tied(nn.Module):
    """An embedding whose output layer shares its weight (as an MLM decoder does)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(ids))))


def _trained(seed: int, steps: int) -> tuple[Tied, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    for step in range(steps):
        _step(model, optimizer, step)
    return model, optimizer


def _step(model: Tied, optimizer: torch.optim.Optimizer, step: int) -> None:
    ids = torch.arange(10) % (step + 3)
    loss = nn.functional.cross_entropy(model(ids), (ids + 1) % 11)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_checkpoint_round_trip_restores_weights_moments_and_state(tmp_path):
    model, optimizer = _trained(0, 3)
    path = tmp_path / "checkpoint" / "last.safetensors"  # the folder is made
    state = {"epoch": 3, "best": {"HR@10": 0.25}, "records": [{"epoch": 1}]}
    save_checkpoint(path, model, optimizer, state)

    restored, restored_optimizer = _trained(1, 0)  # other weights, no moments
    assert load_checkpoint(path, restored, restored_optimizer) == state
    _same_state(restored.state_dict(), model.state_dict())
    assert restored.out.weight.data_ptr() == restored.embed.weight.data_ptr()  # still tied
    saved, loaded = optimizer.state_dict(), restored_optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]  # betas back to a tuple
    for index, slots in saved["state"].items():
        _same_state(loaded["state"][index], slots)
    _step(model, optimizer, 3)  # and the next step is the same step
    _step(restored, restored_optimizer, 3)
    _same_state(restored.state_dict(), model.state_dict())


def test_no_checkpoint_is_none(tmp_path):
    model, optimizer = _trained(0, 0)
    assert load_checkpoint(tmp_path / "last.safetensors", model, optimizer) is None


def test_an_adaptation_checkpoint_from_before_the_runtime_still_resumes(tmp_path):
    """The format ``extract.adapt`` wrote before: ``optim.I.SLOT`` tensors and one ``meta`` entry."""
    model, optimizer = _trained(0, 2)
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for index, slots in optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = value.detach().clone().contiguous()
    meta = {"epochs": [{"epoch": 1, "loss": 2.5}], "probe_loss_before": 3.0, "skipped": [],
            "base_state_sha256": "abc"}
    path = tmp_path / "last.safetensors"
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})

    restored, restored_optimizer = _trained(1, 0)
    assert load_checkpoint(path, restored, restored_optimizer) == meta
    _same_state(restored.state_dict(), model.state_dict())
    for index, slots in optimizer.state_dict()["state"].items():
        _same_state(restored_optimizer.state_dict()["state"][index], slots)
    _step(model, optimizer, 2)
    _step(restored, restored_optimizer, 2)
    _same_state(restored.state_dict(), model.state_dict())


# ---- seeds and versions ---------------------------------------------------------------------------


def test_epoch_seed_is_fixed_and_independent_across_ranks_and_epochs():
    assert epoch_seed(42, 0, 1) == epoch_seed(42, 0, 1)
    # the recommenders' scheme since their first resumable run: a resumed old run draws the same
    assert epoch_seed(42, 0, 1) == int(np.random.SeedSequence([42, 0, 1]).generate_state(1)[0])
    grid = {(s, r, e): epoch_seed(s, r, e) for s in range(4) for r in range(4) for e in range(50)}
    assert len(set(grid.values())) == len(grid)  # no two (seed, rank, epoch) share a stream
    draws = {}
    for key in [(0, 0, 1), (0, 1, 1), (0, 0, 2), (1, 0, 1)]:
        torch.manual_seed(grid[key])
        draws[key] = torch.rand(8)
    keys = list(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(draws[a], draws[b]), (a, b)


def test_versions_record_every_package_and_tolerate_a_missing_one(monkeypatch):
    found = versions_module.versions()
    assert found["morec_store"] and found["torch"] and found["transformers"] and found["zarr"]
    monkeypatch.setattr(versions_module, "PACKAGES", ("torch", "no-such-package-here"))
    assert versions_module.versions()["no-such-package-here"] is None


# ---- two processes ---------------------------------------------------------------------------------

COLLECTIVES = """
import json, os, sys
import numpy as np
import torch
from featurestore.runtime.processes import Processes, process_group

with process_group() as procs:
    assert procs == Processes.from_env() and procs.world_size == 2
    cpu = torch.device("cpu")
    rows = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    out = {
        "broadcast": procs.broadcast(f"from {procs.rank}"),
        "objects": procs.gather_objects({"rank": procs.rank}),
        "all_true": procs.all_true(procs.rank == 0, cpu),
        "all_true_both": procs.all_true(True, cpu),
        "mean": procs.mean(float(procs.rank + 1), cpu),
        "rows": procs.gather(rows[procs.block(7)], 7).tolist(),
    }
with open(os.path.join(sys.argv[1], f"rank{out['objects'][procs.rank]['rank']}.json"), "w") as fh:
    json.dump(out, fh)
"""


def test_collectives_under_torchrun(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = np.arange(14, dtype=np.float32).reshape(7, 2).tolist()
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out == {"broadcast": "from 0", "objects": [{"rank": 0}, {"rank": 1}], "all_true": False,
                       "all_true_both": True, "mean": 1.5, "rows": rows}


def test_one_process_collectives_are_the_identity():
    procs = Processes()
    rows = np.ones((3, 2))
    assert procs.main and procs.broadcast("x") == "x" and procs.gather_objects(1) == [1]
    assert procs.all_true(False, torch.device("cpu")) is False and procs.mean(2.5, torch.device("cpu")) == 2.5
    assert procs.block(3) == slice(0, 3) and procs.gather(rows, 3) is rows
