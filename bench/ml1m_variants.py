"""ML-1M "go beyond" table: every finished run under runs/bench_ml1m, described by how its resolved config
differs from its model's YAML, so what moved the number is read off the run directories, not typed in.

    python bench/ml1m_variants.py                  # after bench/ml1m.py runs with --tag/--set variants

Rows are single runs (seed in the name). "valid" is the selection metric of that run: the validation
split for best_valid runs; for runs trained through the validation event it is contaminated (shown in
brackets) and for best_test runs there is none (the test split picked the epoch). Results:
bench/results/ml1m_variants.{md,json}.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_sha  # noqa: E402
from bench.ml1m import CONFIGS  # noqa: E402
from bench.seqrec import ROOT, tested_epoch  # noqa: E402
from configs.load import load_config  # noqa: E402
from configs.schema import PretrainConfig  # noqa: E402

IGNORED = {"run_dir", "shards", "train.seed", "resume"}  # differ between every run by construction


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(run_cfg: dict, base_cfg: dict) -> list[str]:
    """key=value for every field that differs from the base; fields an older run lacks are its defaults."""
    run, base = flatten(run_cfg), flatten(base_cfg)
    return sorted(f"{k}={run[k]}" for k in run if k in base and k not in IGNORED and run[k] != base[k])


def model_of(name: str) -> str | None:
    """Longest CONFIGS key that prefixes the run name (hstu_large_s0 -> hstu_large, hstu_rw50_s0 -> hstu)."""
    hits = [m for m in CONFIGS if name.startswith(m + "_")]
    return max(hits, key=len) if hits else None


def collect(runs_dir: Path) -> list[dict]:
    bases = {m: dataclasses.asdict(load_config(PretrainConfig, ROOT / p)) for m, p in CONFIGS.items()}
    rows = []
    for d in sorted(runs_dir.iterdir()):
        model = model_of(d.name)
        if model is None or not (d / "metrics.json").exists():
            continue
        m = json.loads((d / "metrics.json").read_text())
        diff = config_diff(json.loads((d / "config.json").read_text()), bases[model])
        rows.append(dict(run=d.name, model=model, changes=diff, protocol=tested_epoch(m),
                         valid_hr10=(m.get("valid") or {}).get("hr@10"),
                         valid_contaminated=bool(m.get("train_through_valid")),
                         test={k: m["test"][k] for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50")},
                         best_epoch=m["best_epoch"], epochs_run=m["epochs_run"]))
    return rows


def write(rows: list[dict], out: Path, command: str) -> None:
    sha = git_sha()
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                git_sha=sha, command=command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ml1m_variants.json").write_text(json.dumps(dict(**meta, runs=rows), indent=2) + "\n")
    lines = ["# ML-1M variants: what moved the number", "", f"{meta['date']}, {meta['machine']}, git {sha}", "",
             f"`{command}`", "", "One row per run; changes = config fields that differ from the model's YAML.", "",
             "| run | changes | test at | valid HR@10 | test HR@10 | NDCG@10 | HR@50 | NDCG@50 | epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["valid_hr10"]
        valid = "-" if v is None else (f"({v:.4f})" if r["valid_contaminated"] else f"{v:.4f}")
        t = r["test"]
        lines.append(f"| {r['run']} | {', '.join(r['changes']) or 'paper recipe'} | {r['protocol']} | {valid} | "
                     f"{t['hr@10']:.4f} | {t['ndcg@10']:.4f} | {t['hr@50']:.4f} | {t['ndcg@50']:.4f} | "
                     f"{r['best_epoch']} of {r['epochs_run']} |")
    (out / "ml1m_variants.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench_ml1m"), help="run directories of bench/ml1m.py")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the table is written")
    args = p.parse_args(argv)
    rows = collect(Path(args.runs))
    if not rows:
        p.error(f"no finished runs under {args.runs}")
    write(rows, Path(args.out), "python bench/ml1m_variants.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print((Path(args.out) / "ml1m_variants.md").read_text())


if __name__ == "__main__":
    main()
