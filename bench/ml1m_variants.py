"""ML-1M "go beyond" table: every finished run under runs/bench_ml1m, described by how its resolved config
differs from its model's YAML, so what moved the number is read off the run directories, not typed in.

    python bench/ml1m_variants.py                  # after bench/ml1m.py runs with --tag/--set variants

Rows are single runs (seed in the name). "valid" is the selection metric of that run: the validation
split for best_valid runs; for runs trained through the validation event it is contaminated (shown in
brackets) and for best_test runs there is none (the test split picked the epoch). Each row names the
commit it trained at, its history-exclusion rule and its flags (capped by hand, still improving).
Results: bench/results/ml1m_variants.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ml1m import CONFIGS  # noqa: E402
from bench.record import header, metadata  # noqa: E402
from bench.seqrec import EXCLUSION, FLAGS, ROOT, load_run, tested_epoch  # noqa: E402


def model_of(name: str) -> str | None:
    """Longest CONFIGS key that prefixes the run name (hstu_large_s0 -> hstu_large, hstu_rw50_s0 -> hstu)."""
    hits = [m for m in CONFIGS if name.startswith(m + "_")]
    return max(hits, key=len) if hits else None


def collect(runs_dir: Path) -> list[dict]:
    rows = []
    for d in sorted(runs_dir.iterdir()):
        model = model_of(d.name)
        if model is None or not (d / "metrics.json").exists():
            continue
        m = load_run(d, CONFIGS[model])
        rows.append(dict(run=d.name, model=model, changes=m["changes"], protocol=tested_epoch(m),
                         valid_hr10=(m.get("valid") or {}).get("hr@10"),
                         valid_contaminated=bool(m.get("train_through_valid")),
                         test={k: m["test"][k] for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50")},
                         best_epoch=m["best_epoch"], epochs_run=m["epochs_run"],
                         exclude_history=m["exclude_history"], flags=m["flags"], train_sha=m["train_sha"]))
    return rows


def write(rows: list[dict], out: Path, command: str) -> None:
    meta = metadata(command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ml1m_variants.json").write_text(json.dumps(dict(**meta, runs=rows), indent=2) + "\n")
    lines = header("ML-1M variants: what moved the number", meta) + [
        "One row per run; changes = config fields that differ from the model's YAML; excl. = the history-"
        "exclusion rule; train sha = the commit the run trained at.", "",
        "| run | changes | test at | excl. | valid HR@10 | test HR@10 | NDCG@10 | HR@50 | NDCG@50 | epoch | flags "
        "| train sha |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["valid_hr10"]
        valid = "-" if v is None else (f"({v:.4f})" if r["valid_contaminated"] else f"{v:.4f}")
        t = r["test"]
        lines.append(f"| {r['run']} | {', '.join(r['changes']) or 'paper recipe'} | {r['protocol']} | "
                     f"{r.get('exclude_history', 'window')} | {valid} | {t['hr@10']:.4f} | {t['ndcg@10']:.4f} | "
                     f"{t['hr@50']:.4f} | {t['ndcg@50']:.4f} | {r['best_epoch']} of {r['epochs_run']} | "
                     f"{', '.join(r.get('flags', [])) or '-'} | {r.get('train_sha', 'unknown')} |")
    lines += [""] + [f"- excl. '{k}': {EXCLUSION[k]}." for k in sorted({r.get("exclude_history", "window")
                                                                         for r in rows}) if k in EXCLUSION]
    for flag, text in FLAGS.items():
        if n := sum(flag in r.get("flags", []) for r in rows):
            lines.append(f"- {flag}: {text} ({n} run{'s' * (n != 1)}).")
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
