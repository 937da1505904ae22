"""ML-1M: HSTU, HSTU-large and SASRec with the paper recipe, model selection on the validation split.

    python bench/ml1m.py ../shared/data/ml-1m                       # 3 seeds x 3 models, resumable
    python bench/ml1m.py ../shared/data/ml-1m --models hstu --seeds 1 --set train.epochs=20
    python bench/ml1m.py ../shared/data/ml-1m --models hstu,hstu_content --shards shards/ml-1m-content \
        --runs runs/bench_ml1m_content --results ml1m_content         # content tokens vs ID-only
    python bench/ml1m.py ../shared/data/ml-1m --models hstu_content --shards shards/ml-1m-content \
        --runs runs/bench_ml1m_content --results ml1m_content --compare ml1m.json  # ... vs the committed rows

Each run trains up to train.epochs (100, the paper's) with early stopping on validation NDCG@10
(patience 10), then tests the best epoch once. Re-running the command skips finished runs and resumes
interrupted ones. Results: bench/results/ml1m{tag}.{md,json} (or --results); the notes under the table are written from
the runs' own metrics.json / config.json (protocol, exclusion rule, changes from the recipe, flags), so a
--tag/--set variant gets the notes of what it ran.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import seqrec as S  # noqa: E402
from configs.schema import EvalConfig, LoaderConfig  # noqa: E402
from data_pipeline.read_shards import load_manifest  # noqa: E402

CONFIGS = {"hstu": "configs/pretrain/ml1m_hstu.yaml", "hstu_large": "configs/pretrain/ml1m_hstu_large.yaml",
           "sasrec": "configs/pretrain/ml1m_sasrec.yaml",
           "hstu_content": "configs/pretrain/ml1m_hstu.yaml",
           "hstu_large_content": "configs/pretrain/ml1m_hstu_large.yaml"}
# the *_content models: the same recipe with each movie's title/genre semantic-ID codes and text vector
# added to its id embedding (issue 17); their shards need the content stage (--content)
OVERRIDES = {"hstu_content": ["model.item_repr=id+sid+content"],
             "hstu_large_content": ["model.item_repr=id+sid+content"]}
REFERENCE = [  # HSTU paper / generative-recommenders README, full ranking, no validation split
    ("HSTU paper", "SASRec", .2853, .1603, .5474, .2185),
    ("HSTU paper", "HSTU", .3097, .1720, .5754, .2307),
    ("HSTU paper", "HSTU-large", .3294, .1893, .5935, .2481),
]
REFERENCE_NOTE = ("Published numbers: the public code has no validation split and selects nothing on one; "
                  "they report the last or best test epoch (optimistic), history excluded by the input-window "
                  "rule ('window').")


def notes(runs: dict[str, list[dict]], manifest: dict) -> list[str]:
    """The notes under the table, from the runs and the shards' manifest (nothing typed in about them)."""
    done = [m for ms in runs.values() for m in ms]
    out = S.protocol_notes(done) + [REFERENCE_NOTE]
    out += [S.recipe_note(model, CONFIGS[model]) for model, ms in runs.items() if ms]
    out += S.changes_notes(runs)
    if not manifest.get("has_timestamps", True):
        out += ["The shards have no timestamps (manifest has_timestamps = false: the ML-1M ratings were rebuilt "
                "from public derivatives): timestamps are per-user chronological ranks, so the time bias sees rank "
                "gaps, not seconds (HSTU's time signal is inert here). In the reference the last state also sees "
                "the target's timestamp through the time bias (the query side uses the next event's time); a user "
                "of it measured ML-1M HR@10 .3013 -> .2816 without the relative bias (generative-recommenders "
                "issue #243)."]
    seeds = sorted({m["seed"] for m in done if m.get("seed") is not None})
    if seeds:
        out.append(f"Seeds {', '.join(map(str, seeds))} (train.seed) vary initialisation, dropout and negatives; "
                   "the data order is seeded by data.seed, the same in every run unless listed above.")
    out.append("Variants (refit, random windows, more negatives, the reference's test-selected protocol): "
               "bench/results/ml1m_variants.md, made by bench/ml1m_variants.py from the run directories.")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="raw ML-1M folder (e.g. ../shared/data/ml-1m)")
    p.add_argument("--shards", default=str(S.ROOT / "shards" / "ml-1m"), help="prepared here if missing")
    p.add_argument("--models", default="hstu,hstu_large,sasrec", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per model (default 3)")
    p.add_argument("--runs", default=str(S.ROOT / "runs" / "bench_ml1m"), help="run directories")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) (default 1)")
    p.add_argument("--set", action="append", default=[], help="config override for every run (repeatable)")
    p.add_argument("--tag", default="", help="suffix of run names and the results file, for variants")
    p.add_argument("--results", help="name of the results file (default ml1m<tag>)")
    p.add_argument("--content", default="configs/content/ml1m.yaml", help="content-stage recipe run on the "
                   "shards (once) when a *_content model is asked for")
    p.add_argument("--compare", help="a results JSON under --out (e.g. ml1m.json) whose rows are shown as well, "
                   "each labelled with its file, commit and date (rows of runs made by another command: same "
                   "split only if that file's shards were prepared with the same settings)")
    p.add_argument("--no-train", action="store_true", help="train nothing: tabulate the runs that finished")
    p.add_argument("--out", default=str(S.ROOT / "bench" / "results"), help="where the table is written")
    args = p.parse_args(argv)
    shards = Path(args.shards)
    models = args.models.split(",")
    if unknown := [m for m in models if m not in CONFIGS]:
        p.error(f"unknown models {unknown}; choose from {', '.join(CONFIGS)}")
    S.ensure_shards("ml-1m", args.data_dir, shards)
    if any(m in OVERRIDES for m in models):
        S.ensure_content(shards, args.content)
    manifest = load_manifest(shards)
    from train.baselines import popularity_metrics  # torch: imported only when a table is made
    pop_cfg = EvalConfig()
    pop = dict(popularity_metrics(shards, "test", LoaderConfig(num_workers=0), pop_cfg),
               exclude_history=pop_cfg.exclude_history)
    command = "python bench/ml1m.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs: dict[str, list[dict]] = {}
    for model in models:
        runs[model] = []
        for seed in range(args.seeds):
            run_dir = Path(args.runs) / f"{model}{args.tag}_s{seed}"
            if args.no_train and not (run_dir / "metrics.json").exists():
                continue
            m = S.run_one(CONFIGS[model], run_dir, shards, seed, OVERRIDES.get(model, []) + args.set, args.nproc)
            if m:
                runs[model].append(m)
            summary, extra = S.summarize(runs), []
            if args.compare:
                summary, extra = compared(summary, Path(args.out) / args.compare)
            S.write_results(args.results or f"ml1m{args.tag}", "ML-1M, full ranking", summary, REFERENCE,
                          notes(runs, manifest) + extra, command, {"popularity": pop}, out=args.out)


def compared(summary: dict, path: Path) -> tuple[dict, list[str]]:
    """`summary` + the model rows of another results JSON (written by this driver), each labelled with where
    it comes from, and the note that says so."""
    other = json.loads(path.read_text())
    label = f"{path.name}, git {other['git_sha']}, {other['date']}"
    rows = {f"{name} [{label}]": row for name, row in other["results"].items()}
    return {**summary, **rows}, [f"Rows marked [{label}] are copied from {path.name} ({other['command']!r}), "
                                 f"not trained by this command (different commit, run directories not kept); their "
                                 f"shards were made by this driver's default `prepare` of the same raw folder "
                                 f"(same split settings), so they rank the same test targets."]


if __name__ == "__main__":
    main()
