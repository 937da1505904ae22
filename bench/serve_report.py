"""Markdown of bench/serve.py's record (latency table, the p99 target, soak, faiss), and the constants
both files use. Split out of bench/serve.py to keep each file readable."""
from __future__ import annotations

import json

from bench.record import header

TARGET_P99_MS = 10.0  # 2-layer model, concurrency 1, 1 core
FAISS_CENTRES, FAISS_NOISE = 1000, 1.0  # topic centres; noise norm relative to the unit centre
INVALID_KINDS = {
    "unknown_ids": "history of ids not in the catalogue only",
    "history_string": "history is a string, not a list",
    "missing_history": "no history field",
    "k_zero": "k = 0",
    "k_huge": "k = 10**9 (over the catalogue)",
    "k_string": 'k = "ten"',
    "exclude_history_string": 'exclude_history = "maybe"',
    "nan_timestamps": "a timestamp written as the raw JSON token NaN",
    "inf_timestamps": "timestamps written as raw Infinity / -Infinity tokens",
    "timestamps_length": "timestamps one shorter than history",
    "invalid_json": "truncated JSON bytes",
    "not_an_object": "a JSON list instead of an object",
    "body_over_2mb": "a valid request padded past 2.5 MiB with excluded ids",
}



def _f(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def target_lines(record: dict) -> list[str]:
    """The p99 target, judged on the measured 1-core, concurrency-1 row of every 2-layer export."""
    out = []
    for e in (e for e in record["exports"] if e.get("num_layers") == 2):
        for enc in record["args"]["encoders"]:
            row = next((r for r in record["latency"] if r["dir"] == e["dir"] and r["encoder"] == enc
                        and r["cores"] == 1 and r["concurrency"] == 1), None)
            verdict = "not measured" if row is None or row["p99_ms"] is None else \
                f"{'MET' if row['p99_ms'] <= TARGET_P99_MS else 'NOT MET'} (p99 {row['p99_ms']:.2f} ms)"
            out.append(f"- {e['name']}, {enc}: **{verdict}**")
    return out or ["- no export with a 2-layer model (config.json model.num_layers == 2) in this run"]


def soak_md(s: dict) -> list[str]:
    rss = {k: _f(v / 1024 if v else None, ".1f") for k, v in s["rss_kb"].items()}
    lines = [f"## Soak: {s['requests']} requests at concurrency {s['concurrency']} ({s['export']}, "
             f"{s['cores']} core(s), {s['encoder']}), {s['seconds']:.1f} s", "",
             f"**{'PASSED' if s['passed'] else 'FAILED'}**: {s['mismatches']} mismatched responses (valid requests "
             f"answered differently from their recorded answer), {s['server_errors']} server errors (5xx or "
             f"connection errors), {s['wrong_status']} wrong statuses (valid not 200, invalid not 4xx). Server RSS "
             f"before {rss['before']} MiB, after {rss['after']} MiB, peak {rss['peak']} MiB (sampled every 0.5 s).",
             "", "| kind | what | sent | statuses |", "|---|---|---|---|"]
    what = {"valid": f"one of {s['fixed_requests']} fixed valid requests (expect 200, same ids)", **INVALID_KINDS}
    for kind, statuses in s["by_kind"].items():
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
        lines.append(f"| {kind} | {what.get(kind, '')} | {sum(statuses.values())} | {shown} |")
    lines += [""] + [f"- example problem: `{json.dumps(x)}`" for x in s["examples"]]
    return lines


def faiss_md(fz: dict) -> list[str]:
    lines = [f"## Faiss IVF-Flat vs exact: recall@{fz['k']}", "",
             f"Synthetic catalogue (not a model's table): {fz['items']:,} unit vectors of dim {fz['dim']}, each one of "
             f"{FAISS_CENTRES} gaussian topic centres + noise of norm ~{FAISS_NOISE}, normalised; {fz['queries']} "
             f"queries drawn the same way. nlist {fz['nlist']}, build {fz['build_s']:.1f} s (all cores); queries "
             f"batch 1, {fz['threads']} thread(s); exact search {fz['exact_ms_p50']:.2f} ms a query (median).", "",
             f"| nprobe | recall@{fz['k']} | faiss ms/query (median) | exact ms/query (median) |", "|---|---|---|---|"]
    lines += [f"| {r['nprobe']} | {r['recall']:.4f} | {r['faiss_ms_p50']:.3f} | {fz['exact_ms_p50']:.3f} |"
              for r in fz["rows"]]
    return lines


def render_md(record: dict) -> str:
    m, a = record["meta"], record["args"]
    lines = header("Serving benchmark: POST /recommend over HTTP", m)
    lines += [f"Machine: {m['machine']['cpu']}, {m['machine']['cpus']} cores. Server `python -m serve` pinned with "
              f"taskset to the first `cores` CPUs, OMP_NUM_THREADS = --threads = cores, --index {a['index']}. Load "
              f"generator: one asyncio process (this script), one keep-alive HTTP/1.1 connection per request in "
              f"flight; latency is client-side, so it includes the client's HTTP work (GET /health p50: that "
              f"floor, measured once per server, sequentially). Each "
              f"row: {a['warmup']} untimed then {a['requests']} timed requests, every one a different history of "
              f"{a['history']} distinct servable items with increasing timestamps, k 10.", "",
              "| export | layers | dim | max_len | items | servable |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['num_layers']} | {e['dim']} | {e['max_len']} | {e['items']} | {e['servable']} |"
              for e in record["exports"]]
    lines += ["", "## Latency", "", "| export | cores | encoder | concurrency | p50 ms | p99 ms | mean ms | QPS "
              "| server took_ms p50 | GET /health p50 ms | non-200 | client shares server cores? |", "|---" * 12 + "|"]
    for r in record["latency"]:
        share = f"yes (client on {r['client_cpus']})" if r["shares"] else f"no (client on {r['client_cpus']})"
        lines.append(f"| {r['export']} | {r['cores']} | {r['encoder']} | {r['concurrency']} | {_f(r['p50_ms'])} | "
                     f"{_f(r['p99_ms'])} | {_f(r['mean_ms'])} | {_f(r['qps'], '.1f')} | {_f(r['took_p50_ms'])} | "
                     f"{_f(r.get('health_p50_ms'))} | {r['errors']} | {share} |")
    lines += ["", f"Target: 2-layer model, concurrency 1, 1 core: /recommend p99 <= {TARGET_P99_MS:g} ms", ""]
    lines += target_lines(record)
    for fail in record["failures"]:
        lines += ["", f"**FAILED** {fail['what']}:", "", "```", fail["error"], "```"]
    if record["soak"]:
        lines += [""] + soak_md(record["soak"])
    if record["faiss"]:
        lines += [""] + faiss_md(record["faiss"])
    return "\n".join(lines) + "\n"


