"""bench/serve.py measures and checks what it says: percentiles on hand-worked numbers, one body per invalid
kind carrying exactly the defect it names, a load generator and soak checker that pass against an honest
fake server and fail (mismatches, 5xx) against a dishonest one, server start-up errors that show the
server's output, and faiss recall 1.0 when every list is probed. No model: the fake server answers
deterministically from the history."""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("httpx")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import HTTPException, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from bench import serve as bs  # noqa: E402

CATALOGUE = [f"it{i}" for i in range(1000)]
KNOWN = set(CATALOGUE)


class Req(BaseModel):
    history: list[str]
    timestamps: list[int] | None = None
    now: int | None = None
    k: int = 10
    exclude_history: bool = True
    exclude: list[str] | None = None


def make_app(state: dict) -> fastapi.FastAPI:
    """The serving contract in miniature: 413 over 2 MB, 422 for bad input, answers a function of the
    known history ids. state["mode"]: "ok"; "wrong" (every 5th answer's first id replaced); "error"
    (every 7th request a 500)."""
    app = fastapi.FastAPI()

    # FastAPI's default 422 handler echoes the input, and a NaN in it makes that response a 500 ("Out of
    # range float values are not JSON compliant"): the soak found this here first
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": [dict(loc=e["loc"], msg=e["msg"]) for e in exc.errors()]}, status_code=422)

    @app.middleware("http")
    async def limit(request: Request, call_next):
        if int(request.headers.get("content-length", 0)) > 2_000_000:
            return JSONResponse({"detail": "body too large"}, status_code=413)
        return await call_next(request)

    @app.get("/ready")
    def ready():
        return {"ready": True}

    @app.post("/recommend")
    def recommend(req: Req):
        state["calls"] += 1
        if state["mode"] == "error" and state["calls"] % 7 == 0:
            return JSONResponse({"detail": "boom"}, status_code=500)
        known = [h for h in req.history if h in KNOWN]
        if req.history and not known:
            raise HTTPException(422, "no known ids")
        if req.timestamps is not None and len(req.timestamps) != len(req.history):
            raise HTTPException(422, "timestamps length")
        if not 1 <= req.k <= len(CATALOGUE):
            raise HTTPException(422, "k out of range")
        seed = sum(int(h[2:]) for h in known)
        ids = [CATALOGUE[(seed * 7 + j) % len(CATALOGUE)] for j in range(req.k)]
        if state["mode"] == "wrong" and state["calls"] % 5 == 0:
            ids = ["wrong"] + ids[1:]
        return {"items": [{"id": i, "score": 1.0, "title": None} for i in ids], "model": "fake", "took_ms": 0.5,
                "warnings": [], "fallback": None if known else "popularity"}
    return app


@pytest.fixture(scope="module")
def fake():
    state = {"mode": "ok", "calls": 0}
    port = bs.free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(10)


def test_percentile_and_summary_on_hand_worked_numbers():
    assert bs.percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert bs.percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)  # rank 0.99 * 3 = 2.97: 3 + 0.97 * (4 - 3)
    assert bs.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert bs.percentile([], 50) is None
    s = bs.summarize([0.001, 0.004, 0.002, 0.003], wall_s=2.0, took_ms=[9.0, 0.5, 1.5])
    assert s == dict(n=4, p50_ms=pytest.approx(2.5), p99_ms=pytest.approx(3.97), mean_ms=pytest.approx(2.5),
                     qps=pytest.approx(2.0), took_p50_ms=pytest.approx(1.5))
    assert bs.summarize([], 1.0, [])["p99_ms"] is None


def test_requests_have_distinct_items_and_increasing_timestamps():
    req = bs.make_request(np.random.default_rng(0), CATALOGUE, 200)
    assert len(set(req["history"])) == 200 and set(req["history"]) <= KNOWN
    assert len(req["timestamps"]) == 200 and np.all(np.diff(req["timestamps"]) > 0)
    assert req["now"] > req["timestamps"][-1]
    assert bs.make_bodies(CATALOGUE, 3, 5, seed=1) == bs.make_bodies(CATALOGUE, 3, 5, seed=1)  # seeded
    valid = [json.loads(b) for b in bs.soak_valid_requests(CATALOGUE, 50, 20, seed=0)]
    assert len(valid) == 50 and valid[0]["history"] == [] and all(1 <= len(v["history"]) <= 20 for v in valid[1:])


def test_each_invalid_kind_has_exactly_the_defect_it_names():
    base = bs.make_request(np.random.default_rng(0), CATALOGUE, 5)
    bodies = bs.invalid_requests(base)
    assert set(bodies) == set(bs.INVALID_KINDS) and len(bodies) >= 8
    changed = dict(unknown_ids="history", history_string="history", k_zero="k", k_huge="k", k_string="k",
                   exclude_history_string="exclude_history", nan_timestamps="timestamps",
                   inf_timestamps="timestamps", timestamps_length="timestamps", body_over_2mb="exclude")
    for kind, key in changed.items():
        got = json.loads(bodies[kind])
        assert {k for k in got.keys() | base.keys() if got.get(k) != base.get(k)} == {key}, kind
    got = {k: json.loads(bodies[k]) for k in changed}
    assert not KNOWN & set(got["unknown_ids"]["history"]) and len(got["unknown_ids"]["history"]) == 5
    assert isinstance(got["history_string"]["history"], str)
    assert got["k_zero"]["k"] == 0 and got["k_huge"]["k"] > len(CATALOGUE) and isinstance(got["k_string"]["k"], str)
    assert isinstance(got["exclude_history_string"]["exclude_history"], str)
    assert math.isnan(got["nan_timestamps"]["timestamps"][0]) and b"NaN" in bodies["nan_timestamps"]
    assert b"Infinity" in bodies["inf_timestamps"] and b"-Infinity" in bodies["inf_timestamps"]
    assert len(got["timestamps_length"]["timestamps"]) == 4
    assert len(bodies["body_over_2mb"]) > 2 * 2**20
    assert json.loads(bodies["missing_history"]) == {k: v for k, v in base.items() if k != "history"}
    assert isinstance(json.loads(bodies["not_an_object"]), list)
    with pytest.raises(json.JSONDecodeError):
        json.loads(bodies["invalid_json"])


def test_load_generator_against_the_fake_server(fake):
    url, _ = fake
    row = bs.run_load(url, bs.make_bodies(CATALOGUE, 60, 10, seed=0), warmup=20, concurrency=4)
    assert row["n"] == 40 and row["errors"] == 0 and row["statuses"] == {"200": 40}
    assert 0 < row["p50_ms"] <= row["p99_ms"] and row["qps"] > 0 and row["took_p50_ms"] == 0.5


def _soak_inputs(url):
    valid = bs.soak_valid_requests(CATALOGUE, 50, 10, seed=1)
    invalid = bs.invalid_requests(bs.make_request(np.random.default_rng(2), CATALOGUE, 10))
    return valid, bs.record_answers(url, valid), invalid


def test_soak_passes_against_an_honest_server(fake):
    url, state = fake
    valid, answers, invalid = _soak_inputs(url)
    res = bs.run_soak(url, os.getpid(), valid, answers, invalid, n=300, concurrency=8, seed=0)
    assert res["passed"] and res["mismatches"] == res["server_errors"] == res["wrong_status"] == 0, res["examples"]
    assert set(res["by_kind"]) == set(bs.INVALID_KINDS) | {"valid"}
    assert res["by_kind"]["valid"].keys() == {"200"} and res["by_kind"]["body_over_2mb"].keys() == {"413"}
    assert all(s.startswith("4") for k, v in res["by_kind"].items() if k != "valid" for s in v)
    assert sum(sum(v.values()) for v in res["by_kind"].values()) == 300
    assert 0 < res["rss_kb"]["before"] <= res["rss_kb"]["peak"]


@pytest.mark.parametrize("mode, counter", [("wrong", "mismatches"), ("error", "server_errors")])
def test_soak_catches_wrong_answers_and_server_errors(fake, mode, counter):
    url, state = fake
    valid, answers, invalid = _soak_inputs(url)
    state["mode"] = mode
    try:
        res = bs.run_soak(url, os.getpid(), valid, answers, invalid, n=100, concurrency=4, seed=0)
    finally:
        state["mode"] = "ok"
    assert res[counter] > 0 and not res["passed"] and res["examples"][0]["problem"] in (counter, "wrong_status")


def test_check_soak_counts_each_problem_once():
    plan = [("valid", 0), ("k_zero", -1), ("valid", 0), ("k_zero", -1), ("valid", 0), ("k_zero", -1)]
    ok, other = {"items": [{"id": "a"}]}, {"items": [{"id": "b"}]}
    results = [(200, 0, ok), (200, 0, ok), (500, 0, None), (-1, 0, {"error": "reset"}), (200, 0, other), (422, 0, {})]
    res = bs.check_soak(plan, results, [["a"]])
    assert (res["mismatches"], res["wrong_status"], res["server_errors"]) == (1, 1, 2) and not res["passed"]
    assert res["by_kind"] == {"k_zero": {"200": 1, "conn_error": 1, "422": 1}, "valid": {"200": 2, "500": 1}}


def test_server_start_failures_show_the_output_and_servers_are_stopped():
    url = f"http://127.0.0.1:{bs.free_port()}"
    crash = [sys.executable, "-c", "import sys; print('boom: no model', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(bs.ServerStartError, match="(?s)code 3.*boom: no model"):
        with bs.running_server(crash, url, ready_timeout=20):
            pass
    with pytest.raises(bs.ServerStartError, match="within 1 s"):
        with bs.running_server([sys.executable, "-c", "import time; time.sleep(60)"], url, ready_timeout=1):
            pass
    port = bs.free_port()
    ready = ("import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n def do_GET(self):\n"
             "  self.send_response(200); self.end_headers()\n"
             f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()")
    with bs.running_server([sys.executable, "-c", ready], f"http://127.0.0.1:{port}", ready_timeout=20) as proc:
        assert proc.poll() is None
    assert proc.returncode is not None  # stopped on the way out


def test_server_command_pins_cores_and_threads():
    cmd = bs.server_command("exports/x", 8123, [0, 1], "program", "exact")
    assert cmd[:3] == ["taskset", "-c", "0,1"] and cmd[cmd.index("--threads") + 1] == "2"
    assert cmd[cmd.index("--encoder") + 1] == "program" and cmd[cmd.index("--port") + 1] == "8123"
    assert bs.client_cpus([0, 1], [0]) == [1] and bs.client_cpus([0, 1], [0, 1]) == [0, 1]


def test_target_is_judged_on_the_measured_row_of_two_layer_exports():
    row = lambda enc, p99, cores=1, conc=1: dict(dir="a", encoder=enc, cores=cores, concurrency=conc, p99_ms=p99)
    record = dict(args=dict(encoders=["eager", "program"]),
                  exports=[dict(name="a", dir="a", num_layers=2), dict(name="b", dir="b", num_layers=8)],
                  latency=[row("eager", 9.5), row("program", 10.5), row("program", 1.0, cores=2)])
    from bench.serve_report import target_lines
    assert target_lines(record) == ["- a, eager: **MET (p99 9.50 ms)**", "- a, program: **NOT MET (p99 10.50 ms)**"]


def test_faiss_recall_is_one_when_every_list_is_probed():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    items, queries = bs.clustered_vectors(rng, 2000, centres, 1.0), bs.clustered_vectors(rng, 10, centres, 1.0)
    assert np.allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    res = bs.faiss_recall(items, queries, nprobes=[1, 8], k=100, nlist=8)
    assert res["nlist"] == 8 and [r["nprobe"] for r in res["rows"]] == [1, 8]
    assert res["rows"][1]["recall"] == 1.0 and 0 < res["rows"][0]["recall"] <= 1.0
