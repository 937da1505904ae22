"""Cold-item score calibration (issue 17): how cold recall trades against the cold items' share of the lists
when every cold item's score gets an offset b, read from finished runs' best checkpoints.

    python bench/cold_calibration.py runs/bench_amazon-beauty/hstu_idpsidpcontent_piddrop_s0 [RUN ...]

A content model scores a cold item (never trained, never a negative) by its code and content parts only;
whether its lists hold too many cold items (issue 17: 32% of the top-10 slots against 4.6% of the targets)
or too few is a matter of calibration between the two kinds of vectors, and cold recall at a given share
is the quality of the no-id path. For each offset b (cosine units; scores are state . unit item vector)
this ranks every validation and test target with cold items' scores + b (train/calibrate.py, the rules of
train/evaluate.py: at b = 0 the numbers equal the run's metrics.json).

Two readings, kept apart:
- 'chosen on valid': b is picked with no test data, as the grid offset whose validation cold share@10 is
  closest to the cold items' share of the catalogue (the rule of eval.calibrate_cold; validation has no
  cold targets, so nothing else there can choose b). Its test row is a fair number.
- the test sweep: every b on the test split. Diagnostic only (it shows what the best b would be if one
  could look), never a result.
Results: bench/results/<name>_cold_calibration.{md,json}, <name> from --name (default: the runs' parent).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.record import header, metadata  # noqa: E402
from data_pipeline.collate import make_loader  # noqa: E402
from data_pipeline.read_shards import cold_items, load_manifest  # noqa: E402
from train.calibrate import OFFSETS, choose_offset, offset_sweep  # noqa: E402
from train.teacher import load_teacher, teacher_run  # noqa: E402


def sweep(run: Path, split: str, offsets: list[float]) -> dict[float, dict]:
    """offset -> train.calibrate.offset_sweep's metrics of `split` for the run's best weights."""
    cfg, _ = teacher_run(run)
    manifest = load_manifest(cfg.shards)
    model = load_teacher(run, torch.device("cpu"))
    loader = make_loader(cfg.shards, split, replace(cfg.data, batch_size=cfg.eval.batch_size), shuffle=False)
    batches = ((b, True) for b in tqdm(loader, desc=f"{run.name} {split}", unit="batch"))
    return offset_sweep(model, batches, replace(cfg.eval, ks=[10]), manifest["vocab"]["num_items"],
                        torch.from_numpy(cold_items(manifest)), offsets)


def analyse(run: Path, offsets: list[float]) -> dict:
    cfg, _ = teacher_run(run)
    manifest = load_manifest(cfg.shards)
    catalogue_share = len(cold_items(manifest)) / manifest["vocab"]["num_items"]
    valid, test = sweep(run, "valid", offsets), sweep(run, "test", offsets)
    chosen = choose_offset({b: v["cold_share"] for b, v in valid.items()}, catalogue_share)
    best_test = max(offsets, key=lambda b: test[b]["all"]["ndcg@10"])
    return dict(run=str(run), catalogue_cold_share=catalogue_share, chosen_offset=chosen,
                best_test_offset=best_test, offsets=offsets,
                valid={str(b): v for b, v in valid.items()}, test={str(b): v for b, v in test.items()})


def _f(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.4f}"


def write(results: list[dict], out: Path, name: str, command: str) -> Path:
    meta = metadata(command)
    lines = header(f"{name}: cold-item score calibration (issue 17)", meta)
    lines += ["Every cold item's score (cosine of the state with the unit item vector) + offset b; ranking rules "
              "of train/evaluate.py (full history excluded); at b = 0 the numbers are the run's own. "
              "'valid share' = cold share@10 of the validation lists (validation has no cold targets); "
              "R/N = R@10/NDCG@10 over all test targets, among all items; cold/warm = test targets that "
              "are cold/warm items.", ""]
    for r in results:
        run, b0, bc = Path(r["run"]).name, r["valid"]["0.0"], r["chosen_offset"]
        lines += [f"## {run}", "",
                  f"Chosen on validation (no test data): b = {bc:+.3f}, the offset whose validation cold "
                  f"share@10 is closest to the cold items' catalogue share {r['catalogue_cold_share']:.3f}.", "",
                  "| b | reading | valid share | valid R@10 | test R@10 | test N@10 | cold R@10 | cold N@10 | "
                  "warm R@10 | warm N@10 | test cold share@10 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for b in r["offsets"]:
            v, t = r["valid"][str(b)], r["test"][str(b)]
            tag = "chosen on valid" if b == bc else ("b = 0 (as trained)" if b == 0 else "test sweep (diagnostic)")
            if b == r["best_test_offset"]:
                tag += "; best test N@10 (looks at test)"
            cells = [_f(v["all"]["hr@10"])] + [_f(t[part][m]) for part in ("all", "cold", "warm")
                                                for m in ("hr@10", "ndcg@10")]
            lines.append(f"| {b:+.3f} | {tag} | {v['cold_share']:.4f} | " + " | ".join(cells)
                         + f" | {t['cold_share']:.4f} |")
        lines += ["", f"Test cold targets: {r['test']['0.0']['cold']['count']:,} of "
                  f"{r['test']['0.0']['all']['count']:,}; validation lists: {b0['all']['count']:,}.", ""]
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}_cold_calibration.md"
    md.write_text("\n".join(lines) + "\n")
    (out / f"{name}_cold_calibration.json").write_text(json.dumps(dict(**meta, runs=results), indent=1) + "\n")
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run directories (config.json, metrics.json, ckpt/best)")
    p.add_argument("--name", help="results file stem (default: the first run's parent without 'bench_')")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bench" / "results"))
    a = p.parse_args(argv)
    runs = [Path(r) for r in a.runs]
    name = a.name or runs[0].resolve().parent.name.removeprefix("bench_")
    results = [analyse(r, OFFSETS) for r in runs]
    print(write(results, Path(a.out), name, "python bench/cold_calibration.py " + " ".join(argv or sys.argv[1:])))


if __name__ == "__main__":
    main()
