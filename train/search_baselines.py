"""Search baselines that learn nothing, ranked on exactly the models' search test targets.

Each baseline is a scorer, batch -> (B, I+1) scores of every item for each target's query; `search_metrics`
ranks the target with `train.evaluate.rank_targets` (the models' rules: items 1..I, pessimistic ties,
eval.exclude_history) and averages with `train.evaluate.evaluate`, so a baseline's dict has the keys of a
model's (count, hr@K, ndcg@K, mrr, per_domain, per_slice, exclude_history, ...) and one table shows both:

    bm25_metrics                  BM25 (bm25s) over each item's title, brand and categories
    dense_metrics                 MiniLM query vector . MiniLM item text vector (the content stage's files)
    category_popularity_metrics   items matching the query's category by training popularity, then the rest

Targets: the test split's search targets (make_loader(..., task="search")); slices: seen_query /
unseen_query (manifest counts.search.unseen_test_queries) and, when the shard set holds cold items,
warm / cold / warm_among_warm as for the models. One process: under several ranks each rank's loader would
read only its share of the shards.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import bm25s
import numpy as np
import torch
from torch import nn

from configs.schema import EvalConfig, LoaderConfig
from data_pipeline.collate import make_loader
from data_pipeline.content import CONTENT_DIR, ContentError, load_content, read_catalog
from data_pipeline.queries import QUERIES, load_query_vectors
from data_pipeline.read_shards import cold_items, load_manifest, read_shards
from data_pipeline.schema import ROW_ITEM, ROW_QUERY
from data_pipeline.search_data import category_query
from train.baselines import item_counts
from train.evaluate import QuerySlices, evaluate, rank_targets

Scorer = Callable[..., torch.Tensor]  # JaggedBatch -> (B, I+1) scores; column 0 (padding) is never ranked


def search_metrics(shard_dir, score: Scorer, loader: LoaderConfig = LoaderConfig(),
                   cfg: EvalConfig = EvalConfig()) -> dict:
    """Full-ranking metrics of `score` over the test split's search targets (see the module docstring)."""
    manifest = load_manifest(shard_dir)
    if not (manifest["counts"].get("search") or {}).get("test_search_targets"):
        raise ValueError(f"{shard_dir} has no search test targets: prepare it with search events "
                         "(e.g. configs/data/amazon-beauty-search.yaml)")
    n = manifest["vocab"]["num_items"]
    batches = ((b, True) for b in make_loader(shard_dir, "test", replace(loader, batch_size=cfg.batch_size),
                                              shuffle=False, task="search"))

    def ranker(_model, batch, cold):
        s = score(batch)  # (B, I+1)
        return rank_targets(lambda lo, hi: s[:, lo:hi], batch, cfg, n, cold=cold)

    unseen = torch.tensor(manifest["counts"]["search"]["unseen_test_queries"], dtype=torch.long)
    # evaluate toggles a model's train/eval mode and hands it to the ranker; a baseline has no model
    out = evaluate(nn.Module(), batches, cfg, n, manifest["id_maps"]["domains"],
                   cold=torch.from_numpy(cold_items(manifest)), ranker=ranker, slices=QuerySlices(unseen),
                   num_users=manifest["vocab"]["num_users"])  # per-target ranks: bench/search.py's intervals
    out["task"] = "search"
    return out


# ---- BM25 -----------------------------------------------------------------------------------------------
def bm25_text(row: dict) -> str:
    """Catalog row -> the text BM25 indexes: title, brand and categories (a nested path joined by spaces)."""
    cats = [c if isinstance(c, str) else " ".join(map(str, c)) for c in row.get("categories") or []]
    return " ".join([row.get("title") or "", row.get("brand") or "", *cats])


def bm25_scorer(shard_dir) -> Scorer:
    """BM25 (bm25s defaults: Lucene variant, k1 1.5, b 0.75; English stopwords) of each item's `bm25_text`
    for the target's query string. An item without text, or a query with no indexed word, scores 0."""
    manifest, rows = read_catalog(shard_dir)
    index = bm25s.BM25()
    index.index(bm25s.tokenize([bm25_text(r) for r in rows], stopwords="en", show_progress=False),
                show_progress=False)
    # the query words as strings: tokenize builds a vocabulary per call, so ids must come from the index's
    words = bm25s.tokenize(manifest["id_maps"]["queries"], stopwords="en", return_ids=False, show_progress=False)
    cache: dict[int, torch.Tensor] = {}  # query id -> (I+1,): a query repeats over many targets

    def row(q: int) -> torch.Tensor:
        if q not in cache:
            s = np.zeros(len(rows) + 1, dtype=np.float32)
            ids = index.get_tokens_ids(words[q])
            if ids:  # bm25s needs at least one known word
                s[1:] = index.get_scores_from_ids(ids)
            cache[q] = torch.from_numpy(s)
        return cache[q]

    return lambda batch: torch.stack([row(q) for q in batch.target_query.tolist()])


def bm25_metrics(shard_dir, loader: LoaderConfig = LoaderConfig(), cfg: EvalConfig = EvalConfig()) -> dict:
    return search_metrics(shard_dir, bm25_scorer(shard_dir), loader, cfg)


# ---- dense retrieval --------------------------------------------------------------------------------------
def dense_scorer(shard_dir) -> Scorer:
    """Query text vector (content/queries.npy row) . item text vector (content/text.npy row): the encoder's
    cosine, both sides unit rows, nothing trained."""
    fix = f"run `python -m data_pipeline content --shards {shard_dir}`"
    for name in ("text.npy", QUERIES):
        path = Path(shard_dir) / CONTENT_DIR / name
        if not path.is_file():
            raise ContentError(f"{path} not found: the dense-retrieval baseline needs the content stage's item "
                               f"and query text vectors; {fix}")
    try:
        text = torch.from_numpy(load_content(shard_dir)["text"])  # (I+1, H)
        queries = torch.from_numpy(load_query_vectors(shard_dir)[0])  # (Q+1, H)
    except ContentError as e:
        raise ContentError(f"dense-retrieval baseline: {e}") from e
    if text.shape[1] != queries.shape[1]:
        raise ContentError(f"content/text.npy has dim {text.shape[1]}, content/{QUERIES} {queries.shape[1]}: "
                           f"made by different encoders; {fix}")
    return lambda batch: queries[batch.target_query] @ text.T  # (B, H) @ (H, I+1)


def dense_metrics(shard_dir, loader: LoaderConfig = LoaderConfig(), cfg: EvalConfig = EvalConfig()) -> dict:
    return search_metrics(shard_dir, dense_scorer(shard_dir), loader, cfg)


# ---- category popularity ----------------------------------------------------------------------------------
CATEGORY_PATH, TRAIN_CLICK = "category_path", "train_click"


def match_rule(manifest: dict) -> str:
    """'category_path' when the queries were made from catalog category paths (search_data's Amazon
    construction), else 'train_click'. Decided by how the queries were made, not by the catalog's look:
    ml-latest-small's categories are genre lists, which category_query would read as a path."""
    construction = str((manifest.get("search") or {}).get("construction", ""))
    return CATEGORY_PATH if construction.startswith("category_paths") else TRAIN_CLICK


def category_matches(rows: list[dict], queries: list[str]) -> dict[int, list[int]]:
    """query id -> dense items one of whose category paths (attributes['category_paths'], else categories)
    gives that query string, as search_data.item_queries reads them."""
    qid = {q: i for i, q in enumerate(queries) if i}
    out = defaultdict(list)
    for row in rows:
        attributes = row.get("attributes") or {}
        paths = attributes.get("category_paths") or ([row["categories"]] if row.get("categories") else [])
        for q in dict.fromkeys(category_query(list(p)) for p in paths):
            if q in qid:
                out[qid[q]].append(row["id"])
    return out


def click_matches(shard_dir, loader: LoaderConfig) -> dict[int, list[int]]:
    """query id -> dense items clicked for it in a training-split search event (the inputs a model trains on)."""
    out = defaultdict(set)
    for ex in read_shards(shard_dir, "train", replace(loader, num_workers=0), shuffle=False):
        h = ex["history"]  # (5, n)
        s = h[ROW_QUERY] > 0
        for q, i in zip(h[ROW_QUERY, s].tolist(), h[ROW_ITEM, s].tolist()):
            out[q].add(i)
    return {q: sorted(items) for q, items in out.items()}


def category_popularity_scorer(shard_dir, loader: LoaderConfig = LoaderConfig()) -> tuple[Scorer, str]:
    """(scorer, match rule): items matching the target's query (see `match_rule`) rank above every other
    item, each group by training popularity (train.baselines.item_counts: the item's training-split events);
    equal counts tie (pessimistically, as everywhere)."""
    manifest, rows = read_catalog(shard_dir)
    counts = torch.from_numpy(item_counts(shard_dir, len(rows), loader=loader)).double()  # (I+1,), exact
    rule = match_rule(manifest)
    found = category_matches(rows, manifest["id_maps"]["queries"]) if rule == CATEGORY_PATH \
        else click_matches(shard_dir, loader)
    matches = {q: torch.tensor(items, dtype=torch.long) for q, items in found.items()}
    lift = counts.max() + 1  # a matching item with count 0 still beats the most popular other item
    none = torch.zeros(0, dtype=torch.long)

    def score(batch) -> torch.Tensor:
        s = counts.repeat(batch.num_sequences, 1)  # (B, I+1)
        for b, q in enumerate(batch.target_query.tolist()):
            s[b, matches.get(q, none)] += lift
        return s

    return score, rule


def category_popularity_metrics(shard_dir, loader: LoaderConfig = LoaderConfig(),
                                cfg: EvalConfig = EvalConfig()) -> dict:
    """`search_metrics` of the category-popularity scorer, with "match_rule": 'category_path' (Amazon:
    an item matches when one of its category paths gives the query string) or 'train_click' (queries not
    made from categories, e.g. ml-latest-small's tags: an item matches when it was clicked for that exact
    query in a training-split search event; an unseen query then matches nothing: pure popularity)."""
    score, rule = category_popularity_scorer(shard_dir, loader)
    return {**search_metrics(shard_dir, score, loader, cfg), "match_rule": rule}
