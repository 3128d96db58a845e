"""The split handed to RecBole (bench/parity.py) is ours, target by target, without RecBole.

``bench.recbole_split`` writes our prepared sequences as RecBole's atomic ``.inter`` file.
Here the file is read back the way RecBole's sequential datasets read it (rows ordered
by user then timestamp, in whatever order they lie in the file; the last two of each
user left out as test and validation; the model's history window the most recent
``MAX_ITEM_LIST_LENGTH`` items), and the result must equal our split for every user,
computed independently from the raw sequences. The full bench (RecBole installed in its
own virtualenv, training both models) is not part of the suite.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.recbole_split import check_split, write_inter, write_item
from data.dataset import PreparedDataset
from data.prepare import synthetic_dataset
from featurestore.cliutil import UserError

MAX_LEN = 6  # shorter than most sequences, so the history window really cuts


@pytest.fixture(scope="module")
def generic(tmp_path_factory) -> PreparedDataset:
    root = tmp_path_factory.mktemp("parity")
    return PreparedDataset.load(synthetic_dataset(root, "g", "generic", users=300, items=80, images=False))


def read_like_recbole(path, max_len: int, seed: int = 0) -> dict:
    """RecBole's leave-one-out of an atomic .inter file: {split: (users, targets, histories)}."""
    frame = pd.read_csv(path, sep="\t")
    frame.columns = [c.split(":")[0] for c in frame.columns]
    frame = frame.sample(frac=1.0, random_state=seed)  # the file's row order must not matter
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    out = {"valid": ([], [], []), "test": ([], [], [])}
    for user, rows in frame.groupby("user_id", sort=True):
        items = rows["item_id"].to_numpy()
        for split, back in (("valid", 2), ("test", 1)):
            users, targets, histories = out[split]
            seen = items[: len(items) - back][-max_len:]
            users.append(int(user))
            targets.append(int(items[len(items) - back]))
            histories.append(np.pad(seen, (0, max_len - len(seen))))
    return {split: tuple(np.asarray(a) for a in parts) for split, parts in out.items()}


def test_inter_file_carries_our_split_target_by_target(generic, tmp_path):
    path = write_inter(generic, tmp_path / "g.inter")
    header = path.read_text().splitlines()[0]
    assert header.split("\t") == ["user_id:token", "item_id:token", "timestamp:float"]
    split = read_like_recbole(path, MAX_LEN)
    for name, back in (("valid", 2), ("test", 1)):
        users, targets, histories = split[name]
        assert sorted(users) == list(range(generic.n_users))
        for user, target, history in zip(users, targets, histories):  # independent of history()/targets()
            sequence = generic.sequence(user)
            assert target == sequence[-back]
            window = sequence[: len(sequence) - back][-MAX_LEN:]
            assert list(history[: len(window)]) == list(window) and not history[len(window):].any()
        assert check_split(generic, name, users, targets, histories) == generic.n_users


def test_a_changed_order_is_caught(generic, tmp_path):
    path = write_inter(generic, tmp_path / "g.inter")
    lines = path.read_text().splitlines()
    # user 0's last two rows trade timestamps: RecBole would swap its valid and test targets
    first = 1 + 0
    n = len(generic.sequence(0))
    last, before = lines[first + n - 1].split("\t"), lines[first + n - 2].split("\t")
    last[2], before[2] = before[2], last[2]
    lines[first + n - 1], lines[first + n - 2] = "\t".join(last), "\t".join(before)
    path.write_text("\n".join(lines) + "\n")
    users, targets, histories = read_like_recbole(path, MAX_LEN)["test"]
    with pytest.raises(UserError, match="1 targets and 1 histories"):
        check_split(generic, "test", users, targets, histories)


def test_a_filtered_user_is_refused(generic, tmp_path):
    users, targets, histories = read_like_recbole(write_inter(generic, tmp_path / "g.inter"), MAX_LEN)["valid"]
    with pytest.raises(UserError, match="must not filter"):
        check_split(generic, "valid", users[1:], targets[1:], histories[1:])


def test_item_file_lists_the_whole_catalogue(generic, tmp_path):
    lines = write_item(generic, tmp_path / "g.item").read_text().splitlines()
    assert lines[0] == "item_id:token"
    assert [int(x) for x in lines[1:]] == list(range(1, generic.n_items + 1))
