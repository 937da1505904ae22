"""The HTTP API over a loaded export (FastAPI; `python -m serve` runs it under uvicorn).

    POST /recommend  {history: [raw ids], timestamps?: [unix s], now?: unix s, actions?: [codes], k: 10,
                      exclude_history: true, exclude?: [raw ids], head?: "retrieval"|"generative", beam?: 50,
                      domain?: one of config.json domains (required when the export needs one: engine.py)}
                  -> {items: [{id, score, title}], model, took_ms, warnings: [...], fallback: null|"popularity",
                      domain (echoed when the request named one or the export requires it)}
    POST /search     {query, history?: [raw ids], history_queries?: [str|null], ...every /recommend field}
                  -> the /recommend answer + query_known (501: a model without query tokens; 503: --no-search)
    GET  /health, /ready, /items/{id}, /metrics (Prometheus text)

/search (serve/search.py) is the history + a query token, through the eager model (program.pt2 has no
query inputs); it shares /recommend's validation, micro-batcher and metrics. An empty or whitespace query
is a 422; one over max_query_chars is cut, with a warning.

Bad input is a 4xx naming the field, never a 5xx: JSON types are strict (a number sent as a string is
refused, not coerced), unknown fields are refused (a misspelt `exclude_histroy` would otherwise be
ignored silently), bodies over max_body_bytes get 413 before they are read.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at definition time, and
# the request models are local to make_app (their limits come from the config)
import json
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from configs.schema import ServeConfig
from data_pipeline.schema import NUM_ACTIONS
from serve.engine import MicroBatcher, Prepared, Recommender, RequestError
from serve.search import Searcher, SearchPrepared, batch_runner, make_searcher

BATCHED = ("/recommend", "/search")  # endpoints whose forward passes go through the micro-batcher
BY_CONTRACT = (501, 503)  # /search without a query path / turned off, /ready before warm-up: not faults
TIME_MAX = 1 << 42  # unix seconds (year ~141,000): anything larger is a unit mistake (ms or ns)
RawId = StrictStr | StrictInt
Timestamp = Annotated[StrictInt, Field(ge=0, le=TIME_MAX)]
Action = Annotated[StrictInt, Field(ge=0, lt=NUM_ACTIONS)]


def request_models(cfg: ServeConfig):
    """Pydantic request models with this server's limits."""
    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[RawId] = Field(max_length=cfg.max_history)
        timestamps: list[Timestamp] | None = Field(None, max_length=cfg.max_history)
        now: Timestamp | None = None
        actions: list[Action] | None = Field(None, max_length=cfg.max_history)
        k: StrictInt = 10
        exclude_history: StrictBool = True
        exclude: list[RawId] = Field(default_factory=list, max_length=cfg.max_history)
        head: Literal["retrieval", "generative"] = "retrieval"
        beam: StrictInt = 50
        domain: StrictStr | None = None

    class SearchRequest(RecommendRequest):  # every /recommend field, the same limits
        query: StrictStr
        history: list[RawId] = Field(default_factory=list, max_length=cfg.max_history)  # may be empty
        # aligned with history: the query string of an event that was a search (its item was clicked for it)
        history_queries: list[StrictStr | None] | None = Field(None, max_length=cfg.max_history)

    return RecommendRequest, SearchRequest


class Guard:
    """Pure ASGI middleware around the app (Starlette's BaseHTTPMiddleware costs ~1 ms a request here):
    413 for a body over `limit` bytes (by Content-Length, or by counting a streamed body), a 500 instead
    of a dropped connection when a handler raises, the in-flight count of /recommend requests (the
    micro-batcher reads it; /search shares the batcher), and the request / latency / error metrics."""

    def __init__(self, app, limit: int, metrics: dict, state: dict):
        self.app, self.limit, self.m, self.state = app, limit, metrics, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        counted = scope["path"] in BATCHED  # counted from before its body is read and parsed

        async def observed_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)
        self.state["in_flight"] += counted
        try:
            body = await self._read_body(scope, receive)
            await self.app(scope, _replay(body, receive), observed_send)
        except ConnectionAbortedError:
            status[0] = status[0] or 499  # nginx's code for "client closed the request"; nothing to send
        except _TooLarge:
            if not status[0]:
                status[0] = 413
                await _json(send, 413, {"detail": f"request body over {self.limit} bytes (serve max_body_bytes)"})
        except Exception as e:  # noqa: BLE001  a bug must cost one request a 500, never the server
            if not status[0]:
                status[0] = 500
                await _json(send, 500, {"detail": f"internal error: {type(e).__name__}: {e}"})
        finally:
            self.state["in_flight"] -= counted
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.m["requests"].labels(endpoint, str(status[0])).inc()
            self.m["latency"].labels(endpoint).observe(time.perf_counter() - t0)
            if status[0] >= 500 and status[0] not in BY_CONTRACT:
                self.m["errors"].labels(endpoint).inc()

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body, read here so that an oversized one is a 413 whether it came with a
        Content-Length or chunked (an exception inside the app's own body reader would be a 400)."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            raise _TooLarge
        parts, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                raise ConnectionAbortedError("client disconnected")
            parts.append(msg.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                raise _TooLarge
            more = msg.get("more_body", False)
        return b"".join(parts)


def _replay(body: bytes, receive):
    """An ASGI receive that hands the buffered body over once, then waits on the real one (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


class _TooLarge(Exception):
    pass


async def _json(send, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _metrics(registry: CollectorRegistry) -> dict:
    return dict(
        requests=Counter("unirec_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                         registry=registry),
        errors=Counter("unirec_errors", "5xx answers by endpoint", ["endpoint"], registry=registry),
        latency=Histogram("unirec_request_seconds", "request latency in the server", ["endpoint"], registry=registry,
                          buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)),
        batch=Histogram("unirec_batch_size", "requests per forward pass", registry=registry,
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
    )


def search_unavailable(rec: Recommender, cfg: ServeConfig) -> tuple[int, str]:
    """Why this server has no /search: (status, message)."""
    if not cfg.search:
        return 503, "search is turned off on this server (serve search=false / --no-search): use /recommend"
    return 501, ("search is not available: this model has no query tokens (its shards had no search events), "
                 "so it answers /recommend only")


def make_app(rec: Recommender, cfg: ServeConfig, searcher: Searcher | None = None) -> FastAPI:
    """The FastAPI app over `rec`; its lifespan starts the micro-batcher and warms the encoder up.
    `searcher`: /search's engine; None builds it here when cfg.search and the model has query tokens
    (loading the text encoder: python -m serve builds it first, to refuse to start on a mismatch)."""
    searcher = (searcher or make_searcher(rec, cfg)) if cfg.search else None
    exp, registry = rec.exp, CollectorRegistry()
    m = _metrics(registry)
    state = {"ready": False, "in_flight": 0}  # in_flight: batched requests started, not yet answered
    batcher = MicroBatcher(batch_runner(rec, searcher), cfg.max_batch, cfg.max_wait_ms, on_batch=m["batch"].observe,
                           pending=lambda: state["in_flight"])
    RecommendRequest, SearchRequest = request_models(cfg)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        first = int(exp.popular[0]) if len(exp.popular) else 1
        history, domain = [exp.items[first - 1]["item_id"]], exp.domains[0] if rec.domain_required else None
        await batcher.submit(rec.prepare(history, k=1, domain=domain))  # first call compiles/warms
        if searcher is not None:  # the eager model and (for a text model) the encoder's first call
            query = "warm-up" if searcher.encoder else exp.queries[1]
            await batcher.submit(searcher.prepare(query, history, k=1, domain=domain))
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(title="unirec serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes the offending input, which fails to serialise when it is NaN/inf
        # (Python's json reads those tokens): a 422 for bad input must never become a 500
        errors = [dict(loc=list(e.get("loc", ())), msg=e.get("msg", ""), type=e.get("type", ""),
                       input=repr(e.get("input"))[:200]) for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post("/recommend")
    async def recommend(req: RecommendRequest):
        t0 = time.perf_counter()
        try:
            prepared: Prepared = rec.prepare(**req.model_dump())
        except RequestError as e:
            return JSONResponse({"detail": [{"loc": ["body", e.field_name], "msg": str(e)}]}, status_code=422)
        answer = await batcher.submit(prepared)
        return JSONResponse(answer_body(answer, prepared, t0, req.domain))  # no jsonable_encoder pass

    def answer_body(answer, prepared, t0: float, domain: str | None) -> dict:
        items = [dict(id=exp.items[i - 1]["item_id"], score=s, title=exp.items[i - 1].get("title"))
                 for i, s in answer.hits]
        body = dict(items=items, model=exp.model_id, took_ms=round((time.perf_counter() - t0) * 1000, 3),
                    warnings=prepared.warnings, fallback=answer.fallback)
        if domain is not None or rec.domain_required:
            body["domain"] = exp.domains[prepared.domain]
        return body

    @app.post("/search")
    async def search(req: SearchRequest):
        t0 = time.perf_counter()
        if searcher is None:
            status, message = search_unavailable(rec, cfg)
            return JSONResponse({"detail": message}, status_code=status)
        try:
            prepared: SearchPrepared = searcher.prepare(**req.model_dump())
        except RequestError as e:
            return JSONResponse({"detail": [{"loc": ["body", e.field_name], "msg": str(e)}]}, status_code=422)
        answer = await batcher.submit(prepared)
        return JSONResponse(dict(answer_body(answer, prepared, t0, req.domain), query_known=prepared.query_known))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        ok = state["ready"] and batcher.running
        body = dict(ready=ok, model=exp.model_id, items=exp.num_items, servable=rec.num_servable,
                    encoder=rec.encoder, index=type(rec.index).__name__)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):  # JSON, like every other answer (Starlette: plain text)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/items/{item_id:path}")  # raw ids may contain '/' (the synthetic world's 'beauty/0')
    async def item(item_id: str):
        dense = exp.index_of.get(item_id)
        if dense is None:
            return JSONResponse({"detail": f"unknown item id {item_id!r}"}, status_code=404)
        return exp.items[dense - 1]

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Guard(app, cfg.max_body_bytes, m, state)
