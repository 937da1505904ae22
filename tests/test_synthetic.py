"""The synthetic world: deterministic, honours the data contract, and has structure a model can learn."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

from configs.schema import SyntheticConfig
from data_pipeline import schema, synthetic


@pytest.fixture(scope="module")
def world() -> synthetic.World:
    return synthetic.generate(SyntheticConfig(num_users=1500))


def _events_equal(a: schema.Events, b: schema.Events) -> bool:
    cols = ("user_id", "item_id", "timestamp", "action", "domain", "query")
    return len(a) == len(b) and all(np.array_equal(getattr(a, c), getattr(b, c)) for c in cols)


def test_deterministic_per_seed():
    cfg = SyntheticConfig(num_users=200)
    a, b = synthetic.generate(cfg), synthetic.generate(cfg)
    assert _events_equal(a.dataset.events, b.dataset.events)
    assert a.dataset.catalog == b.dataset.catalog
    assert np.array_equal(a.event_interest, b.event_interest)
    c = synthetic.generate(dataclasses.replace(cfg, seed=1))
    assert not _events_equal(a.dataset.events, c.dataset.events)


def _events_and_python_lines(cfg: SyntheticConfig) -> tuple[int, int]:
    """(events, lines of data_pipeline/synthetic.py executed) for generating `cfg`. Only the generator's
    own lines are traced, so the count does not depend on the machine, its load or the numpy version."""
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        if frame.f_code.co_filename != synthetic.__file__:
            return None  # numpy and the rest run untraced
        lines += event == "line"
        return trace

    sys.settrace(trace)
    try:
        n = len(synthetic.generate(cfg).dataset.events)
    finally:
        sys.settrace(None)
    return n, lines


def test_default_config_is_cheap():
    """`make demo` and most tests build the default world, so it must stay cheap to generate (~1 s here).
    Counted, not timed: the default world is small, and the generator does no Python work per event
    (numpy over all users, one Python iteration per simulation step). Doubling every user's events adds
    ~0.09 traced lines per added event (the longer step loop); a per-event Python loop adds at least 1.
    Searches are off: their query strings are built in Python, one per search."""
    assert len(synthetic.generate(SyntheticConfig()).dataset.events) <= 100_000  # 60,137 with seed 0
    base = SyntheticConfig(num_users=300, search_prob=0.0)
    e1, l1 = _events_and_python_lines(base)
    e2, l2 = _events_and_python_lines(dataclasses.replace(base, mean_events=2 * base.mean_events))
    assert e2 > 1.8 * e1
    assert (l2 - l1) / (e2 - e1) < 0.5, (l1, l2, e1, e2)


def test_contract(world):
    cfg, ds = world.cfg, world.dataset
    ev = ds.events
    assert ds.name == "synthetic" and ev.has_timestamps
    assert len(ds.catalog) == len(cfg.domains) * cfg.items_per_domain
    # Events are grouped per user (user_offsets), each user with >= 3 strictly increasing timestamps.
    counts = np.diff(world.user_offsets)
    assert len(counts) == cfg.num_users and counts.min() >= 3
    assert len(np.unique(ev.user_id)) == cfg.num_users
    same_user = ev.user_id[1:] == ev.user_id[:-1]
    assert np.all(np.diff(ev.timestamp)[same_user] > 0)
    assert abs(int(ev.timestamp.min()) - cfg.start_time) < 60 * 86400
    assert set(ev.item_id) <= set(ds.catalog)
    assert np.array_equal(world.item_ids[world.event_item], ev.item_id)
    assert set(ev.domain) == set(cfg.domains)
    assert all(ds.catalog[i].domain == d for i, d in zip(ev.item_id[:500], ev.domain[:500], strict=True))
    search = ev.action == schema.ACTION_SEARCH_CLICK
    assert 0 < search.mean() < 0.5
    assert all(q and q == q.lower() and 2 <= len(q.split()) <= 3 for q in ev.query[search])
    assert all(q == "" for q in ev.query[~search])
    assert set(np.unique(ev.action)) <= {schema.ACTION_INTERACT, schema.ACTION_SEARCH_CLICK,
                                         *range(schema.ACTION_RATING_BASE + 1, schema.NUM_ACTIONS)}
    for item in ds.catalog.values():
        assert item.title and item.brand and item.categories[0] == item.domain and len(item.categories) == 3


def test_query_words_come_from_the_clicked_item(world):
    ev, cat = world.dataset.events, world.dataset.catalog
    for n in np.flatnonzero(ev.action == schema.ACTION_SEARCH_CLICK)[:300]:
        item = cat[ev.item_id[n]]
        words = set(" ".join([item.title, *item.categories]).lower().split())
        assert set(ev.query[n].split()) <= words


def test_oracle_is_the_generating_distribution(world):
    idx = np.arange(8000)
    p = synthetic.oracle_scores(world, idx)  # (n, I)
    assert p.shape == (len(idx), len(world.item_ids)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    # If items really are drawn from p, E[p(drawn item)] = E[sum_i p_i^2]; a mismatched oracle fails this.
    hit = p[np.arange(len(idx)), world.event_item[idx]]  # (n,)
    expected = (p**2).sum(axis=1)
    assert abs(hit.mean() - expected.mean()) < 4 * hit.std() / np.sqrt(len(idx))


def _hit_rate(scores: np.ndarray, targets: np.ndarray, k: int = 10) -> float:
    """Fraction of rows whose target is among the k best-scored items: scores (U, I), targets (U,)."""
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def test_learnable_structure(world):
    """Leave-one-out HR@10 over all items: the oracle and item-to-item co-occurrence beat popularity."""
    n_items, off = len(world.item_ids), world.user_offsets
    index = {item_id: i for i, item_id in enumerate(world.item_ids)}
    items = np.array([index[i] for i in world.dataset.events.item_id])  # (E,)
    test = off[1:] - 1  # (U,) each user's last event is held out
    train = np.ones(len(items), dtype=bool)
    train[test] = False
    pop = np.bincount(items[train], minlength=n_items).astype(np.float64)  # (I,)
    # Transitions between consecutive training events of one user (never across users or into a test).
    src = np.arange(len(items) - 1)
    ok = train[src] & train[src + 1] & np.isin(src + 1, off[:-1], invert=True)
    co = np.zeros((n_items, n_items))
    np.add.at(co, (items[src[ok]], items[src[ok] + 1]), 1.0)
    targets = items[test]
    hr_pop = _hit_rate(np.broadcast_to(pop, (len(test), n_items)), targets)
    hr_co = _hit_rate(co[items[test - 1]] + 1e-3 * pop / pop.max(), targets)  # popularity breaks ties
    hr_oracle = _hit_rate(synthetic.oracle_scores(world, test), targets)
    print(f"\nHR@10 popularity {hr_pop:.3f}  co-occurrence {hr_co:.3f}  oracle {hr_oracle:.3f}")
    assert hr_co >= 1.5 * hr_pop
    assert hr_oracle >= 1.5 * hr_pop
    assert hr_oracle > hr_co
