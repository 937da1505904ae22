"""/search: a query string + the user's history -> a ranking of the item table, read at a query token.

    searcher = make_searcher(rec, ServeConfig())            # None when the model has no query tokens
    answers = searcher.run([searcher.prepare(query="night cream", history=[...]), ...])

A search request is the sequence offline evaluation builds for a search target (`task="search"`), made
by the same function, `data_pipeline.collate.tokenize`: every history event is an item token; a past
search (`history_queries[i]`, a string) is a query token before its clicked item, as in training
histories; then the request's query token (token type QUERY, action QUERY, at the request time `now`,
which is also the last history item's next-event time). The state at that last token is scored against
the item table exactly as /recommend scores the last history state (`Recommender.rank`: same index,
exclusions, ties, generative head).

A query string the export's vocabulary (queries.json) knows, exactly after stripping surrounding
whitespace, gets its id and the text vector the model trained with (the `query_text` row); any other
string gets query id 0 and a vector encoded on the fly by the export's text encoder, loaded once at
start-up and refused unless its files hash to config.json's `query_encoder.encoder_sha256`. An id-only
model (query_repr 'id') has no representation for an unknown string: its /search answers 422.

Search runs the eager jagged model: program.pt2 (torch.export of `encode_padded`) encodes item-only
histories and has no query inputs, so the `encoder` setting applies to /recommend only. A request's
`domain` is checked as /recommend's (`Recommender.domain_id`) and becomes its sequence's batch `domain`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from configs.schema import ContentConfig, ServeConfig
from data_pipeline import schema
from data_pipeline.collate import collate, tokenize
from data_pipeline.schema import ROW_ACTION, ROW_ITEM, ROW_QUERY, ROW_TS, SEQ_ROWS
from serve.engine import Answer, Prepared, Recommender, RequestError

CACHE_SIZE = 4096  # unseen query strings whose vectors are kept (a repeated query skips MiniLM: ~5 ms on 1 core)


class SearchSetupError(RuntimeError):
    """/search cannot be served as configured (the installed text encoder is not the export's)."""


class QueryEncoder:
    """The export's query text encoder, loaded once: a string -> (H,) float32 unit vector, computed as
    data_pipeline.queries computed the training queries (`content.pooled_vectors`: masked mean pooling,
    L2 norm; the same max_length and bf16). Each string is encoded alone, so its vector never depends
    on what else is in the batch (offline batches pad, which moves the last bits: ~1e-7)."""

    def __init__(self, record: dict, folder: str = ""):
        from configs.hardware import cpu_has_native_bf16
        from data_pipeline.content import ContentError, encoder_fingerprint, load_text_encoder, text_encoder_path
        try:
            path = text_encoder_path(ContentConfig(encoder=folder))
        except ContentError as e:
            raise SearchSetupError(f"the query text encoder is not available: {e}") from e
        got = encoder_fingerprint(path)
        if got != record["encoder_sha256"]:
            raise SearchSetupError(
                f"the query text encoder at {path} (sha256 {got[:12]}) is not the one this model was trained with "
                f"({record['encoder']}, sha256 {record['encoder_sha256'][:12]}): unseen queries would get vectors "
                "the model never saw. Install that encoder (serve text_encoder=FOLDER) or serve /recommend only "
                "(--no-search)")
        self.path, self.max_length = path, int(record["max_length"])
        self.bf16 = bool(record["bf16"]) and cpu_has_native_bf16()  # what embed_texts did on such a CPU
        self.tokenizer, self.model = load_text_encoder(path)
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, text: str) -> np.ndarray:
        vec = self.cache.get(text)
        if vec is None:
            from data_pipeline.content import pooled_vectors
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                vec = pooled_vectors(self.tokenizer, self.model, [text], self.max_length)[0].numpy()
            self.cache[text] = vec
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(text)
        return vec


@dataclass
class SearchPrepared:
    """One /search request as tokens, ready for a batch (the fields `Recommender.rank` reads included)."""

    tokens: dict[str, np.ndarray]  # tokenize()'s per-token arrays (T,), query_ids = vocabulary ids
    texts: list[tuple[int, str]]  # (token position, string): query tokens whose vector is encoded on the fly
    exclude: np.ndarray
    k: int
    head: str
    beam: int
    query_known: bool
    warnings: list[str] = field(default_factory=list)
    domain: int = 0  # index into config.json domains


class Searcher:
    def __init__(self, rec: Recommender, encoder: QueryEncoder | None, max_query_chars: int = 512):
        if max_query_chars < 1:
            raise ValueError(f"serve max_query_chars must be >= 1, got {max_query_chars}")
        self.rec, self.exp, self.encoder, self.max_chars = rec, rec.exp, encoder, max_query_chars
        self.text = getattr(self.exp.model.embed, "query_text", None)  # (Q+1, H) or None (id-only queries)
        if self.text is not None and encoder is None:
            raise ValueError("a model that reads query text needs its QueryEncoder")

    # ---- one request -> tokens ------------------------------------------------------------------------
    def prepare(self, query: str, history: list = (), history_queries: list | None = None,
                timestamps: list[int] | None = None, now: int | None = None, actions: list[int] | None = None,
                k: int = 10, exclude_history: bool = True, exclude: list | None = None, head: str = "retrieval",
                beam: int = 50, domain: str | None = None) -> SearchPrepared:
        history, warnings = list(history), []
        text = self._clean(query, "query", warnings)
        if history_queries is not None and len(history_queries) != len(history):
            raise RequestError("history_queries", f"history_queries has {len(history_queries)} entries, history "
                                                  f"has {len(history)} (null for an event that was not a search)")
        p, keep = self.rec.prepare_events(history, timestamps, now, actions, k, exclude_history, exclude, head, beam,
                                          domain)
        p.warnings[:0] = warnings
        warnings = p.warnings
        if text not in self.exp.query_of and self.text is None:
            raise RequestError("query", f"query {text[:80]!r} is not one of this model's {len(self.exp.queries) - 1} "
                                        "training queries, and it knows queries only by id (query_repr 'id'): it has "
                                        "no representation for a new one")
        past = [history_queries[i] for i in keep] if history_queries is not None else [None] * len(keep)
        past = self._past_queries(past, warnings)
        if actions is None:  # the shards' action of an item clicked after a query
            searched = np.array([q is not None for q in past], dtype=bool)
            p.actions = np.where(searched, schema.ACTION_SEARCH_CLICK, schema.ACTION_INTERACT).astype(np.int64)
        tokens, texts = self._tokens(p, past, text)
        return SearchPrepared(tokens, texts, p.exclude, k, head, beam, text in self.exp.query_of, warnings,
                              domain=p.domain)

    def _clean(self, query: str, name: str, warnings: list[str]) -> str:
        text = query.strip()
        if not text:
            raise RequestError(name, f"{name} is empty or only whitespace")
        if len(text) > self.max_chars:
            warnings.append(f"{name} has {len(text)} characters; the first {self.max_chars} (max_query_chars) are used")
            text = text[:self.max_chars].rstrip()
        return text

    def _past_queries(self, past: list, warnings: list[str]) -> list[str | None]:
        """history_queries of the known events -> cleaned strings or None; an id-only model cannot read an
        unknown past query, so that event stays an item event (with a warning)."""
        out, dropped = [], []
        for q in past:
            q = None if q is None else self._clean(q, "history_queries", warnings)
            if q is not None and self.text is None and q not in self.exp.query_of:
                dropped.append(q)
                q = None
            out.append(q)
        if dropped:
            warnings.append(f"{len(dropped)} past quer(ies) unknown to this id-only query model were sent as item "
                            f"events without their query: {[q[:40] for q in dropped[:5]]}")
        return out

    def _tokens(self, p: Prepared, past: list[str | None], text: str) -> tuple[dict, list[tuple[int, str]]]:
        """The request's events -> tokenize()'s tokens; query strings travel as request-local ids 1..S
        through tokenize (it only asks "> 0"), then become vocabulary ids (0 when unknown)."""
        strings = list(dict.fromkeys([q for q in past if q is not None] + [text]))  # local id = index + 1
        local = {s: i + 1 for i, s in enumerate(strings)}
        hist = np.zeros((len(SEQ_ROWS), len(p.items)), dtype=np.int64)  # (5, n); domain row 0: not read
        hist[ROW_ITEM], hist[ROW_TS], hist[ROW_ACTION] = p.items, p.timestamps, p.actions
        hist[ROW_QUERY] = [local[q] if q is not None else 0 for q in past]
        target = np.zeros(len(SEQ_ROWS), dtype=np.int64)  # the query event: no item, at the request time
        target[ROW_TS], target[ROW_ACTION], target[ROW_QUERY] = p.now, schema.ACTION_QUERY, local[text]
        total = len(p.items) + sum(q is not None for q in past) + 1
        if total > self.exp.max_len:
            p.warnings.append(f"history + query make {total} tokens (a past search is 2); the most recent "
                              f"{self.exp.max_len} (max_len) are used")
        tok = tokenize(hist, target, query_tokens=True, max_len=self.exp.max_len)
        vocab = np.array([0] + [self.exp.query_of.get(s, 0) for s in strings], dtype=np.int64)
        texts = [(int(t), strings[tok["query_ids"][t] - 1]) for t in np.flatnonzero(tok["query_ids"])
                 if vocab[tok["query_ids"][t]] == 0]
        tok["query_ids"] = vocab[tok["query_ids"]]
        return tok, texts

    # ---- a batch of prepared searches -> answers ------------------------------------------------------
    @torch.no_grad()
    def encode(self, reqs: list[SearchPrepared]) -> torch.Tensor:
        """(B, D) states at each request's query token, one eager jagged forward pass."""
        batch = collate([dict(r.tokens, domain=r.domain, user=0) for r in reqs])  # batch.domain: (B,) mixed
        if self.text is not None:  # the text path reads these rows: stored ones, and encoded unknown queries
            vecs = self.text[batch.query_ids]  # (L, H), a copy; row 0 (item tokens) zeros
            start = 0
            for r in reqs:
                for t, s in r.texts:
                    vecs[start + t] = torch.from_numpy(self.encoder(s))
                start += len(r.tokens["item_ids"])
            batch.query_vectors = vecs
        return self.exp.model(batch, last_only=True)

    def run(self, reqs: list[SearchPrepared]) -> list[Answer]:
        return self.rec.rank(self.encode(reqs).float(), reqs)


def make_searcher(rec: Recommender, cfg: ServeConfig) -> Searcher | None:
    """The /search engine of `rec`'s export, or None (search turned off, or a model without query tokens).
    Loads and checks the text encoder here, once; raises SearchSetupError when it is not the export's."""
    if not cfg.search or not rec.exp.has_queries:
        return None
    record = rec.exp.query_encoder
    encoder = QueryEncoder(record, cfg.text_encoder) if record is not None else None
    return Searcher(rec, encoder, cfg.max_query_chars)


def batch_runner(rec: Recommender, searcher: Searcher | None) -> Callable[[list], list[Answer]]:
    """One MicroBatcher function for both endpoints: a micro-batch may mix /recommend and /search requests;
    each kind runs its own forward pass, in one worker thread, so the two never compete for the cores."""
    def run(reqs: list) -> list[Answer]:
        out: list[Answer | None] = [None] * len(reqs)
        for kind, fn in ((Prepared, rec.run), (SearchPrepared, searcher.run if searcher else None)):
            idx = [i for i, r in enumerate(reqs) if isinstance(r, kind)]
            if idx:
                for i, a in zip(idx, fn([reqs[i] for i in idx])):
                    out[i] = a
        return out
    return run
