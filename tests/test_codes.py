"""``featurestore codes``: residual quantisation of a store group into a codes group (real faiss, real zarr)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from extract.codes import CodesOptions, run_codes
from extract.quantise import QUANTISERS, collisions, disambiguate
from featurestore.cli import cli
from featurestore.errors import UserError
from featurestore.store import STATUS_COMPLETE, STATUS_PARTIAL, FeatureGroup, FeatureStore
from codes_helpers import ABSENT, DUPLICATES, clustered_rows, write_vectors

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE = "synth/text/bert-tiny"


@pytest.fixture(scope="module")
def ws(private_ws, synth_dataset):
    ws = private_ws("codes")
    write_vectors(ws, synth_dataset, SOURCE)
    return ws


def stored_codes(ws, group: str) -> np.ndarray:
    return np.asarray(FeatureStore(ws.store).open(group).read(), dtype=np.int64)


def options(**changes) -> CodesOptions:
    return CodesOptions(**{"dataset": "synth", "encoder": "bert-tiny", "levels": 3, "codebook": 8, **changes})


def test_codes_are_deterministic_for_a_seed_and_the_error_falls_with_each_level(ws):
    first = run_codes(ws, options(variant="first"))
    second = run_codes(ws, options(variant="second"))
    assert first.status == STATUS_COMPLETE and first.group == "synth/codes/bert-tiny@first"
    assert np.array_equal(stored_codes(ws, first.group), stored_codes(ws, second.group))
    errors = first.reconstruction_error
    assert len(errors) == 3 and all(a > b for a, b in zip(errors, errors[1:])) and errors[0] < 1
    attrs = FeatureStore(ws.store).open(first.group).attrs
    assert attrs["source"]["group"] == SOURCE and attrs["source"]["dataset_fingerprint"] == attrs["dataset_fingerprint"]
    assert attrs["method"] == "rq-kmeans" and attrs["settings"]["iterations"] == 20
    assert run_codes(ws, options(variant="first")).computed_chunks == 0  # complete: nothing to redo


def test_rq_vae_is_deterministic_and_its_error_falls_with_each_level():
    x = clustered_rows(300)[1:]
    a, b = (QUANTISERS.get("rq-vae")(x, 3, 8, seed=1, iterations=1) for _ in range(2))
    assert np.array_equal(a.codes, b.codes) and a.state_sha256 == b.state_sha256
    assert a.codes.shape == (300, 3) and a.codes.max() < 8
    assert all(x > y for x, y in zip(a.errors, a.errors[1:])), a.errors


def test_collisions_are_counted_exactly(ws, synth_dataset):
    result = run_codes(ws, options(levels=2, codebook=4, variant="small"))
    codes = stored_codes(ws, result.group)
    group = FeatureStore(ws.store).open(result.group)
    present = group.present()
    assert not present[0] and not present[ABSENT] and present[1:].sum() == synth_dataset.n_items - 1
    counts = Counter(tuple(row) for row in codes[present])  # the hand count
    assert result.collisions == {"collisions": sum(c - 1 for c in counts.values()),
                                 "colliding_items": sum(c for c in counts.values() if c > 1),
                                 "largest": max(counts.values())}
    n = synth_dataset.n_items
    copies = [i for i in range(1, DUPLICATES + 1) if i != ABSENT]
    assert np.array_equal(codes[[n - DUPLICATES + i for i in copies]], codes[copies])  # equal vectors, equal codes
    assert result.code_usage == [len(set(codes[present, level])) for level in range(2)]


def test_disambiguation_numbers_the_items_sharing_codes():
    codes = np.array([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [4, 4]])
    assert collisions(codes) == {"collisions": 3, "colliding_items": 5, "largest": 3}
    assert disambiguate(codes)[:, 2].tolist() == [0, 1, 0, 2, 1, 0]
    assert collisions(disambiguate(codes))["collisions"] == 0


def test_refuses_a_partial_group_another_fingerprint_and_codes_of_another_group(ws, synth_dataset):
    write_vectors(ws, synth_dataset, "synth/text/bert-tiny@partial", complete=False)
    with pytest.raises(UserError, match="partial"):
        run_codes(ws, options(encoder="bert-tiny@partial"))
    write_vectors(ws, synth_dataset, "synth/text/bert-tiny@old", fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match="fingerprint 0123456789abcdef.*re-extract"):
        run_codes(ws, options(encoder="bert-tiny@old"))
    write_vectors(ws, synth_dataset, "synth/text/bert-tiny@other", rows=clustered_rows(synth_dataset.n_items, seed=1))
    run_codes(ws, options(variant="shared"))
    with pytest.raises(UserError, match="codes of another group.*--variant TAG"):
        run_codes(ws, options(encoder="bert-tiny@other", variant="shared"))
    with pytest.raises(UserError, match="seed 0, now 1"):
        run_codes(ws, options(variant="shared", seed=1))
    with pytest.raises(UserError, match="--codebook 400 is larger than the 149 items"):
        run_codes(ws, options(codebook=400))
    assert not FeatureStore(ws.store).exists("synth/codes/bert-tiny@rq-kmeans-3x400")  # refused before writing


def test_a_killed_job_resumes_to_the_same_codes(ws, monkeypatch):
    write = FeatureGroup.write_chunk

    def die_after_first(self, chunk, rows, present):
        if chunk > 0:
            raise KeyboardInterrupt
        write(self, chunk, rows, present)

    monkeypatch.setattr(FeatureGroup, "write_chunk", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_codes(ws, options(variant="resumed", chunk_rows=40))
    assert FeatureStore(ws.store).open("synth/codes/bert-tiny@resumed").status == STATUS_PARTIAL
    monkeypatch.setattr(FeatureGroup, "write_chunk", write)
    resumed = run_codes(ws, options(variant="resumed", chunk_rows=40))
    assert resumed.status == STATUS_COMPLETE and resumed.computed_chunks == 3
    fresh = run_codes(ws, options(variant="fresh", chunk_rows=40))
    assert np.array_equal(stored_codes(ws, resumed.group), stored_codes(ws, fresh.group))


def test_cli_writes_codes_and_refuses_an_unknown_method_in_one_line(ws):
    runner = CliRunner()
    ok = runner.invoke(cli, ["codes", "--root", str(ws.root), "--dataset", "synth", "--encoder", "bert-tiny",
                             "--levels", "2", "--codebook", "4", "--disambiguate"])
    assert ok.exit_code == 0, ok.output
    codes = stored_codes(ws, "synth/codes/bert-tiny@rq-kmeans-2x4")
    assert codes.shape[1] == 3 and collisions(codes[1:])["collisions"] <= 1  # only the absent item's zeros collide
    bad = subprocess.run([sys.executable, "-m", "featurestore.cli", "codes", "--root", str(ws.root), "--dataset",
                          "synth", "--encoder", "bert-tiny", "--method", "rq-vea"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "error: unknown --method 'rq-vea'; did you mean rq-vae or rq-kmeans? known: rq-kmeans, rq-vae"]
