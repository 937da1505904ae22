"""serve/: the HTTP API over the tiny export (tests/conftest.py) answers what the engine computes, keeps its
semantics (exclusions, cold items, unknown ids, max_len, popularity fallback), refuses every bad input
with a 4xx naming the field and stays sound afterwards, batches concurrent requests without mixing their
answers, refuses to start on a damaged export, and its faiss index agrees with the exact one when every
list is probed."""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")  # FastAPI's TestClient and the end-to-end client
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from configs.schema import ServeConfig  # noqa: E402
from serve import load_export  # noqa: E402
from serve.app import make_app  # noqa: E402
from serve.engine import MicroBatcher, Recommender  # noqa: E402
from serve.index import build_index, valid_hits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JSON = {"content-type": "application/json"}
T0 = 1_600_000_000  # unix seconds: where the tiny world starts (SyntheticConfig.start_time)


# ---- shared state: one export, one compiled-program recommender (loading program.pt2 costs seconds) ----
@pytest.fixture(scope="module")
def exp(tiny_export):
    return load_export(tiny_export)


@pytest.fixture(scope="module")
def rows(tiny_export):
    """items.jsonl.gz read here, not through serve/: the tests' own view of the catalogue."""
    with gzip.open(tiny_export / "items.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(rows):
    servable = [r["item_id"] for r in rows if r["servable"]]
    cold = [r["item_id"] for r in rows if not r["servable"]]
    assert cold and len(servable) > 40  # the fixture has cold items, or the cold-item tests prove nothing
    return SimpleNamespace(servable=servable, cold=cold, by_raw={r["item_id"]: r for r in rows},
                           h=servable[:3], n_servable=len(servable))


@pytest.fixture(scope="module")
def rec(exp):
    return Recommender(exp, encoder="program")


@contextmanager
def client_for(rec, **cfg):
    with TestClient(make_app(rec, ServeConfig(**cfg))) as c:
        yield c


@pytest.fixture(scope="module")
def client(rec):
    with client_for(rec) as c:
        yield c


def make_body(rng, world, n, k=10, **kw) -> dict:
    """A valid request: n distinct servable items, increasing unix-second timestamps, `now` after them."""
    history = [str(x) for x in rng.choice(world.servable, size=n, replace=False)]
    ts = (T0 + np.cumsum(rng.integers(1, 100_000, size=n))).tolist()
    return dict(history=history, timestamps=ts, now=(ts[-1] if ts else T0) + 60, k=k, **kw)


def ids(answer: dict) -> list[str]:
    return [it["id"] for it in answer["items"]]


def scores(answer: dict) -> list[float]:
    return [it["score"] for it in answer["items"]]


def strict_json(r) -> dict:
    """The response body as strict JSON (a NaN or Infinity token in an answer is a broken answer)."""
    def refuse(token):
        raise ValueError(f"non-JSON constant {token} in {r.text[:200]}")
    return json.loads(r.text, parse_constant=refuse)


def recommend(c, body) -> dict:
    r = c.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    return strict_json(r)


def direct(rec, rows, body) -> list[tuple[str, float]]:
    """The engine's answer for `body`, computed without HTTP, as (raw id, score)."""
    (answer,) = rec.run([rec.prepare(**body)])
    return [(rows[i - 1]["item_id"], s) for i, s in answer.hits]


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def same_answer(a: dict, b: dict) -> bool:
    """Two answers to one request: same items in the same order, scores equal to float rounding (a batch
    pads histories to its longest, which may move the last bits), same warnings and fallback."""
    return (ids(a) == ids(b) and np.allclose(scores(a), scores(b), rtol=1e-5, atol=1e-6)
            and a["warnings"] == b["warnings"] and a["fallback"] == b["fallback"] and a["model"] == b["model"])


# ---- 1. every endpoint -------------------------------------------------------------------------------
def test_health_and_ready(client, rows, tiny_export):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/ready")
    model_id = hashlib.sha256((tiny_export / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert r.status_code == 200
    assert r.json() == dict(ready=True, model=model_id, items=len(rows), servable=sum(r["servable"] for r in rows),
                            encoder="program", index="ExactIndex")


def test_ready_is_503_until_the_lifespan_has_run(rec):
    # without `with`, TestClient never runs the lifespan: no batcher, no warm-up, so not ready
    c = TestClient(make_app(rec, ServeConfig()))
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False


def test_items_unknown_is_404_naming_it(client):
    r = client.get("/items/no-such-item")
    assert r.status_code == 404 and "no-such-item" in r.json()["detail"]


def test_items_known_returns_its_row(client, world):
    raw = world.servable[0]
    for path in (f"/items/{raw}", "/items/" + raw.replace("/", "%2F")):
        r = client.get(path)
        assert r.status_code == 200 and r.json() == world.by_raw[raw], path


def test_metrics_count_requests_by_endpoint_and_status(rec, world):
    rng = np.random.default_rng(1)
    with client_for(rec) as c:  # its own app: counters start at 0 (the lifespan warm-up is not a request)
        for _ in range(3):
            recommend(c, make_body(rng, world, 4))
        assert c.post("/recommend", json={"history": world.h, "k": 0}).status_code == 422
        assert c.post("/recommend", json={"k": 5}).status_code == 422
        assert c.post("/search", json={"query": "lotion"}).status_code == 501
        assert c.get("/items/no-such-item").status_code == 404
        big = json.dumps({"history": world.h, "exclude": ["x" * 2_000_000]})
        assert c.post("/recommend", content=big, headers=JSON).status_code == 413
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE unirec_requests_total counter" in text
    assert metric(text, "unirec_requests_total", endpoint="/recommend", status="200") == 3
    assert metric(text, "unirec_requests_total", endpoint="/recommend", status="422") == 2
    assert metric(text, "unirec_requests_total", endpoint="/search", status="501") == 1
    assert metric(text, "unirec_requests_total", endpoint="/items/{item_id:path}", status="404") == 1
    assert metric(text, "unirec_requests_total", status="413") == 1  # refused before routing: any endpoint label
    # every request counted once (the /metrics call itself is counted after it answers)
    assert metric(text, "unirec_requests_total") == 8 and metric(text, "unirec_request_seconds_count") == 8
    assert metric(text, "unirec_errors_total") == 0  # 501 is the contract, not a fault
    assert metric(text, "unirec_batch_size_count") == 4  # the warm-up and 3 answered requests: one batch each


def test_search_is_501_with_a_message_and_422_for_a_bad_body(client):
    r = client.post("/search", json={"query": "night cream", "k": 5})
    assert r.status_code == 501 and "search is not available" in r.json()["detail"]
    for bad in ({"query": 5}, {}, {"query": "x", "k": "5"}, {"query": "x", "qurey": "y"}):
        r = client.post("/search", json=bad)
        assert r.status_code == 422, bad


# ---- 2. a valid /recommend ---------------------------------------------------------------------------
def test_recommend_answer_shape_and_values(client, rec, rows, world, tiny_export):
    rng = np.random.default_rng(2)
    model_id = hashlib.sha256((tiny_export / "model.safetensors").read_bytes()).hexdigest()[:12]
    for n, k in ((1, 1), (5, 7), (12, 20), (24, 3)):
        body = make_body(rng, world, n, k=k)
        got = recommend(client, body)
        assert got.keys() == {"items", "model", "took_ms", "warnings", "fallback"}
        assert got["model"] == model_id and got["fallback"] is None and got["warnings"] == []
        assert isinstance(got["took_ms"], float) and got["took_ms"] >= 0
        assert len(got["items"]) == k
        for it in got["items"]:
            assert it.keys() == {"id", "score", "title"} and it["title"] == world.by_raw[it["id"]]["title"]
        assert all(a >= b for a, b in zip(scores(got), scores(got)[1:]))
        # the HTTP layer returns exactly what the engine computes for the same request
        want = direct(rec, rows, body)
        assert ids(got) == [i for i, _ in want] and scores(got) == pytest.approx([s for _, s in want])


# ---- 3. semantics ------------------------------------------------------------------------------------
def test_history_items_are_excluded_unless_asked_not_to(client, world):
    rng = np.random.default_rng(3)
    for _ in range(8):
        body = make_body(rng, world, int(rng.integers(1, 30)), k=40)
        assert not set(ids(recommend(client, body))) & set(body["history"])
    # with exclude_history false and k = every servable item, the history items must come back
    body = make_body(rng, world, 10, k=world.n_servable, exclude_history=False)
    assert set(body["history"]) <= set(ids(recommend(client, body)))


def test_exclude_ids_are_never_returned(client, world):
    rng = np.random.default_rng(4)
    exclude = [str(x) for x in rng.choice(world.servable, size=12, replace=False)] + ["no-such-item"]
    body = make_body(rng, world, 6, k=world.n_servable - 12, exclude_history=False, exclude=exclude)
    got = ids(recommend(client, body))
    # k is exactly what is left, so the answer is the whole servable catalogue minus the excluded ids
    assert sorted(got) == sorted(set(world.servable) - set(exclude)) and len(got) == len(set(got))


def test_cold_items_are_never_returned(client, world):
    rng = np.random.default_rng(5)
    for history in (make_body(rng, world, 8)["history"], world.cold[:3] + world.servable[:2]):
        got = ids(recommend(client, dict(history=history, k=world.n_servable, exclude_history=False)))
        assert sorted(got) == sorted(world.servable)  # every servable item, no cold one, no duplicate
    r = client.post("/recommend", json=dict(history=world.h, k=world.n_servable + 1))
    assert r.status_code == 422 and any("k" in e["loc"] for e in r.json()["detail"])


def test_unknown_ids_are_dropped_with_a_warning(client, world):
    rng = np.random.default_rng(6)
    clean = make_body(rng, world, 6, k=10)
    dirty = dict(clean, history=clean["history"][:2] + ["ghost-1"] + clean["history"][2:] + [424242],
                 timestamps=clean["timestamps"][:2] + [clean["timestamps"][2] - 1] + clean["timestamps"][2:]
                 + [clean["timestamps"][-1]])
    got, want = recommend(client, dirty), recommend(client, clean)
    assert len(got["warnings"]) == 1 and "ghost-1" in got["warnings"][0] and "424242" in got["warnings"][0]
    assert ids(got) == ids(want) and scores(got) == pytest.approx(scores(want))


def test_history_over_max_len_uses_the_most_recent(client, exp, world):
    assert exp.max_len == 24
    rng = np.random.default_rng(7)
    full = make_body(rng, world, 40, k=15)
    full["exclude"] = list(full["history"])  # both requests exclude the whole history, so they compare
    cut = dict(full, history=full["history"][-24:], timestamps=full["timestamps"][-24:])
    got, want = recommend(client, full), recommend(client, cut)
    assert any("max_len" in w for w in got["warnings"]) and want["warnings"] == []
    assert ids(got) == ids(want) and scores(got) == pytest.approx(scores(want))
    # and the cut matters: the oldest items change the answer when the history is cut from the other end
    first = recommend(client, dict(full, history=full["history"][:24], timestamps=full["timestamps"][:24]))
    assert scores(first) != pytest.approx(scores(want))


def test_empty_history_falls_back_to_popularity(client, rows):
    by_count = sorted((r for r in rows if r["servable"]), key=lambda r: (-r["train_count"], r["id"]))
    got = recommend(client, dict(history=[], k=12))
    assert got["fallback"] == "popularity"
    assert ids(got) == [r["item_id"] for r in by_count[:12]]
    assert scores(got) == [float(r["train_count"]) for r in by_count[:12]]
    top = by_count[0]["item_id"]
    got = recommend(client, dict(history=[], k=12, exclude=[top]))
    assert ids(got) == [r["item_id"] for r in by_count[1:13]]


def test_eager_and_program_encoders_agree(exp, rec, rows, world):
    eager = Recommender(exp, encoder="eager")
    rng = np.random.default_rng(8)
    bodies = [make_body(rng, world, int(rng.integers(1, 40)), k=int(rng.integers(1, 30))) for _ in range(20)]
    for x, y in zip(eager.run([eager.prepare(**b) for b in bodies]), rec.run([rec.prepare(**b) for b in bodies])):
        assert [i for i, _ in x.hits] == [i for i, _ in y.hits]
        assert [s for _, s in x.hits] == pytest.approx([s for _, s in y.hits], rel=1e-5, abs=1e-6)


# ---- 4. the bad-input table --------------------------------------------------------------------------
def _raw(text: str):
    """Bytes as written (json.dumps would never write these tokens into a valid body), @H@ = a known history."""
    return lambda w: text.replace("@H@", json.dumps(w.h)).replace("@T@", str(T0)).encode()


def _chunks(w):
    body = json.dumps({"history": w.h, "exclude": ["x" * 5000]}).encode()
    return iter([body[:2000], body[2000:]])  # a generator body: chunked, no content-length


# (name, body from the world (dict -> JSON, bytes as sent), expected status, field named in the detail)
BAD = [
    ("missing_history", lambda w: {"k": 5}, 422, "history"),
    ("history_not_a_list", lambda w: {"history": w.h[0]}, 422, "history"),
    ("history_float", lambda w: {"history": [w.h[0], 1.5]}, 422, "history"),
    ("history_null", lambda w: {"history": [w.h[0], None]}, 422, "history"),
    ("history_nested", lambda w: {"history": [w.h[0], [w.h[1]]]}, 422, "history"),
    ("history_bool", lambda w: {"history": [True]}, 422, "history"),
    ("history_over_max_history", lambda w: {"history": w.h * 17}, 422, "history"),  # 51 > max_history 50
    ("history_all_unknown", lambda w: {"history": ["ghost-1", "ghost-2", 7]}, 422, "history"),
    ("k_zero", lambda w: {"history": w.h, "k": 0}, 422, "k"),
    ("k_negative", lambda w: {"history": w.h, "k": -3}, 422, "k"),
    ("k_over_catalogue", lambda w: {"history": w.h, "k": w.n_servable + 1}, 422, "k"),
    ("k_string", lambda w: {"history": w.h, "k": "5"}, 422, "k"),
    ("k_float", lambda w: {"history": w.h, "k": 5.0}, 422, "k"),
    ("exclude_history_string", lambda w: {"history": w.h, "exclude_history": "true"}, 422, "exclude_history"),
    ("exclude_not_a_list", lambda w: {"history": w.h, "exclude": w.h[0]}, 422, "exclude"),
    ("timestamps_nan", _raw('{"history": @H@, "timestamps": [@T@, NaN, @T@]}'), 422, "timestamps"),
    ("timestamps_inf", _raw('{"history": @H@, "timestamps": [@T@, Infinity, -Infinity]}'), 422, "timestamps"),
    ("timestamps_float", lambda w: {"history": w.h, "timestamps": [T0, T0 + 0.5, T0 + 1]}, 422, "timestamps"),
    ("timestamps_length", lambda w: {"history": w.h, "timestamps": [T0, T0 + 1]}, 422, "timestamps"),
    ("actions_length", lambda w: {"history": w.h, "actions": [1, 1, 1, 1]}, 422, "actions"),
    ("now_string", lambda w: {"history": w.h, "now": str(T0)}, 422, "now"),
    ("now_negative", lambda w: {"history": w.h, "now": -1}, 422, "now"),
    ("unknown_field", lambda w: {"history": w.h, "exclude_histroy": False}, 422, "exclude_histroy"),
    ("head_generative_without_head", lambda w: {"history": w.h, "head": "generative"}, 422, "head"),
    ("head_unknown", lambda w: {"history": w.h, "head": "ranking"}, 422, "head"),
    ("invalid_json", lambda w: b'{"history": ["a", ', 422, None),
    ("json_array", lambda w: json.dumps([w.h]).encode(), 422, None),
    ("json_null", lambda w: b"null", 422, None),
    ("empty_body", lambda w: b"", 422, None),
    # would be a 200 if it were read: the 413 comes from the size alone, before parsing
    ("over_max_body_bytes", lambda w: {"history": w.h, "exclude": ["x" * 5000]}, 413, None),
    ("chunked_over_max_body_bytes", _chunks, 413, None),  # no content-length: counted as it streams
    ("timestamps_negative", lambda w: {"history": w.h, "timestamps": [-5, T0, T0 + 1]}, 422, "timestamps"),
    ("timestamps_over_int64", lambda w: {"history": w.h, "timestamps": [T0, T0 + 1, 2**63]}, 422, "timestamps"),
    ("actions_over_int64", lambda w: {"history": w.h, "actions": [1, 1, 2**63]}, 422, "actions"),
    ("actions_unknown_code", lambda w: {"history": w.h, "actions": [1, 1, 99]}, 422, "actions"),
]
TABLE_CFG = dict(max_body_bytes=4096, max_history=50)


def _send(c, make, w):
    body = make(w)  # a dict is sent as JSON; bytes or an iterator of bytes (chunked) as they are
    return c.post("/recommend", json=body) if isinstance(body, dict) else \
        c.post("/recommend", content=body, headers=JSON)


def _check_bad(r, status, field):
    assert r.status_code == status, r.text
    detail = strict_json(r)["detail"]  # a refusal is itself valid JSON, even for NaN input
    if status == 413:
        assert "max_body_bytes" in detail
    if field is not None:
        assert any(field in e["loc"] for e in detail), detail


@pytest.fixture(scope="module")
def table(rec, world):
    """One app for the whole table, with the answer it gave to a valid request before any bad one."""
    valid = make_body(np.random.default_rng(9), world, 8, k=10)
    with client_for(rec, **TABLE_CFG) as c:
        yield c, valid, recommend(c, valid)


@pytest.mark.parametrize("name, make, status, field", BAD, ids=[b[0] for b in BAD])
def test_bad_input(table, world, name, make, status, field):
    c, _, _ = table
    _check_bad(_send(c, make, world), status, field)


def test_bad_input_table_leaves_the_server_sound(table, world):
    c, valid, before = table
    for name, make, status, field in BAD:  # all of them here too, whichever table cases were selected
        _check_bad(_send(c, make, world), status, field)
    assert len(BAD) >= 15
    untimed = lambda a: {k: v for k, v in a.items() if k != "took_ms"}
    assert untimed(recommend(c, valid)) == untimed(before)  # the same request, alone in its batch: bit-identical
    text = c.get("/metrics").text
    assert metric(text, "unirec_errors_total") == 0
    statuses = {s.labels["status"] for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "unirec_requests_total"}
    assert statuses >= {"200", "422", "413"} and not any(s.startswith("5") for s in statuses)


# ---- 5. micro-batching -------------------------------------------------------------------------------
def _batcher_run(coro_fn, **kw):
    async def main():
        b = MicroBatcher(**kw)
        b.start()
        try:
            return await asyncio.wait_for(coro_fn(b), 10)  # a lost result fails here instead of hanging
        finally:
            await b.stop()
    return asyncio.run(main())


def test_microbatcher_batches_and_keeps_results_apart():
    sizes, seen = [], []

    def fn(xs):
        sizes.append(len(xs))
        time.sleep(0.002)  # a forward pass takes time: submits arriving meanwhile queue up
        return [x * 2 for x in xs]

    out = _batcher_run(lambda b: asyncio.gather(*(b.submit(x) for x in range(50))), fn=fn, max_batch=8,
                       max_wait_ms=20, on_batch=seen.append)
    assert out == [2 * x for x in range(50)]  # each submitter gets its own result
    assert sum(sizes) == 50 and max(sizes) <= 8 and max(sizes) > 1
    assert seen == sizes  # on_batch sees every batch's size


def test_microbatcher_error_reaches_its_whole_batch_only():
    sizes = []

    def fn(xs):
        sizes.append(len(xs))
        if "bad" in xs:
            raise ValueError("boom")
        return [x.upper() for x in xs]

    async def go(b):
        first = await asyncio.gather(b.submit("a"), b.submit("bad"), b.submit("c"), return_exceptions=True)
        return first, await b.submit("d"), await asyncio.gather(b.submit("e"), b.submit("f"))

    first, later, more = _batcher_run(go, fn=fn, max_batch=16, max_wait_ms=50)
    assert sizes[0] == 3 and all(isinstance(e, ValueError) and str(e) == "boom" for e in first)
    assert later == "D" and more == ["E", "F"]  # the loop survived the error


def test_microbatcher_lone_request_does_not_wait_when_nothing_is_pending():
    async def timed(b):
        t0 = time.perf_counter()
        assert await b.submit(3) == 6
        return time.perf_counter() - t0

    fn = lambda xs: [x * 2 for x in xs]
    assert _batcher_run(timed, fn=fn, max_batch=32, max_wait_ms=500, pending=lambda: 1) < 0.25
    # the control: without `pending` a lone request waits for company up to max_wait
    assert _batcher_run(timed, fn=fn, max_batch=32, max_wait_ms=500) > 0.45


@contextmanager
def serving(app):
    """The app under a real uvicorn server on a free loopback port, in a background thread."""
    from bench.serve import free_port
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
    try:
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "server did not get ready"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


def test_concurrent_requests_are_batched_and_never_mixed(rec, world):
    rng = np.random.default_rng(10)
    bodies = [make_body(rng, world, int(rng.integers(1, 40)), k=int(rng.integers(1, 25))) for _ in range(58)]
    bodies += [dict(history=[], k=5), dict(history=[], k=9, exclude=world.servable[:4])]  # fallback rows too
    max_batch = 8
    with serving(make_app(rec, ServeConfig(max_batch=max_batch))) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            alone = [recommend(c, b) for b in bodies]  # one at a time: every batch has one request
            before = c.get("/metrics").text

        async def fire():
            async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                return await asyncio.gather(*(ac.post("/recommend", json=b) for b in bodies))

        together = asyncio.run(fire())
        after = httpx.get(url + "/metrics").text
    assert len({json.dumps(b, sort_keys=True) for b in bodies}) == len(bodies)  # distinct requests
    assert len({tuple(ids(a)) for a in alone}) > len(bodies) // 2  # and mostly distinct answers: a mix would show
    for b, a, r in zip(bodies, alone, together):
        assert r.status_code == 200, r.text
        assert same_answer(strict_json(r), a), b
    batches = metric(after, "unirec_batch_size_count") - metric(before, "unirec_batch_size_count")
    assert metric(after, "unirec_batch_size_sum") - metric(before, "unirec_batch_size_sum") == len(bodies)
    assert batches < len(bodies)  # some requests shared a forward pass
    assert metric(after, "unirec_batch_size_bucket", le=f"{max_batch:.1f}") == metric(after, "unirec_batch_size_count")
    assert metric(after, "unirec_errors_total") == 0


# ---- 6. python -m serve refuses a damaged export -----------------------------------------------------
def _flip_byte(d: Path):
    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, name", [
    (_flip_byte, "model.safetensors"),
    (lambda d: (d / "items.jsonl.gz").unlink(), "items.jsonl.gz"),
    (lambda d: (d / "export.json").unlink(), "export.json"),
], ids=["tampered_weights", "missing_items", "missing_export_json"])
def test_serve_refuses_to_start_on_a_damaged_export(tiny_export, tmp_path, damage, name):
    d = tmp_path / "export"
    shutil.copytree(tiny_export, d)
    damage(d)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "serve", "--export", str(d), "--port", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    # exit code 2 alone could be an argparse error: the refusal must also name the damaged file
    assert res.returncode == 2, res.stderr
    assert "refusing to start" in res.stderr and str(d / name) in res.stderr, res.stderr


# ---- 7. faiss ----------------------------------------------------------------------------------------
def test_faiss_with_every_list_probed_equals_exact(exp, world):
    pytest.importorskip("faiss")
    exact = Recommender(exp, encoder="eager")
    approx = Recommender(exp, encoder="eager", index="faiss", nlist=4, nprobe=4)
    assert approx.index.nlist == 4 and approx.index.index.nprobe == 4
    rng = np.random.default_rng(11)
    bodies = [make_body(rng, world, int(rng.integers(1, 30)), k=int(rng.integers(1, 40)),
                        exclude=[str(x) for x in rng.choice(world.servable, size=5, replace=False)])
              for _ in range(20)]
    for a, b in zip(exact.run([exact.prepare(**x) for x in bodies]), approx.run([approx.prepare(**x) for x in bodies])):
        assert [i for i, _ in a.hits] == [i for i, _ in b.hits]
        assert [s for _, s in a.hits] == pytest.approx([s for _, s in b.hits], rel=1e-5, abs=1e-6)


def test_item_bias_is_added_to_scores_by_exact_and_faiss_alike(exp):
    """eval.cold_offset reaches serving as the index's per-item bias: exact adds it to every score; faiss
    carries it as one more column met by a 1 in the state, so with every list probed both agree."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(13)
    bias = torch.zeros(exp.num_items + 1)
    bias[torch.from_numpy(rng.choice(np.arange(1, exp.num_items + 1), 10, replace=False))] = 0.3
    states = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((6, exp.table.shape[1])).astype(
        np.float32)), dim=1)
    exact, approx = (build_index(exp.table, exp.servable, kind, bias=bias, **kw)
                     for kind, kw in (("exact", {}), ("faiss", dict(nlist=4, nprobe=4))))
    (ei, es), (fi, fs) = exact.search(states, 20), approx.search(states, 20)
    want = (states @ exp.table.T + bias).masked_fill(~exp.servable, -torch.inf)
    want[:, 0] = -torch.inf
    assert torch.allclose(torch.from_numpy(es), want.topk(20, dim=1).values, atol=1e-6)
    assert np.array_equal(ei, fi) and np.allclose(es, fs, atol=1e-5)
    plain_ids, _ = build_index(exp.table, exp.servable).search(states, 20)
    assert not np.array_equal(plain_ids, ei)  # the bias changed the lists


@pytest.mark.parametrize("nprobe", [4, 1])
def test_faiss_respects_exclude_and_never_returns_non_servable(exp, nprobe):
    pytest.importorskip("faiss")
    index = build_index(exp.table, exp.servable, "faiss", nlist=4, nprobe=nprobe)
    servable = set(torch.nonzero(exp.servable, as_tuple=True)[0].tolist()) - {0}
    cold = sorted(set(range(1, exp.num_items + 1)) - servable)
    rng = np.random.default_rng(12)
    states = torch.from_numpy(rng.standard_normal((8, exp.table.shape[1])).astype(np.float32))
    states = torch.nn.functional.normalize(states, dim=1)
    exclude = [np.unique(np.concatenate([rng.choice(sorted(servable), 10, replace=False), cold[:2]]))
               for _ in range(8)]
    out_ids, out_scores = index.search(states, len(servable), exclude)
    for b in range(8):
        got = [i for i, _ in valid_hits(out_ids[b], out_scores[b])]
        assert len(got) == len(set(got)) and set(got) <= servable - set(exclude[b].tolist())
        if nprobe == index.nlist:  # every list probed: everything that is allowed comes back
            assert set(got) == servable - set(exclude[b].tolist())
