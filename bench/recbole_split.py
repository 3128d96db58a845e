"""Our leave-one-out split, handed to RecBole as an atomic ``.inter`` file, and checked back.

A parity run is only fair when both libraries rank the same target for the same user
after the same history. RecBole would build its own split from raw interactions (its
own filtering, deduplication and tie order), so instead it gets our *prepared*
sequences: one row per interaction, user token = our user index, item token = our
item id, and as timestamp the item's position in the user's sequence. RecBole's
sequential datasets order each user's rows by timestamp (``eval_args.order: TO``)
and leave the last two out (``split: {LS: valid_and_test}``), so positions give
exactly our order, whatever order the rows lie in and however its sort breaks ties
between users.

:func:`check_split` compares what RecBole actually built (exported by
``bench/recbole_runner.py``) with our split, target by target and history by history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from data.dataset import PreparedDataset
from featurestore.errors import UserError
from featurestore.runtime.files import write_atomic

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token"


def write_inter(dataset: PreparedDataset, path: Path) -> Path:
    """Write ``dataset``'s sequences as RecBole's atomic ``.inter`` file (atomically).

    Returns:
        ``path``; a crash leaves the old file or the new one, never half of one.
    """
    lengths = dataset.lengths()
    users = np.repeat(np.arange(dataset.n_users), lengths)
    positions = np.arange(len(dataset.seq_items)) - np.repeat(dataset.indptr[:-1], lengths)
    rows = zip(users.tolist(), dataset.seq_items.tolist(), positions.tolist())
    return _write_lines(path, INTER_HEADER, (f"{u}\t{i}\t{p}" for u, i, p in rows))


def write_item(dataset: PreparedDataset, path: Path) -> Path:
    """RecBole's ``.item`` file listing every item id 1..N, so its catalogue is ours even when
    an item never occurs in a sequence (it would otherwise leave it out of its id space)."""
    return _write_lines(path, ITEM_HEADER, (str(i) for i in range(1, dataset.n_items + 1)))


def _write_lines(path: Path, header: str, lines: Iterable[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(f"{line}\n" for line in (header, *lines)).encode())
    return path


def expected_split(dataset: PreparedDataset, split: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Our ``split`` (valid/test) as RecBole should see it: per user index, the target and the
    history window RecBole feeds its model (the most recent ``max_len`` items, 0-padded on the
    right as RecBole stores ``item_id_list``)."""
    indptr, items = dataset.history(split)
    histories = np.zeros((dataset.n_users, max_len), dtype=np.int64)
    for user in range(dataset.n_users):
        seen = items[indptr[user]: indptr[user + 1]][-max_len:]
        histories[user, : len(seen)] = seen
    return dataset.targets(split).astype(np.int64), histories


def check_split(dataset: PreparedDataset, split: str, users: np.ndarray, targets: np.ndarray,
                histories: np.ndarray) -> int:
    """Raise unless RecBole's ``split`` equals ours for every user; return the users checked.

    Args:
        users: our user index of each RecBole row; targets: its target item id (ours);
        histories: its ``item_id_list`` rows in our item ids, 0 = padding, right-padded.
    """
    users, targets, histories = (np.asarray(a, dtype=np.int64) for a in (users, targets, histories))
    if len(users) != dataset.n_users or len(np.unique(users)) != dataset.n_users:
        raise UserError(f"RecBole's {split} split has {len(users)} rows for {len(np.unique(users))} users, "
                        f"ours {dataset.n_users} users with one target each; it must not filter or split itself "
                        "(check its filtering options)")
    want_targets, want_histories = expected_split(dataset, split, histories.shape[1])
    wrong_target = int((want_targets[users] != targets).sum())
    wrong_history = int((want_histories[users] != histories).any(axis=1).sum())
    if wrong_target or wrong_history:
        raise UserError(f"RecBole's {split} split differs from ours: {wrong_target} targets and "
                        f"{wrong_history} histories of {len(users)} users; the .inter file does not carry our order")
    return len(users)

