"""Live HTTP benchmark of the recommendation server (`python -m serve`): latency, a soak, faiss recall.

Latency: for each --export x --cores x --encoders, start the server as a subprocess on a free loopback
port, pinned with `taskset -c 0` (1 core) or `taskset -c 0,1` (2 cores), OMP_NUM_THREADS = --threads =
cores; wait for /ready; then per --concurrency level send --warmup untimed and --requests timed
POST /recommend with that many in flight (asyncio + httpx in this process). Every request is a different
seeded history of --history distinct servable items with increasing timestamps. Latency is client-side
(send to response read), so it includes this client's own HTTP work. With a 1-core server the load
generator is pinned to the last other core; otherwise it shares the server's cores and the table says so.
The timed requests go through RawConnection (keep-alive HTTP/1.1 on asyncio streams, ~0.1 ms of client
CPU a request): httpx's async client saturated its core first (see RawConnection).

Soak (--soak N): a fresh server, ~70% valid requests, each one of 50 fixed requests whose answers were
recorded one by one first (a different answer later is a mismatch), ~30% invalid ones of the
INVALID_KINDS, which must get a 4xx. A 5xx or a connection error is a server error. Server RSS before,
after and peak (sampled every 0.5 s).

Faiss (--faiss-items N): recall@100 of serve.index's IVF-Flat index against exact search on a synthetic
clustered catalogue, its build time, and batch-1 query latency at each --faiss-nprobe.

    python bench/serve.py --export exports/beauty --export exports/ml1m-hstu-large
    python bench/serve.py --export exports/beauty --cores 1 --encoders eager --requests 30 --soak 300 \\
        --faiss-items 20000

Writes bench/results/serve{--tag}.{json,md}, rewritten after each server, so a crash keeps what was measured.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, so `serve` is the package, not this file

from bench.record import loadavg, metadata  # noqa: E402
from bench.serve_report import FAISS_CENTRES, FAISS_NOISE, INVALID_KINDS, _f, render_md  # noqa: E402

JSON_HEADERS = {"content-type": "application/json"}
BIG_BODY = 5 * 2**19  # 2.5 MiB: over a 2 MB body limit whichever way "MB" is read
def percentile(xs, q: float) -> float | None:
    """q in [0, 100], linear between order statistics (numpy's default): p99 of 400 values lies between
    the 396th and 397th smallest. None for no values."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else None


def summarize(latencies_s: list[float], wall_s: float, took_ms: list[float]) -> dict:
    """Client latencies (s) of the answered requests -> p50 / p99 / mean ms, QPS over the wall time, and the
    median of the server's own took_ms."""
    ms = [x * 1e3 for x in latencies_s]
    return dict(n=len(ms), p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99),
                mean_ms=float(np.mean(ms)) if ms else None, qps=len(ms) / wall_s if wall_s > 0 else None,
                took_p50_ms=percentile(took_ms, 50))


def load_export(folder: str) -> tuple[dict, list[str], set[str]]:
    """-> (what the tables show, servable raw ids in file order, every raw id)."""
    folder_p = Path(folder)
    config = json.loads((folder_p / "config.json").read_text())
    with gzip.open(folder_p / "items.jsonl.gz", "rt") as f:
        items = [json.loads(line) for line in f if line.strip()]
    servable = [it["item_id"] for it in items if it.get("servable", True)]
    model = config.get("model", {})
    info = dict(name=folder_p.name, dir=str(folder_p.resolve()), max_len=config.get("max_len"),
                num_layers=model.get("num_layers"), dim=model.get("dim"), items=len(items), servable=len(servable))
    return info, servable, {it["item_id"] for it in items}


def make_request(rng: np.random.Generator, ids: list[str], length: int, k: int = 10) -> dict:
    """A history of `length` distinct ids drawn from `ids`, timestamps strictly increasing."""
    hist = [ids[i] for i in rng.choice(len(ids), size=min(length, len(ids)), replace=False)]
    ts = 1_600_000_000 + np.cumsum(rng.integers(60, 86_400, size=len(hist)))  # gaps of 1 min to 1 day
    now = int(ts[-1]) + 60 if len(hist) else 1_700_000_000
    return dict(history=hist, timestamps=[int(t) for t in ts], now=now, k=k)


def make_bodies(ids: list[str], n: int, length: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [json.dumps(make_request(rng, ids, length)).encode() for _ in range(n)]


def soak_valid_requests(ids: list[str], n: int, max_length: int, seed: int) -> list[bytes]:
    """The soak's fixed valid requests: #0 has an empty history (the popularity fallback), the others
    lengths in [1, max_length] and k in (1, 10, 50); every 5th also excludes 3 other servable ids."""
    rng = np.random.default_rng(seed)
    out = [json.dumps(dict(history=[], k=10)).encode()]
    for j in range(1, n):
        req = make_request(rng, ids, int(rng.integers(1, max_length + 1)), k=(1, 10, 50)[j % 3])
        if j % 5 == 0:
            req["exclude"] = [ids[i] for i in rng.choice(len(ids), size=min(3, len(ids)), replace=False)]
        out.append(json.dumps(req).encode())
    return out


def invalid_requests(base: dict) -> dict[str, bytes]:
    """INVALID_KINDS -> body bytes, each a valid request `base` (non-empty history with timestamps) with
    one defect. json.dumps writes float nan / inf as the bare tokens NaN / Infinity (not strict JSON)."""
    d = lambda **kw: json.dumps({**base, **kw}).encode()
    ts, n = list(base["timestamps"]), len(base["history"])
    out = dict(
        unknown_ids=d(history=[f"__bench_unknown_{i}__" for i in range(n)]),
        history_string=d(history=" ".join(base["history"])),
        missing_history=json.dumps({k: v for k, v in base.items() if k != "history"}).encode(),
        k_zero=d(k=0), k_huge=d(k=10**9), k_string=d(k="ten"), exclude_history_string=d(exclude_history="maybe"),
        nan_timestamps=d(timestamps=[float("nan")] + ts[1:]),
        inf_timestamps=d(timestamps=[float("inf")] + ts[1:-1] + [float("-inf")]) if n > 1 else
        d(timestamps=[float("inf")]),
        timestamps_length=d(timestamps=ts[:-1]),
        invalid_json=d()[: len(d()) // 2],
        not_an_object=json.dumps([base]).encode(),
        body_over_2mb=d(exclude=[f"pad{i:07d}" for i in range(BIG_BODY // 12)]),  # 14 bytes an entry
    )
    assert set(out) == set(INVALID_KINDS)
    return out


class ServerStartError(RuntimeError):
    """The server exited, or never answered /ready; the message ends with its output tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(export_dir: str, port: int, cpus: list[int], encoder: str, index: str) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus)), sys.executable, "-m", "serve", "--export", export_dir,
            "--host", "127.0.0.1", "--port", str(port), "--threads", str(len(cpus)), "--encoder", encoder,
            "--index", index]


def server_env(cores: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    tail = lambda: log.read_bytes()[-4000:].decode(errors="replace")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with code {proc.returncode} before /ready: "
                                   f"{shlex.join(proc.args)}\n--- server output tail ---\n{tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return
        time.sleep(0.25)
    raise ServerStartError(f"no 200 from {url}/ready within {timeout:.0f} s: {shlex.join(proc.args)}\n"
                           f"--- server output tail ---\n{tail()}")


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_server(cmd: list[str], url: str, env: dict | None = None, ready_timeout: float = 300.0):
    """Start `cmd` (stdout + stderr to a temp log), wait for GET {url}/ready == 200, yield the Popen, and
    always stop it (SIGTERM, SIGKILL after 15 s). taskset execs, so Popen.pid is the server itself."""
    with tempfile.NamedTemporaryFile(prefix="bench_serve_", suffix=".log") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, url, ready_timeout, Path(log.name))
            yield proc
        finally:
            _stop(proc)


def _client(url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0)


async def _post(client: httpx.AsyncClient, body: bytes) -> tuple[int, float, dict | None]:
    """-> (status, or -1 for a connection error; seconds; parsed JSON, or {"error": ...})."""
    t0 = time.perf_counter()
    try:
        r = await client.post("/recommend", content=body, headers=JSON_HEADERS)
    except httpx.HTTPError as e:
        return -1, time.perf_counter() - t0, {"error": f"{type(e).__name__}: {e}"}
    dt = time.perf_counter() - t0
    try:
        return r.status_code, dt, r.json()
    except ValueError:
        return r.status_code, dt, None


async def _post_all(client: httpx.AsyncClient, bodies: list[bytes], concurrency: int) -> tuple[list, float]:
    """Every body once with `concurrency` in flight -> (results in body order, wall seconds)."""
    results: list = [None] * len(bodies)
    order = iter(range(len(bodies)))  # shared by the workers: each takes the next unsent body

    async def worker():
        for i in order:
            results[i] = await _post(client, bodies[i])
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


class RawConnection:
    """One keep-alive HTTP/1.1 connection speaking just enough protocol for POST /recommend: the timed
    load generator. httpx's async client was the bottleneck: measured 2026-12-02 at concurrency 32
    against a 1-core server, the client process used 99% of its core and the server 48% (78 QPS), so
    the concurrency rows measured the client. This costs ~0.1 ms of client CPU a request."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def post(self, path: str, body: bytes, method: bytes = b"POST") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                          b"\r\n\r\n" % (method, path.encode(), self.host.encode(), len(body)) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status, length = int(head[9:12]), 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _raw_post_all(conns: list[RawConnection], bodies: list[bytes]) -> tuple[list, float]:
    """Every body once, one in flight per connection -> ((status, seconds, JSON) per body, wall s)."""
    results: list = [None] * len(bodies)
    order = iter(range(len(bodies)))

    async def worker(conn):
        for i in order:
            t0 = time.perf_counter()
            try:
                status, data = await conn.post("/recommend", bodies[i])
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                results[i] = (-1, time.perf_counter() - t0, {"error": f"{type(e).__name__}: {e}"})
                conn.close()
                conn.writer = None
                continue
            dt = time.perf_counter() - t0
            with contextlib.suppress(ValueError):
                results[i] = (status, dt, json.loads(data))
                continue
            results[i] = (status, dt, None)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    return results, time.perf_counter() - t0


async def _load(url: str, bodies: list[bytes], warmup: int, concurrency: int) -> tuple[list, float]:
    host, port = url.split("//")[1].split(":")
    conns = [RawConnection(host, int(port)) for _ in range(concurrency)]
    try:  # warm-up opens the connections the timed part reuses
        await _raw_post_all(conns, bodies[:warmup])
        return await _raw_post_all(conns, bodies[warmup:])
    finally:
        for c in conns:
            c.close()


def run_load(url: str, bodies: list[bytes], warmup: int, concurrency: int) -> dict:
    """bodies[:warmup] untimed, then the rest timed -> summarize() of the 200s, plus errors (non-200s)."""
    results, wall = asyncio.run(_load(url, bodies, warmup, concurrency))
    ok = [r for r in results if r[0] == 200]
    took = [r[2]["took_ms"] for r in ok if isinstance(r[2], dict) and "took_ms" in r[2]]
    return summarize([r[1] for r in ok], wall, took) | dict(
        errors=len(results) - len(ok), statuses=dict(Counter(str(r[0]) for r in results)))


def http_floor_ms(url: str, n: int = 200) -> float | None:
    """Median ms of a sequential GET /health through the load generator's own connection: the HTTP +
    client share of every latency."""
    host, port = url.split("//")[1].split(":")

    async def run():
        conn, ms = RawConnection(host, int(port)), []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                await conn.post("/health", b"", method=b"GET")
                ms.append((time.perf_counter() - t0) * 1e3)
        finally:
            conn.close()
        return ms
    return percentile(asyncio.run(run()), 50)


def record_answers(url: str, bodies: list[bytes]) -> list[list[str]]:
    """Each fixed valid request once, one at a time: its item ids are the answer the soak must repeat."""
    answers = []
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for body in bodies:
            r = client.post("/recommend", content=body, headers=JSON_HEADERS)
            if r.status_code != 200:
                raise RuntimeError(f"fixed valid request got {r.status_code}: {r.text[:300]}\nbody {body[:200]!r}")
            answers.append([it["id"] for it in r.json()["items"]])
    return answers


def soak_plan(n: int, n_valid: int, kinds: list[str], seed: int, valid_share: float = 0.7) -> list[tuple[str, int]]:
    """n x ("valid", which fixed request) or (invalid kind, -1), seeded."""
    rng = np.random.default_rng(seed)
    return [("valid", int(rng.integers(n_valid))) if rng.random() < valid_share
            else (kinds[int(rng.integers(len(kinds)))], -1) for _ in range(n)]


def rss_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


async def _soak(url: str, bodies: list[bytes], concurrency: int, pid: int) -> tuple[list, float, int | None]:
    peak, done = [rss_kb(pid)], asyncio.Event()

    async def sample():  # VmRSS every 0.5 s while the soak runs
        while not done.is_set():
            peak[0] = max(peak[0] or 0, rss_kb(pid) or 0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
    sampler = asyncio.create_task(sample())
    async with _client(url, concurrency) as client:
        results, wall = await _post_all(client, bodies, concurrency)
    done.set()
    await sampler
    return results, wall, peak[0]


def _ids(data) -> list | None:
    try:
        return [it["id"] for it in data["items"]]
    except (TypeError, KeyError):
        return None


def check_soak(plan: list[tuple[str, int]], results: list, answers: list[list[str]]) -> dict:
    """Statuses by kind; server errors (5xx, connection errors); wrong statuses (a valid request not 200,
    an invalid one not 4xx); mismatches (a 200 whose ids differ from the recorded answer)."""
    by_kind: dict[str, Counter] = {}
    counts, examples = Counter(server_errors=0, wrong_status=0, mismatches=0), []
    for (kind, i), (status, _, data) in zip(plan, results):
        by_kind.setdefault(kind, Counter())[str(status) if status > 0 else "conn_error"] += 1
        if status < 0 or status >= 500:
            bad = "server_errors"
        elif kind == "valid":
            bad = "wrong_status" if status != 200 else ("mismatches" if _ids(data) != answers[i] else None)
        else:
            bad = None if 400 <= status < 500 else "wrong_status"
        if bad:
            counts[bad] += 1
            if len(examples) < 5:
                examples.append(dict(kind=kind, status=status, problem=bad, detail=str(data)[:300]))
    return dict(counts) | dict(by_kind={k: dict(v) for k, v in sorted(by_kind.items())}, examples=examples,
                               passed=sum(counts.values()) == 0)


def run_soak(url: str, pid: int, valid: list[bytes], answers: list[list[str]], invalid: dict[str, bytes],
             n: int, concurrency: int = 8, seed: int = 0) -> dict:
    plan = soak_plan(n, len(valid), sorted(invalid), seed)
    bodies = [valid[i] if kind == "valid" else invalid[kind] for kind, i in plan]
    before = rss_kb(pid)
    results, wall, peak = asyncio.run(_soak(url, bodies, concurrency, pid))
    after = rss_kb(pid)
    peak = max((x for x in (before, peak, after) if x), default=None)  # the 0.5 s samples can miss the end
    return check_soak(plan, results, answers) | dict(
        requests=n, concurrency=concurrency, seconds=wall, rss_kb=dict(before=before, after=after, peak=peak))


def clustered_vectors(rng: np.random.Generator, n: int, centres: np.ndarray, noise: float) -> np.ndarray:
    """n unit rows: a random centre + gaussian noise of expected norm `noise`, normalised (100k rows at a time,
    so 1M x 64 needs ~0.3 GB, not 3x that)."""
    out = np.empty((n, centres.shape[1]), np.float32)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        x = centres[rng.integers(len(centres), size=m)]
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(noise / math.sqrt(centres.shape[1]))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _search_each(index, queries: np.ndarray, k: int) -> tuple[list[set], float]:
    """Batch-1 searches -> (top-k id sets, median ms a query)."""
    import torch
    tops, ms = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids, _ = index.search(torch.from_numpy(q[None]), k)
        ms.append((time.perf_counter() - t0) * 1e3)
        tops.append(set(ids[0].tolist()))
    return tops, float(np.median(ms))


def faiss_recall(items: np.ndarray, queries: np.ndarray, nprobes: list[int], k: int = 100,
                 nlist: int | None = None, threads: int = 1) -> dict | None:
    """recall@k of serve.index's faiss index against its exact one (mean |faiss top-k & exact top-k| / k),
    build seconds, median batch-1 ms per query with `threads` threads. None if faiss is not importable."""
    try:
        import faiss
    except ImportError:
        return None
    import torch

    from serve.index import build_index
    table = torch.from_numpy(np.vstack([np.zeros((1, items.shape[1]), np.float32), items]))  # row 0 = padding
    servable = torch.ones(len(table), dtype=torch.bool)
    exact = build_index(table, servable, kind="exact")
    t0 = time.perf_counter()
    approx = build_index(table, servable, kind="faiss", **({"nlist": nlist} if nlist else {}))
    build_s = time.perf_counter() - t0
    saved = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(threads), faiss.omp_set_num_threads(threads)
    try:
        truth, exact_ms = _search_each(exact, queries, k)
        rows = []
        for nprobe in nprobes:
            approx.index.nprobe = min(nprobe, approx.nlist)
            got, ms = _search_each(approx, queries, k)
            recall = float(np.mean([len(g & t) / k for g, t in zip(got, truth)]))
            rows.append(dict(nprobe=approx.index.nprobe, recall=recall, faiss_ms_p50=ms))
    finally:
        torch.set_num_threads(saved[0]), faiss.omp_set_num_threads(saved[1])
    return dict(items=len(items), dim=items.shape[1], queries=len(queries), k=k, nlist=approx.nlist,
                build_s=build_s, exact_ms_p50=exact_ms, threads=threads, rows=rows)


def write_results(record: dict, args, load_before: list[float] | None) -> None:
    record["meta"] = metadata(record["meta"]["command"], load_before=load_before)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(out / f"serve{args.tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    Path(out / f"serve{args.tag}.md").write_text(render_md(record))


def client_cpus(all_cpus: list[int], server: list[int]) -> list[int]:
    """The last CPU the server does not use; all CPUs (shared) when it uses every one."""
    free = [c for c in all_cpus if c not in server]
    return free[-1:] or list(all_cpus)


def bench_export(record: dict, exp: tuple, args, all_cpus: list[int], save) -> None:
    info, ids, _ = exp
    bodies = make_bodies(ids, args.warmup + args.requests, args.history, args.seed)
    for cores in args.cores:
        server, client = all_cpus[:cores], client_cpus(all_cpus, all_cpus[:cores])
        for encoder in args.encoders:
            port = free_port()
            cmd, url = server_command(info["dir"], port, server, encoder, args.index), f"http://127.0.0.1:{port}"
            print(f"[serve] {info['name']}, {cores} core(s), {encoder}: {shlex.join(cmd)}", flush=True)
            try:
                t0 = time.perf_counter()
                with running_server(cmd, url, server_env(cores), args.ready_timeout):
                    ready_s = time.perf_counter() - t0
                    os.sched_setaffinity(0, client)
                    floor = http_floor_ms(url)
                    for conc in args.concurrency:
                        row = dict(export=info["name"], dir=info["dir"], cores=cores, server_cpus=server,
                                   client_cpus=client, shares=bool(set(server) & set(client)), encoder=encoder,
                                   concurrency=conc, ready_s=ready_s, health_p50_ms=floor
                                   ) | run_load(url, bodies, args.warmup, conc)
                        record["latency"].append(row)
                        print(f"[serve]   concurrency {conc}: p50 {_f(row['p50_ms'])} ms, p99 {_f(row['p99_ms'])} "
                              f"ms, {_f(row['qps'], '.1f')} QPS, {row['errors']} non-200", flush=True)
            except ServerStartError as e:
                print(f"[serve] FAILED to start: {e}", file=sys.stderr, flush=True)
                record["failures"].append(dict(what=f"{info['name']}, {cores} core(s), {encoder}", error=str(e)))
            finally:
                os.sched_setaffinity(0, all_cpus)
            save()


def soak_section(exp: tuple, args, all_cpus: list[int]) -> dict:
    info, ids, known = exp
    valid = soak_valid_requests(ids, 50, args.history, args.seed + 1)
    invalid = invalid_requests(make_request(np.random.default_rng(args.seed + 2), ids, args.history))
    assert not known & set(json.loads(invalid["unknown_ids"])["history"]), "an 'unknown' id is in the catalogue"
    server, port = all_cpus[:args.soak_cores], free_port()
    cmd, url = server_command(info["dir"], port, server, args.encoders[0], args.index), f"http://127.0.0.1:{port}"
    print(f"[serve] soak: {args.soak} requests, {shlex.join(cmd)}", flush=True)
    try:
        with running_server(cmd, url, server_env(args.soak_cores), args.ready_timeout) as proc:
            os.sched_setaffinity(0, client_cpus(all_cpus, server))
            answers = record_answers(url, valid)
            res = run_soak(url, proc.pid, valid, answers, invalid, args.soak, args.soak_concurrency, args.seed)
    finally:
        os.sched_setaffinity(0, all_cpus)
    print(f"[serve] soak {'PASSED' if res['passed'] else 'FAILED'}: {res['mismatches']} mismatches, "
          f"{res['server_errors']} server errors, {res['wrong_status']} wrong statuses", flush=True)
    return res | dict(export=info["name"], cores=args.soak_cores, encoder=args.encoders[0], fixed_requests=len(valid))


def faiss_section(args) -> dict | None:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((FAISS_CENTRES, args.faiss_dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    items = clustered_vectors(rng, args.faiss_items, centres, FAISS_NOISE)
    queries = clustered_vectors(rng, args.faiss_queries, centres, FAISS_NOISE)
    print(f"[serve] faiss: {args.faiss_items:,} items x {args.faiss_dim}, nprobe {args.faiss_nprobe}", flush=True)
    res = faiss_recall(items, queries, args.faiss_nprobe)
    if res is None:
        print("[serve] faiss: SKIPPED, faiss is not importable (pip install faiss-cpu)", flush=True)
    else:
        print("[serve] faiss: " + ", ".join(f"nprobe {r['nprobe']} recall {r['recall']:.4f}" for r in res["rows"]))
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", action="append", required=True, metavar="DIR",
                   help="export folder (items.jsonl.gz + config.json) to serve; repeat for several in one run")
    p.add_argument("--history", type=int, default=200, help="history length per request (default 200)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                   help="requests in flight, one table row each (default 1 8 32)")
    p.add_argument("--cores", type=int, nargs="+", default=[1, 2],
                   help="server cores, one server each: taskset -c 0 / 0,1; OMP_NUM_THREADS = --threads = it")
    p.add_argument("--encoders", nargs="+", default=["eager", "program"], choices=["eager", "program", "aoti"],
                   help="the server's --encoder, one server each (default eager program; aoti only if asked)")
    p.add_argument("--index", default="exact", choices=["exact", "faiss"], help="the server's --index")
    p.add_argument("--requests", type=int, default=400, help="timed requests per row (default 400)")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before each row (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds the histories, the soak's mix and the faiss data")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for /ready before failing with the server's output (default 300)")
    p.add_argument("--soak", type=int, default=10_000, help="soak requests against one server, 0 = skip")
    p.add_argument("--soak-cores", type=int, default=1, help="the soak server's cores (first export, first encoder)")
    p.add_argument("--soak-concurrency", type=int, default=8, help="soak requests in flight (default 8)")
    p.add_argument("--faiss-items", type=int, default=1_000_000, help="synthetic faiss catalogue size, 0 = skip")
    p.add_argument("--faiss-dim", type=int, default=64, help="its vector dimension (default 64)")
    p.add_argument("--faiss-queries", type=int, default=200, help="recall / latency queries (default 200)")
    p.add_argument("--faiss-nprobe", type=int, nargs="+", default=[16, 32, 64], help="nprobe values, a row each")
    p.add_argument("--tag", default="", help="results go to OUT/serve<tag>.{json,md}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder (default bench/results)")
    args = p.parse_args(argv)
    have = len(os.sched_getaffinity(0))
    if max(args.cores + [args.soak_cores]) > have or min(args.cores + [args.soak_cores]) < 1:
        p.error(f"--cores / --soak-cores must be within 1..{have} (the CPUs this process may use)")
    if min(args.concurrency) < 1 or args.requests < 1 or args.warmup < 0 or args.history < 1:
        p.error("--concurrency, --requests and --history must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the servers
    command = "python bench/serve.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    load_before, all_cpus = loadavg(), sorted(os.sched_getaffinity(0))
    exports = [load_export(d) for d in args.export]
    record = dict(meta=dict(command=command), args=vars(args), exports=[e[0] for e in exports], latency=[],
                  failures=[], soak=None, faiss=None)
    save = lambda: write_results(record, args, load_before)
    for exp in exports:
        bench_export(record, exp, args, all_cpus, save)
    if args.soak:
        try:
            record["soak"] = soak_section(exports[0], args, all_cpus)
        except ServerStartError as e:
            print(f"[serve] soak server FAILED to start: {e}", file=sys.stderr, flush=True)
            record["failures"].append(dict(what="soak server", error=str(e)))
        save()
    if args.faiss_items:
        record["faiss"] = faiss_section(args)
    save()
    print(f"[serve] wrote {Path(args.out) / f'serve{args.tag}'}.{{json,md}}", flush=True)
    return 1 if record["failures"] or (record["soak"] and not record["soak"]["passed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
