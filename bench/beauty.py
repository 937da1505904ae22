"""Amazon Beauty with content tokens: ID-only vs semantic-ID vs content item representations, the
generative (semantic-ID beam search) head, and a cold-start slice, all on one split.

    python bench/beauty.py ../shared/data/amazon-beauty                 # every row, 1 seed
    python bench/beauty.py ../shared/data/amazon-beauty --rows id,id+sid+content --seeds 3

Steps (each skipped when its output exists, so the command resumes run by run):
1. shards: the P5/TIGER leave-one-out split with 5% of the items held out of training
   (configs/data/amazon-beauty-cold.yaml);
2. content: item text (title, brand, category path, price) -> all-MiniLM-L6-v2 -> RQ-VAE semantic IDs
   fitted on the warm items; cold items get codes from the saved codebook (configs/content/beauty.yaml);
3. one `python -m train pretrain` per (row, seed), validation-selected, tested once.
Results: bench/results/beauty.{md,json}, rewritten after every run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_sha  # noqa: E402
from bench.seqrec import ROOT, ensure_shards, run_one  # noqa: E402
from configs.load import load_config  # noqa: E402
from configs.schema import ContentStageConfig  # noqa: E402
from data_pipeline import content_stage  # noqa: E402
from data_pipeline.read_shards import load_manifest  # noqa: E402

HSTU = "configs/pretrain/beauty_hstu.yaml"
ROWS = {  # row name -> (config, overrides)
    "hstu id": (HSTU, ["model.item_repr=id"]),
    "hstu sid": (HSTU, ["model.item_repr=sid"]),
    "hstu id+sid": (HSTU, ["model.item_repr=id+sid"]),
    "hstu id+sid+content": (HSTU, ["model.item_repr=id+sid+content"]),
    "hstu id+sid+content +gen": (HSTU, ["model.item_repr=id+sid+content", "model.generative_head=true"]),
    "sasrec id": ("configs/pretrain/beauty_sasrec.yaml", ["model.item_repr=id"]),
}
DEFAULT_ROWS = "hstu id,hstu sid,hstu id+sid,hstu id+sid+content,hstu id+sid+content +gen"
COLS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")
REFERENCE = [("TIGER paper", .0454, .0321, .0648, .0384), ("SASRec, CE loss (RecBole, LETTER #20)", .0543, None,
                                                           .0821, .0405)]
NOTES = [
    "Split: P5/TIGER leave-one-out on the 5-core data, but 5% of the items (605) are held out of training "
    "entirely: their events are removed from every input, 1,010 validation targets on them are dropped, and "
    "their 1,027 test targets (4.6% of the test users) stay in. The overall columns therefore include targets "
    "an ID-only model cannot rank (a handicap the published rows do not have); the warm columns exclude them.",
    "Full ranking over all 12,101 items, history excluded, test once at the best validation NDCG@10 epoch. "
    "The generative row decodes the next item's semantic-ID tuple by trie-constrained beam search (beam 50): "
    "a target outside the beam counts as a miss.",
    "Published rows use their own model selection (TIGER: none reported; RecBole: validation).",
    "Cold items are never trained: negatives are drawn from warm items only, and the ID-only row does not "
    "rank them at all (it has nothing but an untrained random row for them), so its cold recall is 0 by "
    "construction. The protocol matters for ID-only validation HR@10 at epoch 21: .1089 when cold items were "
    "sampled as negatives (pushed down: a leak of the split), .0979 with warm-only negatives but cold items "
    "ranked with their random rows, .1087 with them not ranked (as tabulated; best .1117 at epoch 35).",
    "Session record (2026-11-22): rows ran two at a time, one thread each, on the 2 cores (train s are "
    "from that setting). The semantic-ID rows peak early (best validation epoch 9-10, stopped at ~20) while "
    "ID-only improves to epoch 35: code and content embeddings are shared across items and fit the "
    "training sequences faster, and the warm metrics pay for it; their cold recall is what ID-only cannot "
    "have. The generative head ranks warm items a little better than the dot product of the same run "
    "(R@10 .0771 vs .0714 on warm targets) but never emits a cold item: it was trained only on warm items' "
    "code tuples (TIGER needed an explicit unseen-item quota for the same reason).",
]


def _prepare(data_dir: str, shards: Path) -> dict:
    ensure_shards("amazon-beauty", data_dir, shards, ["shards.samples_per_shard=2000", "shards.cold_item_frac=0.05"])
    if load_manifest(shards).get("semantic_ids") is None:
        cfg = load_config(ContentStageConfig, ROOT / "configs/content/beauty.yaml", [f"shards={shards}"])
        content_stage.run(cfg)
    return load_manifest(shards)


def _mean_sd(vals: list[float]) -> str:
    return f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f}"


def _row_cells(ms: list[dict], key: str) -> list[str]:
    """Overall @5/@10 + warm and cold @10 for the runs' `key` metrics ('test' or 'test_generative')."""
    cells = [_mean_sd([m[key][c] for m in ms]) for c in COLS]
    for part in ("warm", "cold"):
        cells += [_mean_sd([m[key]["per_slice"][part][c] for m in ms]) for c in ("hr@10", "ndcg@10")]
    return cells


def write_results(runs: dict[str, list[dict]], manifest: dict, command: str) -> None:
    out = ROOT / "bench" / "results"
    sid = manifest["semantic_ids"]
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                git_sha=git_sha(), command=command)
    (out / "beauty.json").write_text(json.dumps(dict(**meta, semantic_ids=sid, runs=runs, reference=REFERENCE,
                                                     notes=NOTES), indent=2) + "\n")
    lines = ["# Amazon Beauty: item representations, generative head, cold start", "",
             f"{meta['date']}, {meta['machine']}, git {meta['git_sha']}", "", f"`{command}`", "",
             "| row | seeds | R@5 | N@5 | R@10 | N@10 | warm R@10 | warm N@10 | cold R@10 | cold N@10 | best epochs "
             "| train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, ms in runs.items():
        if not ms:
            continue
        tail = f"{[m['best_epoch'] for m in ms]} | {round(statistics.fmean(m['train_seconds_this_run'] for m in ms))}"
        lines.append(f"| {name} | {len(ms)} | {' | '.join(_row_cells(ms, 'test'))} | {tail} |")
        if ms[0].get("test_generative"):
            lines.append(f"| {name}: generative head (beam) | {len(ms)} | "
                         f"{' | '.join(_row_cells(ms, 'test_generative'))} | {tail} |")
    pop = next((ms[0]["test_popularity"] for ms in runs.values() if ms), None)
    if pop:
        lines.append(f"| popularity | - | {' | '.join(_row_cells([dict(test=pop)], 'test'))} | - | - |")
    lines += ["", "Published (their protocol, no cold hold-out):", "", "| source | R@5 | N@5 | R@10 | N@10 |",
              "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in r[1:]) + " |" for r in REFERENCE]
    st = sid["stats"]
    lines += ["", f"Semantic IDs: {sid['method']}, level sizes {sid['level_sizes']} (last = collision level), "
              f"fitted on {st['fitted_on_items']:,} warm items, {st['assigned_after_fit']:,} cold items assigned "
              f"with the saved codebook. Codebook usage per level {[round(u, 3) for u in st['usage']]}, "
              f"collision rate {st['collision_rate']:.4f} (items sharing a 3-code tuple), max group "
              f"{st['max_group']}, relative reconstruction error {st['recon_rel_error']}.", ""]
    lines += [f"- {n}" for n in NOTES] + [""]
    (out / "beauty.md").write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="raw Amazon Beauty folder (interactions.tsv.gz + items.jsonl.gz)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated rows from: {', '.join(ROWS)}")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--shards", default=str(ROOT / "shards" / "beauty-cold"))
    p.add_argument("--set", action="append", default=[], help="config override for every run (repeatable)")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    shards = Path(args.shards)
    manifest = _prepare(args.data_dir, shards)
    runs: dict[str, list[dict]] = {}
    for row in rows:
        config, overrides = ROWS[row]
        runs[row] = []
        for seed in range(args.seeds):
            run_dir = ROOT / "runs" / "bench_beauty" / f"{row.replace(' ', '_').replace('+', 'p')}_s{seed}"
            m = run_one(config, run_dir, shards, seed, overrides + args.set, args.nproc)
            if m:
                runs[row].append(m)
            write_results(runs, manifest, "python bench/beauty.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
