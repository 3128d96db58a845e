"""A Hugging Face hub cache laid out by hand, holding tiny models saved by the libraries themselves.

The layout is the hub library's own (``hub/models--ORG--NAME/refs/main`` naming the
commit, ``snapshots/COMMIT/`` holding the files); the files come from timm's
``save_for_hf`` and transformers' ``save_pretrained``. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable


def lay_out_snapshot(hf_home: Path, repo_id: str, save: Callable[[Path], None]) -> tuple[Path, str]:
    """``save(folder)`` writes the repository's files; returns (snapshot folder, commit)."""
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot, revision


def tiny_swin():
    """A Swin of the swin-b architecture at a fraction of its size (width 128, 4 blocks)."""
    import timm

    return timm.create_model("swin_base_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1)).eval()


def cache_tiny_swin(hf_home: Path, repo_id: str):
    """Cache :func:`tiny_swin` under ``repo_id``; returns (model, snapshot, commit)."""
    from timm.models import save_for_hf

    model = tiny_swin()
    snapshot, revision = lay_out_snapshot(hf_home, repo_id,
                                          lambda folder: save_for_hf(model, folder, safe_serialization=True))
    return model, snapshot, revision
