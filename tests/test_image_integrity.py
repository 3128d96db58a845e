"""Pictures that must not reach the encoder: too large to decode safely, or changed since prepare."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from data.dataset import PreparedDataset
from extract_helpers import draw_picture, titles, write_dataset
from featurestore.store import FeatureStore
from featurestore.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread")


def huge_png(path: Path, side: int = 20000) -> Path:
    """A real PNG whose header says ``side`` x ``side`` (400 M pixels, past PIL's bomb limit);
    written as a 1 x 1 PNG with its IHDR rewritten, so it costs a few bytes."""
    Image.new("RGB", (1, 1)).save(path, "PNG")
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def featurestore(ws: Workspace, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featurestore.cli", *args, "--root", str(ws.root)],
                          capture_output=True, text=True, timeout=600)


def extract(ws: Workspace) -> subprocess.CompletedProcess:
    return featurestore(ws, "extract", "--dataset", "img", "--encoder", "efficientnet-lite0", "--workers", "0",
                        "--batch-size", "4", "--json")


def test_an_oversized_image_is_a_named_bad_item_and_extraction_completes(tmp_path):
    ws = Workspace(tmp_path / "root")
    raw = tmp_path / "raw"
    pictures = [draw_picture(raw / f"{i}.jpg", seed=i) for i in range(6)]
    with pytest.raises(Image.DecompressionBombError):
        Image.open(huge_png(raw / "huge.png"))
    write_dataset(ws, "img", titles(7), [*pictures, raw / "huge.png"])
    done = extract(ws)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["status"], result["embedded"], result["bad"]) == ("complete", 6, 1)
    (bad,) = FeatureStore(ws.store).open("img/image/efficientnet-lite0").attrs["bad_items"]
    assert bad["id"] == 7 and bad["file"].endswith("huge.png") and "too large" in bad["reason"]


def test_images_changed_after_prepare_are_refused_before_extraction(tmp_path):
    ws = Workspace(tmp_path / "root")
    raw = tmp_path / "raw"
    pictures = [draw_picture(raw / f"{i}.jpg", seed=i) for i in range(6)]
    dataset = write_dataset(ws, "img", titles(6), pictures)
    assert all(item.image_sha256 and item.image_size for item in dataset.items)
    draw_picture(pictures[2], seed=99)  # regenerated in place, as a second `dataset synth` would
    refused = extract(ws)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"error: image {pictures[2]} changed since dataset img was prepared")
    assert "featurestore dataset prepare" in line and "--overwrite" in line
    assert not (ws.store / "img").exists()  # nothing extracted from the new picture


def test_a_swapped_image_with_its_size_and_mtime_kept_is_caught_by_its_hash(tmp_path):
    ws = Workspace(tmp_path / "root")
    raw = tmp_path / "raw"
    pictures = [draw_picture(raw / f"{i}.jpg", seed=i) for i in range(6)]
    write_dataset(ws, "img", titles(6), pictures)
    original = pictures[1].read_bytes()
    stat = os.stat(pictures[1])
    swapped = bytearray(original)
    swapped[-3] ^= 0xFF  # same length, other content
    pictures[1].write_bytes(bytes(swapped))
    os.utime(pictures[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    done = extract(ws)
    assert done.returncode == 0, done.stderr
    (bad,) = FeatureStore(ws.store).open("img/image/efficientnet-lite0").attrs["bad_items"]
    assert bad["id"] == 2 and "changed since `featurestore dataset prepare`" in bad["reason"]


def test_prepare_again_reuses_unchanged_hashes_and_the_fingerprint_follows_the_content(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "root")
    raw = tmp_path / "raw"
    pictures = [draw_picture(raw / f"{i}.jpg", seed=i) for i in range(4)]
    first = write_dataset(ws, "img", titles(4), pictures)
    read = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real(self))
    again = write_dataset(ws, "img", titles(4), pictures)
    assert read == [] and again.fingerprint == first.fingerprint  # nothing re-read: prepare stays a stat per image
    swapped = bytearray(pictures[0].read_bytes())
    swapped[-3] ^= 0xFF
    pictures[0].write_bytes(bytes(swapped))
    read.clear()
    changed = write_dataset(ws, "img", titles(4), pictures)
    assert read == ["0.jpg"] and changed.fingerprint != first.fingerprint
    assert PreparedDataset.load(ws.dataset_dir("img")).items[0].image_size == len(swapped)
