"""Where ``featurestore dataset synth`` may write: never over files it did not write.

Each generation records the files it left (path, size, mtime) in ``.synth-files.json``.
A folder holding nothing else, unchanged, is the generator's own: its old files are
replaced as a whole by the new ones, so no old picture stays beside the new ones
(a prepared dataset would read it). A folder with anything else (a real catalogue, an
edited file) is refused unless ``--overwrite``, which replaces everything in it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from featurestore.errors import UserError

MARKER = ".synth-files.json"
SHOWN = 3  # foreign files named in the refusal


def _files(folder: Path) -> dict[str, list[int]]:
    """Every file under ``folder`` but the marker: relative path -> [size, mtime_ns]."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.name != MARKER:
            st = path.stat()
            found[path.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return found


def _written_before(folder: Path) -> dict[str, list[int]]:
    try:
        recorded = json.loads((folder / MARKER).read_text())
        return {str(k): list(v) for k, v in recorded["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no (readable) record: nothing here counts as the generator's


def _refuse(folder: Path, overwrite: bool, workspace: Path) -> None:
    """Refuse, naming what the generator did not write (and always when ``folder`` holds the
    ``workspace``, which emptying it would delete)."""
    if workspace.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"--out {folder} holds the workspace {workspace}; choose a folder of its own, "
                        f"e.g. --out {workspace / 'raw' / 'NAME'}")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"--out {folder} is a file; choose a folder")
    ours = _written_before(folder)
    foreign = sorted(name for name, stamp in _files(folder).items() if ours.get(name) != stamp)
    if foreign and not overwrite:
        more = f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        raise UserError(f"--out {folder} holds files `dataset synth` did not write ({', '.join(foreign[:SHOWN])}"
                        f"{more}); choose an empty folder, or pass --overwrite to delete everything in it first")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def synthesize_into(folder: Path, overwrite: bool, workspace: Path, generate: Callable[[Path], dict]) -> dict:
    """Run ``generate(tmp)`` in a fresh folder beside ``folder``, then replace ``folder``'s content
    with it: a refused or failed generation leaves ``folder`` as it was."""
    _refuse(folder, overwrite, workspace)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.synth-", dir=folder.parent))
    try:
        summary = generate(tmp)
        folder.mkdir(exist_ok=True)
        for child in folder.iterdir():
            _remove(child)
        for child in tmp.iterdir():
            os.replace(child, folder / child.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (folder / MARKER).write_text(json.dumps({"files": _files(folder)}))
    return {**summary, "out": str(folder)}
