"""Amazon content-token probes (issue 17): every finished run under runs/bench_<dataset>/, described by how
its resolved config differs from its recipe YAML, with its validation numbers (what a probe is chosen by)
and its test numbers, so what moved warm quality, cold recall and the cold share is read off the run
directories, not typed in.

    python bench/beauty.py amazon-beauty ../shared/data/amazon-beauty --rows "hstu id+sid+content" \\
        --tag _iddrop30 --set model.id_dropout=0.3        # one probe (its own run name and results file)
    python bench/beauty_probes.py amazon-beauty           # the table of every run

Validation drops cold targets, so its columns are warm targets only; 'valid cold share@10' still says how
much of the validation lists cold items took. Runs trained with eval.trace_test also show the epoch at
which the traced test cold R@10 peaked (never used to select: the tested epoch is the best validation one).
Results: bench/results/<dataset>_probes.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import seqrec as S  # noqa: E402
from bench.beauty import COLD_SHARE, ROWS, _slice, run_name  # noqa: E402
from bench.record import header, metadata  # noqa: E402


def row_of(run: str) -> str | None:
    """The ROWS entry a run directory belongs to: the longest row whose run-name stem prefixes it."""
    hits = [r for r in ROWS if run.startswith(run_name(r, 0)[:-len("_s0")])]
    return max(hits, key=len) if hits else None


def _metric(rec: dict | None, part: str, metric: str):
    """`metric` of slice `part` of an evaluation record (None when either is missing)."""
    return (_slice(rec or {}, part) or {}).get(metric)


def traced_cold_peak(run_dir: Path) -> dict | None:
    """Epoch and value of the best traced test cold R@10 (eval.trace_test runs), and the last item norms."""
    log = run_dir / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    traced = [r for r in rows if r.get("kind") == "epoch" and r.get("test_trace")]
    if not traced:
        return None
    best = max(traced, key=lambda r: _metric(r["test_trace"], "cold", "hr@10") or -1.0)
    return dict(epoch=best["epoch"], cold_hr10=_metric(best["test_trace"], "cold", "hr@10"),
                item_parts=traced[-1].get("item_parts"))


def collect(runs_dir: Path) -> list[dict]:
    out = []
    for d in sorted(p for p in runs_dir.iterdir() if (p / "metrics.json").exists()):
        row = row_of(d.name)
        if row is None:
            continue
        m = S.load_run(d, ROWS[row][0])
        v, t = m.get("valid") or {}, m["test"]
        out.append(dict(run=d.name, row=row, changes=m["changes"], best_epoch=m["best_epoch"],
                        epochs_run=m["epochs_run"], flags=m["flags"], train_sha=m["train_sha"],
                        valid={"hr@10": v.get("hr@10"), "ndcg@10": v.get("ndcg@10"), COLD_SHARE: v.get(COLD_SHARE)},
                        test={"warm_among_warm_hr@10": _metric(t, "warm_among_warm", "hr@10"),
                              "warm_among_warm_ndcg@10": _metric(t, "warm_among_warm", "ndcg@10"),
                              "hr@10": t.get("hr@10"), "ndcg@10": t.get("ndcg@10"),
                              "cold_hr@10": _metric(t, "cold", "hr@10"), COLD_SHARE: t.get(COLD_SHARE),
                              "cold_target_share": t.get("cold_target_share")},
                        trace=traced_cold_peak(d)))
    return out


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def write(dataset: str, rows: list[dict], out: Path, command: str) -> Path:
    meta = metadata(command)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{dataset}_probes.json").write_text(json.dumps(dict(**meta, dataset=dataset, runs=rows), indent=2) + "\n")
    lines = header(f"{dataset}: content-token probes (issue 17)", meta) + [
        "One row per run (1 seed each unless the run names say otherwise); changes = config fields that differ "
        "from the row's recipe YAML; valid = the best validation epoch (warm targets only: validation drops "
        "cold ones), which is also the tested epoch; warm/warm = warm test targets ranked among warm items only; "
        "all = every test target among all items; cold share@10 = the share of the top-10 slots that cold "
        "items take (test: compare with 'cold targets'); traced cold peak = the epoch where the traced test "
        "cold R@10 peaked (eval.trace_test runs; never used to select).", "",
        "| run | changes | valid R@10 | valid N@10 | valid cold share@10 | warm/warm R@10 | warm/warm N@10 "
        "| all R@10 | all N@10 | cold R@10 | cold share@10 | cold targets | epoch | traced cold peak | flags "
        "| train sha |", "|" + "---|" * 16]
    for r in rows:
        v, t, tr = r["valid"], r["test"], r["trace"]
        peak = "-" if tr is None else f"{_f(tr['cold_hr10'])} at {tr['epoch']}"
        lines.append(f"| {r['run']} | {', '.join(r['changes']) or 'recipe'} | {_f(v['hr@10'])} | {_f(v['ndcg@10'])} "
                     f"| {_f(v[COLD_SHARE])} | {_f(t['warm_among_warm_hr@10'])} | {_f(t['warm_among_warm_ndcg@10'])} "
                     f"| {_f(t['hr@10'])} | {_f(t['ndcg@10'])} | {_f(t['cold_hr@10'])} | {_f(t[COLD_SHARE])} "
                     f"| {_f(t['cold_target_share'])} | {r['best_epoch']} of {r['epochs_run']} | {peak} "
                     f"| {', '.join(r['flags']) or '-'} | {r['train_sha']} |")
    parts = [(r["run"], r["trace"]["item_parts"]) for r in rows if r["trace"] and r["trace"].get("item_parts")]
    if parts:
        lines += ["", "Mean L2 norm of each item-vector part at the last traced epoch (warm items / cold items):", "",
                  "| run | id | code | content | all |", "|---|---|---|---|---|"]
        cell = lambda p, k: "-" if k not in p else f"{p[k]['warm']:.3f} / {_f(p[k]['cold'])}"  # noqa: E731
        lines += [f"| {run} | " + " | ".join(cell(p, k) for k in ("id", "code", "content", "all")) + " |"
                  for run, p in parts]
    path = out / f"{dataset}_probes.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="amazon-<category>: reads runs/bench_<dataset>/")
    p.add_argument("--runs", help="run directories (default runs/bench_<dataset>)")
    p.add_argument("--out", default=str(S.ROOT / "bench" / "results"), help="where <dataset>_probes.{md,json} go")
    args = p.parse_args(argv)
    runs_dir = Path(args.runs) if args.runs else S.ROOT / "runs" / f"bench_{args.dataset}"
    rows = collect(runs_dir) if runs_dir.is_dir() else []
    if not rows:
        p.error(f"no finished runs under {runs_dir}")
    path = write(args.dataset, rows, Path(args.out), "python bench/beauty_probes.py " +
                 " ".join(sys.argv[1:] if argv is None else argv))
    print(path.read_text())


if __name__ == "__main__":
    main()
