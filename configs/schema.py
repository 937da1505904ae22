"""Typed configuration: one dataclass per concern, a docstring under every field.

`CHOICES` (a class attribute, not a field) lists the allowed values of a field that is one of a few
strings; the loader refuses anything else with the key and the choices, before any work starts.

The docstrings are not decoration: `configs.load.describe()` reads them (with `ast`) to print `--help`
for every key, so a field without one is a bug (tests/test_configs.py checks that).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from configs.data_schema import (  # noqa: F401  (re-exported: the data stage's configs live there)
    ContentConfig,
    ContentStageConfig,
    LoaderConfig,
    PrepareConfig,
    SearchDataConfig,
    SemanticIdConfig,
    ShardConfig,
    SyntheticConfig,
)


@dataclass
class ModelConfig:
    """The sequence encoder: embeddings -> HSTU (or SASRec) blocks -> L2-normalised states."""

    CHOICES: ClassVar[dict] = {"arch": ("hstu", "sasrec"), "layer_variant": ("research", "production"),
                                 "attention_backend": ("auto", "ref", "triton"),
                                 "item_repr": ("id", "sid", "id+sid", "id+sid+content"),
                                 "content_norm": ("none", "center", "whiten"),
                                 "cold_item_id": ("random", "zero"),
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
    id_dropout: float = 0.0
    """Training only: the chance that one occurrence of an item (an input token, a positive or a negative
    candidate) is embedded without its id part, i.e. from its codes and content alone, as a never-trained
    (cold) item always is. Content-only vectors then also appear as negatives and get pushed down, which
    cold items (never negatives) otherwise never are. Needs an item_repr with 'id' and another part."""
    cold_item_id: str = "random"
    """The id rows of the items held out of training (the shard manifest's cold items), which never get a
    gradient (never an input, a positive or a negative): 'random' (initialised like every row, norm ~.16
    at D 64, noise added to a cold item's codes + content) or 'zero' (zero, and they stay zero: a cold
    item is then embedded exactly as an id-dropped occurrence is in training, see model.id_dropout).
    Training is otherwise identical, so only the cold items' scores change."""
    content_norm: str = "none"
    """What is done to the content vectors before the learned projection: 'none'; 'center' (subtract
    their mean over the catalogue: MiniLM vectors of Amazon Beauty share one direction, mean cosine .59
    to the mean vector, so every item's content part starts out alike and cold items, never negatives,
    score high for everyone); 'whiten' (center, then ZCA-whiten, scaled to a mean norm of 1)."""
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
    content_weight_decay: float = -1.0
    """AdamW weight decay of the item code and content parts alone (every ItemEncoder's code embeddings
    and content projection): they fit the training sequences within ~7 epochs on Amazon Beauty while
    the id part improves to ~35 (issue 17). -1 = train.weight_decay, like every other parameter."""
    content_lr_mult: float = 1.0
    """Learning-rate multiplier of the same code and content parameters (1 = train.lr)."""
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
    trace_test: bool = False
    """Diagnostics: after every validation also rank the test split and measure each item part's norm
    (warm vs cold items), logged per epoch in log.jsonl as `test_trace` / `item_parts`; never used to
    select anything. Validation drops cold targets, so this is the only per-epoch view of the cold slice.
    Doubles evaluation time."""
    select_task: str = "auto"
    """Which validation metric picks the epoch: 'auto' (every target as it comes: a search target with
    its query, any other as recommendation), 'rec' (every target from the history alone) or 'search'
    (search targets only, with their query; the search-only control)."""
    cold_offset: float = 0.0
    """Added to every cold item's (manifest split_rule.cold_items) retrieval score, in evaluation and in
    the export's item index, so serving ranks as the evaluation did. It sets how often items that were
    never trained (and never negatives) enter the lists: an id+sid+content model gave them 32% of the
    Beauty top-10 slots at 0, for 4.6% of the targets (issue 17). Cosine units (a score is state . unit
    item vector); the dot-product ranking only, not the generative head's beam."""
    calibrate_cold: bool = False
    """After training, choose cold_offset on validation with no test data (train/calibrate.py): of the
    offsets -0.1..+0.1 in steps of 0.005, the one whose validation cold share@10 is closest to the cold
    items' share of the catalogue (a new item expected to be listed as often as an average one;
    validation has no cold targets, so nothing else there can choose it). Recorded in metrics.json
    (cold_offset, cold_calibration) and used by the test evaluation and the export."""


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
