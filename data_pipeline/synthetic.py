"""The embedded synthetic multi-domain world: events with learnable structure, plus the latent truth.

Generative story (mirrored exactly by `oracle_scores`, so the oracle is the Bayes-optimal ranker):
  items: one main topic each, Zipf popularity, text built from the topic's words;
  users: a Dirichlet topic interest (few dominant topics) that drifts after every event, and a domain mix;
  event: with prob `session_prob` (not for a user's first event) keep the previous event's topic, else
  with prob `topic_focus` draw a topic from the current interest, else draw an item by global popularity.
  A topic-driven event then picks a domain ~ the user's mix (among domains holding that topic) and an
  item in that (domain, topic) cell by popularity.
Users are simulated in lock-step (one numpy step per event position) so the default world takes < 1 s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from configs.schema import SyntheticConfig
from data_pipeline import schema

_GENRES = ("space mystery romance history wellness fantasy horror comedy travel cooking sports music "
           "science nature crime family art gardening ocean war").split()
_WORDS = ("vintage cosmic silent golden hidden wild urban bright dark gentle rapid ancient modern secret "
          "lost frozen burning velvet crystal shadow lunar solar northern coastal royal rustic electric "
          "quiet bold tender savage lucky broken endless crimson emerald silver iron paper glass stone "
          "river forest desert island mountain city garden kitchen harbor castle empire galaxy planet "
          "storm winter summer autumn spring midnight dawn twilight echo dream journey legend story "
          "voyage secret mirror orchard lantern compass anchor feather thunder meadow canyon glacier "
          "signal rocket engine detective witness letter promise ritual harvest festival carnival "
          "classic deluxe compact gentle organic herbal floral citrus matte glossy nourishing daily "
          "pocket grand little hollow radiant scarlet amber cobalt ivory jade copper marble velvet "
          "starlit misty sunny stormy wandering forgotten broken brave clever curious fearless "
          "humble loyal noble proud restless serene swift wicked wise cozy crisp fresh smoky spicy "
          "sweet bitter tropical arctic alpine prairie valley lagoon meteor nebula comet orbit").split()
_SYLLABLES = "ka lo mi ren ta vo su el an ri ne do pa sel mor tin va qua ber lu zen cor fi".split()
_DOMAIN_NOUNS = {"movies": ["film", "movie", "feature", "documentary"],
                 "books": ["novel", "book", "memoir", "anthology"],
                 "beauty": ["serum", "cream", "lotion", "palette"],
                 "music": ["album", "record", "single", "mixtape"],
                 "games": ["game", "adventure", "simulator", "puzzle"]}
TITLE_WORDS, SUBCATS, BRANDS = 8, 3, 3  # words per topic: title vocabulary, sub-categories, brands
INTEREST_ALPHA = 0.15  # Dirichlet concentration of interests and of drift noise: small -> few topics
DOMAIN_ALPHA = 0.7  # Dirichlet concentration of a user's domain mix
RATED_PROB = 0.8  # a non-search event is a rating with this prob, else an unrated interaction
SESSION_GAP_S, BREAK_GAP_S, MAX_OFFSET_S = 600.0, 1.5 * 86400.0, 30 * 86400  # mean gaps, user offsets


@dataclass
class World:
    """A generated dataset plus the latent truth behind it. Item indices follow `item_ids` order."""

    dataset: schema.Dataset
    cfg: SyntheticConfig
    topic_names: list[str]
    item_ids: np.ndarray  # (I,) object: raw item id per item index
    item_domain: np.ndarray  # (I,) int64: index into cfg.domains
    item_topic: np.ndarray  # (I,) int64: main latent topic
    item_pop: np.ndarray  # (I,) float64: global popularity, sums to 1
    item_cell_prob: np.ndarray  # (I,) float64: P(item | its (domain, topic) cell), sums to 1 per cell
    user_domain_mix: np.ndarray  # (U, D) float64: a user's domain preference
    user_offsets: np.ndarray  # (U + 1,) int64: user u's events are [offsets[u], offsets[u + 1])
    event_user: np.ndarray  # (E,) int64: user index, aligned with dataset.events
    event_item: np.ndarray  # (E,) int64: item index
    event_interest: np.ndarray  # (E, T) float32: the user's topic interest when the event was drawn


def _sample_rows(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise categorical draw: weights (N, K) >= 0, uniforms u (N,) -> (N,) column indices."""
    c = np.cumsum(weights, axis=1)
    idx = (c < u[:, None] * c[:, -1:]).sum(axis=1)
    return np.minimum(idx, weights.shape[1] - 1)  # float round-off can push u * total past the last bin


def _unique_words(pool: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """n distinct words: the pool shuffled first, then made-up syllable words once it runs out."""
    pool = list(dict.fromkeys(pool))  # a repeated pool word must not give two topics the same word
    words = [pool[i] for i in rng.permutation(len(pool))][:n]
    seen = set(words)
    while len(words) < n:
        w = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _domain_given_topic(domain_mix: np.ndarray, has_cell: np.ndarray) -> np.ndarray:
    """P(domain | topic, user): (n, D) mix x (D, T) cell-nonempty mask -> (n, D, T), columns sum to 1."""
    p = domain_mix[:, :, None] * has_cell[None]
    return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)


def _make_items(cfg: SyntheticConfig, rng: np.random.Generator):
    """Item structure: (domain, topic, pop, cell_prob) arrays (I,), plus the per-topic vocabulary."""
    d, t, n = len(cfg.domains), cfg.num_topics, len(cfg.domains) * cfg.items_per_domain
    if n < t:
        raise ValueError(f"{n} items cannot cover {t} topics; raise items_per_domain")
    domain = np.repeat(np.arange(d), cfg.items_per_domain)
    topic = rng.permutation(np.arange(n) % t)  # round robin first, so every topic has >= 1 item
    pop = (rng.permutation(n) + 1.0) ** -cfg.popularity_skew
    pop /= pop.sum()
    cell = domain * t + topic
    cell_prob = pop / np.bincount(cell, weights=pop, minlength=d * t)[cell]
    names = (_GENRES[:t] if t <= len(_GENRES) else _unique_words(_GENRES, t, rng))
    words = _unique_words(_WORDS, t * (TITLE_WORDS + SUBCATS), rng)
    brands = [w.capitalize() for w in _unique_words([], t * BRANDS, rng)]
    vocab = [(words[k * TITLE_WORDS:(k + 1) * TITLE_WORDS],
              words[t * TITLE_WORDS + k * SUBCATS:t * TITLE_WORDS + (k + 1) * SUBCATS],
              brands[k * BRANDS:(k + 1) * BRANDS]) for k in range(t)]
    return domain, topic, pop, cell_prob, list(names), vocab


def _make_catalog(cfg, domain, topic, names, vocab, rng) -> tuple[dict, list]:
    """Text per item from its topic's words -> (catalog, per-item query word lists)."""
    catalog, query_words = {}, []
    for i, (d, k) in enumerate(zip(domain, topic, strict=True)):
        dom = cfg.domains[d]
        title_vocab, subcats, brands = vocab[k]
        picked = [title_vocab[j] for j in rng.permutation(TITLE_WORDS)[:int(rng.integers(2, 4))]]
        noun = str(rng.choice(_DOMAIN_NOUNS.get(dom, [dom.rstrip("s") or dom])))
        sub = str(rng.choice(subcats))
        item_id = f"{dom}/{i - d * cfg.items_per_domain}"
        catalog[item_id] = schema.Item(
            item_id=item_id, domain=dom, title=" ".join(picked + [noun]),
            categories=[dom, names[k], sub], brand=str(rng.choice(brands)),
            description=f"A {sub} {names[k]} {noun} about {picked[0]} things.")
        words = " ".join([*picked, noun, dom, names[k], sub]).lower().split()
        query_words.append(list(dict.fromkeys(words)))  # dedupe, keep title order
    return catalog, query_words


def _simulate(cfg, n_events, item_domain, item_topic, pop, cell_prob, rng):
    """Lock-step simulation of all users -> items (L, U), stays (L, U), interests (L, U, T), domain mix."""
    n_users, t, d = len(n_events), cfg.num_topics, len(cfg.domains)
    has_cell = np.zeros((d, t), dtype=bool)
    has_cell[item_domain, item_topic] = True
    # Items sorted by cell; cumulative cell_prob makes cell r (in sorted order) span (r, r + 1].
    order = np.lexsort((np.arange(len(pop)), item_domain * t + item_topic))
    cell_cdf = np.cumsum(cell_prob[order])
    cell_sorted = (item_domain * t + item_topic)[order]
    cell_start = np.searchsorted(cell_sorted, np.arange(d * t))  # (D*T,)
    cell_end = np.searchsorted(cell_sorted, np.arange(d * t), side="right")
    cell_rank = np.cumsum(has_cell.reshape(-1)) - 1  # (D*T,) index among non-empty cells
    pop_cdf = np.cumsum(pop)

    interest = rng.dirichlet(np.full(t, INTEREST_ALPHA), n_users)  # (U, T)
    domain_mix = rng.dirichlet(np.full(d, DOMAIN_ALPHA), n_users)  # (U, D)
    steps = int(n_events.max())
    items = np.zeros((steps, n_users), dtype=np.int64)
    stays = np.zeros((steps, n_users), dtype=bool)
    snaps = np.zeros((steps, n_users, t), dtype=np.float32)
    prev_topic = np.full(n_users, -1)
    rows = np.arange(n_users)
    p_dom = _domain_given_topic(domain_mix, has_cell)  # (U, D, T)
    for s in range(steps):
        snaps[s] = interest
        u = rng.random((6, n_users))
        stay = (prev_topic >= 0) & (u[0] < cfg.session_prob)
        by_topic = stay | (u[1] < cfg.topic_focus)
        topic = np.where(stay, prev_topic, _sample_rows(interest, u[2]))
        dom = _sample_rows(p_dom[rows, :, topic], u[3])
        cell = dom * t + topic
        k = np.searchsorted(cell_cdf, cell_rank[cell] + u[4], side="right")
        in_cell = order[np.clip(k, cell_start[cell], cell_end[cell] - 1)]  # clip: float round-off
        by_pop = np.minimum(np.searchsorted(pop_cdf, u[5] * pop_cdf[-1], side="right"), len(pop) - 1)
        items[s] = np.where(by_topic, in_cell, by_pop)
        stays[s] = stay
        prev_topic = item_topic[items[s]]
        noise = rng.dirichlet(np.full(t, INTEREST_ALPHA), n_users)
        interest = (1.0 - cfg.drift) * interest + cfg.drift * noise  # drift toward fresh noise
    return items, stays, snaps, domain_mix


def _queries(items: np.ndarray, query_words: list, rng: np.random.Generator) -> np.ndarray:
    """2-3 random words of each searched item's title/category words, in title order -> (S,) object."""
    lens = np.array([len(query_words[i]) for i in items], dtype=np.int64)  # (S,)
    keys = rng.random((len(items), int(lens.max(initial=1))))  # (S, W)
    keys[np.arange(keys.shape[1])[None, :] >= lens[:, None]] = np.inf  # padding slots rank last
    rank = np.argsort(np.argsort(keys, axis=1), axis=1)  # (S, W): rank of each word slot
    chosen = rank < np.minimum(rng.integers(2, 4, len(items)), lens)[:, None]
    return np.asarray([" ".join(query_words[i][j] for j in np.flatnonzero(chosen[n]))
                       for n, i in enumerate(items)], dtype=object)


def _actions(cfg, topics, snaps, is_search, rng) -> np.ndarray:
    """(E,) action codes: search click, else a rating that grows with interest in the item's topic."""
    n = len(topics)
    match = snaps[np.arange(n), topics] / snaps.max(axis=1)  # (E,) in [0, 1]
    stars = np.clip(np.rint(1.5 + 3.5 * match + rng.normal(0.0, 0.75, n)), 1, 5).astype(np.int64)
    rated = rng.random(n) < RATED_PROB
    act = np.where(rated, schema.ACTION_RATING_BASE + stars, schema.ACTION_INTERACT)
    return np.where(is_search, schema.ACTION_SEARCH_CLICK, act).astype(np.int64)


def generate(cfg: SyntheticConfig | None = None) -> World:
    """Build the world for `cfg` (default config if None). Same seed -> identical events."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    domain, topic, pop, cell_prob, names, vocab = _make_items(cfg, rng)
    catalog, query_words = _make_catalog(cfg, domain, topic, names, vocab, rng)
    item_ids = np.asarray(list(catalog), dtype=object)
    n_events = 3 + rng.poisson(max(cfg.mean_events - 3.0, 0.0), cfg.num_users)  # (U,)
    items, stays, snaps, domain_mix = _simulate(cfg, n_events, domain, topic, pop, cell_prob, rng)
    # Session continuations come minutes apart, other events hours to days apart.
    gaps = 1 + rng.exponential(np.where(stays, SESSION_GAP_S, BREAK_GAP_S)).astype(np.int64)  # (L, U)
    ts = cfg.start_time + rng.integers(0, MAX_OFFSET_S, cfg.num_users)[None, :] + np.cumsum(gaps, 0)
    is_search = rng.random(items.shape) < cfg.search_prob  # (L, U)
    # (L, U) step-major -> (E,) user-major: user u's events are contiguous and in time order.
    live = (np.arange(items.shape[0])[:, None] < n_events[None, :]).T  # (U, L)
    ev_item, ev_ts, ev_search = items.T[live], ts.T[live], is_search.T[live]
    ev_snap = snaps.transpose(1, 0, 2)[live]  # (E, T)
    ev_user = np.repeat(np.arange(cfg.num_users), n_events)
    query = np.full(len(ev_item), "", dtype=object)
    query[ev_search] = _queries(ev_item[ev_search], query_words, rng)
    events = schema.Events(
        user_id=np.asarray([f"u{u}" for u in range(cfg.num_users)], dtype=object)[ev_user],
        item_id=item_ids[ev_item], timestamp=ev_ts.astype(np.int64),
        action=_actions(cfg, topic[ev_item], ev_snap, ev_search, rng),
        domain=np.asarray(cfg.domains, dtype=object)[domain[ev_item]], query=query)
    notes = [(f"synthetic world: seed {cfg.seed}, {cfg.num_users} users, {len(item_ids)} items, "
              f"{len(events)} events, {int(ev_search.sum())} searches")]
    return World(schema.Dataset("synthetic", events, catalog, notes=notes), cfg, names, item_ids,
                 domain, topic, pop, cell_prob, domain_mix,
                 np.concatenate([[0], np.cumsum(n_events)]).astype(np.int64), ev_user, ev_item, ev_snap)


def oracle_scores(world: World, events) -> np.ndarray:
    """True P(item) for each given event index, from the latent state just before it -> (n, I).

    Mirrors `_simulate` term by term, so ranking by it is the best any model can do.
    """
    cfg, idx = world.cfg, np.atleast_1d(np.asarray(events, dtype=np.int64))  # (n,)
    users = world.event_user[idx]
    first = idx == world.user_offsets[users]
    prev_topic = np.where(first, -1, world.item_topic[world.event_item[np.maximum(idx - 1, 0)]])
    has_cell = np.zeros((len(cfg.domains), cfg.num_topics), dtype=bool)
    has_cell[world.item_domain, world.item_topic] = True
    p_dom = _domain_given_topic(world.user_domain_mix[users], has_cell)  # (n, D, T)
    in_cell = p_dom[:, world.item_domain, world.item_topic] * world.item_cell_prob  # (n, I) P(i | topic)
    interest = world.event_interest[idx].astype(np.float64)
    interest /= interest.sum(axis=1, keepdims=True)
    focus = interest[:, world.item_topic] * in_cell  # (n, I)
    stay = (world.item_topic[None, :] == prev_topic[:, None]) * in_cell  # (n, I); all 0 if first
    s = np.where(first, 0.0, cfg.session_prob)[:, None]
    f = cfg.topic_focus
    return s * stay + (1.0 - s) * (f * focus + (1.0 - f) * world.item_pop[None, :])
