"""Examples -> tokens -> jagged batches (values + offsets, no padding), and the DataLoader around them.

Tokens: every event is an item token; with `query_tokens`, a search event becomes a query token followed
by its clicked item token, so search is "history + query token -> next item" and recommendation is
"history -> next item", with one model and one item space. When the evaluated target is a search event,
its query token is appended to the history: the model sees the query, never the clicked item.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from configs.schema import LoaderConfig
from data_pipeline import schema
from data_pipeline.read_shards import load_manifest, read_shards
from data_pipeline.schema import ROW_ACTION, ROW_DOMAIN, ROW_ITEM, ROW_QUERY, ROW_TS

TOKEN_FIELDS = ("item_ids", "query_ids", "timestamps", "next_timestamps", "actions", "token_types",
                "domains", "targets")


@dataclass
class JaggedBatch:
    """B sequences, L tokens in total. Per-token fields are (L,) int64 in sequence order."""

    item_ids: torch.Tensor  # (L,) dense item id, 0 on query tokens
    query_ids: torch.Tensor  # (L,) query id on query tokens, 0 elsewhere
    timestamps: torch.Tensor  # (L,) event time (or chronological rank without timestamps)
    next_timestamps: torch.Tensor  # (L,) time of the next event, the request time known when predicting
    actions: torch.Tensor  # (L,) ACTION_* code
    token_types: torch.Tensor  # (L,) TOKEN_ITEM / TOKEN_QUERY
    domains: torch.Tensor  # (L,) domain id of each token's event
    targets: torch.Tensor  # (L,) next item id to predict at each token, 0 = no target
    offsets: torch.Tensor  # (B+1,) sequence b is tokens offsets[b]:offsets[b+1]
    domain: torch.Tensor  # (B,) domain of the sequence's predicted event
    user: torch.Tensor  # (B,) dense user index
    target_query: torch.Tensor | None = None  # (B,) query id of the predicted event (0 = a recommendation target)
    # evaluation splits only: jagged (seen, seen_offsets) = every item of each user's history before the
    # target, not cut to max_len (the exclude_history='full' rule); None in training batches
    seen: torch.Tensor | None = None  # (H,)
    seen_offsets: torch.Tensor | None = None  # (B+1,)
    # serving only: (L, H) text vectors of query tokens encoded at request time (a query string the
    # export's vocabulary lacks); when given, the query-text path reads these rows instead of the buffer
    query_vectors: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]  # (B,)

    def to(self, device) -> JaggedBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return JaggedBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def jagged_from_padded(item_ids: torch.Tensor, actions: torch.Tensor, timestamps: torch.Tensor,
                       next_timestamps: torch.Tensor, lengths: torch.Tensor) -> JaggedBatch:
    """Right-padded item-only histories (B, N) + lengths (B,) -> the JaggedBatch of the same tokens (no
    queries, no targets): what the model's jagged path reads for the padded inputs of encode_padded."""
    B, N = item_ids.shape
    valid = torch.arange(N)[None, :] < lengths[:, None]  # (B, N)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    z = torch.zeros(int(lengths.sum()), dtype=torch.long)
    return JaggedBatch(item_ids=item_ids[valid], query_ids=z, timestamps=timestamps[valid],
                       next_timestamps=next_timestamps[valid], actions=actions[valid], token_types=z, domains=z,
                       targets=z, offsets=offsets, domain=torch.zeros(B, dtype=torch.long), user=torch.arange(B),
                       target_query=torch.zeros(B, dtype=torch.long))


def tokenize(history: np.ndarray, target: np.ndarray | None, query_tokens: bool, max_len: int,
             append_query: bool = True) -> dict:
    """History events (5, h) [+ target event (5,)] -> per-token arrays (T,), the last max_len tokens.
    With `append_query` (and query_tokens), a search target's query token ends the sequence."""
    h = history.shape[1]
    is_q = (history[ROW_QUERY] > 0) if query_tokens else np.zeros(h, dtype=bool)  # (h,)
    item_pos = np.cumsum(1 + is_q) - 1  # (h,) token index of each event's item token
    T = h + int(is_q.sum())
    q_pos = item_pos[is_q] - 1
    # next item / next time after each event; after the last history event comes the target (if any)
    tgt_item = int(target[ROW_ITEM]) if target is not None else 0
    tgt_ts = int(target[ROW_TS]) if target is not None else (int(history[ROW_TS, -1]) if h else 0)
    next_item = np.append(history[ROW_ITEM, 1:], tgt_item)  # (h,)
    next_ts = np.append(history[ROW_TS, 1:], tgt_ts)  # (h,)

    tok = {k: np.zeros(T, dtype=np.int64) for k in TOKEN_FIELDS}
    for key, row in (("timestamps", ROW_TS), ("domains", ROW_DOMAIN)):
        tok[key][item_pos] = history[row]
        tok[key][q_pos] = history[row, is_q]
    tok["item_ids"][item_pos] = history[ROW_ITEM]
    tok["actions"][item_pos] = history[ROW_ACTION]
    tok["targets"][item_pos] = next_item
    tok["next_timestamps"][item_pos] = next_ts
    tok["query_ids"][q_pos] = history[ROW_QUERY, is_q]
    tok["actions"][q_pos] = schema.ACTION_QUERY
    tok["token_types"][q_pos] = schema.TOKEN_QUERY
    tok["targets"][q_pos] = history[ROW_ITEM, is_q]  # a query token predicts the item clicked for it
    tok["next_timestamps"][q_pos] = history[ROW_TS, is_q]
    if target is not None and query_tokens and append_query and target[ROW_QUERY] > 0:
        q = dict(item_ids=0, query_ids=target[ROW_QUERY], timestamps=tgt_ts, next_timestamps=tgt_ts,
                 actions=schema.ACTION_QUERY, token_types=schema.TOKEN_QUERY, domains=target[ROW_DOMAIN],
                 targets=tgt_item)
        # the last history item keeps the clicked item as its target, as inside training histories
        tok = {k: np.append(v, q[k]) for k, v in tok.items()}
    return {k: v[-max_len:] for k, v in tok.items()}


EVAL_TASKS = ("auto", "rec", "search", "query_only")


def example_to_tokens(ex: dict, query_tokens: bool, max_len: int, task: str = "auto") -> dict | None:
    """A read_shards example -> tokens + per-sequence fields; None when it has nothing to predict.

    `task` says how an evaluation target is posed: 'auto' (a search target with its query token, any
    other as recommendation), 'rec' (history only, every target), 'search' (search targets only, history
    + query token) or 'query_only' (search targets only, the query token alone: no personalisation; the
    history still decides which items are excluded from the ranking). Without query_tokens a search
    target is posed without its query (a rec-only model cannot read it)."""
    target, history = ex["target"], ex["history"]
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")
    if task in ("search", "query_only"):
        if target is None or target[ROW_QUERY] == 0:
            return None
        if task == "query_only":
            history = history[:, :0]
    tok = tokenize(history, target, query_tokens, max_len, append_query=task != "rec")
    if not (tok["targets"] > 0).any():
        return None  # e.g. a one-event training history: no next item inside it
    if ex["target"] is not None:
        dom = int(ex["target"][ROW_DOMAIN])
    else:
        dom = int(ex["history"][ROW_DOMAIN, -1])
    tok["domain"], tok["user"] = dom, ex["user"]
    tok["target_query"] = int(ex["target"][ROW_QUERY]) if ex["target"] is not None else 0
    if "seen" in ex:
        tok["seen"] = ex["seen"]
    return tok


def collate_packed(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Token dicts -> three tensors: per-token fields stacked (8, L), offsets (B+1,), (domain, user,
    target query) (3, B).

    Packed because a DataLoader worker ships every tensor through its own shared-memory segment: with
    eleven tensors per batch the transfer, not the reading, bounded the loader (ML-1M, 48 batches/epoch:
    1.1 s with 1 worker vs 0.5 s in-process; measured here)."""
    lengths = [len(s["item_ids"]) for s in samples]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.from_numpy(np.cumsum(lengths))
    tokens = np.stack([np.concatenate([s[k] for s in samples]) for k in TOKEN_FIELDS])  # (8, L)
    per_seq = np.array([[s["domain"] for s in samples], [s["user"] for s in samples],
                        [s.get("target_query", 0) for s in samples]], dtype=np.int64)
    out = dict(tokens=torch.from_numpy(tokens), offsets=offsets, per_seq=torch.from_numpy(per_seq))
    if all("seen" in s for s in samples):
        out["seen_offsets"] = torch.zeros(len(samples) + 1, dtype=torch.int64)
        out["seen_offsets"][1:] = torch.from_numpy(np.cumsum([len(s["seen"]) for s in samples]))
        out["seen"] = torch.from_numpy(np.concatenate([s["seen"] for s in samples]).astype(np.int64))
    return out


def unpack(packed: dict[str, torch.Tensor]) -> JaggedBatch:
    """The packed tensors -> JaggedBatch of views (no copy)."""
    tok = packed["tokens"]
    return JaggedBatch(**{k: tok[i] for i, k in enumerate(TOKEN_FIELDS)}, offsets=packed["offsets"],
                       domain=packed["per_seq"][0], user=packed["per_seq"][1], target_query=packed["per_seq"][2],
                       seen=packed.get("seen"),
                       seen_offsets=packed.get("seen_offsets"))


def collate(samples: list[dict]) -> JaggedBatch:
    """Token dicts -> one JaggedBatch: values concatenated, offsets = cumulative lengths."""
    return unpack(collate_packed(samples))


def random_window(history: np.ndarray, max_len: int, prob: float, rng: np.random.Generator) -> np.ndarray:
    """A training history (5, n) -> its most recent max_len events, or with probability `prob` (when
    n > max_len) the max_len events ending at a uniformly drawn position in [max_len, n]."""
    n = history.shape[1]
    if n <= max_len or prob <= 0 or rng.random() >= prob:
        return history
    end = int(rng.integers(max_len, n + 1))
    return history[:, end - max_len:end]


def domain_ids(shard_dir: str | Path, names: list[str]) -> set[int] | None:
    """LoaderConfig.domains (names) -> their ids in the shard set's manifest; None = keep every domain."""
    if not names:
        return None
    known = load_manifest(shard_dir)["id_maps"]["domains"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"data.domains: unknown domain(s) {unknown}; {shard_dir} has {known}")
    return {known.index(n) for n in names}


def _tokens_stage(cfg: LoaderConfig, split: str, epoch: int, task: str, keep: set[int] | None = None):
    windows = split == "train" and cfg.random_window > 0

    def stage(src):
        for ex in src:
            if windows:  # seeded per (seed, epoch, user): the same on any rank/worker split
                rng = np.random.default_rng([cfg.seed, epoch, ex["user"]])
                ex = {**ex, "history": random_window(ex["history"], cfg.max_len, cfg.random_window, rng)}
            tok = example_to_tokens(ex, cfg.query_tokens, cfg.max_len, task)
            if tok is not None and (keep is None or tok["domain"] in keep):
                yield tok
    return stage


def make_loader(shard_dir: str | Path, split: str, cfg: LoaderConfig, epoch: int = 0,
                shuffle: bool | None = None, task: str = "auto") -> Iterator[JaggedBatch]:
    """JaggedBatches for one epoch of `split`; rank and world size come from the environment
    (RANK, WORLD_SIZE, as set by torchrun and the deepspeed launcher) or torch.distributed.
    `task` (evaluation splits): how each target is posed, see `example_to_tokens`."""
    if split == "train" and task != "auto":
        raise ValueError(f"task={task!r} poses evaluation targets; the train split has none")
    keep = domain_ids(shard_dir, cfg.domains)  # a bad name fails here, before any worker starts
    pipe = read_shards(shard_dir, split, cfg, epoch, shuffle)
    pipe.append(_tokens_stage(cfg, split, epoch, task, keep))
    pipe.append(wds.batched(cfg.batch_size, collation_fn=collate_packed, partial=True))
    # its own generator: a DataLoader iterator otherwise draws its base seed from torch's global RNG, so
    # validating an epoch would shift the dropout masks of every later training step (the pipeline's own
    # randomness is seeded by (seed, epoch) above; the base seed only seeds worker processes' torch RNG)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=cfg.num_workers,
                                         persistent_workers=False, pin_memory=False, generator=gen)
    return (unpack(packed) for packed in loader)
