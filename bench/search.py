"""Unified search + recommendation: one HSTU trained on both tasks against single-task controls and
untrained search baselines, every search target ranked as search (history + query), recommendation
(history only) and query-only (no history), with seen- and unseen-query slices.

    python bench/search.py --dataset amazon-beauty --data ../shared/data/amazon-beauty
    python bench/search.py --dataset ml-latest-small --data ../shared/data/ml-latest-small
    python bench/search.py --dataset amazon-beauty --data ../shared/data/amazon-beauty --no-train  # tabulate

Steps (each skipped when its output exists, so the command resumes run by run):
1. shards from configs/data/<dataset>-search.yaml (search events, held-out queries / last-tag test split);
2. content: item + query MiniLM vectors (and rq_kmeans semantic IDs, which item_repr id+sid+content reads);
3. one `python -m train pretrain` per (row, seed) under runs/bench_search_<dataset>/, seed 0 of every row
   first, then seed 1, ...;
4. baselines (BM25, dense MiniLM, category popularity) on the same search test targets, cached as JSON.
Results: bench/results/search_<short>.{md,json}, rewritten after every run from the run directories.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import seqrec as S  # noqa: E402
from bench.record import header, metadata  # noqa: E402

DATASETS = {  # dataset -> (data config, pretrain recipe, results short name)
    "amazon-beauty": ("configs/data/amazon-beauty-search.yaml", "configs/pretrain/beauty_search.yaml", "beauty"),
    "ml-latest-small": ("configs/data/ml-latest-small-search.yaml", "configs/pretrain/mlsmall_search.yaml", "mlsmall"),
}
ROWS = {  # row -> overrides of the recipe
    "joint (query text)": [],
    "joint (query id)": ["model.query_repr=id"],
    "search-only": ["loss.rec_weight=0.0", "eval.select_task=search"],
    "rec-only": ["data.query_tokens=false", "eval.select_task=rec"],
}
BASELINES = ("bm25", "dense", "category_popularity")
BOOTSTRAP = 2000  # resamples of the search targets for the 95% intervals


def prepare(dataset: str, data: str, root: Path) -> Path:
    """Shards + content for the dataset; returns the shard folder."""
    import subprocess
    data_cfg = DATASETS[dataset][0]
    shards = S.ROOT / "shards" / f"{dataset}-search"
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--config", data_cfg, "--raw", data,
                        "--out", str(shards), "--quiet"], cwd=S.ROOT, check=True)
    if not (shards / "content" / "queries.json").exists() or not (shards / "semantic_ids").exists():
        extra = ["--config", "configs/content/beauty.yaml"] if dataset.startswith("amazon") else []
        subprocess.run([sys.executable, "-m", "data_pipeline", "content", "--shards", str(shards), *extra,
                        "--set", "semantic_ids.method=rq_kmeans", "--quiet"], cwd=S.ROOT, check=True)
    return shards


def run_name(row: str, seed: int) -> str:
    return "".join(c if c.isalnum() else "_" for c in row).strip("_") + f"_s{seed}"


def cached_baselines(root: Path, manifest: dict) -> dict | None:
    path = root / "baselines.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("manifest_hash") == manifest["content_hash"]:
            return cached["rows"]
    return None


def baselines(shards: Path, root: Path) -> dict:
    """The untrained baselines' metrics on the search test targets (cached in root/baselines.json)."""
    path = root / "baselines.json"
    manifest = json.loads((shards / "manifest.json").read_text())
    if (cached := cached_baselines(root, manifest)) is not None:
        return cached
    from train import search_baselines as B
    rows = {"bm25": B.bm25_metrics(shards), "dense": B.dense_metrics(shards),
            "category_popularity": B.category_popularity_metrics(shards)}
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(manifest_hash=manifest["content_hash"], rows=rows)) + "\n")
    return rows


def _slice(m: dict | None, name: str, key: str) -> float | None:
    if m is None:
        return None
    if name == "all":
        return m.get(key)
    return ((m.get("per_slice") or {}).get(name) or {}).get(key)


def _cell(vals: list) -> str:
    ms = S.mean_sd(vals)
    return "-" if ms is None else f"{ms['mean']:.4f} ± {ms['sd']:.4f}" if len(vals) > 1 else f"{ms['mean']:.4f}"


def _seconds(vals: list) -> str:
    ms = S.mean_sd(vals) if vals else None
    return "-" if ms is None else f"{ms['mean']:.0f}"


def ndcg10(ranks: np.ndarray) -> np.ndarray:
    """Per-target NDCG@10 from ranks (-1 = miss)."""
    r = ranks.astype(np.float64)
    return np.where((r >= 1) & (r <= 10), 1.0 / np.log2(r + 1.0), 0.0)


def bootstrap_ci(ranks_per_seed: list[list[int]], seed: int = 0) -> list[float] | None:
    """95% interval of the mean search NDCG@10 over targets, resampling targets (seeds averaged per target)."""
    if not ranks_per_seed or any(r is None for r in ranks_per_seed):
        return None
    arr = np.array(ranks_per_seed)  # (seeds, users); 0 = no target
    has = (arr != 0).all(0)
    per_target = ndcg10(arr[:, has]).mean(0)  # (T,)
    rng = np.random.default_rng(seed)
    means = per_target[rng.integers(0, len(per_target), (BOOTSTRAP, len(per_target)))].mean(1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


SEARCH_COLS = [("all", "hr@10"), ("all", "ndcg@10"), ("seen_query", "ndcg@10"), ("unseen_query", "ndcg@10")]


def table_rows(runs: dict[str, list[dict]], base: dict) -> list[dict]:
    """One dict per table row: name, seeds, search cells (task 'search'), rec cells (task 'rec')."""
    out = []
    for row, ms in runs.items():
        if not ms:
            continue
        for label, task in ((row, "search"), (f"{row}: query-only (empty history)", "query_only")):
            if task == "query_only" and not row.startswith("joint (query text)"):
                continue
            ts = [m["test_tasks"].get(task) for m in ms]
            rec = [m["test_tasks"]["rec"] for m in ms] if task == "search" else [None] * len(ms)
            out.append(dict(row=label, seeds=len(ms), search={f"{s}/{k}": [_slice(t, s, k) for t in ts]
                                                               for s, k in SEARCH_COLS},
                            rec={k: [_slice(r, "all", k) for r in rec] for k in ("hr@10", "ndcg@10")},
                            ci=bootstrap_ci([t.get("ranks") for t in ts]), epochs=[m["best_epoch"] for m in ms],
                            train_s=[m.get("train_seconds") for m in ms],
                            flags=sorted({f for m in ms for f in m["flags"]})))
    for name, m in base.items():
        out.append(dict(row=name, seeds=0, search={f"{s}/{k}": [_slice(m, s, k)] for s, k in SEARCH_COLS},
                        rec={"hr@10": [None], "ndcg@10": [None]}, ci=bootstrap_ci([m.get("ranks")]),
                        epochs=[], train_s=[], flags=[], note=m.get("match_rule", "")))
    return out


def mean(vals: list) -> float | None:
    ms = S.mean_sd(vals)
    return None if ms is None else ms["mean"]


def checks(rows: list[dict]) -> list[dict]:
    """The issue's targets, evaluated on the table's means (None = a row is missing)."""
    by = {r["row"]: r for r in rows}
    get = lambda row, part, key: mean(by[row][part][key]) if row in by else None  # noqa: E731
    joint_s = get("joint (query text)", "search", "all/ndcg@10")
    # the target names BM25 and dense retrieval; category popularity is reported, not a target
    best_base = max([v for v in (get(b, "search", "all/ndcg@10") for b in ("bm25", "dense")) if v is not None],
                    default=None)
    qonly = get("joint (query text): query-only (empty history)", "search", "all/ndcg@10")
    out = [
        ("joint >= 2x the better of BM25 / dense retrieval on search NDCG@10", joint_s, best_base,
         lambda a, b: a >= 2 * b),
        ("joint >= search-only on search NDCG@10", joint_s, get("search-only", "search", "all/ndcg@10"),
         lambda a, b: a >= b),
        ("joint >= rec-only on recommendation NDCG@10", get("joint (query text)", "rec", "ndcg@10"),
         get("rec-only", "rec", "ndcg@10"), lambda a, b: a >= b),
        ("joint (history + query) >= 1.2x query-only on search NDCG@10", joint_s, qonly, lambda a, b: a >= 1.2 * b),
        ("unseen-query search NDCG@10: query text > query id",
         get("joint (query text)", "search", "unseen_query/ndcg@10"),
         get("joint (query id)", "search", "unseen_query/ndcg@10"), lambda a, b: a > b),
    ]
    return [dict(check=c, ours=a, other=b, met=None if a is None or b is None else bool(f(a, b)))
            for c, a, b, f in out]


def write(short: str, dataset: str, command: str, rows: list[dict], manifest: dict, recipe: str) -> None:
    meta = metadata(command)
    res = S.ROOT / "bench" / "results"
    (res / f"search_{short}.json").write_text(json.dumps(dict(meta, dataset=dataset, rows=rows, checks=checks(rows),
                                                              search=manifest["counts"]["search"] | {
                                                                  "unseen_test_queries": None}), indent=1) + "\n")
    lines = header(f"{dataset}: one model for search and recommendation", meta)
    lines += ["| row | seeds | search HR@10 | search NDCG@10 | NDCG@10 seen query | NDCG@10 unseen query | "
              "search NDCG@10 95% CI | rec HR@10 | rec NDCG@10 | best epochs | train s (mean) | flags |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "-" if r["ci"] is None else f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]"
        cells = [_cell(r["search"][f"{s}/{k}"]) for s, k in SEARCH_COLS] + [ci] + \
                [_cell(r["rec"][k]) for k in ("hr@10", "ndcg@10")]
        lines.append(f"| {r['row']} | {r['seeds'] or '-'} | " + " | ".join(cells) +
                     f" | {r['epochs'] or '-'} | {_seconds(r['train_s'])} | "
                     f"{', '.join(r['flags']) or '-'} |")
    lines += ["", "Checks (means over seeds):", "", "| target | ours | other | met |", "|---|---|---|---|"]
    for c in checks(rows):
        show = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {c['check']} | {show(c['ours'])} | {show(c['other'])} | "
                     f"{'n/a' if c['met'] is None else 'yes' if c['met'] else '**no**'} |")
    sc = manifest["counts"]["search"]
    lines += ["", f"- Search test targets: {sc['test_search_targets']:,} ({sc['test_unseen_query_targets']:,} with a "
              f"query no training input holds: the unseen-query slice); recommendation columns rank every one of "
              f"the {manifest['counts']['split']['test_targets']:,} test targets from the history alone.",
              f"- Data: {manifest['notes'][-1]}" if manifest["notes"] else "",
              "- Each search target is ranked over all items, history items excluded (rule 'full'); search = "
              "history + the target's query token, rec = history only, query-only = the query token alone (the "
              "history still decides the excluded items). A rec-only model has no query tokens: its search "
              "columns rank the search targets from the history alone.",
              f"- Trained rows: {recipe} + the row's overrides "
              + "; ".join(f"{k}: {' '.join(v) or 'none'}" for k, v in ROWS.items()) + ".",
              "- 95% CI: bootstrap over the search targets (per-target NDCG@10 averaged over seeds first), "
              f"{BOOTSTRAP} resamples."]
    lines += [f"- {r['row']}: {r['note']}" for r in rows if r.get("note")]
    (res / f"search_{short}.md").write_text("\n".join(x for x in lines if x is not None) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--data", required=True, help="raw data folder, e.g. ../shared/data/amazon-beauty")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
    p.add_argument("--no-train", action="store_true", help="only tabulate finished runs and baselines")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every trained row (e.g. train.epochs=2 for a smoke run)")
    args = p.parse_args(argv)
    _, recipe, short = DATASETS[args.dataset]
    root = S.ROOT / "runs" / f"bench_search_{args.dataset}"
    shards = prepare(args.dataset, args.data, root)
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = cached_baselines(root, manifest) or {}  # computed after the runs (they need no training)
    command = "python bench/search.py " + " ".join(argv if argv is not None else sys.argv[1:])
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    for seed in seeds:  # seed 0 of every row first: a short session still fills every row
        for row in rows:
            run_dir = root / run_name(row, seed)
            if args.no_train and not (run_dir / "metrics.json").exists():
                continue
            m = S.run_one(recipe, run_dir, shards, seed, ROWS[row] + args.set, nproc=1)
            if m is not None:
                runs[row].append(m)
                write(short, args.dataset, command, table_rows(runs, base), manifest, recipe)
    base = baselines(shards, root)
    write(short, args.dataset, command, table_rows(runs, base), manifest, recipe)
    print((S.ROOT / "bench" / "results" / f"search_{short}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
