"""Every raw format parsed from small hand-written files, checked against hand-computed results.

Each case covers the edge cases the format has: ties in timestamps (file order wins),
duplicates (first kept), users below the threshold, missing images, unreadable rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from data.dataset import PreparedDataset
from data.formats import get_format, list_formats
from data.prepare import prepare_dataset
from featurestore.cliutil import UserError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def picture(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def prepared(fmt: str, source: Path, tmp_path: Path, **options) -> PreparedDataset:
    prepare_dataset(fmt, source, tmp_path / "prepared", name="t", **options)
    return PreparedDataset.load(tmp_path / "prepared")


def sequences(ds: PreparedDataset) -> dict[str, list[str]]:
    """user orig id -> item orig ids in order: the dataset in raw terms."""
    return {ds.user_ids[u]: [ds.items[i - 1].orig_id for i in ds.sequence(u)] for u in range(ds.n_users)}


def test_registry_knows_every_format_and_names_them_on_a_typo() -> None:
    assert list_formats() == ["generic", "hm", "mind", "ninerec", "seqtsv"]
    with pytest.raises(UserError, match="unknown dataset format 'hmm'; known formats: generic, hm, mind"):
        get_format("hmm")


# ---- H&M ------------------------------------------------------------------------------

HM_ARTICLES = """article_id,prod_name,product_type_name,colour_group_name,detail_desc
0100000001,Red dress,Dress,Red,A red dress.
0100000002,Blue shirt,Shirt,Blue,
0100000003,Green hat,Hat,Green,"Hat, green."
0200000004,Black boots,Boots,Black,Leather boots
0200000005,White socks,Socks,White,Cotton socks
0200000006,Unused bag,Bag,Grey,never bought
"""

HM_TRANSACTIONS = """t_dat,customer_id,article_id,price,sales_channel_id
2020-01-01,A,100000001,0.1,1
2020-01-01,C,0100000001,0.1,1
2020-01-01,A,0100000002,0.1,1
2020-01-02,A,0100000001,0.1,1
2020-01-02,C,0100000002,0.1,1
2020-01-03,A,0100000003,0.1,1
2020-01-03,A,0200000004,0.1,2
2020-01-03,C,0100000001,0.1,1
2020-01-04,A,0200000005,0.1,1
2020-01-04,C,0100000003,0.1,1
2020-01-05,C,0200000004,0.1,1
2020-02-05,B,0200000005,0.1,1
2020-02-01,B,0100000003,0.1,1
2020-02-03,B,0100000001,0.1,1
2020-02-02,B,0200000004,0.1,1
2020-02-04,B,0100000002,0.1,1
2020-13-45,D,0100000001,0.1,1
2020-01-01,E,0100000001,0.1,1,EXTRA
2020-01-01,,0100000001,0.1,1
2020-01-01,A,0999999999,0.1,1
"""


@pytest.fixture
def hm_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "hm"
    write(raw / "articles.csv", HM_ARTICLES)
    write(raw / "transactions_train.csv", HM_TRANSACTIONS)
    for article in ("0100000001", "0100000002", "0200000004", "0200000005"):
        picture(raw / "images" / article[:3] / f"{article}.jpg")
    return raw


def test_hm_sequences_ties_duplicates_threshold_and_bad_rows(hm_raw: Path, tmp_path: Path) -> None:
    ds = prepared("hm", hm_raw, tmp_path)
    # A: same-day tie keeps file order (1 before 2), the repeat of 1 is dropped, the
    # unpadded id 100000001 is the same article. B: rows out of time order get sorted.
    # C: 4 distinct items < 5 -> dropped. D/E/empty user: unreadable; 0999999999: unknown.
    assert sequences(ds) == {
        "A": ["0100000001", "0100000002", "0100000003", "0200000004", "0200000005"],
        "B": ["0100000003", "0200000004", "0100000001", "0100000002", "0200000005"],
    }
    stats = ds.manifest["stats"]
    assert stats["bad_rows"] == 2
    assert stats["unknown_item_rows"] == 1
    assert stats["duplicates_removed"] == 2  # A's and C's repeat of 0100000001
    assert stats["users_below_min"] == 2
    assert stats["rows_read"] == 20
    assert ds.max_seq_len == 13


def test_hm_dates_in_other_forms_are_read_or_refused_with_the_row(hm_raw: Path, tmp_path: Path) -> None:
    """A's days as Unix times, B's as ISO date-times: the same sequences; a day-first or
    month-first date is refused naming the row, never dropped with the rows like it."""
    lines = HM_TRANSACTIONS.splitlines()
    epoch = {"2020-01-01": "1577836800", "2020-01-02": "1577923200", "2020-01-03": "1578009600",
             "2020-01-04": "1578096000"}
    mixed = [epoch.get(line[:10], line[:10]) + line[10:] if ",A," in line else
             line[:10] + "T12:00:00" + line[10:] if ",B," in line else line for line in lines]
    write(hm_raw / "transactions_train.csv", "\n".join(mixed) + "\n")
    ds = prepared("hm", hm_raw, tmp_path)
    assert sequences(ds) == {
        "A": ["0100000001", "0100000002", "0100000003", "0200000004", "0200000005"],
        "B": ["0100000003", "0200000004", "0100000001", "0100000002", "0200000005"],
    }
    assert ds.manifest["stats"]["bad_rows"] == 2  # the same two unreadable rows as in Kaggle's form
    slashed = [line.replace("2020-02-03", "03/02/2020") for line in lines]
    write(hm_raw / "transactions_train.csv", "\n".join(slashed) + "\n")
    with pytest.raises(UserError) as refused:
        prepared("hm", hm_raw, tmp_path)
    assert str(refused.value) == (f"{hm_raw / 'transactions_train.csv'}, data row 14: t_dat '03/02/2020' is not "
                                  "YYYY-MM-DD or a Unix time (day and month cannot be told apart); write the column "
                                  "as YYYY-MM-DD and prepare again")


def test_hm_items_text_and_missing_image(hm_raw: Path, tmp_path: Path) -> None:
    ds = prepared("hm", hm_raw, tmp_path)
    assert [it.orig_id for it in ds.items] == ["0100000001", "0100000002", "0100000003", "0200000004", "0200000005"]
    assert [it.id for it in ds.items] == [1, 2, 3, 4, 5]
    assert ds.items[0].text == "Red dress. Dress. Red. A red dress"
    assert ds.items[1].text == "Blue shirt. Shirt. Blue"
    assert ds.items[2].text == "Green hat. Hat. Green. Hat, green"
    assert ds.items[2].image is None
    assert ds.items[0].image == str((hm_raw / "images/010/0100000001.jpg").resolve())
    assert ds.manifest["counts"]["items_with_image"] == 4
    assert ds.manifest["stats"]["items_missing_image"] == 1


def test_hm_text_fields_are_selectable_and_checked(hm_raw: Path, tmp_path: Path) -> None:
    ds = prepared("hm", hm_raw, tmp_path, text_fields=["colour_group_name", "prod_name"])
    assert ds.items[0].text == "Red. Red dress"
    with pytest.raises(UserError, match=r"unknown text field\(s\) colour for articles.csv; choose --text-fields from prod_name"):
        prepared("hm", hm_raw, tmp_path, text_fields=["colour"])


def test_hm_missing_file_and_column_are_named(hm_raw: Path, tmp_path: Path) -> None:
    write(hm_raw / "transactions_train.csv", "t_dat,customer,article_id\n2020-01-01,A,0100000001\n")
    with pytest.raises(UserError, match="transactions_train.csv lacks column.*customer_id"):
        prepared("hm", hm_raw, tmp_path)
    (hm_raw / "articles.csv").unlink()
    with pytest.raises(UserError, match="missing H&M articles file.*articles.csv"):
        prepared("hm", hm_raw, tmp_path)


# ---- MIND -----------------------------------------------------------------------------

MIND_NEWS = "".join(
    f"N{k}\tsports\tfootball\tTitle {k}\tAbstract {k}\thttps://x/{k}\t[]\t[]\n" for k in range(1, 6)
) + "N6\tnews\tworld\tTitle 6\t\thttps://x/6\t[]\t[]\n"

MIND_BEHAVIORS = """1\tU1\t11/11/2019 9:00:00 AM\tN1 N2\tN3-1 N4-0 N5-0
2\tU1\t11/12/2019 9:00:00 AM\tN1 N2\tN4-1 N3-1 N6-0
3\tU1\t11/10/2019 8:00:00 AM\tN1 N2\tN5-1
4\tU2\t11/11/2019 10:00:00 PM\t\tN6-1 N1-0
5\tU2\t11/11/2019 10:00:00 PM\tN6\tN2-1 N3-1
6\tU3\tnot a time\tN1 N2 N3\tN4-1
7\tU4\t11/11/2019 9:00:00 AM\tN1 N2 N3\tN4-1\tan extra field
"""


@pytest.fixture
def mind_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "mind"
    write(raw / "news.tsv", MIND_NEWS)
    write(raw / "behaviors.tsv", MIND_BEHAVIORS)
    return raw


def test_mind_history_then_clicks_by_row_time(mind_raw: Path, tmp_path: Path) -> None:
    ds = prepared("mind", mind_raw, tmp_path, min_interactions=3)
    # U1: row 3 is the earliest (history N1 N2, click N5), then row 1 (N3), then row 2
    # (N4; N3 again is a duplicate). U2: rows 4 and 5 tie in time -> file order.
    # U3's row has an unparseable time, U4's a sixth field: both unreadable.
    assert sequences(ds) == {"U1": ["N1", "N2", "N5", "N3", "N4"], "U2": ["N6", "N2", "N3"]}
    assert ds.manifest["stats"]["bad_rows"] == 2
    assert ds.manifest["stats"]["rows_read"] == 7
    assert ds.max_seq_len == 23
    assert ds.items[0].text == "Title 1"
    assert ds.manifest["counts"]["items_with_image"] == 0


def test_mind_threshold_and_text_fields(mind_raw: Path, tmp_path: Path) -> None:
    ds = prepared("mind", mind_raw, tmp_path, text_fields=["category", "title", "abstract"])
    assert list(sequences(ds)) == ["U1"]
    assert ds.items[0].text == "sports. Title 1. Abstract 1"
    assert [it.orig_id for it in ds.items] == ["N1", "N2", "N3", "N4", "N5"]  # N6 only in dropped U2


# ---- NineRec --------------------------------------------------------------------------

def test_ninerec_headerless_without_timestamps_uses_file_order(tmp_path: Path) -> None:
    raw = tmp_path / "ninerec"
    write(raw / "Bili_Test_pair.csv", "i3,u1\ni1,u1\ni2,u1\ni2,u2\ni1,u2\ni3,u2\ni1,u2\ni9,u2\n")
    write(raw / "Bili_Test_item.csv", "i1,标题一,First title\ni2,标题二,Second title\ni3,标题三,Third title\n")
    picture(raw / "Bili_Test_cover" / "i1.jpg")
    picture(raw / "Bili_Test_cover" / "i2.png")
    ds = prepared("ninerec", raw, tmp_path, min_interactions=3)
    assert sequences(ds) == {"u1": ["i3", "i1", "i2"], "u2": ["i2", "i1", "i3"]}
    assert [it.text for it in ds.items] == ["First title", "Second title", "Third title"]
    assert [Path(it.image).name if it.image else None for it in ds.items] == ["i1.jpg", "i2.png", None]
    assert ds.manifest["stats"]["unknown_item_rows"] == 1
    assert ds.manifest["stats"]["duplicates_removed"] == 1
    ds = prepared("ninerec", raw, tmp_path, min_interactions=3, text_fields=["text"])
    assert ds.items[0].text == "标题一"


def test_ninerec_header_and_timestamps(tmp_path: Path) -> None:
    raw = tmp_path / "ninerec"
    write(raw / "x_pair.csv", "item,user,timestamp\n7,1,300\n8,1,100\n9,1,200\n7,2,5\n8,2,5\n9,2,1\nbad,3\n")
    write(raw / "x_item.csv", "item,text\n7,seven\n8,eight\n9,nine\n")
    ds = prepared("ninerec", raw, tmp_path, min_interactions=3)
    assert sequences(ds) == {"1": ["8", "9", "7"], "2": ["9", "7", "8"]}
    assert ds.items[0].text == "seven"
    assert ds.manifest["stats"]["bad_rows"] == 1  # a row without a timestamp


def test_ninerec_needs_exactly_one_pair_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no \*_pair.csv"):
        prepared("ninerec", tmp_path, tmp_path)
    write(tmp_path / "a_pair.csv", "1,1\n")
    write(tmp_path / "b_pair.csv", "1,1\n")
    with pytest.raises(UserError, match="several NineRec pair files.*a_pair.csv, b_pair.csv"):
        prepared("ninerec", tmp_path, tmp_path)


# ---- seqtsv ---------------------------------------------------------------------------

def test_seqtsv_order_duplicates_and_images(tmp_path: Path) -> None:
    raw = tmp_path / "seq"
    write(raw / "users.tsv", "u1\ta b c d\nu2\tc a b a\nu3\ta b\n")
    write(raw / "items.tsv", "a\tText a\timages/a.jpg\nb\tText b\t\nc\tText c\timages/missing.jpg\nd\tText d\t\n")
    picture(raw / "images" / "a.jpg")
    ds = prepared("seqtsv", raw, tmp_path, min_interactions=3)
    assert sequences(ds) == {"u1": ["a", "b", "c", "d"], "u2": ["c", "a", "b"]}
    assert [it.image is not None for it in ds.items] == [True, False, False, False]
    assert ds.manifest["stats"]["items_missing_image"] == 3
    assert ds.manifest["stats"]["users_below_min"] == 1
    assert ds.max_seq_len == 23


# ---- generic --------------------------------------------------------------------------

def test_generic_datetime_timestamps_ties_and_images(tmp_path: Path) -> None:
    raw = tmp_path / "generic"
    write(raw / "interactions.csv", "user_id,item_id,timestamp\n"
          "x,p2,2021-03-01 10:00:00\nx,p1,2021-03-01 09:00:00\nx,p3,2021-03-01 10:00:00\n"
          "x,p1,2021-03-02\ny,p3,2021-01-01\ny,p2,2021-01-01\ny,p1,2021-01-01\ny,p4,yesterday\n")
    write(raw / "items.csv", "item_id,text,image,brand\np1,one,pics/p1.jpg,acme\np2,two,,acme\np3,three,pics/nope.jpg,zed\n"
          "p4,four,,zed\n")
    picture(raw / "pics" / "p1.jpg")
    ds = prepared("generic", raw, tmp_path, min_interactions=3)
    assert sequences(ds) == {"x": ["p1", "p2", "p3"], "y": ["p3", "p2", "p1"]}
    assert [it.image is not None for it in ds.items] == [True, False, False]
    assert ds.manifest["stats"]["bad_rows"] == 1
    assert ds.max_seq_len == 13  # an image column makes it image-first
    ds = prepared("generic", raw, tmp_path, min_interactions=3, text_fields=["brand", "text"])
    assert ds.items[0].text == "acme. one"


@pytest.mark.parametrize("outside", ["/etc/passwd", "../../x.jpg", "pics/../../secret.jpg"])
def test_generic_image_paths_outside_the_raw_folder_are_refused(tmp_path: Path, outside: str) -> None:
    raw = tmp_path / "generic"
    picture(tmp_path / "secret.jpg")  # a real picture, but not in the raw folder
    picture(raw / "pics" / "p1.jpg")
    write(raw / "interactions.csv", "user_id,item_id,timestamp\nx,p1,1\nx,p2,2\nx,p1,3\n")
    write(raw / "items.csv", f"item_id,text,image\np1,one,pics/p1.jpg\np2,two,{outside}\n")
    with pytest.raises(UserError) as refused:
        prepared("generic", raw, tmp_path, min_interactions=3)
    assert str(refused.value) == (f"{raw / 'items.csv'}: item p2 has image path {outside!r} outside the raw folder "
                                  f"{raw}; give a path relative to that folder (copy or link the file into it)")


def test_generic_missing_columns_are_named(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,text\np1,one\n")
    write(tmp_path / "interactions.csv", "user,item_id,time\nx,p1,1\n")
    with pytest.raises(UserError, match="interactions.csv lacks column.*user_id, timestamp"):
        prepared("generic", tmp_path, tmp_path)
    write(tmp_path / "items.csv", "id,text\np1,one\n")
    with pytest.raises(UserError, match="items.csv lacks column.*item_id"):
        prepared("generic", tmp_path, tmp_path)


def test_empty_and_undecodable_files_are_user_errors(mind_raw: Path, tmp_path: Path) -> None:
    (mind_raw / "behaviors.tsv").write_bytes(bytes(range(128, 256)) * 20)
    with pytest.raises(UserError, match="behaviors.tsv line 1: byte 0x80 at column 1 is not UTF-8 text; save"):
        prepared("mind", mind_raw, tmp_path)
    write(mind_raw / "news.tsv", "")
    with pytest.raises(UserError, match="news.tsv is empty"):
        prepared("mind", mind_raw, tmp_path)
