"""Property-based tests (Hypothesis) of every raw-format reader, through ``prepare_dataset``.

Two properties per format:

- **Well-formed but awkward files** (a BOM, CRLF line ends, quoted commas and newlines in
  CSV text, non-ASCII ids, duplicate catalogue rows, repeated interactions, ids padded
  with spaces, interactions naming unknown items) prepare into a dataset whose user,
  item and interaction counts equal an independent reading: the preparation rules
  re-applied in plain Python to the interactions the test wrote.
- **Damaged files** (random bytes, a cut at a random byte, a zero-byte file, a header
  only, the wrong delimiter, bytes that are not UTF-8, a stray quote) end either in a
  prepared dataset that is internally consistent, or in one ``UserError`` line that names
  the damaged file; never another exception, and never a half-written dataset folder.

Kept small (a few dozen examples per property, no deadline) so the suite stays quick.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.dataset import PreparedDataset
from data.prepare import prepare_dataset
from featurestore.cliutil import UserError

FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MIN_INTERACTIONS = 3
# id pieces: non-ASCII letters, an inner space, and (CSV only) a comma and a quote, which the writer quotes
ID_PIECES = ["a", "b", "Z", "7", "é", "日本", "x y"]
CSV_PIECES = ID_PIECES + [",", '"']
TEXT = st.text(alphabet=st.sampled_from(list("abc xyzé日,.'\"") + ["\n"]), max_size=12)


@dataclass
class Truth:
    """What the test wrote: catalogue ids (with duplicates) and interactions in file order."""

    items: list[str]
    texts: list[str]
    events: list[tuple[str, str, int]]  # user, item, time


def expected_counts(truth: Truth, max_seq_len: int, normalise=str.strip) -> tuple[int, int, int]:
    """The preparation rules, re-applied independently: known items only, stable sort by
    time, first occurrence of a repeated item kept, users below the minimum dropped, the
    most recent ``max_seq_len`` kept. Returns (users, items, interactions)."""
    catalogue = {normalise(i) for i in truth.items}
    per_user: dict[str, list[tuple[int, int, str]]] = {}
    for order, (user, item, time) in enumerate(truth.events):
        if normalise(item) in catalogue:
            per_user.setdefault(normalise(user), []).append((time, order, normalise(item)))
    users = items = 0
    used: set[str] = set()
    for events in per_user.values():
        seen, sequence = set(), []
        for _, _, item in sorted(events):
            if item not in seen:
                seen.add(item)
                sequence.append(item)
        if len(sequence) >= MIN_INTERACTIONS:
            users += 1
            kept = sequence[-max_seq_len:]
            items += len(kept)
            used.update(kept)
    return users, len(used), items


def _ids(pieces: list[str], prefix: str) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), min_size=1, max_size=3).map(lambda p: prefix + "".join(p))


@st.composite
def truths(draw, pieces: list[str] = ID_PIECES, numeric_items: bool = False, text=TEXT) -> Truth:
    n_items = draw(st.integers(4, 10))
    if numeric_items:
        items = [str(k) for k in draw(st.lists(st.integers(1, 10**9), min_size=n_items, max_size=n_items, unique=True))]
    else:
        items = draw(st.lists(_ids(pieces, "i"), min_size=n_items, max_size=n_items, unique_by=str.strip))
    dupes = draw(st.lists(st.sampled_from(items), max_size=2))  # repeated catalogue rows: first kept
    users = draw(st.lists(_ids(pieces, "u"), min_size=1, max_size=5, unique_by=str.strip))
    unknown = "9" * 11 if numeric_items else "i-not-in-catalogue"
    events = draw(st.lists(st.tuples(st.sampled_from(users), st.sampled_from(items + [unknown]),
                                     st.integers(0, 40)), min_size=3, max_size=40))
    all_items = items + dupes
    return Truth(all_items, [draw(text) for _ in all_items], events)


def csv_text(rows: list[list[str]], delimiter: str = ",") -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def plain_text(text: str) -> str:
    """Text for tab-separated formats, which have no quoting: no tabs or line breaks."""
    return text.replace("\t", " ").replace("\n", " ")


def hm_files(t: Truth) -> dict[str, str]:
    day = dt.date(2020, 1, 1)
    return {
        "articles.csv": csv_text([["article_id", "prod_name", "product_type_name", "colour_group_name", "detail_desc"]]
                                 + [[i, text, "type", "colour", "desc"] for i, text in zip(t.items, t.texts)]),
        "transactions_train.csv": csv_text([["t_dat", "customer_id", "article_id", "price"]]
                                           + [[str(day + dt.timedelta(days=time)), u, i, "0.1"]
                                              for u, i, time in t.events]),
    }


def generic_files(t: Truth) -> dict[str, str]:
    return {"items.csv": csv_text([["item_id", "text"]] + [[i, text] for i, text in zip(t.items, t.texts)]),
            "interactions.csv": csv_text([["user_id", "item_id", "timestamp"]] + [[u, i, str(time)] for u, i, time in t.events])}


def ninerec_files(t: Truth) -> dict[str, str]:
    return {"bili_item.csv": csv_text([["item", "text"]] + [[i, text] for i, text in zip(t.items, t.texts)]),
            "bili_pair.csv": csv_text([["item", "user", "timestamp"]] + [[i, u, str(time)] for u, i, time in t.events])}


def mind_files(t: Truth) -> dict[str, str]:
    base = dt.datetime(2019, 11, 15, 8, 0, 0)
    news = "".join(f"{i}\tcat\tsub\t{plain_text(text)}\tabstract\turl\t[]\t[]\n" for i, text in zip(t.items, t.texts))
    behaviors = "".join(f"{row}\t{u}\t{(base + dt.timedelta(seconds=time)).strftime('%m/%d/%Y %I:%M:%S %p')}\t\t"
                        f"{i}-1 {t.items[0]}-0\n" for row, (u, i, time) in enumerate(t.events))
    return {"news.tsv": news, "behaviors.tsv": behaviors}


def seqtsv_files(t: Truth) -> dict[str, str]:
    items = "".join(f"{i}\t{plain_text(text)}\n" for i, text in zip(t.items, t.texts))
    return {"items.tsv": items, "users.tsv": "".join(f"{u}\t{i}\n" for u, i, _ in t.events)}


def seqtsv_truth(t: Truth) -> Truth:
    """seqtsv has no timestamps: the file position is the time."""
    return Truth(t.items, t.texts, [(u, i, k) for k, (u, i, _) in enumerate(t.events)])


def no_space_ids(t: Truth) -> Truth:
    """Whitespace-separated layouts (MIND's impressions, seqtsv's item lists) cannot hold ids with spaces."""
    fix = lambda s: s.replace(" ", "_")  # noqa: E731
    return Truth([fix(i) for i in t.items], t.texts, [(fix(u), fix(i), time) for u, i, time in t.events])


@dataclass
class Layout:
    """One raw format as the tests write it."""

    fmt: str
    files: callable
    truth: st.SearchStrategy
    max_seq_len: int
    prepare_truth: callable = lambda t: t
    normalise: callable = str.strip


LAYOUTS = {
    "generic": Layout("generic", generic_files, truths(CSV_PIECES), 23),
    "ninerec": Layout("ninerec", ninerec_files, truths(CSV_PIECES), 13),
    "hm": Layout("hm", hm_files, truths(CSV_PIECES, numeric_items=True), 13,
                 normalise=lambda s: s.strip().zfill(10)),
    "mind": Layout("mind", mind_files, truths().map(no_space_ids), 23),
    "seqtsv": Layout("seqtsv", seqtsv_files, truths().map(no_space_ids), 23, prepare_truth=seqtsv_truth),
}


def write_raw(folder: Path, files: dict[str, bytes | str], bom: bool = False, crlf: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, str):
            content = (content.replace("\n", "\r\n") if crlf else content).encode()
            content = (b"\xef\xbb\xbf" if bom else b"") + content
        (folder / name).write_bytes(content)
    return folder


def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_awkward_but_valid_files_prepare_to_the_independent_counts(fmt: str, tmp_path_factory) -> None:
    layout = LAYOUTS[fmt]

    @FUZZ
    @given(truth=layout.truth, bom=st.booleans(), crlf=st.booleans())
    def check(truth: Truth, bom: bool, crlf: bool) -> None:
        work = fresh(tmp_path_factory)
        raw = write_raw(work / "raw", layout.files(truth), bom=bom, crlf=crlf)
        users, items, interactions = expected_counts(layout.prepare_truth(truth), layout.max_seq_len,
                                                     layout.normalise)
        if users == 0:
            with pytest.raises(UserError, match="no users left|no readable interactions"):
                prepare_dataset(fmt, raw, work / "out", name="x", min_interactions=MIN_INTERACTIONS)
            assert not (work / "out").exists()
            return
        counts = prepare_dataset(fmt, raw, work / "out", name="x", min_interactions=MIN_INTERACTIONS)["counts"]
        assert (counts["users"], counts["items"], counts["interactions"]) == (users, items, interactions)
        dataset = PreparedDataset.load(work / "out")
        assert (dataset.n_users, dataset.n_items) == (users, items)
        catalogue = {layout.normalise(i) for i in truth.items}
        assert all(item.orig_id in catalogue for item in dataset.items)

    check()


DAMAGE = ["random bytes", "cut", "zero bytes", "header only", "wrong delimiter", "not utf-8", "stray quote",
          "nul byte"]


def damage(content: bytes, how: str, data: st.DataObject) -> bytes:
    lines = content.splitlines(keepends=True)
    if how == "random bytes":
        return data.draw(st.binary(min_size=1, max_size=300))
    if how == "cut":
        return content[: data.draw(st.integers(0, max(0, len(content) - 1)))]
    if how == "zero bytes":
        return b""
    if how == "header only":
        return lines[0] if lines else b""
    if how == "wrong delimiter":
        other = data.draw(st.sampled_from([b";", b"|", b","]))
        return content.replace(b",", other).replace(b"\t", other)
    at = data.draw(st.integers(0, max(0, len(content) - 1)))
    insert = {"not utf-8": b"\xff\xfe", "stray quote": b'"', "nul byte": b"\x00"}[how]
    return content[:at] + insert + content[at:]


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_damaged_files_give_one_line_naming_the_file_or_a_consistent_dataset(fmt: str, tmp_path_factory) -> None:
    layout = LAYOUTS[fmt]

    @FUZZ
    @given(truth=layout.truth, how=st.sampled_from(DAMAGE), which=st.integers(0, 1), data=st.data())
    def check(truth: Truth, how: str, which: int, data: st.DataObject) -> None:
        work = fresh(tmp_path_factory)
        files = {name: text.encode() for name, text in layout.files(truth).items()}
        target = sorted(files)[which]
        files[target] = damage(files[target], how, data)
        raw = write_raw(work / "raw", files)
        try:
            manifest = prepare_dataset(fmt, raw, work / "out", name="x", min_interactions=MIN_INTERACTIONS)
        except UserError as err:
            message = str(err)
            assert "\n" not in message, message
            assert target in message or "no users left" in message or "no readable interactions" in message, message
            assert not (work / "out").exists()  # nothing half-written
            return
        dataset = PreparedDataset.load(work / "out")
        assert dataset.n_users == manifest["counts"]["users"] > 0
        lengths = dataset.lengths()
        assert lengths.min() >= MIN_INTERACTIONS and lengths.max() <= layout.max_seq_len
        assert dataset.n_items == len(set(dataset.seq_items.tolist()))

    check()


SPECIFIC = [  # (format, file, content, what the one line must say)
    ("hm", "articles.csv", b"", "articles.csv is empty"),
    ("hm", "articles.csv", b"article_id;prod_name\n1;x\n", "line 1 is separated by semicolons, but this format uses commas"),
    ("generic", "items.csv", b"item_id,text\n", "items.csv has no rows below line 1"),
    ("generic", "interactions.csv", b"user_id,item_id,timestamp\nu\xe9,i1,1\n", "interactions.csv line 2: byte 0xe9"),
    ("generic", "items.csv", b'item_id,text\ni1,"never closed\n', "items.csv line 2: cannot parse"),
    ("mind", "news.tsv", b"N1,cat,sub,title\n", "line 1 is separated by commas, but this format uses tabs"),
    ("seqtsv", "users.tsv", b"u1\n", "users.tsv line 1 has 1 column"),
]


@pytest.mark.parametrize("fmt,name,content,words", SPECIFIC)
def test_each_damage_names_file_line_and_fix(fmt, name, content, words, tmp_path: Path) -> None:
    layout = LAYOUTS[fmt]
    truth = Truth(["1", "2", "3"], ["a", "b", "c"], [("u", "1", 1), ("u", "2", 2), ("u", "3", 3)])
    files = {**layout.files(truth), name: content}
    with pytest.raises(UserError) as err:
        prepare_dataset(fmt, write_raw(tmp_path / "raw", files), tmp_path / "out", name="x",
                        min_interactions=MIN_INTERACTIONS)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# -- featurestore import ---------------------------------------------------------------


@pytest.fixture(scope="module")
def import_root(tmp_path_factory) -> Path:
    from test_names import tiny_raw

    work = tmp_path_factory.mktemp("import")
    root = work / "root"
    prepare_dataset("generic", tiny_raw(work / "raw"), root / "datasets" / "tiny", name="tiny")
    return root


def _import(root: Path, path: Path, group: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from featurestore.cli import cli

    result = CliRunner().invoke(cli, ["import", str(path), "--group", group, "--root", str(root)])
    if isinstance(result.exception, UserError):
        return 2, str(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def test_import_round_trips_or_refuses_bad_arrays(import_root: Path, tmp_path_factory) -> None:
    import numpy as np

    from featurestore.store import FeatureStore

    counter = iter(range(10**6))
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)

    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(values=st.lists(floats, min_size=9 * 3, max_size=9 * 3), zero_rows=st.sets(st.integers(0, 8)),
           dtype=st.sampled_from(["float32", "float16", "float64"]),
           cut=st.one_of(st.none(), st.integers(0, 200)))
    def check(values, zero_rows, dtype, cut) -> None:
        with np.errstate(over="ignore"):
            rows = np.asarray(values, dtype=np.float64).reshape(9, 3).astype(dtype)
        rows[sorted(zero_rows)] = 0
        work = fresh(tmp_path_factory)
        path = work / "rows.npy"
        np.save(path, rows)
        if cut is not None:
            path.write_bytes(path.read_bytes()[:cut])
        group = f"tiny/text/fuzz{next(counter)}"
        code, out = _import(import_root, path, group)
        store = FeatureStore(import_root / "store.zarr")
        stored = "float16" if dtype == "float16" else "float32"
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(rows.astype(stored)).all()
        if code == 0:
            assert cut is None and finite
            fg = store.open(group, complete=True)
            np.testing.assert_array_equal(fg.read(), rows.astype(stored).astype(np.float32))
            expected_present = np.abs(rows).max(axis=1) > 0
            expected_present[0] = False
            np.testing.assert_array_equal(fg.present(), expected_present)
        else:
            assert code == 2 and "\n" not in out and str(path) in out, out
            assert not (cut is None and finite), out
            assert not store.exists(group)

    check()
