"""Parity, end to end: a run's test split sent through the HTTP server of its export must give the
trainer's test numbers and the offline top-10 lists.

    python bench/serve_parity.py --run runs/bench_ml1m/hstu_speed_s0               # exports if needed
    python bench/serve_parity.py --run runs/bench_amazon-beauty/hstu_id_s0 --encoder eager
    python bench/serve_parity.py --run runs/<a run on shards with searches> --task search

1. export the run (`python -m train export`) unless --export names an existing folder;
2. offline: the run's own checkpoint scores every test user's history (the evaluator's inputs and its
   history-exclusion rule) and keeps the top 10;
3. online: `python -m serve` on that export; every test user becomes one POST /recommend with the same
   history window, timestamps, request time (the target's time) and excluded items, 16 in flight so
   micro-batches mix users;
4. HR@10 / NDCG@10 recomputed from the served lists must equal metrics.json's test numbers, and each
   served list must equal the offline one (two ids may swap only where their scores are within 1e-6).
With --task search, steps 2-4 take every SEARCH test target as the evaluator poses it (task 'search':
history + the target's query token) and POST /search: the history's past searches travel as
`history_queries` (the query string of each event that was one), the query as the string of the
target's query id, the request time as the query token's time; the numbers to equal are metrics.json's
test_tasks.search. (With --task rec, users whose history holds a search are skipped: /recommend has no
way to say an event was a search.) /search runs the eager model whatever --encoder says.
Writes bench/results/serve_parity_<dataset>[_search].{md,json}; exit status 1 when parity fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import header, metadata  # noqa: E402
from bench.serve import free_port, running_server, server_command, server_env  # noqa: E402
from data_pipeline.schema import TOKEN_QUERY  # noqa: E402

K, TOL = 10, 1e-6


def offline_lists(run: Path, cfg, manifest: dict, task: str = "rec") -> tuple[list[dict], dict]:
    """Per test target posed as `task` ('rec': every target, history only; 'search': every search target,
    history + its query token): the request the server will get and the offline top-K (ids, scores)."""
    from data_pipeline.collate import make_loader
    from data_pipeline.read_shards import cold_items
    from model.seqrec import model_from_state
    from train.engine import consolidated_state_dict
    from train.evaluate import _history_mask
    facts = dict(num_items=manifest["vocab"]["num_items"], num_queries=manifest["vocab"]["num_queries"],
                 max_len=cfg.data.max_len, level_sizes=(manifest.get("semantic_ids") or {}).get("level_sizes"))
    model = model_from_state(cfg.model, facts, consolidated_state_dict(run / "ckpt", "best"))
    raw = manifest["id_maps"]["items"]
    cold = torch.from_numpy(cold_items(manifest))
    unrankable = cold if cfg.model.item_repr == "id" and len(cold) else torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        table = F.normalize(model.embed.item(torch.arange(facts["num_items"] + 1)).float(), dim=-1, eps=1e-6)
    users, skipped = [], 0
    loader = replace(cfg.data, batch_size=cfg.eval.batch_size, num_workers=0)
    for batch in make_loader(cfg.shards, "test", loader, shuffle=False, task=task):
        with torch.no_grad():
            q = model(batch, last_only=True).float()  # (B, D)
        targets = batch.targets[batch.offsets[1:] - 1]
        excluded = _history_mask(batch, 0, facts["num_items"] + 1, targets, cfg.eval.exclude_history)
        scores = q @ table.T
        scores[:, 0] = -torch.inf
        scores[excluded] = -torch.inf
        scores[:, unrankable] = -torch.inf
        top = torch.topk(scores, K, dim=1)
        for b in range(batch.num_sequences):
            body = request_body(batch, b, raw, manifest["id_maps"]["queries"], task)
            if body is None:
                skipped += 1
                continue
            body["exclude"] = [raw[int(i)] for i in torch.nonzero(excluded[b], as_tuple=True)[0]]
            users.append(dict(target=raw[int(targets[b])], offline=[raw[int(i)] for i in top.indices[b]],
                              offline_scores=top.values[b].tolist(), body=body))
    return users, dict(skipped_search_users=skipped)


def request_body(batch, b: int, raw: list[str], queries: list[str], task: str) -> dict | None:
    """Sequence b's tokens as the request that makes the server build the same tokens: each item token an
    event (timestamp, action); a query token before an item token is that event's search
    (`history_queries`, /search only: None for 'rec', which /recommend cannot express); for 'search' the
    final query token is the request's query, at the request time `now`."""
    lo, hi = int(batch.offsets[b]), int(batch.offsets[b + 1])
    qids, types = batch.query_ids[lo:hi].tolist(), batch.token_types[lo:hi].tolist()
    if task == "search":
        if types[-1] != TOKEN_QUERY:
            raise ValueError(f"a search sequence must end with its query token, got token types {types}")
        now, hi = int(batch.timestamps[hi - 1]), hi - 1
    else:
        if any(qids):  # a search token in the history: not expressible as /recommend
            return None
        now = int(batch.next_timestamps[hi - 1])
    items = [t for t in range(lo, hi) if types[t - lo] != TOKEN_QUERY]
    past = [queries[qids[t - lo - 1]] if t > lo and types[t - lo - 1] == TOKEN_QUERY else None for t in items]
    col = lambda x: [int(x[t]) for t in items]  # noqa: E731
    body = dict(history=[raw[i] for i in col(batch.item_ids)], timestamps=col(batch.timestamps), now=now,
                actions=col(batch.actions), k=K, exclude_history=False)
    if task == "search":
        body.update(query=queries[int(batch.target_query[b])], history_queries=past)
    return body


async def _send_all(url: str, bodies: list[dict], concurrency: int, path: str = "/recommend") -> list[dict]:
    import httpx
    sem, out = asyncio.Semaphore(concurrency), [None] * len(bodies)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(i):
            async with sem:
                r = await client.post(path, json=bodies[i])
                out[i] = dict(status=r.status_code, body=r.json())
        await asyncio.gather(*(one(i) for i in range(len(bodies))))
    return out


def compare(users: list[dict], answers: list[dict]) -> dict:
    """Served metrics and list equality against the offline lists."""
    hr, ndcg, mismatched, errors, first = [], [], 0, 0, None
    for u, a in zip(users, answers):
        if a["status"] != 200:
            errors += 1
            continue
        ids = [x["id"] for x in a["body"]["items"]]
        scores = [x["score"] for x in a["body"]["items"]]
        pos = ids.index(u["target"]) + 1 if u["target"] in ids else None
        hr.append(1.0 if pos else 0.0)
        ndcg.append(1.0 / math.log2(pos + 1) if pos else 0.0)
        same = len(ids) == K and all(i == j or abs(s - t) <= TOL for i, j, s, t in
                                     zip(ids, u["offline"], scores, u["offline_scores"]))
        if not same:
            mismatched += 1
            first = first or dict(target=u["target"], served=ids, offline=u["offline"])
    mean = lambda x: float(np.mean(x)) if x else math.nan  # noqa: E731
    return dict(users=len(users), http_errors=errors, mismatched_lists=mismatched, first_mismatch=first,
                served={"hr@10": mean(hr), "ndcg@10": mean(ndcg)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="finished run directory (config.json, metrics.json, ckpt/best)")
    p.add_argument("--export", help="its export folder (default exports/<run name>; written when missing)")
    p.add_argument("--encoder", default="program", choices=("program", "eager", "aoti"))
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--tag", default="", help="suffix of the results file names")
    p.add_argument("--task", default="rec", choices=("rec", "search"),
                   help="rec: every test target as POST /recommend (history only); search: every search test "
                        "target as POST /search (history with its past searches + the target's query), against "
                        "metrics.json test_tasks.search")
    args = p.parse_args(argv)
    from configs.load import load_config
    from configs.schema import PretrainConfig
    from data_pipeline.read_shards import load_manifest
    run = Path(args.run)
    export = Path(args.export or ROOT / "exports" / run.name)
    if not (export / "export.json").exists():
        subprocess.run([sys.executable, "-m", "train", "export", "--run", str(run), "--out", str(export)],
                       cwd=ROOT, check=True)
    cfg = load_config(PretrainConfig, run / "config.json")
    manifest = load_manifest(cfg.shards)
    metrics = json.loads((run / "metrics.json").read_text())
    want = metrics["test"] if args.task == "rec" else (metrics.get("test_tasks") or {}).get("search")
    if want is None:
        p.error(f"{run / 'metrics.json'} has no test_tasks.search (the shards have no search test targets)")
    print(f"offline top-{K} of {run} on its test split ({args.task}) ...", flush=True)
    users, extra = offline_lists(run, cfg, manifest, args.task)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    path = "/recommend" if args.task == "rec" else "/search"
    with running_server(server_command(str(export), port, [0, 1], args.encoder, "exact"), url, server_env(2)):
        print(f"sending {len(users):,} requests to {url}{path} ({args.concurrency} in flight) ...", flush=True)
        answers = asyncio.run(_send_all(url, [u["body"] for u in users], args.concurrency, path))
    res = compare(users, answers)
    trainer = {k: want[k] for k in ("hr@10", "ndcg@10")}
    res.update(extra, trainer=trainer, trainer_count=want["count"], encoder=args.encoder, task=args.task,
               run=str(run), export=str(export), exclude_history=cfg.eval.exclude_history)
    res["metrics_equal"] = all(abs(res["served"][k] - trainer[k]) < 1e-9 for k in trainer)
    res["passed"] = bool(res["metrics_equal"] and res["mismatched_lists"] == 0 and res["http_errors"] == 0
                         and res["users"] == res["trainer_count"])
    name = manifest["dataset"] + ("_search" if args.task == "search" else "") + args.tag
    write(res, name, " ".join(["python bench/serve_parity.py"] + sys.argv[1:]))
    print(json.dumps({k: res[k] for k in ("users", "served", "trainer", "mismatched_lists", "http_errors", "passed")}))
    return 0 if res["passed"] else 1


def write(res: dict, name: str, command: str) -> None:
    meta = metadata(command)
    out = ROOT / "bench" / "results"
    (out / f"serve_parity_{name}.json").write_text(json.dumps(dict(meta=meta, **res), indent=2) + "\n")
    s, t = res["served"], res["trainer"]
    lines = header(f"Serving parity: {name}", meta) + [
        f"Run `{res['run']}`, export `{res['export']}`, encoder `{res['encoder']}`, history exclusion "
        f"`{res['exclude_history']}`, task `{res['task']}`; every test target of the task sent through HTTP.", "",
        "| | users | HR@10 | NDCG@10 |", "|---|---|---|---|",
        f"| trainer (metrics.json) | {res['trainer_count']:,} | {t['hr@10']:.6f} | {t['ndcg@10']:.6f} |",
        f"| served (recomputed from the HTTP answers) | {res['users']:,} | {s['hr@10']:.6f} | {s['ndcg@10']:.6f} |",
        "", f"- top-10 lists different from the offline ones (beyond ties within {TOL:g}): "
        f"**{res['mismatched_lists']}** of {res['users']:,}",
        f"- HTTP errors: {res['http_errors']}; users skipped (search token in the history): "
        f"{res['skipped_search_users']}", f"- **parity {'PASSED' if res['passed'] else 'FAILED'}**", ""]
    (out / f"serve_parity_{name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
