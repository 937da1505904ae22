"""Shared driver of the sequential-recommendation benchmarks (bench/ml1m.py, bench/beauty.py, ...).

Each (model, seed) is one `python -m train pretrain` run in its own run directory. A finished run
(metrics.json present) is skipped, an interrupted one resumes from its last epoch, so a benchmark that
does not fit in one session is continued by running the same command again. After every run the
results table (mean +- sd of test metrics at the best validation epoch, over the seeds that finished)
is rewritten, so what is committed is always what ran.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import git_sha

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")
PROTOCOL = {  # (train.select, data.train_through_valid) -> which epoch the test numbers come from
    ("best_valid", False): "best valid epoch", ("best_valid", True): "best valid epoch (valid trained on!)",
    ("last", False): "last epoch", ("last", True): "last epoch, trained through valid",
    ("best_test", False): "best TEST epoch (optimistic)",
    ("best_test", True): "best TEST epoch (optimistic), trained through valid"}


def tested_epoch(metrics: dict) -> str:
    """Which epoch a run's test numbers come from, read off its metrics.json (older runs: best valid)."""
    return PROTOCOL[(metrics.get("selected", "best_valid"), bool(metrics.get("train_through_valid")))]


def ensure_shards(dataset: str, raw: str, shards: Path, extra: list[str] = ()) -> None:
    if (shards / "manifest.json").exists():
        return
    cmd = [sys.executable, "-m", "data_pipeline", "prepare", "--dataset", dataset, "--raw", raw, "--out",
           str(shards), "--quiet", *sum((["--set", s] for s in extra), [])]
    subprocess.run(cmd, cwd=ROOT, check=True)


def run_one(config: str, run_dir: Path, shards: Path, seed: int, overrides: list[str], nproc: int) -> dict | None:
    """Train (or resume, or skip) one run; returns its metrics.json or None if it failed."""
    if (run_dir / "metrics.json").exists():
        return _with_train_seconds(run_dir)
    launch = [sys.executable, "-m", "train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    cmd = launch + ["pretrain", "--config", config, "--set", f"run_dir={run_dir}", "--set", f"shards={shards}",
                    "--set", f"train.seed={seed}", *sum((["--set", s] for s in overrides), [])]
    if (run_dir / "ckpt" / "last").exists():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, 2 // nproc)))}
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env)
    if res.returncode != 0:
        print(f"run {run_dir} failed with exit code {res.returncode}", file=sys.stderr)
        return None
    m = json.loads((run_dir / "metrics.json").read_text())
    m["wall_seconds"] = round(time.time() - t0, 1)
    (run_dir / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    return _with_train_seconds(run_dir)


def _with_train_seconds(run_dir: Path) -> dict:
    """metrics.json plus train_seconds = the sum of every epoch's training time (meta.json's history), which,
    unlike train_seconds_this_run, counts the epochs of earlier sessions of a resumed run; eval excluded."""
    m = json.loads((run_dir / "metrics.json").read_text())
    epochs = json.loads((run_dir / "meta.json").read_text())["epochs"]
    m["train_seconds"] = round(sum(e["seconds"] for e in epochs), 1)
    return m


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, ms in runs.items():
        if not ms:
            continue
        row = {"seeds": len(ms), "best_epochs": [m["best_epoch"] for m in ms],
               "epochs_run": [m["epochs_run"] for m in ms],
               "train_seconds": [m["train_seconds"] for m in ms],
               "test_at": sorted({tested_epoch(m) for m in ms})}
        for k in METRICS + ("mrr",):
            vals = [m["test"][k] for m in ms]
            row[k] = dict(mean=statistics.fmean(vals), sd=statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out[name] = row
    return out


def write_results(name: str, title: str, summary: dict, reference: list[tuple], notes: list[str],
                  command: str, extra_rows: dict | None = None) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    sha = git_sha()
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                git_sha=sha, command=command)
    (out / f"{name}.json").write_text(json.dumps(dict(**meta, results=summary, extra=extra_rows or {},
                                                      reference=reference, notes=notes), indent=2) + "\n")
    fmt = lambda r, k: f"{r[k]['mean']:.4f} ± {r[k]['sd']:.4f}"  # noqa: E731
    lines = [f"# {title}", "", f"{meta['date']}, {meta['machine']}, git {sha}", "", f"`{command}`", "",
             "Test metrics at the epoch named in 'test at', full ranking over all items, history excluded; "
             "mean ± sd over seeds; epochs = the tested epoch of each seed; train s/run = training seconds "
             "summed over epochs (evaluation excluded).", "",
             "| model | seeds | test at | HR@10 | NDCG@10 | HR@50 | NDCG@50 | HR@200 | epochs | train s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, r in summary.items():
        secs = [s for s in r["train_seconds"] if s]
        lines.append(f"| {model} | {r['seeds']} | {'; '.join(r['test_at'])} | {fmt(r, 'hr@10')} | "
                     f"{fmt(r, 'ndcg@10')} | {fmt(r, 'hr@50')} | {fmt(r, 'ndcg@50')} | {fmt(r, 'hr@200')} | "
                     f"{r['best_epochs']} | "
                     f"{round(statistics.fmean(secs)) if secs else ''} |")
    for model, m in (extra_rows or {}).items():
        lines.append(f"| {model} | - | - | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['hr@50']:.4f} | "
                     f"{m['ndcg@50']:.4f} | {m['hr@200']:.4f} | - | - |")
    lines += ["", "Published reference numbers (their protocol; see notes):", "",
              "| source | model | HR@10 | NDCG@10 | HR@50 | NDCG@50 |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(str(x) for x in r)} |" for r in reference]
    lines += ["", *[f"- {n}" for n in notes], ""]
    (out / f"{name}.md").write_text("\n".join(lines))
