"""Requests -> model inputs -> one forward pass per micro-batch -> each request's own top-k.

    rec = Recommender(load_export(path), encoder="program")   # or "eager" / "aoti"
    answers = rec.run([rec.prepare(req), ...])                 # list of Answer, one per request, same order

`prepare` turns one validated request (raw ids) into dense model inputs, with every repair it made listed
in `warnings` (unknown ids dropped, history cut to max_len, timestamps missing). `run` encodes all of a
batch's histories in one call and ranks each against the item index with that request's own k and
exclusions, so batching never changes an answer (tests/test_serve.py checks batched == one-by-one).
`MicroBatcher` collects concurrent requests for up to max_wait_ms (or max_batch requests) and runs them
as one `run` call in a worker thread, so the event loop keeps accepting requests meanwhile.
/search (serve/search.py) reuses `prepare_events` (the history checks and repairs) and `rank` (top-k
from states), with its own eager forward pass: `encoder` ('program', 'aoti') applies to /recommend only.

Domains: a request may name its `domain` (one of config.json `domains`); an export whose model has
per-domain parameters (num_domains > 1), or that ranks within domains over several, requires it. The
domain id goes to the model per sequence (program input `domains`, or the jagged batch's `domain`), so one
micro-batch mixes domains. With `within_domain`, a request never gets an item of another domain (an item
whose items.jsonl `domain` is set and is not the request's domain's name).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from data_pipeline.collate import jagged_from_padded
from data_pipeline.schema import ACTION_INTERACT
from model.generative import beam_search
from model.seqrec import ENCODE_INPUTS
from serve.index import build_index, valid_hits
from serve.load import Export

ENCODERS = ("auto", "eager", "program", "aoti")


class RequestError(ValueError):
    """A request that cannot be answered as sent (HTTP 422); `field` names the offending field."""

    def __init__(self, field_name: str, message: str):
        self.field_name = field_name
        super().__init__(message)


@dataclass
class Prepared:
    """One request in dense form, ready for a batch."""

    items: np.ndarray  # (n,) dense ids, the most recent max_len known history items (n may be 0)
    timestamps: np.ndarray  # (n,)
    actions: np.ndarray  # (n,)
    now: int  # the request's time: the last position's "next event" time
    exclude: np.ndarray  # dense ids never returned
    k: int
    head: str = "retrieval"
    beam: int = 50
    warnings: list[str] = field(default_factory=list)
    domain: int = 0  # index into config.json domains (0 when the request named none)


@dataclass
class Answer:
    hits: list[tuple[int, float]]  # (dense id, score), best first
    fallback: str | None = None  # "popularity" when the history was empty


def _known(exp: Export, raw: list) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw ids -> (positions of the known ones, their dense ids, the unknown raw ids)."""
    dense = [exp.index_of.get(r if isinstance(r, str) else str(r)) for r in raw]
    keep = [i for i, d in enumerate(dense) if d is not None]
    unknown = [str(r) for r, d in zip(raw, dense) if d is None]
    return np.asarray(keep, dtype=np.int64), np.asarray([dense[i] for i in keep], dtype=np.int64), unknown


def _other_domain_items(exp: Export) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per domain id: the items of another domain (items.jsonl `domain` set and not this domain's name; an
    item of several domains has none and stays) as a (I+1,) bool mask and their sorted dense ids."""
    dom = np.array([""] + [r.get("domain") or "" for r in exp.items], dtype=object)  # (I+1,), row 0 padding
    masks = [(dom != "") & (dom != name) for name in exp.domains]
    return [(m, np.flatnonzero(m)) for m in masks]


class Recommender:
    def __init__(self, exp: Export, encoder: str = "program", index: str = "exact", **index_kw):
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if encoder == "auto":  # the fastest the export has: AOTI ~1.6-2x program on CPU (bench/results/serve.md)
            encoder = "aoti" if "program_aoti.pt2" in exp.record["files"] else "program"
        self.exp, self.encoder = exp, encoder
        self.program = exp.load_program(encoder) if encoder != "eager" else None
        self.index = build_index(exp.table, exp.servable, index, bias=exp.bias, **index_kw)
        self.num_servable = int(exp.servable.sum())
        self.time_bias = bool(exp.config["model"]["time_bias"])
        self.ranks = not exp.config["has_timestamps"]  # timestamps are chronological ranks
        self.domain_required = exp.num_domains > 1 or (exp.within_domain and len(exp.domains) > 1)
        self.elsewhere = _other_domain_items(exp) if exp.within_domain else None  # per domain: (mask, ids)

    # ---- one request -> dense inputs ------------------------------------------------------------------
    def prepare(self, history: list, timestamps: list[int] | None = None, now: int | None = None,
                actions: list[int] | None = None, k: int = 10, exclude_history: bool = True,
                exclude: list | None = None, head: str = "retrieval", beam: int = 50,
                domain: str | None = None) -> Prepared:
        p, _ = self.prepare_events(history, timestamps, now, actions, k, exclude_history, exclude, head, beam,
                                   domain)
        if len(p.items) > self.exp.max_len:
            n = self.exp.max_len
            p.warnings.append(f"history has {len(p.items)} known items; the most recent {n} (max_len) are used")
            p.items, p.timestamps, p.actions = p.items[-n:], p.timestamps[-n:], p.actions[-n:]
        return p

    def prepare_events(self, history: list, timestamps: list[int] | None = None, now: int | None = None,
                       actions: list[int] | None = None, k: int = 10, exclude_history: bool = True,
                       exclude: list | None = None, head: str = "retrieval", beam: int = 50,
                       domain: str | None = None) -> tuple[Prepared, np.ndarray]:
        """The checks and repairs /recommend and /search share -> (Prepared with the whole known history,
        not yet cut to max_len; positions in `history` of the known items)."""
        exp, warnings = self.exp, []
        d = self.domain_id(domain)
        for name, seq in (("timestamps", timestamps), ("actions", actions)):
            if seq is not None and len(seq) != len(history):
                raise RequestError(name, f"{name} has {len(seq)} entries, history has {len(history)}")
        self._check_k(k, head, beam)
        keep, items, unknown = _known(exp, history)
        if unknown:
            if len(keep) == 0:
                raise RequestError("history", f"none of the {len(history)} history items is in the catalogue "
                                              f"(first unknown: {unknown[:5]})")
            warnings.append(f"dropped {len(unknown)} unknown item id(s): {unknown[:10]}")
        ts = self._timestamps(timestamps, keep, len(history), warnings)
        acts = np.asarray(actions, dtype=np.int64)[keep] if actions is not None else np.full(len(keep), ACTION_INTERACT)
        now = self._now(now, ts, warnings)
        _, excluded, _ = _known(exp, exclude or [])
        if exclude_history:  # every known item sent, not only the max_len the model reads ('full' rule)
            excluded = np.concatenate([excluded, items])
        excluded = np.unique(excluded)
        if self.elsewhere is not None:  # + the other domains' items (precomputed; disjoint from the rest)
            mask, ids = self.elsewhere[d]
            excluded = np.concatenate([excluded[~mask[excluded]], ids])
        return Prepared(items, ts, acts, now, excluded, k, head, beam, warnings, domain=d), keep

    def domain_id(self, name: str | None) -> int:
        """A request's `domain` name -> its id (the index in config.json domains; 0 when none is sent).
        RequestError('domain') when it is unknown, or missing where this export needs one."""
        names = self.exp.domains
        if name is None:
            if self.domain_required:
                why = "has per-domain parameters" if self.exp.num_domains > 1 else "ranks within domains"
                raise RequestError("domain", f"this model {why}: send \"domain\", one of {names}")
            return 0
        if name not in names:
            raise RequestError("domain", f"unknown domain {name!r}; this model's domains are {names}")
        return names.index(name)

    def _check_k(self, k: int, head: str, beam: int) -> None:
        if not 1 <= k <= self.num_servable:
            raise RequestError("k", f"k must be in 1..{self.num_servable} (the servable catalogue), got {k}")
        if head == "generative":
            if self.exp.model.gen_head is None:
                raise RequestError("head", "this export has no generative head (head='retrieval' only)")
            if not k <= beam <= 1024:
                raise RequestError("beam", f"beam must be in k..1024 = {k}..1024, got {beam}")

    def _timestamps(self, timestamps, keep, n, warnings) -> np.ndarray:
        if timestamps is None:
            if self.ranks:  # what the shards hold: 0, 1, 2, ... per user
                return np.arange(n, dtype=np.int64)[keep]
            if self.time_bias and n:
                warnings.append("no timestamps: every event is placed at the request time, so the time bias "
                                "sees no gaps (send unix-second timestamps for the trained behaviour)")
            return np.full(len(keep), -1, dtype=np.int64)  # filled with `now` in _now
        ts = np.asarray(timestamps, dtype=np.int64)[keep]
        if len(ts) > 1 and (np.diff(ts) < 0).any():
            warnings.append("timestamps are not in increasing order; used as sent")
        return ts

    def _now(self, now, ts, warnings) -> int:
        if now is None:
            if self.ranks:
                now = int(ts[-1]) + 1 if len(ts) else 0
            else:
                now = int(time.time())
        if len(ts) and ts[-1] >= 0 and now < ts[-1]:
            warnings.append(f"now ({now}) is before the last timestamp ({int(ts[-1])})")
        ts[ts < 0] = now
        return int(now)

    # ---- a batch of prepared requests -> answers ------------------------------------------------------
    @torch.no_grad()
    def encode(self, reqs: list[Prepared]) -> torch.Tensor:
        """(B, D) last states of the requests' histories (each non-empty), in one forward pass."""
        lengths = torch.tensor([len(r.items) for r in reqs])
        B, N = len(reqs), int(lengths.max())
        cols = {k: torch.zeros(B, N, dtype=torch.int64) for k in ENCODE_INPUTS[:-1]}  # (B, N) each
        for b, r in enumerate(reqs):
            n = len(r.items)
            cols["item_ids"][b, :n] = torch.from_numpy(r.items)
            cols["actions"][b, :n] = torch.from_numpy(r.actions)
            cols["timestamps"][b, :n] = torch.from_numpy(r.timestamps)
            cols["next_timestamps"][b, :n] = torch.from_numpy(np.append(r.timestamps[1:], r.now))
        domains = torch.tensor([r.domain for r in reqs], dtype=torch.int64)  # (B,) may mix domains
        if self.program is not None:
            extra = (domains,) if self.exp.program_takes_domains else ()
            return self.program(*(cols[k] for k in ENCODE_INPUTS[:-1]), lengths, *extra)
        batch = jagged_from_padded(*(cols[k] for k in ENCODE_INPUTS[:-1]), lengths)
        return self.exp.model(replace(batch, domain=domains), last_only=True)

    def run(self, reqs: list[Prepared]) -> list[Answer]:
        answers: list[Answer | None] = [None] * len(reqs)
        with_history = [i for i, r in enumerate(reqs) if len(r.items)]
        for i, r in enumerate(reqs):
            if not len(r.items):
                answers[i] = self._popular(r)
        if with_history:
            sub = [reqs[i] for i in with_history]
            for i, a in zip(with_history, self.rank(self.encode(sub).float(), sub)):
                answers[i] = a
        return answers

    def rank(self, states: torch.Tensor, reqs: list) -> list[Answer]:
        """states (B, D) -> each request's own top-k (its k, exclusions and head); /search ranks here too."""
        answers: list[Answer | None] = [None] * len(reqs)
        retrieval = [j for j, r in enumerate(reqs) if r.head == "retrieval"]
        if retrieval:
            sub = [reqs[j] for j in retrieval]
            ids, scores = self.index.search(states[retrieval], max(r.k for r in sub), [r.exclude for r in sub])
            for row, (j, r) in enumerate(zip(retrieval, sub)):
                answers[j] = Answer(valid_hits(ids[row], scores[row])[:r.k])
        for j, r in enumerate(reqs):
            if r.head == "generative":
                answers[j] = self._generative(states[j:j + 1], r)
        return answers

    def _popular(self, r: Prepared) -> Answer:
        ids = self.exp.popular[~np.isin(self.exp.popular, r.exclude)][:r.k]
        counts = [self.exp.items[i - 1].get("train_count", 0) for i in ids]
        return Answer([(int(i), float(c)) for i, c in zip(ids, counts)], fallback="popularity")

    def _generative(self, state: torch.Tensor, r: Prepared) -> Answer:
        model = self.exp.model
        blocked = ~self.exp.servable[None, :]  # (1, I+1), a new tensor
        blocked[0, torch.from_numpy(r.exclude)] = True
        ids, scores = beam_search(model.gen_head, model.code_trie(), state, r.beam, r.k, blocked)
        return Answer([(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i > 0 and np.isfinite(float(s))])


class MicroBatcher:
    """Concurrent `submit(x)` calls -> `fn([x, ...])` calls of at most max_batch requests, run one at a
    time in a worker thread; results go back by position.

    A batch starts when it is full, when max_wait_ms has passed since its first request, or as soon as
    no other request is on its way: `pending()` (when given) counts the requests the server has started
    handling and not yet answered, so a lone request never waits for company that is not coming (at
    concurrency 1 a fixed 2 ms wait would be pure latency), while under load requests arriving during a
    forward pass queue up and form the next batch."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 32, max_wait_ms: float = 2.0,
                 on_batch: Callable[[int], None] | None = None, pending: Callable[[], int] | None = None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.on_batch, self.pending = on_batch, pending
        self.queue: asyncio.Queue | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")  # torch threads inside
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.pool.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, x):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0 or (self.pending is not None and self.pending() <= len(batch)):
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), timeout=left))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self.pool, self.fn, [x for x, _ in batch])
            except Exception as e:  # noqa: BLE001  every waiting request gets the error, the loop goes on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
