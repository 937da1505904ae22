"""Readers on tiny hand-written fixtures in every supported layout (never the real data in /work/shared)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_pipeline.readers import read_dataset
from data_pipeline.schema import ACTION_INTERACT, ACTION_SEARCH_CLICK, DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write text; gzip it when the name ends in .gz."""
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def rows(ds) -> list[tuple]:
    e = ds.events
    return list(zip(e.user_id.tolist(), e.item_id.tolist(), e.timestamp.tolist(), e.action.tolist(),
                    e.query.tolist()))


def assert_bad_row(name: str, raw: Path, file: str, line: int, field: str) -> None:
    """Strict mode raises DataError at file:line naming the field; skip mode drops and counts the row."""
    with pytest.raises(DataError) as info:
        read_dataset(name, raw)
    err = info.value
    assert f"{file}:{line}:" in str(err) and f"'{field}'" in str(err), str(err)
    assert (Path(err.path).name, err.line, err.field_name) == (file, line, field)
    ds = read_dataset(name, raw, skip_bad_rows=True)
    assert ds.skipped_rows == 1
    assert any(n.startswith("skipped 1 bad rows in") and file in n for n in ds.notes)


# ---- MovieLens-1M, GroupLens layout --------------------------------------------------------------------
MOVIES_DAT = "1::Toy Story (1995)::Animation|Comedy\n2::Café Society::Drama\n3::Heat (1995)::Action\n"
RATINGS_DAT = "1::1::5::978300760\n1::2::3::978302109\n2::1::4::978298413\n\n"


def ml1m_dat(tmp_path: Path, ratings: str = RATINGS_DAT) -> Path:
    write(tmp_path / "movies.dat", MOVIES_DAT, "latin-1")
    write(tmp_path / "ratings.dat", ratings, "latin-1")
    write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    return tmp_path


def test_ml1m_grouplens_layout(tmp_path):
    ds = read_dataset("ml-1m", ml1m_dat(tmp_path))
    assert rows(ds) == [("1", "1", 978300760, 8, ""), ("1", "2", 978302109, 6, ""), ("2", "1", 978298413, 7, "")]
    assert ds.events.has_timestamps and set(ds.events.domain) == {"movies"} and ds.skipped_rows == 0
    assert sorted(ds.catalog) == ["1", "2", "3"]  # unrated movie 3 stays in the catalog
    toy, cafe = ds.catalog["1"], ds.catalog["2"]
    assert (toy.title, toy.categories, toy.attributes, toy.domain) == ("Toy Story (1995)", ["Animation", "Comedy"],
                                                                       {"year": 1995}, "movies")
    assert cafe.title == "Café Society" and cafe.attributes == {}  # Latin-1 decoded, no year


@pytest.mark.parametrize("bad, field", [
    ("2::1::4", "row"),
    ("x::1::4::978298413", "UserID"),
    ("2::1::6::978298413", "Rating"),
    ("2::1::four::978298413", "Rating"),
    ("2::1::4::-5", "Timestamp"),
    ("2::1::4::1.5", "Timestamp"),
    ("2::9::4::978298413", "MovieID"),  # movie 9 is not in movies.dat
])
def test_ml1m_bad_rating_row(tmp_path, bad, field):
    ml1m_dat(tmp_path, RATINGS_DAT.replace("2::1::4::978298413", bad))
    assert_bad_row("ml-1m", tmp_path, "ratings.dat", 3, field)


# ---- MovieLens-1M, rank-only layout (gzip) -------------------------------------------------------------
RANK_TSV = "user_id\tmovie_id\trating\tchrono_rank\n1\t1\t5\t1\n1\t2\t3\t0\n1\t3\t4\t2\n2\t3\t2\t0\n"
SEQUENCES = "1 2 1 3\n2 3\n"


def ml1m_ranked(tmp_path: Path, ratings: str = RANK_TSV, sequences: str | None = SEQUENCES) -> Path:
    write(tmp_path / "movies.dat", MOVIES_DAT, "latin-1")
    write(tmp_path / "ratings_notime.tsv.gz", ratings)
    if sequences is not None:
        write(tmp_path / "sequences_chrono.txt.gz", sequences)
    return tmp_path


def test_ml1m_rank_layout(tmp_path):
    ds = read_dataset("ml-1m", ml1m_ranked(tmp_path))
    assert rows(ds) == [("1", "1", 1, 8, ""), ("1", "2", 0, 6, ""), ("1", "3", 2, 7, ""), ("2", "3", 0, 5, "")]
    assert ds.events.has_timestamps is False
    assert any("chronological ranks" in n for n in ds.notes)
    assert ds.catalog["2"].title == "Café Society"


def test_ml1m_rank_layout_without_sequences(tmp_path):
    ds = read_dataset("ml-1m", ml1m_ranked(tmp_path, sequences=None))
    assert ds.events.timestamp.tolist() == [1, 0, 2, 0]


def test_ml1m_sequence_mismatch_names_user(tmp_path):
    ml1m_ranked(tmp_path, sequences="1 1 2 3\n2 3\n")
    with pytest.raises(DataError, match=r"sequences_chrono.txt.gz:1: .*user 1"):
        read_dataset("ml-1m", tmp_path)


@pytest.mark.parametrize("ratings", [
    RANK_TSV.replace("1\t3\t4\t2", "1\t3\t4\t1"),  # rank 1 twice for user 1
    RANK_TSV.replace("1\t3\t4\t2", "1\t3\t4\t5"),  # ranks 1, 0, 5: not a permutation of 0..2
])
def test_ml1m_ranks_must_be_permutation(tmp_path, ratings):
    ml1m_ranked(tmp_path, ratings, sequences=None)
    with pytest.raises(DataError, match="user 1") as info:
        read_dataset("ml-1m", tmp_path)
    assert (info.value.line, info.value.field_name) == (4, "chrono_rank")
    assert read_dataset("ml-1m", tmp_path, skip_bad_rows=True).skipped_rows == 1


def test_ml1m_rank_layout_bad_row_counts_header(tmp_path):
    ml1m_ranked(tmp_path, RANK_TSV.replace("1\t2\t3\t0", "1\t2\t7\t0"), sequences=None)
    assert_bad_row("ml-1m", tmp_path, "ratings_notime.tsv.gz", 3, "rating")


# ---- MovieLens-100K ------------------------------------------------------------------------------------
def flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(19))


U_ITEM = (f"1|Toy Story (1995)|01-Jan-1995||http://imdb/1|{flags(3, 5)}\n"
          f"2|Café (1996)|01-Jan-1996||http://imdb/2|{flags(8)}\n")
U_DATA = "196\t1\t3\t881250949\n186\t2\t1\t891717742\n196\t2\t5\t881250950\n"


def ml100k(tmp_path: Path, data: str = U_DATA, genre: bool = True) -> Path:
    write(tmp_path / "u.item", U_ITEM, "latin-1")
    write(tmp_path / "u.data", data)
    if genre:
        names = ["unknown", "Action", "Adventure", "Animation", "Kids", "Comedy"] + [f"G{i}" for i in range(6, 19)]
        write(tmp_path / "u.genre", "".join(f"{n}|{i}\n" for i, n in enumerate(names)) + "\n")
    return tmp_path


def test_ml100k(tmp_path):
    ds = read_dataset("ml-100k", ml100k(tmp_path))
    assert rows(ds) == [("196", "1", 881250949, 6, ""), ("186", "2", 891717742, 4, ""),
                        ("196", "2", 881250950, 8, "")]
    assert ds.events.has_timestamps
    assert ds.catalog["1"].categories == ["Animation", "Comedy"]
    assert ds.catalog["2"].title == "Café (1996)" and ds.catalog["2"].categories == ["G8"]
    assert ds.catalog["2"].attributes["year"] == 1996


def test_ml100k_default_genres(tmp_path):
    ds = read_dataset("ml-100k", ml100k(tmp_path, genre=False))
    assert ds.catalog["1"].categories == ["Animation", "Comedy"] and ds.catalog["2"].categories == ["Drama"]


def test_ml100k_bad_row(tmp_path):
    ml100k(tmp_path, U_DATA.replace("186\t2\t1", "186\t\t1"))
    assert_bad_row("ml-100k", tmp_path, "u.data", 2, "item_id")


# ---- ml-latest-small -----------------------------------------------------------------------------------
MOVIES_CSV = ('movieId,title,genres\n1,"American President, The (1995)",Comedy|Romance\n'
              '2,"Say ""Hi"" (2001) ",(no genres listed)\n')
RATINGS_CSV = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964981247\n2,1,0.5,964982224\n"
TAGS_CSV = "userId,movieId,tag,timestamp\n2,2,\"funny, sad\",1445714994\n1,1,classic,1445714996\n"


def ml_small(tmp_path: Path, ratings: str = RATINGS_CSV) -> Path:
    write(tmp_path / "movies.csv", MOVIES_CSV)
    write(tmp_path / "ratings.csv", ratings)
    write(tmp_path / "tags.csv", TAGS_CSV)
    return tmp_path


def test_ml_latest_small(tmp_path):
    ds = read_dataset("ml-latest-small", ml_small(tmp_path))
    assert rows(ds) == [("1", "1", 964982703, 7, ""), ("1", "2", 964981247, 7, ""), ("2", "1", 964982224, 4, ""),
                        ("2", "2", 1445714994, ACTION_SEARCH_CLICK, "funny, sad"),
                        ("1", "1", 1445714996, ACTION_SEARCH_CLICK, "classic")]
    assert ds.catalog["1"].title == "American President, The (1995)"
    assert ds.catalog["2"].title == 'Say "Hi" (2001) ' and ds.catalog["2"].categories == []
    assert ds.catalog["2"].attributes == {"year": 2001}


@pytest.mark.parametrize("bad, field", [("2,1,0.25,964982224", "rating"), ("2,1,5.5,964982224", "rating"),
                                        ("2,1,4.0", "row"), (",1,4.0,964982224", "userId")])
def test_ml_latest_small_bad_row(tmp_path, bad, field):
    ml_small(tmp_path, RATINGS_CSV.replace("2,1,0.5,964982224", bad))
    assert_bad_row("ml-latest-small", tmp_path, "ratings.csv", 4, field)


def test_undecodable_utf8_line(tmp_path):
    ml_small(tmp_path)
    (tmp_path / "ratings.csv").write_bytes(RATINGS_CSV.encode().replace(b"1,2,3.5", b"1,2,3.5\xff"))
    assert_bad_row("ml-latest-small", tmp_path, "ratings.csv", 3, "encoding")


# ---- Amazon, shared layout -----------------------------------------------------------------------------
TSV = ("user_id\titem_id\ttimestamp\tp5_user_id\tp5_item_id\tposition\n"
       "UA\tI1\t100\t1\t1\t0\nUA\tI2\t100\t1\t2\t1\nUA\tI3\t200\t1\t3\t2\nUB\tI2\t50\t2\t2\t0\n")
ITEMS = [{"item_id": "I1", "p5_item_id": 1, "title": "Nail Lacquer", "brand": "OPI", "categories": ["Beauty", "Nails"],
          "price": 12.0, "sales_rank": {"category": "Beauty", "rank": 3}, "idgenrec_textual_id": "nail lacquer"},
         {"item_id": "I2", "p5_item_id": 2, "title": None, "brand": None, "categories": ["Beauty"], "price": None},
         {"item_id": "I3", "p5_item_id": 3}]


def amazon_tsv(tmp_path: Path, tsv: str = TSV, items: str | None = None) -> Path:
    write(tmp_path / "interactions.tsv.gz", tsv)
    write(tmp_path / "items.jsonl.gz", items if items is not None else "".join(json.dumps(i) + "\n" for i in ITEMS))
    return tmp_path


def test_amazon_tsv_layout(tmp_path):
    ds = read_dataset("amazon-beauty", amazon_tsv(tmp_path))
    assert rows(ds) == [("UA", "I1", 100, ACTION_INTERACT, ""), ("UA", "I2", 100, ACTION_INTERACT, ""),
                        ("UA", "I3", 200, ACTION_INTERACT, ""), ("UB", "I2", 50, ACTION_INTERACT, "")]
    assert ds.events.has_timestamps and set(ds.events.domain) == {"beauty"} and ds.name == "amazon-beauty"
    i1, i2 = ds.catalog["I1"], ds.catalog["I2"]
    assert (i1.title, i1.brand, i1.categories, i1.domain) == ("Nail Lacquer", "OPI", ["Beauty", "Nails"], "beauty")
    assert i1.attributes == {"p5_item_id": 1, "price": 12.0, "sales_rank": {"category": "Beauty", "rank": 3},
                             "idgenrec_textual_id": "nail lacquer"}
    assert (i2.title, i2.brand, i2.attributes) == ("", "", {"p5_item_id": 2})


def test_amazon_tsv_empty_timestamp_uses_positions(tmp_path):
    ds = read_dataset("amazon-sports", amazon_tsv(tmp_path, TSV.replace("I3\t200", "I3\t")))
    assert ds.events.has_timestamps is False and ds.events.timestamp.tolist() == [0, 1, 2, 0]
    assert any("no timestamp" in n for n in ds.notes) and set(ds.events.domain) == {"sports"}


def test_amazon_tsv_missing_item_gets_stub(tmp_path):
    ds = read_dataset("amazon-beauty", amazon_tsv(tmp_path, items=json.dumps(ITEMS[0]) + "\n"))
    assert ds.catalog["I3"].title == "" and ds.catalog["I3"].domain == "beauty"
    assert any(n.startswith("2 reviewed items have no entry") for n in ds.notes)


@pytest.mark.parametrize("old, new, field", [
    ("I3\t200\t1\t3\t2", "I3\t200\t1\t3\t5", "position"),
    ("I3\t200\t1\t3\t2", "I3\t99\t1\t3\t2", "timestamp"),
    ("I3\t200\t1\t3\t2", "I3\t-1\t1\t3\t2", "timestamp"),
    ("I3\t200\t1\t3\t2", "I3\t200\tx\t3\t2", "p5_user_id"),
    ("UA\tI3", "\tI3", "user_id"),
])
def test_amazon_tsv_bad_row(tmp_path, old, new, field):
    amazon_tsv(tmp_path, TSV.replace(old, new))
    assert_bad_row("amazon-beauty", tmp_path, "interactions.tsv.gz", 4, field)


def test_amazon_items_bad_json(tmp_path):
    lines = [json.dumps(i) for i in ITEMS]
    amazon_tsv(tmp_path, items="\n".join([lines[0], '{"item_id": "I2", ', lines[2]]) + "\n")
    assert_bad_row("amazon-beauty", tmp_path, "items.jsonl.gz", 2, "json")


# ---- Amazon, SNAP layout -------------------------------------------------------------------------------
REVIEWS = [{"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1400000000, "reviewText": "ok"},
           {"reviewerID": "U2", "asin": "B2", "unixReviewTime": 1300000000},
           {"reviewerID": "U1", "asin": "B2", "overall": 2.0, "unixReviewTime": 1300000001}]
META = ("{'asin': 'B1', 'title': \"L'Oreal Lipstick\", 'price': 9.5, 'salesRank': {'Beauty': 12}, "
        "'categories': [['Beauty', 'Makeup'], ['Gifts']], 'related': {'also_bought': ['B2']}}\n"
        '{"asin": "B3", "title": "json line", "brand": "X", "categories": [], "description": "d"}\n')


def amazon_snap(tmp_path: Path, reviews: list[str] | None = None) -> Path:
    lines = reviews if reviews is not None else [json.dumps(r) for r in REVIEWS]
    write(tmp_path / "reviews_Beauty_5.json.gz", "\n".join(lines) + "\n")
    write(tmp_path / "meta_Beauty.json.gz", META)
    return tmp_path


def test_amazon_snap_layout(tmp_path):
    ds = read_dataset("amazon-beauty", amazon_snap(tmp_path))
    assert rows(ds) == [("U1", "B1", 1400000000, 8, ""), ("U2", "B2", 1300000000, ACTION_INTERACT, ""),
                        ("U1", "B2", 1300000001, 5, "")]
    assert ds.events.has_timestamps and set(ds.events.domain) == {"beauty"}
    b1 = ds.catalog["B1"]
    assert (b1.title, b1.categories) == ("L'Oreal Lipstick", ["Beauty", "Makeup"])
    assert b1.attributes == {"price": 9.5, "sales_rank": {"Beauty": 12},
                             "category_paths": [["Beauty", "Makeup"], ["Gifts"]]}
    assert (ds.catalog["B3"].brand, ds.catalog["B3"].description) == ("X", "d")  # unreviewed, kept
    assert ds.catalog["B2"].title == "" and any(n.startswith("1 reviewed items") for n in ds.notes)


@pytest.mark.parametrize("bad, field", [
    ('{"reviewerID": "U1", "asin": "B2", "overall": 2.0', "json"),
    ('{"reviewerID": "U1", "asin": "B2", "overall": 7, "unixReviewTime": 1}', "overall"),
    ('{"reviewerID": "U1", "asin": "B2", "unixReviewTime": "1300000001"}', "unixReviewTime"),
    ('{"reviewerID": "", "asin": "B2", "unixReviewTime": 1}', "reviewerID"),
])
def test_amazon_snap_bad_row(tmp_path, bad, field):
    amazon_snap(tmp_path, [json.dumps(REVIEWS[0]), json.dumps(REVIEWS[1]), bad])
    assert_bad_row("amazon-beauty", tmp_path, "reviews_Beauty_5.json.gz", 3, field)


# ---- dispatch and missing files ------------------------------------------------------------------------
def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="ml-1m.*ml-100k.*ml-latest-small.*amazon-"):
        read_dataset("netflix", tmp_path)
    with pytest.raises(ValueError):
        read_dataset("amazon-", tmp_path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_dataset("ml-100k", tmp_path / "nope")
    write(tmp_path / "u.data", U_DATA)
    with pytest.raises(FileNotFoundError, match=r"u\.item"):
        read_dataset("ml-100k", tmp_path)
    with pytest.raises(FileNotFoundError, match="ratings.dat"):
        read_dataset("ml-1m", tmp_path)
    with pytest.raises(FileNotFoundError, match="reviews_"):
        read_dataset("amazon-beauty", tmp_path)
