"""Shared driver of the sequential-recommendation benchmarks (bench/ml1m.py, bench/beauty.py, ...).

Each (model, seed) is one `python -m train pretrain` run in its own run directory. A finished run
(metrics.json present) is skipped, an interrupted one resumes from its last epoch, so a benchmark that
does not fit in one session is continued by running the same command again. After every run the
results table is rewritten from the run directories, so what is committed is always what ran.

A table row is the mean +- sd over seeds of runs that agree on everything that changes what a number
means: the model, which epoch was tested, the history-exclusion rule and the run's flags (capped by hand,
stopped while still improving). Unlike runs are never averaged: they get rows of their own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

from bench.record import cpus, header, loadavg, metadata

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")
PROTOCOL = {  # (train.select, data.train_through_valid) -> which epoch the test numbers come from
    ("best_valid", False): "best valid epoch", ("best_valid", True): "best valid epoch (valid trained on!)",
    ("last", False): "last epoch", ("last", True): "last epoch, trained through valid",
    ("best_test", False): "best TEST epoch (optimistic)",
    ("best_test", True): "best TEST epoch (optimistic), trained through valid"}
EXCLUSION = {  # eval.exclude_history -> what the row's "excl." column means
    "full": "every item of the user's history before the target is excluded from the ranking",
    "window": "only the items of the max_len-cut input window are excluded (the reference's rule; earlier "
              "history items stay rankable)",
    "none": "nothing is excluded (history items are ranked)"}
FLAGS = {  # flag -> its footnote
    "capped": "capped by hand: train.epochs (or train.max_steps_per_epoch) below the recipe in the model's YAML",
    "still improving": "stopped while still improving: the tested epoch is the last one run (early stopping "
                       "never triggered), so more epochs might have scored higher"}
LOAD_SAMPLE_S = 15  # how often run_one samples the load average while a run trains
SHARED_MARGIN = 0.75  # load above the run's own threads by more than this = the cores were shared


def tested_epoch(metrics: dict) -> str:
    """Which epoch a run's test numbers come from, read off its metrics.json (older runs: best valid)."""
    return PROTOCOL[(metrics.get("selected", "best_valid"), bool(metrics.get("train_through_valid")))]


def exclusion_rule(metrics: dict, config: dict | None = None) -> str:
    """The history-exclusion rule a run was evaluated with: metrics.json `exclude_history` (top level or in
    its test metrics), else the run's
    config (eval.exclude_history as a string), else "window" (older runs: the max_len-cut input only;
    a boolean false in an old config means nothing was excluded)."""
    for rec in (metrics, metrics.get("test") or {}):
        if isinstance(rec.get("exclude_history"), str):
            return rec["exclude_history"]
    rule = ((config or {}).get("eval") or {}).get("exclude_history", True)
    if isinstance(rule, str):
        return rule
    return "window" if rule else "none"


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


IGNORED = {"run_dir", "shards", "train.seed", "resume"}  # differ between every run by construction


def config_diff(run_cfg: dict, base_cfg: dict) -> list[str]:
    """key=value for every field that differs from the base; fields an older run lacks are its defaults."""
    run, base = flatten(run_cfg), flatten(base_cfg)
    return sorted(f"{k}={run[k]}" for k in run if k in base and k not in IGNORED and run[k] != base[k])


@cache
def _recipe_json(recipe: str) -> str:
    from configs.load import load_config
    from configs.schema import PretrainConfig
    path = Path(recipe) if Path(recipe).is_absolute() else ROOT / recipe
    return json.dumps(dataclasses.asdict(load_config(PretrainConfig, path)))


def recipe_config(recipe: str) -> dict:
    """The resolved config of a model's YAML (configs/pretrain/*.yaml): the recipe a run is compared to."""
    return json.loads(_recipe_json(str(recipe)))


def run_flags(metrics: dict, config: dict, recipe: dict | None) -> list[str]:
    """Why a run's numbers are not those of a complete run of the recipe (empty list: complete).
    capped: train.epochs below the recipe's, or a step cap the recipe does not have; a select=last run
    fixes its epochs by protocol (refit), so only the step cap counts there. still improving: the tested
    epoch is the last epoch run (best_valid / best_test), so early stopping never ended the run."""
    train, flags = config.get("train", {}), []
    select = metrics.get("selected", train.get("select", "best_valid"))
    if recipe is not None:
        rt = recipe["train"]
        fewer_epochs = select != "last" and train.get("epochs", rt["epochs"]) < rt["epochs"]
        step_cap = bool(train.get("max_steps_per_epoch")) and train.get("max_steps_per_epoch") != \
            rt.get("max_steps_per_epoch")
        if fewer_epochs or step_cap:
            flags.append("capped")
    if select != "last" and metrics["best_epoch"] == metrics["epochs_run"] - 1:
        flags.append("still improving")
    return flags


def load_run(run_dir: Path, recipe: str | None = None) -> dict:
    """A finished run's metrics.json plus what the tables need, all read off the run directory:
    train_seconds = the sum of every epoch's training time (meta.json's history; counts the epochs of
    earlier sessions of a resumed run; validation excluded), train_sha (metrics.json git_sha), the
    exclusion rule, the config fields that differ from the recipe YAML, and the run's flags."""
    run_dir = Path(run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    epochs = json.loads((run_dir / "meta.json").read_text())["epochs"] if (run_dir / "meta.json").exists() else []
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    base = recipe_config(recipe) if recipe else None
    m["run"], m["run_dir"] = run_dir.name, str(run_dir)
    m["train_seconds"] = round(sum(e["seconds"] for e in epochs), 1) if epochs else None
    # time to target: epoch wall (training + validation + checkpoints) through the selected epoch
    to_best = [e for e in epochs if e.get("epoch", -1) <= m.get("best_epoch", -1)]
    m["wall_to_best"] = (round(sum(e["wall_seconds"] for e in to_best), 1)
                         if to_best and all("wall_seconds" in e for e in to_best) else None)
    m["train_sha"] = (m.get("git_sha") or "unknown")[:7]
    m["exclude_history"] = exclusion_rule(m, cfg)
    m["train_epochs"] = cfg.get("train", {}).get("epochs")
    m["recipe"] = str(recipe) if recipe else None
    m["changes"] = config_diff(cfg, base) if cfg and base else []
    m["flags"] = run_flags(m, cfg, base)
    m["patience"] = cfg.get("train", {}).get("patience")
    m["seed"] = cfg.get("train", {}).get("seed")
    return m


def ensure_content(shards: Path, recipe: str) -> None:
    """`python -m data_pipeline content` with the `recipe` YAML on `shards`, unless they have semantic IDs."""
    from data_pipeline.read_shards import load_manifest
    if load_manifest(shards).get("semantic_ids") is not None:
        return
    from configs.load import load_config
    from configs.schema import ContentStageConfig
    from data_pipeline import content_stage
    content_stage.run(load_config(ContentStageConfig, ROOT / recipe, [f"shards={shards}"]))


def ensure_shards(dataset: str, raw: str, shards: Path, extra: list[str] = ()) -> None:
    if (shards / "manifest.json").exists():
        return
    cmd = [sys.executable, "-m", "data_pipeline", "prepare", "--dataset", dataset, "--raw", raw, "--out",
           str(shards), "--quiet", *sum((["--set", s] for s in extra), [])]
    subprocess.run(cmd, cwd=ROOT, check=True)


def run_one(config: str, run_dir: Path, shards: Path, seed: int, overrides: list[str], nproc: int,
            command: tuple[str, ...] = ("pretrain",), recipe: str | None = None) -> dict | None:
    """Train (or resume, or skip) one run; returns load_run(run_dir, recipe or config) or None if it failed.
    `command` is the `python -m train` subcommand and its own arguments (e.g. ("distill", "--teacher", T));
    `recipe` the PretrainConfig YAML the run is compared to when `config` is not one (a distill YAML).
    While it trains, the machine's 1-min load average is sampled every LOAD_SAMPLE_S seconds and kept in
    metrics.json `bench_sessions` (one entry per session of a resumed run), so a table can say when a run
    shared the cores."""
    recipe = recipe or config
    if (run_dir / "metrics.json").exists():
        return load_run(run_dir, recipe)
    launch = [sys.executable, "-m", "train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    cmd = launch + [*command, "--config", config, "--set", f"run_dir={run_dir}", "--set", f"shards={shards}",
                    "--set", f"train.seed={seed}", *sum((["--set", s] for s in overrides), [])]
    if (run_dir / "ckpt" / "last").exists():
        cmd.append("--resume")
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, 2 // nproc)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    print("$", " ".join(cmd), flush=True)
    t0, samples, before = time.time(), [], loadavg()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    while True:
        try:
            proc.wait(timeout=LOAD_SAMPLE_S)
            break
        except subprocess.TimeoutExpired:
            if (la := loadavg()) is not None:
                samples.append(la[0])
    if proc.returncode != 0:
        print(f"run {run_dir} failed with exit code {proc.returncode}", file=sys.stderr)
        return None
    m = json.loads((run_dir / "metrics.json").read_text())
    m["wall_seconds"] = round(time.time() - t0, 1)
    session = dict(wall_seconds=m["wall_seconds"], nproc=nproc, threads_per_proc=int(threads), cpus=cpus(),
                   load_1min_mean=round(statistics.fmean(samples), 2) if samples else None,
                   load_1min_max=max(samples) if samples else None, load_samples=len(samples),
                   load_1min_before=before[0] if before else None)
    m["bench_sessions"] = m.get("bench_sessions", []) + [session]
    (run_dir / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    return load_run(run_dir, recipe)


def shared_cores(m: dict) -> bool | None:
    """Did the run share the cores? True when, in any session, the mean 1-min load average while it trained
    exceeded the run's own threads (processes x OMP threads) by more than SHARED_MARGIN: something else was
    runnable (another run, a test suite). None when no load was recorded (runs from before the record)."""
    loads = [s for s in m.get("bench_sessions", []) if s.get("load_1min_mean") is not None]
    if not loads:
        return None
    return any(s["load_1min_mean"] > s["nproc"] * s["threads_per_proc"] + SHARED_MARGIN for s in loads)


def load_cell(ms: list[dict]) -> str:
    sessions = [s for m in ms for s in m.get("bench_sessions", []) if s.get("load_1min_mean") is not None]
    if not sessions:
        return "-"
    threads = sorted({s["nproc"] * s["threads_per_proc"] for s in sessions})
    return (f"{statistics.fmean(s['load_1min_mean'] for s in sessions):.1f} "
            f"({'/'.join(map(str, threads))} thr{', shared' if any(shared_cores(m) for m in ms) else ''})")


def group_key(m: dict) -> tuple:
    return tested_epoch(m), m.get("exclude_history", "window"), tuple(m.get("flags", ()))


def row_label(model: str, m: dict) -> str:
    return model + (f" [{', '.join(m['flags'])}]" if m.get("flags") else "")


def group_runs(name: str, ms: list[dict]) -> list[tuple[str, tuple, list[dict]]]:
    """(label, key, runs) per group of `ms` that agree on group_key (tested epoch, exclusion rule, flags);
    the label is the name plus its flags, and the protocol and rule too when they alone split the name."""
    groups: dict[tuple, list[dict]] = {}
    for m in ms:
        groups.setdefault(group_key(m), []).append(m)
    bases = [row_label(name, gs[0]) for gs in groups.values()]
    return [(base if bases.count(base) == 1 else f"{base} ({key[0]}, excl. {key[1]})", key, gs)
            for (key, gs), base in zip(groups.items(), bases)]


def mean_sd(vals: list[float | None]) -> dict | None:
    """Mean and sd over seeds; None when any seed lacks the value (never a mean over a silent subset)."""
    if not vals or any(v is None for v in vals):
        return None
    return dict(mean=statistics.fmean(vals), sd=statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Rows keyed by label (model, plus its flags in brackets when flagged); one row per (model, tested
    epoch, exclusion rule, flags), so unlike runs are never averaged together."""
    out = {}
    for name, ms in runs.items():
        for label, key, gs in group_runs(name, ms):
            row = {"model": name, "seeds": len(gs), "runs": [m.get("run") for m in gs],
                   "best_epochs": [m["best_epoch"] for m in gs], "epochs_run": [m["epochs_run"] for m in gs],
                   "train_seconds": [m.get("train_seconds") for m in gs],
                   "wall_to_best": [m.get("wall_to_best") for m in gs],
                   "train_sha": sorted({m.get("train_sha", "unknown") for m in gs}),
                   "test_at": [key[0]], "exclude_history": key[1], "flags": list(key[2]),
                   "load": load_cell(gs)}
            for k in METRICS + ("mrr",):
                row[k] = mean_sd([m["test"].get(k) for m in gs])
            out[label] = row
    return out


def protocol_notes(runs: list[dict]) -> list[str]:
    """Notes that follow the protocol the runs actually used (read off their metrics.json / config.json)."""
    notes = []
    protocols = {tested_epoch(m) for m in runs}
    for p in sorted(protocols):
        if p == "best valid epoch":
            notes.append("'best valid epoch': tested once, at the epoch with the best validation NDCG@10; the "
                         "test split chose nothing, so these numbers are not optimistic.")
        elif p.startswith("best valid epoch"):
            notes.append("'best valid epoch (valid trained on!)': the validation event was also trained on, so "
                         "the selection is contaminated (optimistic).")
        elif p.startswith("last epoch"):
            eps = sorted({m["epochs_run"] for m in runs if tested_epoch(m) == p})
            notes.append(f"'{p}': the final epoch of a fixed-length run is tested (epochs run: "
                         f"{', '.join(map(str, eps))}; no early stopping); the test split chose nothing"
                         + (", and the validation event was trained on (the refit protocol)." if "through" in p
                            else "."))
        else:
            notes.append(f"'{p}': the TEST split was evaluated at every evaluation and its best epoch kept (the "
                         "HSTU reference code's protocol, which has no validation split): optimistic, comparable "
                         "only to numbers published that way, not an estimate of unseen-data quality.")
    pats = sorted({m["patience"] for m in runs if m.get("patience") is not None and
                   m.get("selected", "best_valid") != "last"})
    if pats:
        notes.append("Early stopping: patience " + ", ".join(map(str, pats)) + " evaluations"
                     + (" (0 = none)." if 0 in pats else "."))
    for rule in sorted({m.get("exclude_history", "window") for m in runs}):
        notes.append(f"History exclusion '{rule}' (column excl.): {EXCLUSION.get(rule, rule)}.")
    return notes


def flag_notes(summary: dict) -> list[str]:
    notes = []
    for flag, text in FLAGS.items():
        rows = {k: r for k, r in summary.items() if flag in r.get("flags", [])}
        if rows:
            n = sum(r["seeds"] for r in rows.values())
            notes.append(f"[{flag}] {text}: {n} run{'s' * (n != 1)} ({', '.join(rows)}); tabulated in rows of "
                         "their own, never averaged with complete runs.")
    return notes


def changes_notes(runs: dict[str, list[dict]]) -> list[str]:
    """One note per model whose runs differ from its recipe YAML (read off the runs' config.json)."""
    notes = []
    for model, ms in runs.items():
        changes = sorted({c for m in ms for c in m.get("changes", [])})
        if changes:
            notes.append(f"{model}: differs from {ms[0].get('recipe')} in {', '.join(changes)}.")
    return notes


def _fmt(r: dict, k: str) -> str:
    return "n/a" if r.get(k) is None else f"{r[k]['mean']:.4f} ± {r[k]['sd']:.4f}"


def write_results(name: str, title: str, summary: dict, reference: list[tuple], notes: list[str],
                  command: str, extra_rows: dict | None = None, out: Path | None = None) -> None:
    out = Path(out) if out else ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata(command)
    notes = list(notes) + flag_notes(summary)
    (out / f"{name}.json").write_text(json.dumps(dict(**meta, results=summary, extra=extra_rows or {},
                                                      reference=reference, notes=notes), indent=2) + "\n")
    lines = header(title, meta) + [
        "Test metrics at the epoch named in 'test at', full ranking over all items, history excluded by the "
        "rule in 'excl.' (see notes); mean ± sd over seeds; epochs = the tested epoch of each seed; "
        "train s/run = training seconds summed over epochs (validation and test excluded); to best = epoch wall "
        "seconds (training, validation, checkpoints) through the tested epoch, the time to target; load = mean 1-min "
        "load average while the runs trained, with the runs' own threads ('shared': load above those threads, "
        "so something else ran on the cores and train s are slower than on an idle machine; '-': not "
        "recorded); train sha = the commit each run trained at.", "",
        "| model | seeds | test at | excl. | HR@10 | NDCG@10 | HR@50 | NDCG@50 | HR@200 | epochs | train s/run "
        "| to best s | load | train sha |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, r in summary.items():
        secs = [s for s in r["train_seconds"] if s]
        to_best = [s for s in r.get("wall_to_best", []) if s]
        lines.append(f"| {model} | {r['seeds']} | {'; '.join(r['test_at'])} | {r.get('exclude_history', '')} | "
                     f"{_fmt(r, 'hr@10')} | {_fmt(r, 'ndcg@10')} | {_fmt(r, 'hr@50')} | {_fmt(r, 'ndcg@50')} | "
                     f"{_fmt(r, 'hr@200')} | {r['best_epochs']} | {round(statistics.fmean(secs)) if secs else ''} | "
                     f"{round(statistics.fmean(to_best)) if to_best else 'n/a'} | "
                     f"{r.get('load', '-')} | {', '.join(r.get('train_sha', []))} |")
    for model, m in (extra_rows or {}).items():
        cells = " | ".join("n/a" if m.get(k) is None else f"{m[k]:.4f}"
                           for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200"))
        lines.append(f"| {model} | - | - | {m.get('exclude_history', '-')} | {cells} | - | - | - | - | - |")
    if reference:
        lines += ["", "Published reference numbers (their protocol; see notes):", "",
                  "| source | model | HR@10 | NDCG@10 | HR@50 | NDCG@50 |", "|---|---|---|---|---|---|"]
        lines += [f"| {' | '.join(str(x) for x in r)} |" for r in reference]
    lines += ["", *[f"- {n}" for n in notes], ""]
    (out / f"{name}.md").write_text("\n".join(lines))


def recipe_note(model: str, recipe: str) -> str:
    """The recipe a model's runs start from, read off its YAML (so the note cannot drift from the file)."""
    c = recipe_config(recipe)
    lo, t, d, md = c["loss"], c["train"], c["data"], c["model"]
    loss = lo["kind"] + (f", {lo['num_negatives']} uniform negatives per position"
                         if lo["kind"] == "sampled_softmax" else "")
    return (f"{model} recipe ({recipe}): {md['arch']}, {md['num_layers']} layers, D {md['dim']}, "
            f"{md['num_heads']} heads; {loss}, temperature {lo['temperature']}; AdamW lr {t['lr']} "
            f"({t['beta1']}, {t['beta2']}), weight decay {t['weight_decay']}; batch {d['batch_size']}, max length "
            f"{d['max_len']}, dropout {md['input_dropout']} / {md['linear_dropout']}; up to {t['epochs']} epochs, "
            f"patience {t['patience']}, selection {t['select']}.")
