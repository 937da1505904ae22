"""Multi-domain shard sets: several sources merged (Amazon Beauty + Sports layout), and ML-1M users split
into age / gender domains from users.dat. Tiny raw folders written in tmp_path (never ../shared)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from configs.load import ConfigError, load_config
from configs.schema import LoaderConfig, PrepareConfig, ShardConfig
from data_pipeline import multidomain
from data_pipeline.__main__ import main
from data_pipeline.read_shards import load_manifest, read_shards
from data_pipeline.readers import read_dataset
from data_pipeline.schema import DataError, Dataset, Events, Item
from data_pipeline.write_shards import write_shards
from tests.test_readers import write

NOSHUF = LoaderConfig(batch_size=8, max_len=10_000, num_workers=0, shuffle_buffer=0, query_tokens=False)
HEADER = "user_id\titem_id\ttimestamp\tp5_user_id\tp5_item_id\tposition\n"
# UA is in both sources; S2 and B2 share t=300, so source order decides (the first source first).
BEAUTY = [("UA", "B1", 100), ("UA", "B2", 300), ("UA", "B3", 500), ("UB", "B1", 10), ("UB", "B2", 20),
          ("UB", "B4", 30)]
SPORTS = [("UA", "S1", 200), ("UA", "S2", 300), ("UA", "S3", 600), ("UC", "S1", 1), ("UC", "S4", 2),
          ("UC", "S3", 3)]
MOVIES = "1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n3::Alien (1979)::Horror\n"
# user 1: F, under 18; user 2: M, 56+; user 3: M, 25-34. Movie 3 is rated by user 3 only.
USERS = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
RATINGS = ("1::1::5::978300760\n1::2::3::978302109\n1::3::4::978301968\n2::1::4::978298413\n2::2::2::978298414\n"
           "2::3::1::978298415\n3::1::5::978200000\n3::2::4::978200001\n3::3::3::978200002\n")


def amazon(folder: Path, rows: list[tuple], blank_ts: bool = False) -> Path:
    """interactions.tsv.gz + items.jsonl.gz; positions count each user's events in file order."""
    folder.mkdir()
    pos: dict[str, int] = {}
    lines = []
    for user, item, ts in rows:
        pos[user] = pos.get(user, -1) + 1
        lines.append(f"{user}\t{item}\t{'' if blank_ts else ts}\t1\t1\t{pos[user]}\n")
    write(folder / "interactions.tsv.gz", HEADER + "".join(lines))
    items = sorted({item for _, item, _ in rows})
    write(folder / "items.jsonl.gz", "".join(json.dumps({"item_id": i, "title": f"t {i}"}) + "\n" for i in items))
    return folder


def ml1m(folder: Path, users: str = USERS) -> Path:
    folder.mkdir()
    write(folder / "movies.dat", MOVIES, "latin-1")
    write(folder / "ratings.dat", RATINGS, "latin-1")
    write(folder / "users.dat", users, "latin-1")
    return folder


def sequences(shards: Path) -> dict[str, list[tuple[str, int, str]]]:
    """Raw user -> [(raw item, timestamp, domain)] of the whole stored sequence (test history + target)."""
    m = load_manifest(shards)
    users, items, doms = (m["id_maps"][k] for k in ("users", "items", "domains"))
    out = {}
    for ex in read_shards(shards, "test", NOSHUF, shuffle=False):
        seq = np.concatenate([ex["history"], ex["target"][:, None]], axis=1)  # (5, n)
        out[users[ex["user"]]] = [(items[i], t, doms[d]) for i, t, _, d, _ in seq.T.tolist()]
    return out


# ---- several sources ---------------------------------------------------------------------------------------
def test_prepare_merges_sources_and_interleaves_shared_users(tmp_path, capsys):
    """End to end through the CLI: one user space, UA's Beauty and Sports events interleaved by time."""
    b, s, out = amazon(tmp_path / "b", BEAUTY), amazon(tmp_path / "s", SPORTS), tmp_path / "shards"
    assert main(["prepare", "--dataset", "amazon-beauty", "--raw", str(b), "--also", f"amazon-sports={s}",
                 "--out", str(out), "--quiet"]) == 0
    assert "beauty" in capsys.readouterr().out
    seqs = sequences(out)
    assert seqs["UA"] == [("B1", 100, "beauty"), ("S1", 200, "sports"), ("B2", 300, "beauty"),
                          ("S2", 300, "sports"), ("B3", 500, "beauty"), ("S3", 600, "sports")]
    assert {u: {d for _, _, d in q} for u, q in seqs.items() if u != "UA"} == {"UB": {"beauty"}, "UC": {"sports"}}
    m = load_manifest(out)
    assert m["dataset"] == "amazon-beauty+amazon-sports" and m["has_timestamps"] is True
    assert m["id_maps"]["domains"] == ["beauty", "sports"] and m["counts"]["users"] == 3
    assert m["domain_by"] == "source"
    dom_of = dict(zip(m["id_maps"]["items"], m["item_domain"]))
    assert dom_of == {"<pad>": -1, "B1": 0, "B2": 0, "B3": 0, "B4": 0, "S1": 1, "S2": 1, "S3": 1, "S4": 1}
    # UA's validation target is B3 (beauty), its test target S3 (sports): targets follow the event's domain
    assert m["per_domain"]["beauty"] == dict(events=6, items=4, users=2, valid_targets=2, test_targets=1)
    assert m["per_domain"]["sports"] == dict(events=6, items=4, users=2, valid_targets=1, test_targets=2)
    assert any("1 users appear in more than one source" in n for n in m["notes"])
    saved = json.loads((out / "prepare_config.json").read_text())
    assert saved["also"] == [f"amazon-sports={s}"] and saved["domain_by"] == "source"


def test_merge_keeps_catalogs_counts_notes_and_source_order_ties(tmp_path):
    beauty = read_dataset("amazon-beauty", amazon(tmp_path / "b", BEAUTY))
    sports = read_dataset("amazon-sports", amazon(tmp_path / "s", SPORTS))
    beauty.skipped_rows, sports.skipped_rows, sports.notes = 2, 3, ["a sports fact"]
    ds = multidomain.merge_datasets([("amazon-sports", sports), ("amazon-beauty", beauty)])
    assert len(ds.events) == 12 and ds.skipped_rows == 5 and ds.events.has_timestamps
    assert set(ds.catalog) == {"B1", "B2", "B3", "B4", "S1", "S2", "S3", "S4"}
    assert ds.catalog["S1"].domain == "sports" and ds.catalog["B1"].domain == "beauty"
    assert "amazon-sports: a sports fact" in ds.notes
    write_shards(ds, tmp_path / "out", ShardConfig(samples_per_shard=2), progress=False)
    ua = [item for item, _, _ in sequences(tmp_path / "out")["UA"]]
    assert ua == ["B1", "S1", "S2", "B2", "B3", "S3"]  # sports listed first: its t=300 event comes first


def test_same_item_id_in_two_domains_names_both_sources(tmp_path):
    beauty = read_dataset("amazon-beauty", amazon(tmp_path / "b", BEAUTY))
    sports = read_dataset("amazon-sports", amazon(tmp_path / "s", [("UC", "B2", 1), ("UC", "S1", 2)]))
    with pytest.raises(ValueError, match=r"'B2' is in amazon-beauty \(domain 'beauty'\) and in amazon-sports"):
        multidomain.merge_datasets([("amazon-beauty", beauty), ("amazon-sports", sports)])


def tiny(name: str, users: list[str], has_timestamps: bool = True, domain: str = "") -> Dataset:
    """One item per source (`<name>1`), one event per user, domain = the source name unless given."""
    n, item = len(users), f"{name}1"
    ev = Events.from_columns(users, [item] * n, list(range(n)), [2] * n, domain or name,
                             has_timestamps=has_timestamps)
    return Dataset(name=name, events=ev, catalog={item: Item(item_id=item, domain=domain or name)})


def test_sources_sharing_a_domain_name_are_refused():
    """ml-1m + ml-100k are both "movies" and both number users from 1: merging would join strangers."""
    with pytest.raises(ValueError, match="sources a and b both have domain 'movies'"):
        multidomain.merge_datasets([("a", tiny("a", ["1"], domain="movies")), ("b", tiny("b", ["1"], domain="movies"))])


def test_timestamps_and_ranks_do_not_mix():
    with pytest.raises(ValueError, match=r"with timestamps \(a\) and rank-only sources \(b\)"):
        multidomain.merge_datasets([("a", tiny("a", ["u1"])), ("b", tiny("b", ["u2"], has_timestamps=False))])
    with pytest.raises(ValueError, match="1 users are in more than one"):
        multidomain.merge_datasets([("a", tiny("a", ["u1"], False)), ("b", tiny("b", ["u1"], False))])
    ds = multidomain.merge_datasets([("a", tiny("a", ["u1"], False)), ("b", tiny("b", ["u2"], False))])
    assert ds.events.has_timestamps is False


def test_mixing_timestamped_and_rank_only_is_a_cli_error(tmp_path, capsys):
    b, s = amazon(tmp_path / "b", BEAUTY), amazon(tmp_path / "s", SPORTS, blank_ts=True)
    assert main(["prepare", "--dataset", "amazon-beauty", "--raw", str(b), "--also", f"amazon-sports={s}",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "rank-only sources (amazon-sports)" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["amazon-sports", "=../x", "amazon-sports=", "amazon-beauty=../x"])
def test_bad_also_entry_is_a_config_error(tmp_path, capsys, entry):
    b = amazon(tmp_path / "b", BEAUTY)
    assert main(["prepare", "--dataset", "amazon-beauty", "--raw", str(b), "--also", entry,
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "also:" in err and (repr(entry) in err or "distinct" in err), err
    assert not (tmp_path / "o").exists()


# ---- users split into groups ------------------------------------------------------------------------------
def test_prepare_ml1m_by_age_labels_every_event_with_its_users_band(tmp_path, capsys):
    raw, out = ml1m(tmp_path / "ml"), tmp_path / "shards"
    assert main(["prepare", "--dataset", "ml-1m", "--raw", str(raw), "--domain-by", "age", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    band = {"1": "age_under18", "2": "age56plus", "3": "age25_34"}
    assert {u: {d for _, _, d in q} for u, q in sequences(out).items()} == {u: {b} for u, b in band.items()}
    m = load_manifest(out)
    assert m["id_maps"]["domains"] == ["age25_34", "age56plus", "age_under18"] and m["domain_by"] == "age"
    assert m["item_domain"] == [-1, -1, -1, -1]  # every movie is rated in all three groups
    for d in m["id_maps"]["domains"]:
        assert m["per_domain"][d] == dict(events=3, items=3, users=1, valid_targets=1, test_targets=1)
    with gzip.open(out / "catalog.jsonl.gz", "rt") as f:
        assert {json.loads(line)["domain"] for line in f} == {"movies"}  # the catalog keeps its own domain
    assert any("user groups by age" in n for n in m["notes"])


def test_by_gender_and_an_item_of_one_group(tmp_path):
    """Movie 3 without user 1's rating is rated by men only: item_domain names gender_m for it and -1
    (several groups) for movies 1 and 2."""
    ds = read_dataset("ml-1m", ml1m(tmp_path / "ml"))
    keep = ~((ds.events.user_id == "1") & (ds.events.item_id == "3"))
    ds.events = Events(*(getattr(ds.events, c)[keep] for c in multidomain.EVENT_COLUMNS))
    by = multidomain.domains_by_user_group(ds, tmp_path / "ml" / "users.dat", "gender")
    assert {(u, d) for u, d in zip(by.events.user_id, by.events.domain)} == \
        {("1", "gender_f"), ("2", "gender_m"), ("3", "gender_m")}
    assert {it.domain for it in by.catalog.values()} == {"movies"} and by.catalog == ds.catalog
    m = write_shards(by, tmp_path / "out", progress=False, domain_by="gender")
    assert m["id_maps"]["domains"] == ["gender_f", "gender_m"] and m["domain_by"] == "gender"
    assert dict(zip(m["id_maps"]["items"], m["item_domain"])) == {"<pad>": -1, "1": -1, "2": -1, "3": 1}
    assert m["per_domain"]["gender_f"] == dict(events=2, items=2, users=1, valid_targets=0, test_targets=0)
    assert m["per_domain"]["gender_m"] == dict(events=6, items=3, users=2, valid_targets=2, test_targets=2)


def test_user_missing_from_users_dat_names_the_file(tmp_path):
    raw = ml1m(tmp_path / "ml", users=USERS.replace("3::M::25::15::55117\n", ""))
    ds = read_dataset("ml-1m", raw)
    with pytest.raises(DataError, match=r"users\.dat:0: field 'UserID': 1 users of the ml-1m events.*\['3'\]"):
        multidomain.domains_by_user_group(ds, raw / "users.dat", "age")


@pytest.mark.parametrize("bad,field", [("2::M::56::16", "row"), ("x::M::56::16::70072", "UserID"),
                                       ("2::X::56::16::70072", "Gender"), ("2::M::57::16::70072", "Age"),
                                       ("2::M::56::21::70072", "Occupation"), ("1::M::56::16::70072", "UserID")])
def test_malformed_users_dat_line(tmp_path, bad, field):
    users = USERS.replace("2::M::56::16::70072", bad)
    with pytest.raises(DataError) as info:
        multidomain.read_user_groups(write(tmp_path / "users.dat", users), "age")
    assert (Path(info.value.path).name, info.value.line, info.value.field_name) == ("users.dat", 2, field)


def test_domain_by_needs_ml1m_alone(tmp_path, capsys):
    b = amazon(tmp_path / "b", BEAUTY)
    assert main(["prepare", "--dataset", "amazon-beauty", "--raw", str(b), "--domain-by", "age",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "domain_by='age' needs ML-1M's users.dat" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="domain_by: expected one of 'source', 'age', 'gender'"):
        load_config(PrepareConfig, None, ["domain_by=zip"])
    with pytest.raises(ValueError, match="by must be one of"):
        multidomain.domains_by_user_group(read_dataset("amazon-beauty", b), tmp_path / "users.dat", "zip")
