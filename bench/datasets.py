"""Sequential-recommendation baselines on ML-100K (Amazon Beauty has its own script, bench/beauty.py,
with the ID-only, semantic-ID and content rows on one cold-start split).

    python bench/datasets.py ml-100k ../shared/data/ml-100k --seeds 3

Same driver as bench/ml1m.py (resumable run by run, validation-selected, test once). Results:
bench/results/ml100k.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import seqrec as S  # noqa: E402
from configs.schema import EvalConfig, LoaderConfig  # noqa: E402
from train.baselines import popularity_metrics  # noqa: E402

DATASETS = {
    "ml-100k": dict(reader="ml-100k", shards="ml-100k", title="ML-100K, full ranking",
                    configs={"hstu": "configs/pretrain/ml100k_hstu.yaml",
                             "sasrec": "configs/pretrain/ml100k_sasrec.yaml"},
                    reference=[], notes=["ML-100K with real timestamps."]),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("data_dir", help="raw data folder")
    p.add_argument("--models", default="hstu,sasrec")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="config override for every run (repeatable)")
    args = p.parse_args(argv)
    d = DATASETS[args.dataset]
    shards = S.ROOT / "shards" / d["shards"]
    S.ensure_shards(d["reader"], args.data_dir, shards)
    name = args.dataset.replace("-", "")
    pop_cfg = EvalConfig()
    pop = dict(popularity_metrics(shards, "test", LoaderConfig(num_workers=0), pop_cfg),
               exclude_history=pop_cfg.exclude_history)
    runs = {}
    for model in args.models.split(","):
        runs[model] = []
        for seed in range(args.seeds):
            m = S.run_one(d["configs"][model], S.ROOT / "runs" / f"bench_{name}" / f"{model}_s{seed}", shards, seed,
                          args.set, args.nproc)
            if m:
                runs[model].append(m)
            done = [m for ms in runs.values() for m in ms]
            notes = S.protocol_notes(done) + d["notes"] + [S.recipe_note(k, d["configs"][k]) for k in runs] \
                + S.changes_notes(runs)
            S.write_results(name, d["title"], S.summarize(runs), d["reference"], notes,
                            "python bench/datasets.py " + " ".join(sys.argv[1:]), {"popularity": pop})


if __name__ == "__main__":
    main()
