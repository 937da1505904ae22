"""Amazon reviews (Beauty, Sports, ... any `amazon-<category>` the reader knows) with content tokens:
ID-only vs semantic-ID vs content item representations, the generative (semantic-ID beam search) head,
and a cold-start slice, all on one split.

    python bench/beauty.py amazon-beauty ../shared/data/amazon-beauty             # every row, 1 seed
    python bench/beauty.py amazon-sports ../shared/data/amazon-sports --rows "hstu id,hstu id+sid+content"
    python bench/beauty.py amazon-beauty ../shared/data/amazon-beauty --no-train  # tabulate finished runs

Steps (each skipped when its output exists, so the command resumes run by run):
1. shards (shards/<dataset>-cold): the P5/TIGER leave-one-out split with a share of the items held out
   of training (--cold-frac, default 5%);
2. content: item text (title, brand, category path, price) -> all-MiniLM-L6-v2 -> RQ-VAE semantic IDs
   fitted on the warm items; cold items get codes from the saved codebook (configs/content/beauty.yaml,
   the recipe for every category);
3. one `python -m train pretrain` per (row, seed) under runs/bench_<dataset>/, tested once.
Results: bench/results/<dataset>[<tag>].{md,json}, rewritten after every run; published references are shown
only for the dataset they were published on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import seqrec as S  # noqa: E402
from bench.record import header, metadata  # noqa: E402

HSTU = "configs/pretrain/beauty_hstu.yaml"
CONTENT = "configs/content/beauty.yaml"
ROWS = {  # row name -> (config, overrides)
    "hstu id": (HSTU, ["model.item_repr=id"]),
    "hstu sid": (HSTU, ["model.item_repr=sid"]),
    "hstu id+sid": (HSTU, ["model.item_repr=id+sid"]),
    "hstu id+sid+content": (HSTU, ["model.item_repr=id+sid+content"]),
    "hstu id+sid+content +gen": (HSTU, ["model.item_repr=id+sid+content", "model.generative_head=true"]),
    # issue 17: id dropout 0.1, the best of the probes (bench/results/amazon-beauty_probes.md): without it
    # cold items, never negatives, took 32% of the top-10 slots (4.6% of the targets are cold)
    "hstu id+sid+content +iddrop": (HSTU, ["model.item_repr=id+sid+content", "model.id_dropout=0.1"]),
    # + the cold items' score offset chosen on validation (eval.calibrate_cold): seed 0 of +iddrop listed
    # cold items in 2.9% of the slots (4.6% of the targets) with cold R@10 .026; at the offset its validation
    # share picks (+0.015), 5.3% and .049, all-items R/N@10 unchanged (bench/results/amazon-beauty_cold_calibration.md)
    "hstu id+sid+content +iddrop +cal": (HSTU, ["model.item_repr=id+sid+content", "model.id_dropout=0.1",
                                                "eval.calibrate_cold=true"]),
    "sasrec id": ("configs/pretrain/beauty_sasrec.yaml", ["model.item_repr=id"]),
}
DEFAULT_ROWS = ("hstu id,hstu sid,hstu id+sid,hstu id+sid+content,hstu id+sid+content +gen,hstu id+sid+content +iddrop,"
                "hstu id+sid+content +iddrop +cal")
# Published numbers, (source, R@5, N@5, R@10, N@10), each only for the dataset it was measured on.
REFERENCES = {
    "amazon-beauty": [("TIGER paper", .0454, .0321, .0648, .0384),
                      ("SASRec, CE loss (RecBole, LETTER #20)", .0543, None, .0821, .0405)],
    "amazon-sports": [("TIGER paper", None, None, .0400, .0225)],
}
REFERENCE_SELECTION = {"TIGER": "TIGER: no model selection reported", "SASRec": "RecBole: validation"}
AT = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")
AT10 = ("hr@10", "ndcg@10")
COLD_SHARE = "cold_share@10"  # train/evaluate.py: cold items' share of the top-10 slots of every test list


def run_name(row: str, seed: int, tag: str = "") -> str:
    return f"{row.replace(' ', '_').replace('+', 'p')}{tag}_s{seed}"


def _prepare(dataset: str, data_dir: str, shards: Path, cold_frac: float) -> dict:
    from data_pipeline.read_shards import load_manifest
    S.ensure_shards(dataset, data_dir, shards, ["shards.samples_per_shard=2000",
                                                f"shards.cold_item_frac={cold_frac}"])
    S.ensure_content(shards, CONTENT)
    return load_manifest(shards)


def _cell(vals: list[float | None]) -> str:
    ms = S.mean_sd(vals)
    return "n/a" if ms is None else f"{ms['mean']:.4f} ± {ms['sd']:.4f}"


def _slice(m: dict, part: str) -> dict | None:
    return (m.get("per_slice") or {}).get(part)


def ranks_cold(m: dict) -> bool:
    """Can the run's dot-product head rank cold items? An ID-only model has no trained row for them, so
    evaluation leaves them out of its candidates (train/pretrain.py): its all-items columns would rank a
    different catalogue."""
    cfg_path = Path(m.get("run_dir", "")) / "config.json"
    if not cfg_path.exists():
        return True
    return json.loads(cfg_path.read_text()).get("model", {}).get("item_repr", "id") != "id"


def row_cells(ms: list[dict], key: str, all_items: bool = True) -> list[str]:
    """Warm-among-warm @5/@10 (every row: the same candidate set), all-items @5/@10 (rows that rank cold
    items; '-' otherwise), cold @10 and the cold items' share of the top-10 slots, for the runs' `key`
    metrics ('test' or 'test_generative')."""
    recs = [m[key] for m in ms]
    cells = [_cell([(_slice(r, "warm_among_warm") or {}).get(c) for r in recs]) for c in AT]
    cells += [_cell([r.get(c) for r in recs]) if all_items else "-" for c in AT]
    cells += [_cell([(_slice(r, "cold") or {}).get(c) for r in recs]) if all_items else "not ranked" for c in AT10]
    cells.append(_cell([r.get(COLD_SHARE) for r in recs]) if all_items else "0 (not ranked)")
    return cells


def _beam(ms: list[dict]) -> int | None:
    p = Path(ms[0].get("run_dir", "")) / "config.json"
    return json.loads(p.read_text()).get("eval", {}).get("beam") if p.exists() else None


def notes(dataset: str, runs: dict[str, list[dict]], manifest: dict) -> list[str]:
    """Notes computed from the manifest and the runs (no number typed in)."""
    done = [m for ms in runs.values() for m in ms]
    num_items = manifest["vocab"]["num_items"]
    cold = len(manifest["split_rule"].get("cold_items", []))
    out = [f"Split: P5/TIGER leave-one-out on the 5-core data of {dataset}, with {cold:,} of the {num_items:,} "
           f"items ({cold / num_items:.1%}) held out of training entirely: their events are removed from every "
           "input, a validation example whose target is cold is dropped, and test targets on them stay in (the "
           "cold slice). Cold items are never trained: negatives are drawn from warm items only."]
    if done:
        t = done[0]["test"]
        ps = t.get("per_slice") or {}
        n_cold, n_valid = (ps.get("cold") or {}).get("count"), (done[0].get("valid") or {}).get("count")
        if n_cold is not None and t.get("count"):
            out.append(f"Test targets: {t['count']:,} ({n_cold:,} cold, {n_cold / t['count']:.1%}); validation "
                       f"targets used for selection: " + (f"{n_valid:,}." if n_valid is not None else "n/a.")
                       + f" 'cold share@10' = the share of all top-10 slots of the test lists that cold items "
                       f"fill; a model that lists cold items as often as they are targets has {n_cold / t['count']:.1%}"
                       " (issue 17's bar: within 2x of it).")
    out += ["Columns: 'warm among warm' = warm test targets ranked among the warm items only (cold items "
            "removed from the candidates), the same candidate set for every row, so these columns compare "
            f"across rows; 'all items' = every test target ranked among all {num_items:,} items (a cold target "
            "is a miss for a row that cannot rank cold items); 'cold' = cold targets among all items. An "
            "ID-only row has nothing but an untrained random row for a cold item, so it does not rank them: "
            "its all-items and cold columns are left out ('-', 'not ranked'). 'n/a' = the run's metrics.json "
            "lacks that slice (a run from before it was recorded)."]
    out += S.protocol_notes(done)
    for name, ms in runs.items():
        gen = [m for m in ms if m.get("test_generative")]
        if not gen:
            continue
        beam = _beam(gen)
        line = (f"{name}: the generative head decodes the next item's semantic-ID tuple by trie-constrained beam "
                f"search (beam {beam if beam is not None else 'n/a'}); a target outside the beam is a miss. ")
        waw = lambda key: S.mean_sd([(_slice(m[key], "warm_among_warm") or {}).get("hr@10") for m in gen])  # noqa: E731
        cold_g = S.mean_sd([(_slice(m["test_generative"], "cold") or {}).get("hr@10") for m in gen])
        show = lambda ms: "n/a" if ms is None else f"{ms['mean']:.4f}"  # noqa: E731
        out.append(line + f"Warm-among-warm R@10: {show(waw('test_generative'))} (beam) vs {show(waw('test'))} "
                   f"(dot product of the same run); cold R@10 of the beam: {show(cold_g)}.")
    for name, ms in runs.items():
        if offsets := [m["cold_offset"] for m in ms if (m.get("cold_calibration") or {}).get("offset") is not None]:
            share = ms[0]["cold_calibration"]["target_share"]
            unc = [m["cold_calibration"].get("test_uncalibrated") or {} for m in ms]
            mean = lambda f: _cell([f(u) for u in unc])  # noqa: E731
            out.append(f"{name}: cold items' score offset chosen on validation per seed (eval.calibrate_cold: the "
                       f"offset whose validation cold share@10 is closest to their catalogue share, {share:.1%}; "
                       f"no test data): {offsets}. The same runs tested at offset 0 (uncalibrated): all items "
                       f"R@10 {mean(lambda u: u.get('hr@10'))}, N@10 {mean(lambda u: u.get('ndcg@10'))}; cold "
                       f"R@10 {mean(lambda u: (_slice(u, 'cold') or {}).get('hr@10'))}; cold share@10 "
                       f"{mean(lambda u: u.get(COLD_SHARE))}.")
    used = [name for name, ms in runs.items() if ms]
    out += [S.recipe_note(", ".join(n for n in used if ROWS[n][0] == recipe), recipe)
            for recipe in dict.fromkeys(ROWS[n][0] for n in used)]
    out += ["Row overrides: " + "; ".join(f"{n}: {', '.join(ROWS[n][1])}" for n in used) + "."] if used else []
    row_keys = {name: {o.split("=", 1)[0] for o in ROWS[name][1]} for name in runs}
    extra = {name: sorted({c for m in ms for c in m.get("changes", []) if c.split("=", 1)[0] not in row_keys[name]})
             for name, ms in runs.items()}
    out += [f"{name}: also {', '.join(ch)} (--set)." for name, ch in extra.items() if ch]
    if REFERENCES.get(dataset):
        sources = {r[0].split(",")[0].split(" ")[0] for r in REFERENCES[dataset]}
        out.append("Published rows use their own protocol (no cold hold-out; "
                   + "; ".join(v for k, v in REFERENCE_SELECTION.items() if k in sources) + ").")
    return out


def write_results(dataset: str, runs: dict[str, list[dict]], manifest: dict, command: str,
                  out: Path | None = None, tag: str = "") -> Path:
    out = Path(out) if out else S.ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    sid = manifest.get("semantic_ids")
    reference = REFERENCES.get(dataset, [])
    meta = metadata(command)
    table_notes = notes(dataset, runs, manifest)
    rows = []
    for name, ms in runs.items():
        for label, key, gs in S.group_runs(name, ms):
            secs = S.mean_sd([m.get("train_seconds") for m in gs])
            tail = (f"{[m['best_epoch'] for m in gs]} | {round(secs['mean']) if secs else 'n/a'} | {S.load_cell(gs)} | "
                    f"{', '.join(sorted({m.get('train_sha', 'unknown') for m in gs}))}")
            head = f"{len(gs)} | {key[0]} | {key[1]}"
            can = all(ranks_cold(m) for m in gs)
            rows.append(f"| {label} | {head} | {' | '.join(row_cells(gs, 'test', can))} | {tail} |")
            if all(m.get("test_generative") for m in gs):
                rows.append(f"| {label}: generative head (beam) | {head} | "
                            f"{' | '.join(row_cells(gs, 'test_generative'))} | {tail} |")
    summary = {label: dict(model=name, flags=list(key[2]), runs=[m["run"] for m in gs])
               for name, ms in runs.items() for label, key, gs in S.group_runs(name, ms)}
    table_notes += S.flag_notes({k: dict(v, seeds=len(v["runs"])) for k, v in summary.items()})
    (out / f"{dataset}{tag}.json").write_text(json.dumps(dict(**meta, dataset=dataset, semantic_ids=sid, runs=runs,
                                                         rows=summary, reference=reference, notes=table_notes),
                                                    indent=2) + "\n")
    lines = header(f"{dataset}: item representations, generative head, cold start", meta) + [
        "Test metrics at the epoch named in 'test at', full ranking, history excluded by the rule in 'excl.'; "
        "mean ± sd over seeds; train s = training seconds per run summed over epochs (validation and test "
        "excluded, as in every results table); load = mean 1-min load average while the runs trained "
        "('shared': above the runs' own threads); train sha = the commit each run trained at.", "",
        "| row | seeds | test at | excl. | warm among warm R@5 | N@5 | R@10 | N@10 | all items R@5 | N@5 | R@10 "
        "| N@10 | cold R@10 | cold N@10 | cold share@10 | best epochs | train s | load | train sha |",
        "|" + "---|" * 19]
    lines += rows
    pop = next((ms[0]["test_popularity"] for ms in runs.values() if ms and ms[0].get("test_popularity")), None)
    if pop:
        lines.append(f"| popularity | - | - | {pop.get('exclude_history', '-')} | "
                     f"{' | '.join(row_cells([dict(test=pop)], 'test'))} | - | - | - | - |")
    if reference:
        lines += ["", "Published (their protocol, no cold hold-out; all items = their whole catalogue):", "",
                  "| source | R@5 | N@5 | R@10 | N@10 |", "|---|---|---|---|---|"]
        lines += [f"| {r[0]} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in r[1:]) + " |"
                  for r in reference]
    if sid:
        st = sid["stats"]
        lines += ["", f"Semantic IDs: {sid['method']}, level sizes {sid['level_sizes']} (last = collision level), "
                  f"fitted on {st['fitted_on_items']:,} warm items, {st['assigned_after_fit']:,} cold items assigned "
                  f"with the saved codebook. Codebook usage per level {[round(u, 3) for u in st['usage']]}, "
                  f"collision rate {st['collision_rate']:.4f} (items sharing a "
                  f"{len(sid['level_sizes']) - 1}-code tuple), max group {st['max_group']}, "
                  f"relative reconstruction error {st['recon_rel_error']}."]
    lines += [""] + [f"- {n}" for n in table_notes] + [""]
    path = out / f"{dataset}{tag}.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="amazon-<category> (amazon-beauty, amazon-sports, ...): the reader, and the "
                   "name of the shards, runs and results")
    p.add_argument("data_dir", help="raw folder of that category (interactions.tsv.gz + items.jsonl.gz)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated rows from: {', '.join(ROWS)}")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--only-seeds", help="comma-separated seeds of range(--seeds) this process trains (the others "
                   "are tabulated when finished): seeds side by side, one process per core")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--cold-frac", type=float, default=0.05, help="share of items held out of training")
    p.add_argument("--shards", help="default shards/<dataset>-cold")
    p.add_argument("--runs", help="run directories (default runs/bench_<dataset>)")
    p.add_argument("--out", default=str(S.ROOT / "bench" / "results"), help="where <dataset>.{md,json} go")
    p.add_argument("--set", action="append", default=[], help="config override for every run (repeatable)")
    p.add_argument("--tag", default="", help="suffix of the run names and the results file, for a --set probe "
                   "(bench/beauty_probes.py tabulates every run with its config changes)")
    p.add_argument("--no-train", action="store_true", help="train nothing: tabulate the runs that finished")
    args = p.parse_args(argv)
    if not args.dataset.startswith("amazon-"):
        p.error(f"dataset must be amazon-<category>, got {args.dataset!r}")
    rows = args.rows.split(",")
    mine = set(range(args.seeds)) if args.only_seeds is None else {int(x) for x in args.only_seeds.split(",")}
    if bad := sorted(mine - set(range(args.seeds))):
        p.error(f"--only-seeds {bad} outside range(--seeds {args.seeds})")
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    shards = Path(args.shards) if args.shards else S.ROOT / "shards" / f"{args.dataset}-cold"
    runs_dir = Path(args.runs) if args.runs else S.ROOT / "runs" / f"bench_{args.dataset}"
    manifest = _prepare(args.dataset, args.data_dir, shards, args.cold_frac)
    command = "python bench/beauty.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs: dict[str, list[dict]] = {}
    for row in rows:
        config, overrides = ROWS[row]
        runs[row] = []
        for seed in range(args.seeds):
            run_dir = runs_dir / run_name(row, seed, args.tag)
            if (args.no_train or seed not in mine) and not (run_dir / "metrics.json").exists():
                continue
            m = S.run_one(config, run_dir, shards, seed, overrides + args.set, args.nproc)
            if m:
                runs[row].append(m)
            write_results(args.dataset, runs, manifest, command, args.out, args.tag)
    if not any(runs.values()):
        print(f"no finished runs under {runs_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
