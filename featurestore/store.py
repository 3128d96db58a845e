"""The feature store: one Zarr v3 store of item embeddings, one group per dataset/modality/encoder.

A group ``DATASET/MODALITY/ENCODER[@VARIANT]`` holds

- ``embeddings``: (N + 1, dim), row = item id, row 0 the zero padding row, chunked
  by rows so that concurrent writers (torchrun ranks) each own whole chunks: Zarr
  has no inter-process locking, and two writers inside one chunk lose rows;
- ``present``: bool (N + 1,), false for the padding row and for items the encoder
  could not read (their row stays zero);
- ``chunks_done``: one flag per row chunk, set only after that chunk's rows are
  written: what a resumed job skips;
- ``flat``: once the group is complete, the same embeddings again in one
  uncompressed chunk, i.e. a plain little-endian file that :meth:`FeatureGroup.memmap`
  maps without loading it (readers gather batches of rows without RAM for the whole);
- attributes: provenance (encoder, weights and their sha256, pooling,
  preprocessing, dtype, dataset name and fingerprint, bad items, timings, versions)
  and ``status`` (``partial`` until every chunk is written, then ``complete``;
  ``failed``, with the reason in ``failure``, when an error stopped the extraction).

Locks live beside the store (``store.zarr.locks/``), not inside it, so every Zarr
client sees a clean hierarchy.

Example:
    >>> fg = FeatureStore(ws.store).open("HM/image/efficientnet-lite0")
    >>> fg.status, fg.dim, fg.read([1, 2, 3]).shape
    ('complete', 1280, (3, 1280))
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import quote

import numpy as np
import zarr
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from featurestore.errors import UserError
from featurestore.runtime.files import naming, read_json
from featurestore.workspace import check_name

FORMAT = "morec-featurestore/1"
DEFAULT_CHUNK_ROWS = 1024
STATUS_PARTIAL = "partial"
STATUS_FAILED = "failed"  # stopped by an error (attribute ``failure``); a rerun resumes it
STATUS_COMPLETE = "complete"
STORED_DTYPES = ("float32", "float16")
# What zarr and its codecs raise on a damaged metadata or chunk file (a cut zstd frame, bad JSON).
DAMAGE_ERRORS = (ValueError, KeyError, TypeError, RuntimeError)
FLAT_SAMPLE = 8  # rows of the flat copy compared with the chunked embeddings when a group is first mapped


@dataclass(frozen=True)
class GroupName:
    """The parts of ``DATASET/MODALITY/ENCODER[@VARIANT]``."""

    dataset: str
    modality: str
    encoder: str
    variant: str | None = None

    def __str__(self) -> str:
        return group_name(self.dataset, self.modality, self.encoder, self.variant)


def group_name(dataset: str, modality: str, encoder: str, variant: str | None = None) -> str:
    """``DATASET/MODALITY/ENCODER[@VARIANT]``, checked.

    Example:
        >>> group_name("HM", "image", "swin-b", "mae")
        'HM/image/swin-b@mae'
    """
    check_name("dataset", dataset)
    check_name("group part", modality)
    check_name("group part", encoder)
    if variant is not None:
        check_name("variant", variant)
    return f"{dataset}/{modality}/{encoder}" + (f"@{variant}" if variant else "")


def parse_group_name(name: str) -> GroupName:
    """Split a group name; a malformed one raises a UserError showing the expected form."""
    parts = name.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(
            f"bad store group name {name!r}; expected DATASET/MODALITY/ENCODER[@VARIANT], "
            "e.g. HM/image/efficientnet-lite0 (see `featurestore ls`)"
        )
    encoder, _, variant = parts[2].partition("@")
    parsed = GroupName(parts[0], parts[1], encoder, variant or None)
    group_name(parsed.dataset, parsed.modality, parsed.encoder, parsed.variant)
    return parsed


def extract_command(
    dataset: str,
    encoder: str,
    *,
    modality: str | None = None,
    variant: str | None = None,
    root: Path | str | None = None,
) -> str:
    """The exact ``featurestore extract`` command that writes that group (for error messages).

    Example:
        >>> extract_command("HM", "swin-t", modality="image")
        'featurestore extract --dataset HM --encoder swin-t --modality image'
    """
    words = ["featurestore", "extract"]
    if root is not None:
        words += ["--root", str(root)]
    words += ["--dataset", dataset, "--encoder", encoder]
    if modality:
        words += ["--modality", modality]
    if variant:
        words += ["--variant", variant]
    return shlex.join(words)


def group_extract_command(name: str, root: Path | str | None = None) -> str:
    """:func:`extract_command` for a group name."""
    parsed = parse_group_name(name)
    return extract_command(parsed.dataset, parsed.encoder, modality=parsed.modality,
                           variant=parsed.variant, root=root)


def file_sha256(paths: Sequence[Path | str]) -> str:
    """sha256 over the bytes of one or more files (sorted by name): weights, imported arrays."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _json_ready(value: Any) -> Any:
    """Attributes are JSON: tuples become lists, numpy scalars plain numbers."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


class FeatureGroup:
    """One group of the store, for reading and (by the extraction job) writing.

    Attributes:
        name: ``DATASET/MODALITY/ENCODER[@VARIANT]``.
        path: the group's folder.
    """

    def __init__(self, store: "FeatureStore", name: str, group: zarr.Group) -> None:
        self.store = store
        self.name = name
        self.path = store.path / name
        self._group = group
        self.attrs: dict = dict(group.attrs)
        self._flat_checked = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Turn a damaged chunk or metadata file met while reading into a UserError with the fix."""
        try:
            yield
        except DAMAGE_ERRORS as err:
            raise self.store.damaged(self.name, err) from None

    def refresh(self) -> "FeatureGroup":
        """Re-read attributes and arrays (another process may have written)."""
        self._group = zarr.open_group(self.store._zarr_store(), path=self.name, mode="r+")
        self.attrs = dict(self._group.attrs)
        return self

    @property
    def status(self) -> str:
        return self.attrs.get("status", STATUS_PARTIAL)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the prepared dataset these rows were computed for."""
        return self.attrs.get("dataset_fingerprint", "")

    @property
    def embeddings(self) -> zarr.Array:
        return self._group["embeddings"]

    @property
    def rows(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def dtype(self) -> str:
        return str(self.embeddings.dtype)

    @property
    def chunk_rows(self) -> int:
        return int(self.embeddings.chunks[0])

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of row chunk ``chunk``."""
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.rows)

    def done_chunks(self) -> np.ndarray:
        """bool per row chunk: its rows are written."""
        with self.reading():
            return np.asarray(self._group["chunks_done"][:], dtype=bool)

    def present(self) -> np.ndarray:
        """bool (rows,): an embedding was computed for that item id."""
        with self.reading():
            return np.asarray(self._group["present"][:], dtype=bool)

    def read(self, ids: Sequence[int] | np.ndarray | None = None, *, mapped: bool = True) -> np.ndarray:
        """float32 rows for item ``ids`` (any order, repeats allowed), or all rows.

        ``mapped=False`` reads the chunked ``embeddings`` even when the flat copy
        exists (``verify`` checks the primary array, not the copy).
        """
        if ids is None:
            with self.reading():
                return np.asarray(self.embeddings[:], dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise UserError(f"item ids must lie in 0..{self.rows - 1} for group {self.name}")
        if mapped and self._has_flat():
            return np.asarray(self.memmap()[ids], dtype=np.float32)
        unique, inverse = np.unique(ids, return_inverse=True)
        with self.reading():
            rows = self.embeddings.get_orthogonal_selection((unique, slice(None)))
        return np.asarray(rows, dtype=np.float32)[inverse]

    def iter_chunks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, rows)`` per row chunk, as stored: streams a group of any size."""
        for chunk in range(self.n_chunks):
            start, stop = self.chunk_bounds(chunk)
            with self.reading():
                rows = np.asarray(self.embeddings[start:stop])
            yield start, stop, rows

    def _flat_file(self) -> Path:
        return self.path / "flat" / self._group["flat"].metadata.encode_chunk_key((0, 0))

    def _has_flat(self) -> bool:
        return "flat" in self._group and self._flat_file().exists()

    def memmap(self) -> np.memmap:
        """The embeddings (stored dtype) memory-mapped read-only: rows are read on access.

        Only a complete group has the ``flat`` copy; it is written on first use if
        missing (e.g. a group written by another tool).
        """
        if self.status != STATUS_COMPLETE:
            raise UserError(
                f"store group {self.name} is {self.status}; finish it first: "
                f"`{group_extract_command(self.name)}`"
            )
        if not self._flat_checked:
            if not self.flat_whole():
                self.write_flat()  # missing or cut: the copy is rebuilt from the embeddings
            elif not self._flat_agrees():
                raise UserError(f"store group {self.name}: its flat copy disagrees with its chunked embeddings, so "
                                f"one of them is damaged; `featurestore verify {self.name}` says which: remove the "
                                f"group's flat/ folder to rebuild the copy, or `featurestore rm {self.name}` and "
                                "extract it again")
        self._flat_checked = True
        return self.flat_view()

    def flat_view(self) -> np.memmap:
        """The flat copy as it is on disk, unchecked (``featurestore verify`` compares it row by row)."""
        return np.memmap(self._flat_file(), dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r",
                         shape=(self.rows, self.dim))

    def flat_whole(self) -> bool:
        """The flat copy exists and has the right size (a cut one is rebuilt)."""
        with self.reading():
            return self._has_flat() and self._flat_file().stat().st_size == self.rows * self.dim * np.dtype(
                self.dtype).itemsize

    def _flat_agrees(self) -> bool:
        """The flat copy equals the chunked embeddings on a sample of rows. A copy that does not is refused,
        not rebuilt: which side is damaged is for ``featurestore verify`` to say, not to overwrite."""
        sample = np.unique(np.linspace(0, self.rows - 1, FLAT_SAMPLE).astype(np.int64))
        with self.reading():
            return bool(np.array_equal(np.asarray(self.flat_view()[sample]), self.read(sample, mapped=False),
                                       equal_nan=True))

    # -- writing (the extraction job, import) --------------------------------------

    def write_chunk(self, chunk: int, rows: np.ndarray, present: np.ndarray) -> None:
        """Write one whole row chunk, then mark it done (a kill in between redoes it)."""
        start, stop = self.chunk_bounds(chunk)
        self.embeddings[start:stop] = rows
        self._group["present"][start:stop] = present
        self._group["chunks_done"][chunk] = 1

    def update_attrs(self, **values: Any) -> None:
        values = _json_ready(values)
        self._group.attrs.update(values)
        self.attrs.update(values)

    def write_flat(self) -> None:
        """Write the uncompressed single-chunk copy, streaming chunk by chunk.

        The ``flat`` array is created with Zarr (metadata, one chunk, bytes codec
        only), and its one chunk file is then written row chunk by row chunk through
        a temporary file renamed into place, so memory stays at one chunk.
        """
        dtype = np.dtype(self.dtype).newbyteorder("<")
        flat = self._group.create_array(
            "flat", shape=(self.rows, self.dim), chunks=(self.rows, self.dim), dtype=dtype,
            compressors=None, filters=None, fill_value=0, overwrite=True,
        )
        target = self.path / "flat" / flat.metadata.encode_chunk_key((0, 0))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with naming(target, remove=tmp):
            with open(tmp, "wb") as fh:
                for _, _, rows in self.iter_chunks():
                    fh.write(np.ascontiguousarray(rows, dtype=dtype).tobytes())
            os.replace(tmp, target)

    def drop_flat(self) -> None:
        if "flat" in self._group:
            del self._group["flat"]

    def describe(self) -> dict:
        """What ``featurestore info`` prints: the essentials plus every attribute."""
        done = self.done_chunks()
        present = self.present()
        return {
            "group": self.name,
            "path": str(self.path),
            "status": self.status,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "encoder": self.attrs.get("encoder"),
            "modality": self.attrs.get("modality"),
            "pooling": self.attrs.get("pooling"),
            "weights": self.attrs.get("weights"),
            "weights_sha256": self.attrs.get("weights_sha256"),
            "dataset": self.attrs.get("dataset"),
            "fingerprint": self.fingerprint,
            "chunks_done": f"{int(done.sum())}/{len(done)}",
            "present": int(present[1:].sum()),
            "bad_items": len(self.attrs.get("bad_items", [])),
            "failure": self.attrs.get("failure") if self.status == STATUS_FAILED else None,
            "size_mb": round(_folder_bytes(self.path) / 2**20, 2),
            "attrs": self.attrs,
        }


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class NamingStore(LocalStore):
    """Zarr's local store whose write errors name the file being written (a chunk or a
    ``zarr.json``): zarr's own name none (a full disk fails in ``write()``) or its temporary
    ``.partial`` file, and the CLI would say "a file: no space left"."""

    async def set(self, key: str, value: Buffer) -> None:
        with naming(self.root / key):
            await super().set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        with naming(self.root / key):
            await super().set_if_not_exists(key, value)


class FeatureStore:
    """The Zarr store under a workspace root (``ws.store``).

    Example:
        >>> store = FeatureStore(ws.store)
        >>> store.groups()
        ['HM/image/efficientnet-lite0', 'HM/text/minilm-l6']
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _zarr_store(self, read_only: bool = False) -> LocalStore:
        return NamingStore(self.path, read_only=read_only)

    def groups(self) -> list[str]:
        """Names of all feature groups (groups that hold an ``embeddings`` array)."""
        if not self.path.is_dir():
            return []
        found = self.path.glob("*/*/*/embeddings/zarr.json")
        return sorted(str(p.parent.parent.relative_to(self.path)) for p in found)

    def exists(self, name: str) -> bool:
        return (self.path / str(parse_group_name(name)) / "embeddings" / "zarr.json").exists()

    def open(self, name: str, *, complete: bool = False, extract_flags: str = "") -> FeatureGroup:
        """Open a group for reading; ``complete=True`` also refuses a partial one.

        A missing group raises a UserError carrying the command that creates it, with
        ``extract_flags`` appended when the caller needs more than pooled vectors
        (``--cache-layer 0`` for the token states of merge-attention).
        """
        name = str(parse_group_name(name))
        command = " ".join(filter(None, [group_extract_command(name), extract_flags]))
        if not self.exists(name):
            known = ", ".join(self.groups()) or "none"
            raise UserError(f"no store group {name} in {self.path} (groups: {known}); create it with `{command}`")
        for meta in sorted((self.path / name).glob("*zarr.json")) + sorted((self.path / name).glob("*/zarr.json")):
            read_json(meta, self._rebuild(name))
        try:
            group = FeatureGroup(self, name, zarr.open_group(self._zarr_store(), path=name, mode="r+"))
            group.embeddings, group._group["present"], group._group["chunks_done"]
        except DAMAGE_ERRORS as err:
            raise self.damaged(name, err) from None
        if complete and group.status == STATUS_FAILED:
            raise UserError(f"store group {name} failed: {group.attrs.get('failure')}; fix that and rerun "
                            f"`{command}`, or remove it: `featurestore rm {name}`")
        if complete and group.status != STATUS_COMPLETE:
            raise UserError(
                f"store group {name} is {group.status} (an extraction did not finish); resume it with `{command}`"
            )
        return group

    def create(self, name: str, *, rows: int, dim: int, dtype: str, chunk_rows: int, attrs: dict) -> FeatureGroup:
        """Create an empty group (status ``partial``); the name must be free."""
        name = str(parse_group_name(name))
        if dtype not in STORED_DTYPES:
            raise UserError(f"--dtype {dtype}: choose one of {', '.join(STORED_DTYPES)}")
        if self.exists(name):
            raise UserError(f"store group {name} already exists; remove it first: `featurestore rm {name}`")
        root = zarr.open_group(self._zarr_store(), mode="a")
        group = root.require_group(name)
        chunk_rows = max(1, min(chunk_rows, rows))
        n_chunks = -(-rows // chunk_rows)
        group.create_array("embeddings", shape=(rows, dim), chunks=(chunk_rows, dim), dtype=dtype, fill_value=0)
        group.create_array("present", shape=(rows,), chunks=(chunk_rows,), dtype="bool", fill_value=False)
        group.create_array("chunks_done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs.update(_json_ready({"format": FORMAT, "status": STATUS_PARTIAL, **attrs}))
        return FeatureGroup(self, name, group)

    def damaged(self, name: str, err: Exception) -> UserError:
        """The message for a group that a damaged chunk or metadata file makes unreadable."""
        detail = str(err).splitlines()[0] if str(err) else ""
        return UserError(f"store group {name} at {self.path / name} is damaged ({type(err).__name__}: {detail}); "
                         f"{self._rebuild(name)}")

    @staticmethod
    def _rebuild(name: str) -> str:
        return f"remove it with `featurestore rm {name}` and extract it again: `{group_extract_command(name)}`"

    def remove(self, name: str) -> str:
        """Delete a group, damaged or not (refused while a live job holds its lock), and now-empty
        parents; the group's name."""
        name = str(parse_group_name(name))
        if not self.exists(name) and not (self.path / name).is_dir():
            self.open(name)  # the "no store group" message, listing the groups there are
        lock = self.lock(name)
        holder = lock.live_holder()
        if holder is not None:
            raise UserError(f"store group {name} is being written by {lock.describe(holder)}; "
                            "wait for that job to end before removing it")
        shutil.rmtree(self.path / name)
        lock.path.unlink(missing_ok=True)
        for parent in (self.path / name).parents:
            if parent == self.path or any(p.name != "zarr.json" for p in parent.iterdir()):
                break
            shutil.rmtree(parent)
        return name

    def lock(self, name: str) -> "GroupLock":
        """The writer lock of a group (see :class:`GroupLock`)."""
        name = str(parse_group_name(name))
        return GroupLock(self.path.with_name(self.path.name + ".locks") / f"{quote(name, safe='@')}.lock", name)


def _process_start(pid: int) -> str | None:
    """Start time of a process (from /proc), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    if Path("/proc").is_dir() and now is None:
        return False  # a zombie: killed, not yet reaped
    return start is None or now is None or now == start


class GroupLock:
    """One writer per group: an exclusive lock file naming its holder.

    Created with ``O_EXCL`` (atomic on local file systems). A lock left by a dead
    process on this host (SIGKILL, power loss) is taken over; a live holder, or one
    on another host that cannot be checked, makes the second writer fail with a
    message naming it.
    """

    def __init__(self, path: Path, name: str, what: str = "store group", command: str = "") -> None:
        self.path = path
        self.name = name
        self.what = what  # what is locked, for messages: "store group", "run", "study folder"
        self.command = command
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def describe(self, holder: dict) -> str:
        return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')} "
                f"(lock file {self.path})")

    def live_holder(self) -> dict | None:
        """The holder's record if the lock is held by a process that may still run."""
        holder = self._read()
        if holder is None:
            return None
        if not holder:  # unreadable: its writer died mid-write, or is writing right now
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 99
            return {"pid": "?", "host": "?"} if age < 10 else None
        if holder.get("host") != socket.gethostname():
            return holder
        return holder if _alive(int(holder["pid"]), holder.get("start")) else None

    def acquire(self, command: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command or self.command,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.live_holder()
                if holder is not None:
                    raise UserError(
                        f"{self.what} {self.name} is being written by {self.describe(holder)}; "
                        "wait for it to finish, or delete the lock file if that job is gone"
                    ) from None
                stale = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.replace(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass  # another job took the stale lock over first; try again
                continue
            with naming(self.path, remove=self.path), os.fdopen(fd, "w") as fh:  # no empty lock left
                json.dump(record, fh)
            self.held = True
            return
        raise UserError(f"could not take the lock of {self.what} {self.name} ({self.path}); try again")

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "GroupLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
