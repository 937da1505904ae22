"""POST /search over the tiny query_repr=text export (tests/conftest.py): the export carries the query
vocabulary and the text encoder's identity, known and unseen query strings both answer, bad input is a 4xx
naming the field (the /recommend table included), a different text encoder refuses to start, search can
be turned off, an id-only query model refuses strings it never trained on, an unseen string's vector is the
offline one, and every served search list equals the offline model's for the same tokens."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from configs.provenance import file_sha256  # noqa: E402
from configs.schema import ServeConfig  # noqa: E402
from serve import load_export  # noqa: E402
from serve.app import make_app  # noqa: E402
from serve.engine import Prepared, Recommender  # noqa: E402
from serve.load import ExportLoadError  # noqa: E402
from serve.search import Searcher, SearchSetupError, batch_runner, make_searcher  # noqa: E402
from tests.conftest import TINY_RUN  # noqa: E402
from tests.test_serve import BAD, JSON, T0, TABLE_CFG, _check_bad, metric, strict_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---- shared state: one export, one searcher (loading MiniLM and program.pt2 costs seconds) -------------
@pytest.fixture(scope="module")
def exp(tiny_search_export):
    return load_export(tiny_search_export)


@pytest.fixture(scope="module")
def rec(exp):
    return Recommender(exp, encoder="program")


@pytest.fixture(scope="module")
def searcher(rec):
    s = make_searcher(rec, ServeConfig())
    assert s is not None and s.encoder is not None
    return s


@pytest.fixture(scope="module")
def world(tiny_search_export):
    with gzip.open(tiny_search_export / "items.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    servable = [r["item_id"] for r in rows if r["servable"]]
    return SimpleNamespace(servable=servable, h=servable[:3], n_servable=len(servable), rows=rows)


@pytest.fixture(scope="module")
def client(rec, searcher):
    with TestClient(make_app(rec, ServeConfig(), searcher)) as c:
        yield c


def search(c, body) -> dict:
    r = c.post("/search", json=body)
    assert r.status_code == 200, r.text
    return strict_json(r)


def ids(answer: dict) -> list[str]:
    return [it["id"] for it in answer["items"]]


def body_for(rng, world, n, query, k=10, **kw) -> dict:
    history = [str(x) for x in rng.choice(world.servable, size=n, replace=False)]
    ts = (T0 + np.cumsum(rng.integers(1, 100_000, size=n))).tolist()
    return dict(query=query, history=history, timestamps=ts, now=(ts[-1] if ts else T0) + 60, k=k, **kw)


def _copy(src: Path, dst: Path, edit_config=None) -> Path:
    """A copy of an export, config.json edited by `edit_config(dict)` and re-hashed in export.json."""
    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
        rec = json.loads((dst / "export.json").read_text())
        rec["files"]["config.json"] = file_sha256(dst / "config.json")
        (dst / "export.json").write_text(json.dumps(rec))
    return dst


# ---- 1. the export carries what search needs ------------------------------------------------------------
def test_export_writes_the_query_vocabulary_and_the_encoder_record(tiny_search_export, tiny_search_shards, exp):
    manifest = json.loads((tiny_search_shards / "manifest.json").read_text())
    strings = json.loads((tiny_search_export / "queries.json").read_text())
    assert strings == manifest["id_maps"]["queries"] and strings[0] == "" and len(strings) > 20
    config = json.loads((tiny_search_export / "config.json").read_text())
    meta = json.loads((tiny_search_shards / "content" / "queries.json").read_text())
    assert config["query_repr"] == "text"
    assert config["query_encoder"] == {k: meta[k] for k in ("encoder", "encoder_sha256", "max_length", "dim", "bf16")}
    record = json.loads((tiny_search_export / "export.json").read_text())
    assert record["files"]["queries.json"] == file_sha256(tiny_search_export / "queries.json")
    assert exp.queries == strings and exp.query_of[strings[5]] == 5 and "/search" in (
        tiny_search_export / "README.md").read_text()


@pytest.mark.parametrize("damage, name", [
    (lambda d: (d / "queries.json").write_text('["", "a"]'), "queries.json"),  # fails its sha256
    (lambda d: _unlist(d, "queries.json"), "export.json"),
    (lambda d: _rewrite(d, "queries.json", '["", "a"'), "queries.json"),  # invalid JSON, hash updated
    (lambda d: _rewrite(d, "queries.json", '["", "a", "b"]'), "queries.json"),  # wrong count
    (lambda d: _rewrite(d, "config.json", _without(d, "query_encoder")), "config.json"),
], ids=["tampered", "unlisted", "invalid_json", "wrong_count", "no_query_encoder"])
def test_load_refuses_a_missing_or_malformed_query_file(tiny_search_export, tmp_path, damage, name):
    d = _copy(tiny_search_export, tmp_path / "export")
    damage(d)
    with pytest.raises(ExportLoadError, match=str(d / name)):
        load_export(d)


def _rewrite(d: Path, name: str, text: str) -> None:
    (d / name).write_text(text)
    rec = json.loads((d / "export.json").read_text())
    rec["files"][name] = file_sha256(d / name)
    (d / "export.json").write_text(json.dumps(rec))


def _unlist(d: Path, name: str) -> None:
    rec = json.loads((d / "export.json").read_text())
    del rec["files"][name]
    (d / "export.json").write_text(json.dumps(rec))


def _without(d: Path, key: str) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = None
    return json.dumps(cfg)


# ---- 2. a valid /search ---------------------------------------------------------------------------------
def test_known_and_unseen_queries_answer_k_items(client, exp, world):
    rng = np.random.default_rng(0)
    for query, known in ((exp.queries[3], True), (f"  {exp.queries[7]}\n", True), ("zebra quantum lotion", False)):
        for n, k in ((0, 5), (6, 10), (30, 3)):
            got = search(client, body_for(rng, world, n, query, k=k))
            assert got.keys() == {"items", "model", "took_ms", "warnings", "fallback", "query_known"}
            assert got["query_known"] is known and got["fallback"] is None and len(got["items"]) == k
            scores = [it["score"] for it in got["items"]]
            assert len(set(ids(got))) == k and all(a >= b for a, b in zip(scores, scores[1:]))
    alone = search(client, {"query": exp.queries[3]})  # history is optional: the query token alone
    assert alone["query_known"] is True and len(alone["items"]) == 10


def test_http_answer_is_the_engine_answer_and_the_query_matters(client, searcher, world):
    rng = np.random.default_rng(1)
    body = body_for(rng, world, 8, "galaxy journey")
    (direct,) = searcher.run([searcher.prepare(**body)])
    got = search(client, body)
    assert ids(got) == [world.rows[i - 1]["item_id"] for i, _ in direct.hits]
    assert [it["score"] for it in got["items"]] == pytest.approx([s for _, s in direct.hits])
    other = search(client, dict(body, query="modern cream"))
    assert [it["score"] for it in other["items"]] != pytest.approx([it["score"] for it in got["items"]])


def test_past_searches_in_the_history_are_read(client, exp, world):
    rng = np.random.default_rng(2)
    body = body_for(rng, world, 6, exp.queries[2])
    with_past = dict(body, history_queries=[None, exp.queries[9], None, None, "unseen past query", None])
    a, b = search(client, body), search(client, with_past)
    assert a["warnings"] == b["warnings"] == []
    assert [it["score"] for it in a["items"]] != pytest.approx([it["score"] for it in b["items"]])


def test_search_tokens_over_max_len_keep_the_most_recent(client, exp, world):
    rng = np.random.default_rng(3)
    body = body_for(rng, world, 30, exp.queries[4], k=5)  # 30 item tokens + the query > max_len 24
    body["exclude"] = body["history"]  # both requests exclude the whole history, so they compare
    got = search(client, body)
    assert any("max_len" in w for w in got["warnings"])
    cut = dict(body, history=body["history"][-23:], timestamps=body["timestamps"][-23:])
    want = search(client, cut)
    assert want["warnings"] == [] and ids(got) == ids(want)


# ---- 3. bad input ---------------------------------------------------------------------------------------
def _as_search(make):
    """A /recommend table case as a /search one: the same body plus a valid query."""
    def make_search(w):
        body = make(w)
        if isinstance(body, dict):
            return {"query": "galaxy", **body}
        if isinstance(body, bytes) and body.startswith(b'{"history"'):
            return b'{"query": "galaxy", ' + body[1:]
        return body
    return make_search


SEARCH_BAD = [
    ("query_missing", lambda w: {"history": w.h}, 422, "query"),
    ("query_number", lambda w: {"query": 5, "history": w.h}, 422, "query"),
    ("query_null", lambda w: {"query": None}, 422, "query"),
    ("query_list", lambda w: {"query": ["night cream"]}, 422, "query"),
    ("query_empty", lambda w: {"query": "", "history": w.h}, 422, "query"),
    ("query_whitespace", lambda w: {"query": " \t\n ", "history": w.h}, 422, "query"),
    ("history_queries_length", lambda w: {"query": "a", "history": w.h, "history_queries": [None]}, 422,
     "history_queries"),
    ("history_queries_number", lambda w: {"query": "a", "history": w.h, "history_queries": [None, 5, None]}, 422,
     "history_queries"),
    ("history_queries_empty", lambda w: {"query": "a", "history": w.h, "history_queries": [None, " ", None]}, 422,
     "history_queries"),
] + [("recommend_" + name, _as_search(make), status, field) for name, make, status, field in BAD
     if name != "missing_history"]  # /search takes no history (the query alone) as valid


def _send(c, make, w):
    body = make(w)
    return c.post("/search", json=body) if isinstance(body, dict) else c.post("/search", content=body, headers=JSON)


@pytest.fixture(scope="module")
def table(rec, searcher, world):
    valid = body_for(np.random.default_rng(4), world, 8, "galaxy journey")
    with TestClient(make_app(rec, ServeConfig(**TABLE_CFG), searcher)) as c:
        yield c, valid, search(c, valid)


@pytest.mark.parametrize("name, make, status, field", SEARCH_BAD, ids=[b[0] for b in SEARCH_BAD])
def test_bad_search_input(table, world, name, make, status, field):
    _check_bad(_send(table[0], make, world), status, field)


def test_bad_search_input_leaves_the_server_sound_and_is_counted(table, world):
    c, valid, before = table
    for _, make, status, field in SEARCH_BAD:
        _check_bad(_send(c, make, world), status, field)
    untimed = lambda a: {k: v for k, v in a.items() if k != "took_ms"}  # noqa: E731
    assert untimed(search(c, valid)) == untimed(before)
    text = c.get("/metrics").text
    assert metric(text, "unirec_requests_total", endpoint="/search", status="200") == 2
    assert metric(text, "unirec_requests_total", endpoint="/search", status="422") >= len(SEARCH_BAD) - 2
    assert metric(text, "unirec_errors_total") == 0


def test_an_over_long_query_is_cut_with_a_warning(rec, searcher, world):
    short = Searcher(rec, searcher.encoder, max_query_chars=12)
    with TestClient(make_app(rec, ServeConfig(), short)) as c:
        body = body_for(np.random.default_rng(5), world, 4, "galaxy journey " * 40)
        got = search(c, body)
        assert len(got["items"]) == 10 and any("max_query_chars" in w for w in got["warnings"])
        same = search(c, dict(body, query="galaxy journey"[:12]))
        assert ids(same) == ids(got) and same["warnings"] == []


# ---- 4. the text encoder, search turned off, id-only queries ------------------------------------------
@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory, searcher):
    """The installed MiniLM's files (symlinks) with one setting changed: another encoder, by its hash."""
    d = tmp_path_factory.mktemp("other_encoder") / "minilm"
    shutil.copytree(searcher.encoder.path, d, copy_function=os.symlink)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps(dict(cfg, layer_norm_eps=1e-6)))
    return d


def test_another_text_encoder_refuses_to_start(rec, tiny_search_export, other_encoder):
    with pytest.raises(SearchSetupError, match="not the one this model was trained with"):
        make_searcher(rec, ServeConfig(text_encoder=str(other_encoder)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "serve", "--export", str(tiny_search_export), "--port", "1",
                          "--set", f"text_encoder={other_encoder}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 2 and "refusing to start" in res.stderr and "--no-search" in res.stderr, res.stderr


def test_search_turned_off_is_503_and_recommend_still_answers(rec, world):
    with TestClient(make_app(rec, ServeConfig(search=False, text_encoder="/no/such/encoder"))) as c:
        r = c.post("/search", json={"query": "galaxy", "history": world.h})
        assert r.status_code == 503 and "turned off" in r.json()["detail"]
        assert c.post("/recommend", json={"history": world.h, "k": 3}).status_code == 200
        assert metric(c.get("/metrics").text, "unirec_errors_total") == 0


@pytest.fixture(scope="module")
def id_export(tiny_search_shards, tmp_path_factory):
    """The same shards, queries known by id only (query_repr=id), 1 epoch."""
    from configs.load import load_config
    from configs.schema import PretrainConfig
    from train.export import main as export
    from train.pretrain import main
    root = tmp_path_factory.mktemp("id_queries")
    main(load_config(PretrainConfig, None, TINY_RUN + [f"shards={tiny_search_shards}", f"run_dir={root / 'run'}",
                                                       "train.epochs=1", "model.query_repr=id"]))
    export(root / "run", root / "export", command="test fixture")
    return load_export(root / "export")


def test_id_only_model_refuses_an_unknown_query(id_export, world):
    assert id_export.config["query_encoder"] is None and len(id_export.queries) > 20
    rec = Recommender(id_export, encoder="eager")
    with TestClient(make_app(rec, ServeConfig())) as c:
        got = search(c, {"query": id_export.queries[3], "history": world.h, "history_queries": [None, "new", None]})
        assert got["query_known"] is True and any("id-only" in w for w in got["warnings"])
        r = c.post("/search", json={"query": "zebra quantum lotion", "history": world.h})
        assert r.status_code == 422, r.text
        (e,) = r.json()["detail"]
        assert e["loc"] == ["body", "query"] and "training queries" in e["msg"]


def test_a_known_query_encoded_on_the_fly_matches_its_stored_row(exp, searcher):
    stored = exp.model.embed.query_text  # (Q+1, H): the vectors the model trained with
    for q in (1, 2, len(exp.queries) // 2, len(exp.queries) - 1):
        got = searcher.encoder(exp.queries[q])
        np.testing.assert_allclose(got, stored[q].numpy(), atol=1e-5)


def test_the_on_the_fly_path_gives_the_stored_path_answer(searcher, exp, world):
    """A text-only model: the same string through its stored row or through the encoder ranks alike."""
    rng = np.random.default_rng(6)
    for q in (2, 11):
        known = searcher.prepare(**body_for(rng, world, 7, exp.queries[q]))
        assert known.texts == [] and known.tokens["query_ids"][-1] == q
        unseen = replace(known, tokens=dict(known.tokens, query_ids=np.zeros_like(known.tokens["query_ids"])),
                         texts=[(len(known.tokens["item_ids"]) - 1, exp.queries[q])])  # as if unknown
        a, b = searcher.run([known, unseen])
        assert [i for i, _ in a.hits] == [i for i, _ in b.hits]
        assert [s for _, s in a.hits] == pytest.approx([s for _, s in b.hits], abs=1e-5)


# ---- 5. parity with the offline model, batching ---------------------------------------------------------
def test_served_searches_equal_the_offline_top_k(tiny_search_run, client):
    """bench/serve_parity.py --task search, in process: every search test target through POST /search."""
    from bench.serve_parity import compare, offline_lists
    from configs.load import load_config
    from configs.schema import PretrainConfig
    from data_pipeline.read_shards import load_manifest
    cfg = load_config(PretrainConfig, tiny_search_run / "config.json")
    users, extra = offline_lists(tiny_search_run, cfg, load_manifest(cfg.shards), task="search")
    trainer = json.loads((tiny_search_run / "metrics.json").read_text())["test_tasks"]["search"]
    assert len(users) == trainer["count"] > 10 and extra["skipped_search_users"] == 0
    assert any(any(u["body"]["history_queries"]) for u in users)  # past searches are part of the parity
    answers = [dict(status=r.status_code, body=r.json()) for r in (client.post("/search", json=u["body"])
                                                                   for u in users)]
    res = compare(users, answers)
    assert res["http_errors"] == 0 and res["mismatched_lists"] == 0, res["first_mismatch"]
    for k in ("hr@10", "ndcg@10"):
        assert res["served"][k] == pytest.approx(trainer[k], abs=1e-9)


def test_a_mixed_batch_equals_each_request_alone(rec, searcher, exp, world):
    rng = np.random.default_rng(7)
    reqs = [searcher.prepare(**body_for(rng, world, int(rng.integers(0, 30)), q))
            for q in (exp.queries[1], "unseen words here", exp.queries[5], "galaxy", exp.queries[8])]
    recs = [rec.prepare(**{k: v for k, v in body_for(rng, world, n, "").items() if k != "query"}) for n in (3, 17)]
    mixed = reqs[:2] + recs[:1] + reqs[2:] + recs[1:]
    together = batch_runner(rec, searcher)(mixed)
    for r, got in zip(mixed, together):
        (alone,) = (rec.run if isinstance(r, Prepared) else searcher.run)([r])
        assert [i for i, _ in got.hits] == [i for i, _ in alone.hits]
        assert [s for _, s in got.hits] == pytest.approx([s for _, s in alone.hits], rel=1e-5, abs=1e-6)
