"""Non-trained search baselines (train/search_baselines.py): hand-computed ranks on 6-item catalogues,
ranked by the evaluator's rules (pessimistic ties, the user's earlier items excluded, the target never)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from configs.schema import EvalConfig, LoaderConfig, SearchDataConfig, ShardConfig
from data_pipeline import schema
from data_pipeline.collate import make_loader
from data_pipeline.content import ContentError, read_catalog
from data_pipeline.read_shards import load_manifest
from data_pipeline.schema import Dataset, Events, Item
from data_pipeline.search_data import category_search_events
from data_pipeline.write_shards import write_shards
from train import search_baselines as sb
from train.evaluate import rank_targets

LOADER = LoaderConfig(num_workers=0, batch_size=2)  # 2 per batch: several batches, one cache across them


def _shards(tmp_path, catalog: dict[str, dict], users: list[list], category_construction: bool = False):
    """users: each a chronological list of events, a raw item id or (item, query) for a search click.
    The last event is the test target, the one before it the validation target, the rest training."""
    rows = []
    for u, events in enumerate(users):
        for t, e in enumerate(events):
            item, query = (e, "") if isinstance(e, str) else e
            action = schema.ACTION_SEARCH_CLICK if query else schema.ACTION_INTERACT
            rows.append((f"u{u}", item, t, action, query))
    user, item, ts, action, query = map(list, zip(*rows))
    ds = Dataset("tiny", Events.from_columns(user, item, ts, action, "beauty", query),
                 {k: Item(item_id=k, domain="beauty", **v) for k, v in catalog.items()})
    if category_construction:  # the manifest record search_data's Amazon construction leaves (its queries unused)
        ds = replace(ds, search_info=category_search_events(ds, SearchDataConfig(search_share=1.0)).search_info)
    write_shards(ds, tmp_path / "shards", ShardConfig(samples_per_shard=2), progress=False)
    return tmp_path / "shards"


def _ranks(shards, score, exclude_history: str = "full") -> dict[str, int]:
    """raw user -> the rank of their search test target under `score`."""
    m = load_manifest(shards)
    cfg, out = EvalConfig(ks=[1], exclude_history=exclude_history), {}
    for b in make_loader(shards, "test", LOADER, shuffle=False, task="search"):
        s = score(b)
        ranks = rank_targets(lambda lo, hi: s[:, lo:hi], b, cfg, m["vocab"]["num_items"]).ranks
        out.update({m["id_maps"]["users"][u]: int(r) for u, r in zip(b.user.tolist(), ranks.tolist())})
    return out


# items 3 and 4 have the same text (an exact BM25 tie); item 5 has none
TEXT_CATALOG = {"1": dict(title="red lipstick", brand="acme", categories=["Beauty", "Makeup", "Lips"]),
                "2": dict(title="red face cream", categories=["Beauty", "Skin Care", "Face"]),
                "3": dict(title="shampoo bottle", categories=["Beauty", "Hair Care"]),
                "4": dict(title="shampoo bottle", categories=["Beauty", "Hair Care"]),
                "5": dict(),
                "6": dict(title="eye liner", categories=["Beauty", "Makeup", "Eyes"])}
TEXT_USERS = [["5", "6", ("1", "red lipstick")],
              ["1", "2", ("3", "shampoo")],
              ["4", "5", ("3", "shampoo")],
              ["1", "2", ("5", "zebra")],
              [("2", "face cream"), "6", "1", ("2", "face cream")]]  # 'face cream' is in a training input


@pytest.fixture
def text_shards(tmp_path):
    return _shards(tmp_path, TEXT_CATALOG, TEXT_USERS)


def test_bm25_ranks(text_shards):
    score = sb.bm25_scorer(text_shards)
    assert _ranks(text_shards, score) == {
        "u0": 1,  # both query words in item 1; item 2 has only 'red'
        "u1": 2,  # item 4's text is item 3's: the tie counts against the target
        "u2": 1,  # ... unless item 4 is in the user's history, so not ranked
        "u3": 4,  # no indexed word: every item scores 0; items 1, 2 of the history are not ranked
        "u4": 1,  # the target is in the history too, and is still ranked
    }
    assert _ranks(text_shards, score, exclude_history="none")["u2"] == 2
    for b in make_loader(text_shards, "test", LOADER, shuffle=False, task="search"):
        assert (score(b)[:, 5] == 0).all()  # the item without text


def _write_vectors(shards, text: np.ndarray | None, queries: np.ndarray | None):
    """content/text.npy + content.json and content/queries.npy + queries.json, as the content stage writes
    them (row k = dense item k / query id k, row 0 zeros), so no MiniLM is needed."""
    h, d = load_manifest(shards)["content_hash"], (shards / "content")
    d.mkdir(exist_ok=True)
    if text is not None:
        np.save(d / "text.npy", text)
        meta = dict(num_items=len(text) - 1, manifest_content_hash=h, modalities={"text": {"dim": text.shape[1]}})
        (d / "content.json").write_text(json.dumps(meta))
    if queries is not None:
        np.save(d / "queries.npy", queries)
        (d / "queries.json").write_text(json.dumps(dict(num_queries=len(queries) - 1, dim=queries.shape[1],
                                                        manifest_content_hash=h)))


def test_dense_retrieval_ranks_by_the_stored_vectors(text_shards):
    with pytest.raises(ContentError, match=r"text\.npy not found.*python -m data_pipeline content --shards"):
        sb.dense_scorer(text_shards)
    text = np.eye(7, dtype=np.float32)  # item k = axis k (row 0, the padding, zeros)
    text[0] = 0
    _write_vectors(text_shards, text, None)
    with pytest.raises(ContentError, match=r"queries\.npy not found.*python -m data_pipeline content"):
        sb.dense_scorer(text_shards)
    strings = load_manifest(text_shards)["id_maps"]["queries"]
    assert strings == ["", "face cream", "red lipstick", "shampoo", "zebra"]
    q = np.zeros((5, 7), dtype=np.float32)
    q[1, 2] = 1.0  # face cream -> item 2
    q[2, [1, 2]] = 0.6, 0.8  # red lipstick -> item 2 above item 1
    q[3, [3, 4]] = 2 ** -0.5  # shampoo -> items 3 and 4 tie exactly
    q[4, 5] = 1.0  # zebra -> item 5 (BM25 cannot find it)
    _write_vectors(text_shards, None, q)
    assert _ranks(text_shards, sb.dense_scorer(text_shards)) == {"u0": 2, "u1": 2, "u2": 1, "u3": 1, "u4": 1}


def test_metrics_have_the_models_keys_and_count_the_query_slices(text_shards):
    m = sb.bm25_metrics(text_shards, LOADER, EvalConfig(ks=[1, 2], batch_size=2, item_chunk=4))
    assert load_manifest(text_shards)["counts"]["search"]["unseen_test_queries"] == [2, 3, 4]
    assert set(m) == {"count", "hr@1", "hr@2", "ndcg@1", "ndcg@2", "mrr", "per_domain", "nonfinite_states",
                      "exclude_history", "per_slice", "task", "ranks"}
    assert (m["count"], m["exclude_history"], m["task"]) == (5, "full", "search")
    assert sorted(r for r in m["ranks"] if r) == [1, 1, 1, 2, 4]  # one per search target, by user
    # ranks 1, 2, 1, 4 (unseen queries) and 1 (face cream, seen in training)
    assert m["hr@1"] == pytest.approx(3 / 5) and m["mrr"] == pytest.approx((1 + 1 / 2 + 1 + 1 / 4 + 1) / 5)
    assert m["per_domain"]["beauty"]["count"] == 5
    seen, unseen = m["per_slice"]["seen_query"], m["per_slice"]["unseen_query"]
    assert (seen["count"], seen["mrr"]) == (1, 1.0)
    assert unseen["count"] == 4 and unseen["mrr"] == pytest.approx((1 + 1 / 2 + 1 + 1 / 4) / 4)


def test_category_popularity_on_a_catalogue_with_category_paths(tmp_path):
    paths = {"1": ["Beauty", "Makeup", "Lips"], "2": ["Beauty", "Skin Care", "Face"], "3": ["Beauty", "Hair Care"],
             "4": ["Beauty", "Hair Care"], "6": ["Beauty", "Makeup", "Eyes"]}
    catalog = {k: dict(categories=p) for k, p in paths.items()}
    # item 5 matches 'beauty makeup lips' only through its second path in attributes.category_paths
    catalog["5"] = dict(attributes={"category_paths": [["Beauty", "Tools"], ["Beauty", "Makeup", "Lips"]]})
    lips, hair = "beauty makeup lips", "beauty hair care"
    users = [["6", "6", "5", ("1", lips)], ["6", "3", "2", ("5", lips)],
             ["1", "2", "6", ("3", hair)], ["5", "4", "1", ("2", hair)]]
    shards = _shards(tmp_path, catalog, users, category_construction=True)
    score, rule = sb.category_popularity_scorer(shards, LOADER)
    assert rule == "category_path"
    # training counts (all but each user's last two events): item 6 three times, items 1..5 once each
    assert _ranks(shards, score) == {
        "u0": 1,  # matches: 1 and 5; 5 is in the history
        "u1": 2,  # matches: 1 and 5, equal counts (a pessimistic tie); item 6 (count 3) does not match
        "u2": 2,  # matches: 3 and 4, equal counts
        "u3": 3,  # the target does not match: below match 3 (4 is in the history) and the popular item 6
    }
    m = sb.category_popularity_metrics(shards, LOADER, EvalConfig(ks=[1], batch_size=2))
    assert m["match_rule"] == "category_path" and m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 / 3) / 4)


def test_category_popularity_without_category_paths_matches_training_clicks(tmp_path):
    # ml-latest-small: genre lists as categories, user tags as queries
    catalog = {"1": dict(title="Toy Story", categories=["Comedy", "Drama"]), "2": dict(categories=["Comedy"]),
               "3": dict(categories=["Drama"]), "4": dict(), "5": dict(categories=["Comedy"]), "6": dict()}
    users = [[("2", "funny"), "3", "1", ("4", "funny")],
             [("5", "funny"), "6", "2", ("1", "comedy drama")],
             ["6", "4", "3", ("5", "funny")]]
    shards = _shards(tmp_path, catalog, users)
    score, rule = sb.category_popularity_scorer(shards, LOADER)
    assert rule == "train_click"
    # training counts: item 6 twice, items 2..5 once, item 1 never; 'funny' was clicked on items 2 and 5
    assert _ranks(shards, score) == {
        "u0": 3,  # below match 5 (match 2 is in the history) and the popular item 6
        "u1": 3,  # 'comedy drama' was never clicked in training: popularity alone, below items 3 and 4
        "u2": 2,  # matches 2 and 5 tie
    }
    # the genre list reads as the path 'comedy drama': the category rule would have made item 1 match
    manifest, rows = read_catalog(shards)
    assert 1 in sb.category_matches(rows, manifest["id_maps"]["queries"])[manifest["id_maps"]["queries"].index(
        "comedy drama")]
    assert sb.category_popularity_metrics(shards, LOADER, EvalConfig(ks=[1]))["match_rule"] == "train_click"
