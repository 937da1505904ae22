"""Typed configuration: one dataclass per concern, a docstring under every field.

The docstrings are not decoration: `configs.load.describe()` reads them (with `ast`) to print `--help`
for every key, so a field without one is a bug (tests/test_configs.py checks that).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SyntheticConfig:
    """The embedded multi-domain world that `make demo` and the tests use."""

    seed: int = 0
    """Seed of every random draw; the same seed gives byte-identical events."""
    num_users: int = 2000
    """Number of users."""
    domains: list[str] = field(default_factory=lambda: ["movies", "books", "beauty"])
    """Domain names; items are split evenly across them and every domain has its own nouns."""
    items_per_domain: int = 400
    """Items in each domain."""
    num_topics: int = 12
    """Latent topics shared across domains; each item has one main topic, each user a topic mixture."""
    mean_events: float = 30.0
    """Mean events per user (a user's count is 3 + Poisson(mean_events - 3), so every user has >= 3)."""
    search_prob: float = 0.15
    """Probability that an event is a search: a query from the chosen item's words, then the click."""
    drift: float = 0.05
    """Per-event interest drift: weight of fresh Dirichlet noise mixed into a user's topic interests."""
    topic_focus: float = 0.85
    """Probability that the next item follows the user's current interests (else a popularity draw)."""
    session_prob: float = 0.65
    """Probability that an event (after a user's first) stays on the previous event's topic: a session
    continuation, which makes item-to-item co-occurrence informative."""
    popularity_skew: float = 1.0
    """Zipf exponent of item popularity: the r-th most popular item has weight 1 / r ** popularity_skew."""
    start_time: int = 1_600_000_000
    """Unix time of the first event of the world."""


@dataclass
class ShardConfig:
    """How events become webdataset shards (`data_pipeline.write_shards`)."""

    samples_per_shard: int = 500
    """Users per .tar shard. Keep the shard count >= ranks x workers so none sits idle:
    ML-1M 6,040 users -> 13 shards, the default synthetic world 2,000 users -> 4 shards."""
    short_users: str = "train"
    """Users with < 3 events cannot give a validation and a test target: 'train' keeps all their
    events for training only (no eval target), 'drop' removes them. Both are counted in the manifest."""
    seed: int = 0
    """Seed of the user -> shard assignment (users are shuffled so shards have mixed lengths)."""


@dataclass
class LoaderConfig:
    """How shards become jagged batches (`data_pipeline.read_shards` + `collate`)."""

    batch_size: int = 128
    """Sequences per batch (per rank)."""
    max_len: int = 200
    """Keep at most this many most recent tokens of each input sequence (older ones are dropped)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; shards are split across ranks x workers."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer (0 = no sample shuffling, shard order still shuffled)."""
    seed: int = 0
    """Seed of shard and sample shuffling; epoch e uses seed + e, the same on every rank."""
    query_tokens: bool = True
    """Expand a search event into a query token followed by its clicked item token."""
    skip_bad_shards: bool = False
    """Skip (and count) a corrupt or truncated shard instead of stopping with an error."""


@dataclass
class PrepareConfig:
    """`python -m data_pipeline prepare`: raw data -> shards."""

    dataset: str = "synthetic"
    """Source format: synthetic, ml-1m, ml-100k, ml-latest-small, amazon-<category> (e.g. amazon-beauty)."""
    raw: str = ""
    """Folder with the raw files (not needed for synthetic)."""
    out: str = "shards/synthetic"
    """Output folder; written atomically (a temp folder renamed at the end)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    skip_bad_rows: bool = False
    """Skip malformed rows and report their count instead of stopping at the first one."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The synthetic world (used when dataset = synthetic)."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Shard writing."""
