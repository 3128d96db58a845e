"""Atomic file writes: a kill or a full disk leaves the previous file or the new one, never half.

Every file a job rewrites in place (run configs, checkpoints, ``adapt.json``, ``eval.json``,
study summaries) goes through :func:`write_atomic`, so every such failure reads the same:
an ``OSError`` naming the file the user knows, not a temporary one, and no debris.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from featurestore.errors import UserError


def write_atomic(path: Path | str, data: bytes) -> None:
    """Write a temporary file beside ``path``, then rename it over ``path``.

    The temporary name carries the process id, so two processes writing the same file
    (two ``eval rank`` on one run) never write into each other's. A failure (full disk,
    a directory in the way) removes the temporary file, leaves the previous ``path`` in
    place and raises the OSError with ``path`` as its file name (a failing ``write()``
    names no file, a failing rename names the temporary one).

    Example:
        >>> write_atomic(run_dir / "metrics.jsonl", b'{"epoch": 1}\\n')
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with naming(path, remove=tmp):
        tmp.write_bytes(data)
        os.replace(tmp, path)


@contextmanager
def naming(path: Path | str, remove: Path | None = None) -> Iterator[None]:
    """Re-raise an OSError inside the block as one naming ``path``, the file the user knows,
    after deleting ``remove`` (the half-written temporary file, so a full disk leaves no debris).

    A failing ``write()`` (a full disk) names no file and a failing rename names a temporary
    one, so without this the CLI could only say "a file: no space left". The errno, and so
    the exception's class, is kept.

    Example:
        >>> with naming(dataset_dir / "seq_items.npy"):
        ...     np.save(tmp_dir / "seq_items.npy", seq_items)
    """
    try:
        yield
    except OSError as err:
        if remove is not None:
            remove.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err


def write_json(path: Path | str, obj: object) -> None:
    """``obj`` as indented JSON, atomically (:func:`write_atomic`); values JSON has no type
    for (paths, dtypes) are written as their ``str``."""
    write_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_json(path: Path | str, fix: str, kind: type = dict) -> Any:
    """The JSON object in ``path``, which the tool wrote; an empty, cut or foreign file (or one
    holding another type than ``kind``) is a UserError naming the file and ``fix``, not a traceback."""
    try:
        value = json.loads(Path(path).read_bytes())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is damaged (not valid JSON: {err}); {fix}") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged (it holds a {type(value).__name__}, not a JSON "
                        f"{'object' if kind is dict else kind.__name__}); {fix}")
    return value
