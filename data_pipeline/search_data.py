"""Search events from real sources: a read Dataset -> the same Dataset with some events turned into searches.

Amazon product search (the construction of Van Gysel et al., CIKM 2016 and Ai et al., SIGIR 2017, so
numbers compare): the query of a purchase is the terms of one of the item's category hierarchies,
lower-cased, stopwords and repeated words removed; one-level hierarchies ("Beauty") are ignored. Here:

    every event -> with probability search_share (seeded) a search event, when its item has a usable path
                -> its query = category_query(one of the item's paths, drawn per event, seeded)
    30% of the distinct query strings (seeded) are held out: they appear only on test targets (each user's
    last event); elsewhere a held-out search event stays a recommendation event (the item, no query)

so the test split has a seen-query and an unseen-query slice, and no held-out string is ever in a
training (or validation) input. ml-latest-small already has real search events (tags); `last_search_test`
cuts each searching user's sequence after their last search, so that event is their test target.
"""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from configs.schema import SearchDataConfig
from data_pipeline.schema import ACTION_SEARCH_CLICK, MIN_EVENTS_FOR_EVAL, Dataset, Events

# The usual English function words (the stopword lists of the constructions above are NLTK's/Indri's;
# category names only ever contain these few): "Skin Care & Body" -> "skin care body".
STOPWORDS = frozenset("""a an and are as at be by for from in into is it of on or s t the to with & + -
                         your you our all other""".split())
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def category_query(path: list[str]) -> str:
    """A category hierarchy (root first) -> its query string, '' when the path has one level.
    ["Beauty", "Skin Care", "Face", "Creams & Moisturizers"] -> "beauty skin care face creams moisturizers"."""
    if len(path) < 2:
        return ""
    words = [w for level in path for w in _WORD.findall(level.lower()) if w not in STOPWORDS]
    return " ".join(dict.fromkeys(words))  # repeated words removed, first occurrence kept


def item_queries(ds: Dataset) -> dict[str, list[str]]:
    """Raw item id -> the distinct query strings of its usable category paths (attributes['category_paths'],
    else the single path Item.categories), in path order; items with none are left out."""
    out = {}
    for item_id, it in ds.catalog.items():
        paths = it.attributes.get("category_paths") or ([it.categories] if it.categories else [])
        qs = [q for q in dict.fromkeys(category_query(list(p)) for p in paths) if q]
        if qs:
            out[item_id] = qs
    return out


def _user_spans(ev: Events) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order (E,), starts (U,), ends (U,)): events in the shards' order (user, then time, ties in file
    order: the stable sort write_shards uses), user u's events being order[starts[u]:ends[u]]."""
    users = ev.user_id.astype(str)
    order = np.lexsort((ev.timestamp, users))
    u = users[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    return order, starts, np.r_[starts[1:], len(u)]


def _test_target_mask(ev: Events) -> np.ndarray:
    """(E,) True on each user's test target: the last event in the shards' order of a user with enough
    events to be evaluated (a shorter user's events are all training)."""
    order, starts, ends = _user_spans(ev)
    last = np.zeros(len(ev), dtype=bool)
    last[order[(ends - 1)[ends - starts >= MIN_EVENTS_FOR_EVAL]]] = True
    return last


def category_search_events(ds: Dataset, cfg: SearchDataConfig) -> Dataset:
    """The Amazon construction above; the counts go into the Dataset's notes and search_info."""
    if not 0.0 < cfg.search_share <= 1.0:
        raise ValueError(f"search.search_share must be in (0, 1], got {cfg.search_share}")
    if not 0.0 <= cfg.heldout_query_frac < 1.0:
        raise ValueError(f"search.heldout_query_frac must be in [0, 1), got {cfg.heldout_query_frac}")
    by_item = item_queries(ds)
    if not by_item:
        raise ValueError(f"{ds.name}: search.category_queries needs category paths of >= 2 levels in the catalog "
                         "(items.jsonl.gz category_paths / categories); this catalog has none")
    ev = ds.events
    rng = np.random.default_rng(cfg.seed)
    n = len(ev)
    draw, pick = rng.random(n), rng.random(n)  # one draw per event each: the same events for any catalog order
    query = np.full(n, "", dtype=object)
    usable = np.fromiter((i in by_item for i in ev.item_id), dtype=bool, count=n)
    chosen = np.flatnonzero(usable & (draw < cfg.search_share))
    for e in chosen.tolist():
        qs = by_item[ev.item_id[e]]
        query[e] = qs[int(pick[e] * len(qs))]
    distinct = sorted({q for q in query.tolist() if q})
    heldout = set(rng.permutation(distinct)[:round(cfg.heldout_query_frac * len(distinct))].tolist())
    is_last = _test_target_mask(ev)
    dropped = np.fromiter((q in heldout for q in query), dtype=bool, count=n) & ~is_last
    query[dropped] = ""  # a held-out query outside a test target: the event stays, as a recommendation
    is_search = query != ""
    action = np.where(is_search, ACTION_SEARCH_CLICK, ev.action)
    info = dict(construction="category_paths (Van Gysel et al. 2016)", search_share=cfg.search_share,
                heldout_query_frac=cfg.heldout_query_frac, seed=cfg.seed, items_with_queries=len(by_item),
                distinct_queries=len(distinct), heldout_queries=sorted(heldout),
                search_events=int(is_search.sum()), heldout_events_kept_as_rec=int(dropped.sum()))
    note = (f"search events from category paths: {info['search_events']:,} of {n:,} events "
            f"(share {cfg.search_share}, seed {cfg.seed}); {len(distinct)} distinct queries, {len(heldout)} held "
            f"out (only on test targets; {info['heldout_events_kept_as_rec']:,} other events with a held-out "
            "query stay recommendation events)")
    events = replace(ev, query=query, action=action.astype(np.int64))
    return replace(ds, events=events, notes=ds.notes + [note], search_info=info)


def last_search_test(ds: Dataset) -> Dataset:
    """Cut each user who has a search event after their last one, so it is their test target (the events
    after it would be later than the test target: they leave the data, and the count goes into a note)."""
    ev = ds.events
    order, starts, ends = _user_spans(ev)
    is_search = (ev.query != "")[order]
    keep = np.ones(len(ev), dtype=bool)
    searchers = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        hits = np.flatnonzero(is_search[s:e])
        if len(hits):
            searchers += 1
            keep[order[s + hits[-1] + 1:e]] = False
    if searchers == 0:
        raise ValueError(f"{ds.name}: search.last_search_test needs search events; this dataset has none")
    cut = int((~keep).sum())
    events = Events(*(getattr(ev, k)[keep] for k in ("user_id", "item_id", "timestamp", "action", "domain",
                                                      "query")), has_timestamps=ev.has_timestamps)
    note = (f"search test split: each of the {searchers} searching users' last search event is their test target; "
            f"{cut:,} later events of theirs are left out")
    info = dict(construction="last search event = test target", searching_users=searchers, events_cut=cut)
    return replace(ds, events=events, notes=ds.notes + [note], search_info=info)


def apply(ds: Dataset, cfg: SearchDataConfig) -> Dataset:
    """The search transforms the config asks for (none by default)."""
    if cfg.category_queries:
        ds = category_search_events(ds, cfg)
    if cfg.last_search_test:
        info = ds.search_info
        ds = last_search_test(ds)
        ds = replace(ds, search_info={**info, **ds.search_info})
    return ds
