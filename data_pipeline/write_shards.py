"""Events -> per-user chronological sequences -> leave-one-out split -> webdataset shards + manifest.json.

One sample per user holds the WHOLE chronological sequence; the split is a rule applied by the loader
(train = events[:n-2], valid target = events[n-2], test target = events[n-1]), written into the manifest.
One shard set then serves all three splits, and no split can drift from another.

Writing is atomic: everything goes into a hidden temp folder next to `out`, `manifest.json` is written
last, and the folder is swapped into place atomically at the end (`atomic_dir.swap_into_place`: with
--overwrite the output folder names the old set, then the new one, and is never missing). An interrupted
run leaves only `.<name>.tmp-*`, which the loader never mistakes for a shard set (it needs `manifest.json`).
"""
from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from configs.schema import ShardConfig
from data_pipeline import schema
from data_pipeline.atomic_dir import recover, swap_into_place
from data_pipeline.schema import MIN_EVENTS_FOR_EVAL, Dataset

FORMAT_VERSION = 1
SPLIT_RULE = ("leave-one-out by time per user: test target = last event, validation target = "
              "second-to-last event, train = all earlier events; ties in time keep file order")


def _natural_key(raw: str):
    """Sort numeric ids numerically ("2" < "10"), everything else as text, numbers first."""
    return (0, int(raw), "") if raw.isdigit() else (1, 0, raw)


def _dense_ids(values: np.ndarray, first: int) -> tuple[list[str], np.ndarray]:
    """Raw ids (E,) -> (vocab in natural order, dense ids (E,) starting at `first`)."""
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    order = sorted(range(len(uniq)), key=lambda i: _natural_key(uniq[i]))
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq)) + first
    return [str(uniq[i]) for i in order], rank[inverse]


def encode_events(ds: Dataset) -> dict:
    """Dense-id every column and sort events by (user, time), stable so same-time events keep file order."""
    ev = ds.events
    users, user_idx = _dense_ids(ev.user_id, first=0)  # (E,) 0..U-1
    items, item_idx = _dense_ids(ev.item_id, first=1)  # (E,) 1..I, 0 = padding
    domains = sorted(set(ev.domain.tolist()))
    dom_of = {d: i for i, d in enumerate(domains)}
    domain_idx = np.fromiter((dom_of[d] for d in ev.domain), dtype=np.int64, count=len(ev))
    queries = [""] + sorted({q for q in ev.query.tolist() if q})  # id 0 = "no query"
    q_of = {q: i for i, q in enumerate(queries)}
    query_idx = np.fromiter((q_of[q] for q in ev.query), dtype=np.int64, count=len(ev))
    order = np.lexsort((ev.timestamp, user_idx))  # numpy's lexsort is stable: ties keep file order
    seq = np.stack([item_idx, ev.timestamp, ev.action, domain_idx, query_idx])[:, order]  # (5, E)
    return dict(users=users, items=items, domains=domains, queries=queries, seq=seq,
                user_idx=user_idx[order], item_domain=_item_domain(item_idx, domain_idx, len(items), len(domains)))


def _item_domain(item_idx: np.ndarray, domain_idx: np.ndarray, num_items: int, num_domains: int) -> np.ndarray:
    """(I+1,) the domain of each item's events; -1 for padding and for an item whose events span several
    domains (user-group domains: ML-1M by age puts most movies in all 7 groups)."""
    lo = np.full(num_items + 1, num_domains, dtype=np.int64)
    hi = np.full(num_items + 1, -1, dtype=np.int64)
    np.minimum.at(lo, item_idx, domain_idx)
    np.maximum.at(hi, item_idx, domain_idx)
    return np.where(lo == hi, hi, -1)


def _split_users(enc: dict, cfg: ShardConfig) -> tuple[list[tuple[int, int, int]], dict]:
    """(user, start, end) slices into enc["seq"], with short users kept or dropped per cfg."""
    if cfg.short_users not in ("train", "drop"):
        raise ValueError(f"shards.short_users must be 'train' or 'drop', got {cfg.short_users!r}")
    user_idx = enc["user_idx"]
    starts = np.flatnonzero(np.r_[True, user_idx[1:] != user_idx[:-1]])
    ends = np.r_[starts[1:], len(user_idx)]
    spans, short, dropped_events = [], 0, 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s < MIN_EVENTS_FOR_EVAL:
            short += 1
            if cfg.short_users == "drop":
                dropped_events += e - s
                continue
        spans.append((int(user_idx[s]), s, e))
    return spans, dict(short_users=short, short_users_policy=cfg.short_users,
                       dropped_short_user_events=dropped_events)


def _counts(enc: dict, spans: list, short: dict, ds: Dataset, cold: np.ndarray) -> dict:
    """Counts of what the loader will use: the split counts come after the cold-item rule (cold events
    leave the training inputs, a cold validation target drops that user's validation example)."""
    seq, domains = enc["seq"], enc["domains"]
    kept = np.concatenate([np.arange(s, e) for _, s, e in spans]) if spans else np.zeros(0, np.int64)
    lengths = np.array([e - s for _, s, e in spans])
    is_eval = lengths >= MIN_EVENTS_FOR_EVAL
    train_pos = np.concatenate([np.arange(s, e - 2 * ok) for (_, s, e), ok in zip(spans, is_eval)]) \
        if spans else np.zeros(0, np.int64)
    valid_pos = np.array([e - 2 for (_, s, e), ok in zip(spans, is_eval) if ok], dtype=np.int64)
    test_pos = np.array([e - 1 for (_, s, e), ok in zip(spans, is_eval) if ok], dtype=np.int64)
    train_pos = train_pos[~np.isin(seq[schema.ROW_ITEM, train_pos], cold)]
    valid_pos = valid_pos[~np.isin(seq[schema.ROW_ITEM, valid_pos], cold)]
    search = _search_counts(seq, train_pos, valid_pos, test_pos)
    per_domain = {}
    for d, name in enumerate(domains):
        in_d = seq[schema.ROW_DOMAIN, kept] == d
        per_domain[name] = dict(  # items = distinct items with events in d (domains may share items)
            events=int(in_d.sum()), items=int(len(np.unique(seq[schema.ROW_ITEM, kept][in_d]))),
            users=int(len(np.unique(enc["user_idx"][kept][in_d]))),
            valid_targets=int((seq[schema.ROW_DOMAIN, valid_pos] == d).sum()),
            test_targets=int((seq[schema.ROW_DOMAIN, test_pos] == d).sum()))
    return dict(
        users=len(spans), items=len(enc["items"]), events=int(len(kept)),
        search_events=int((seq[schema.ROW_QUERY, kept] > 0).sum()),
        split=dict(train_events=len(train_pos), valid_targets=len(valid_pos), test_targets=len(test_pos)),
        length=dict(min=int(lengths.min()) if len(lengths) else 0,
                    max=int(lengths.max()) if len(lengths) else 0,
                    mean=round(float(lengths.mean()), 3) if len(lengths) else 0.0),
        skipped_rows=ds.skipped_rows, **short,
        catalog_items_without_events=len(set(ds.catalog) - set(enc["items"])), search=search,
    ), per_domain


def _search_counts(seq: np.ndarray, train_pos, valid_pos, test_pos) -> dict:
    """Search targets per split and the test queries no training input holds (the unseen-query slice:
    a query id model can know nothing about them)."""
    q = seq[schema.ROW_QUERY]
    train_q = np.unique(q[train_pos])
    test_q = q[test_pos][q[test_pos] > 0]
    unseen = np.setdiff1d(np.unique(test_q), train_q)
    return dict(valid_search_targets=int((q[valid_pos] > 0).sum()), test_search_targets=len(test_q),
                test_unseen_query_targets=int(np.isin(test_q, unseen).sum()), unseen_test_queries=unseen.tolist())


def _write_one_shard(path: Path, spans: list, enc: dict) -> dict:
    seq = enc["seq"]
    # fixed mtime: identical inputs give byte-identical shards, so content_hash identifies the data
    with wds.TarWriter(str(path), encoder=True, mtime=0) as sink:
        for user, s, e in spans:
            sink.write({"__key__": f"u{user:09d}", "seq.i64": seq[:, s:e].astype("<i8").tobytes()})
    data = path.read_bytes()
    return dict(name=path.name, samples=len(spans), events=int(sum(e - s for _, s, e in spans)),
                bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _write_catalog(path: Path, enc: dict, ds: Dataset):
    """Catalog rows for dense items 1..I (text fields for the content encoder of later stages)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for dense, raw in enumerate(enc["items"], start=1):
            d = enc["item_domain"][dense]  # -1: events in several domains, so no one domain to name
            it = ds.catalog.get(raw) or schema.Item(item_id=raw, domain=enc["domains"][d] if d >= 0 else "")
            row = dict(id=dense, item_id=raw, domain=it.domain, title=it.title, categories=it.categories,
                       brand=it.brand, description=it.description, attributes=it.attributes)
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    recover(out)  # a crash inside a previous fallback swap: put the old set back first
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_shards(ds: Dataset, out: str | Path, cfg: ShardConfig = ShardConfig(),
                 overwrite: bool = False, progress: bool = True, domain_by: str = "source") -> dict:
    """Write `ds` as shards + catalog + manifest into `out` atomically; returns the manifest. `domain_by`
    (PrepareConfig.domain_by) goes into the manifest: 'age'/'gender' domains are user groups that share
    items, so eval.within_domain refuses them."""
    out = Path(out)
    tmp = _prepare_out(out, overwrite)
    try:
        enc = encode_events(ds)
        spans, short = _split_users(enc, cfg)
        random.Random(cfg.seed).shuffle(spans)  # mixed lengths per shard -> balanced shards
        groups = [spans[i:i + cfg.samples_per_shard] for i in range(0, len(spans), cfg.samples_per_shard)]
        shards = [_write_one_shard(tmp / f"shard-{i:05d}.tar", g, enc)
                  for i, g in enumerate(tqdm(groups, desc="writing shards", unit="shard", disable=not progress))]
        _write_catalog(tmp / "catalog.jsonl.gz", enc, ds)
        cold = _cold_items(len(enc["items"]), cfg)
        counts, per_domain = _counts(enc, spans, short, ds, cold)
        counts["cold"] = _cold_counts(enc, spans, cold)
        manifest = _manifest(ds, enc, counts, per_domain, shards, cfg, cold, domain_by)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        swap_into_place(tmp, out)  # `out` is never missing, not even for a moment
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _cold_items(num_items: int, cfg: ShardConfig) -> np.ndarray:
    """round(cold_item_frac x I) dense item ids drawn uniformly without replacement (seeded), sorted."""
    if not 0.0 <= cfg.cold_item_frac < 1.0:
        raise ValueError(f"shards.cold_item_frac must be in [0, 1), got {cfg.cold_item_frac}")
    k = round(cfg.cold_item_frac * num_items)
    rng = np.random.default_rng(cfg.seed + 7919)  # its own stream: the shard assignment stays unchanged
    return np.sort(rng.choice(np.arange(1, num_items + 1), size=k, replace=False)) if k else np.zeros(0, np.int64)


def _cold_counts(enc: dict, spans: list, cold: np.ndarray) -> dict:
    """How much the cold-item hold-out removes and how many test targets it leaves to measure on."""
    items = enc["seq"][schema.ROW_ITEM]
    eval_spans = [(s, e) for _, s, e in spans if e - s >= MIN_EVENTS_FOR_EVAL]
    test_items = np.array([items[e - 1] for s, e in eval_spans], dtype=np.int64)
    valid_items = np.array([items[e - 2] for s, e in eval_spans], dtype=np.int64)
    kept = np.concatenate([np.arange(s, e) for _, s, e in spans]) if spans else np.zeros(0, np.int64)
    return dict(items=int(len(cold)), events=int(np.isin(items[kept], cold).sum()),
                test_targets=int(np.isin(test_items, cold).sum()),
                valid_targets_dropped=int(np.isin(valid_items, cold).sum()))


def _manifest(ds, enc, counts, per_domain, shards, cfg, cold, domain_by) -> dict:
    id_maps = dict(items=["<pad>"] + enc["items"], users=enc["users"], domains=enc["domains"],
                   queries=enc["queries"])
    h = hashlib.sha256()
    for s in shards:
        h.update(s["sha256"].encode())
    h.update(json.dumps(id_maps, sort_keys=True).encode())
    if len(cold):  # the hold-out changes every split, so it is part of the data's identity
        h.update(json.dumps(cold.tolist()).encode())
    return dict(
        format_version=FORMAT_VERSION, dataset=ds.name,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        has_timestamps=bool(ds.events.has_timestamps), content_hash=h.hexdigest(),
        counts=counts, per_domain=per_domain, domain_by=domain_by,
        vocab=dict(num_items=len(enc["items"]), num_users=len(enc["users"]), num_actions=schema.NUM_ACTIONS,
                   num_domains=len(enc["domains"]), num_queries=len(enc["queries"]) - 1,
                   num_token_types=schema.NUM_TOKEN_TYPES),
        split_rule=dict(rule=SPLIT_RULE, min_events_for_eval=MIN_EVENTS_FOR_EVAL,
                        short_users=cfg.short_users, cold_item_frac=cfg.cold_item_frac,
                        cold_items=cold.tolist()),
        seq_rows=list(schema.SEQ_ROWS), shards=shards, catalog="catalog.jsonl.gz",
        semantic_ids=None, notes=list(ds.notes), search=ds.search_info or None,
        id_maps=id_maps, item_domain=enc["item_domain"].tolist(),
    )
