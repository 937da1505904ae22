"""Distillation benchmark: how much of a large teacher's quality a small student keeps, and how much faster
it serves (issue 16).

    python bench/distill.py ml1m                    # ML-1M: HSTU-large teacher -> 2-layer D 32 HSTU
    python bench/distill.py beauty                  # Beauty search + rec: the search-stage model -> 1 layer, D 32
    python bench/distill.py beauty --no-train       # tabulate the finished runs only
    python bench/distill.py ml1m --teacher-epochs 20 --epochs 20   # capped runs (flagged in the table)
    python bench/distill.py ml1m --latency-only     # latency of what finished, alone; train the rest later

Steps (each skipped when its output exists, so the command resumes run by run):
1. shards (ML-1M: `data_pipeline prepare`; Beauty: bench/search.py's search shards + content), raw data
   read from --data-root;
2. runs under runs/bench_distill_<setup>/: the teacher (`train pretrain` of the teacher recipe, trained here
   when its run directory is missing), then in priority order scratch_s0 (the student config trained alone:
   `train pretrain` of the distill YAML's student resolved against the teacher, saved as student.json),
   online_s0 (`train distill`, teacher forwards every step), labels_s0 (`train teacher-labels` once, then
   `train distill --set distill.labels=...`), then seeds 1, 2 of scratch and online;
3. serving latency: the teacher and online_s0 exported (`train export`) and served side by side by
   bench/serve.py in one run (same machine, 1 core, eager encoder, concurrency 1), cached in latency.json.
Results: bench/results/distill_<setup>.{md,json} and the index distill.md, rewritten after every run from
the run directories.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import seqrec as S  # noqa: E402
from bench.record import header, metadata, write_index  # noqa: E402


@dataclass
class Setup:
    teacher: str  # the teacher's pretrain recipe
    student: str  # the distill YAML: student model + KD weights
    history: int  # request history length for the latency bench (the data's max_len)
    about: str  # one line: what the teacher and student are


SETUPS = {
    "ml1m": Setup("configs/pretrain/ml1m_hstu_large.yaml", "configs/distill/ml1m_large_to_small.yaml", 200,
                  "ML-1M, full ranking over all items: teacher HSTU-large (8 layers, D 50); student HSTU 2 "
                  "layers, D 32"),
    "beauty": Setup("configs/pretrain/beauty_search.yaml", "configs/distill/beauty.yaml", 50,
                    "Amazon Beauty search + recommendation: teacher = the search-stage model (2 layers, D 64, "
                    "id+sid+content, query text); student 1 layer, D 32, same item and query paths"),
    "synthetic": Setup("configs/pretrain/demo.yaml", "configs/distill/synthetic.yaml", 64,
                       "the synthetic world (a smoke run of this driver: `make demo`'s teacher -> 1 layer, D 16)"),
}
SEEDS = {"scratch": 3, "online": 3, "labels": 1}
ROWS = {"teacher": "teacher", "scratch": "student from scratch", "online": "distilled student (online teacher)",
        "labels": "distilled student (precomputed labels)"}
METRICS = ("hr@10", "ndcg@10")


def prepare(name: str, root: str) -> Path:
    if name == "synthetic":
        shards = S.ROOT / "shards" / "synthetic"
        for cmd, done in ((["synthetic", "--out", str(shards), "--overwrite"], shards / "manifest.json"),
                          (["content", "--shards", str(shards), "--set", "semantic_ids.method=rq_kmeans"],
                           shards / "semantic_ids")):
            if not done.exists():
                subprocess.run([sys.executable, "-m", "data_pipeline", *cmd, "--quiet"], cwd=S.ROOT, check=True)
        return shards
    if name == "ml1m":
        shards = S.ROOT / "shards" / "ml-1m"
        S.ensure_shards("ml-1m", f"{root}/ml-1m", shards)
        return shards
    from bench.search import prepare as search_shards
    return search_shards("amazon-beauty", f"{root}/amazon-beauty", S.ROOT)


def plan() -> list[tuple[str, int]]:
    """(kind, seed) in training order: one of each first, extra seeds last."""
    first = [("teacher", 0), ("scratch", 0), ("online", 0), ("labels", 0)]
    return first + [(k, s) for s in (1, 2) for k in ("scratch", "online") if s < SEEDS[k]]


def caps(epochs: int | None) -> list[str]:
    # a cap below the recipe's eval_from (ML-1M: 20) would leave no validated epoch: validate from epoch 0
    return [f"train.epochs={epochs}", "train.eval_from=0"] if epochs else []


def student_recipe(setup: Setup, teacher: Path, runs: Path) -> Path:
    """The distill YAML's student resolved against the teacher (its shards, data, loss, eval) as a pretrain
    config: the scratch row trains exactly the distilled student's config, without a teacher."""
    from configs.load import save_config
    from configs.schema import PretrainConfig
    from train.distill import distill_config
    cfg = distill_config(str(teacher), S.ROOT / setup.student, [])
    path = runs / "student.json"  # JSON is YAML: `train pretrain --config` reads it
    fields = {k: v for k, v in vars(cfg).items() if k != "distill"}
    save_config(PretrainConfig(**fields), path)
    return path


def train(kind: str, seed: int, setup: Setup, shards: Path, runs: Path, args) -> dict | None:
    """One run (trained, resumed or read back); its metrics with the parameter counts of its model."""
    run_dir, teacher = runs / f"{kind}_s{seed}", runs / "teacher_s0"
    if kind == "teacher":
        return S.run_one(setup.teacher, run_dir, shards, seed, caps(args.teacher_epochs) + args.set, nproc=1)
    if not (teacher / "metrics.json").exists():
        print(f"skip {run_dir.name}: the teacher has not finished", file=sys.stderr)
        return None
    student = student_recipe(setup, teacher, runs)
    over = caps(args.epochs) + args.set
    if kind == "scratch":
        return S.run_one(str(student), run_dir, shards, seed, over, nproc=1)
    if kind == "labels":
        over = over + [f"distill.labels={teacher_labels(setup, teacher, runs)}"]
    return S.run_one(str(S.ROOT / setup.student), run_dir, shards, seed, over, nproc=1,
                     command=("distill", "--teacher", str(teacher)), recipe=str(student))


def teacher_labels(setup: Setup, teacher: Path, runs: Path) -> Path:
    out = runs / "labels"
    if not (out / "labels.json").exists():  # written last: without it the folder is partial, so it is redone
        cmd = [sys.executable, "-m", "train", "teacher-labels", "--teacher", str(teacher), "--out", str(out),
               "--config", str(S.ROOT / setup.student), "--overwrite"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=S.ROOT, check=True)
    return out


@cache  # a finished run never changes, and the table is rewritten after every run: load each model once
def params(run_dir: Path) -> dict:
    import torch

    from train.teacher import load_teacher, param_counts
    return param_counts(load_teacher(run_dir, torch.device("cpu")))


def export(run_dir: Path) -> Path:
    out = run_dir / "export"
    if not (out / "config.json").exists():
        cmd = [sys.executable, "-m", "train", "export", "--run", str(run_dir), "--out", str(out), "--overwrite"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=S.ROOT, check=True)
    return out


def latency(setup: Setup, runs: Path, name: str, args) -> dict | None:
    """p50 / p99 of /recommend for the teacher and online_s0, served one after the other by one
    bench/serve.py run (1 core, eager, concurrency 1, histories of max_len); cached in latency.json."""
    path = runs / "latency.json"
    if path.exists():
        return json.loads(path.read_text())
    t, s = runs / "teacher_s0", runs / "online_s0"
    if args.no_train or args.no_latency or not all((r / "metrics.json").exists() for r in (t, s)):
        return None
    exports = {"teacher": str(export(t)), "student": str(export(s))}
    cmd = [sys.executable, "bench/serve.py", "--export", exports["teacher"], "--export", exports["student"],
           "--history", str(setup.history), "--cores", "1", "--encoders", "eager", "--concurrency", "1",
           "--requests", str(args.requests), "--soak", "0", "--faiss-items", "0", "--tag", f"_distill_{name}",
           "--out", str(runs)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=S.ROOT, check=True)
    rec = json.loads((runs / f"serve_distill_{name}.json").read_text())
    rows = {r["dir"]: r for r in rec["latency"]}
    out = dict(command=rec["meta"]["command"], load=rec["meta"].get("load"), requests=args.requests,
               **{k: {m: rows[d][m] for m in ("p50_ms", "p99_ms", "qps")} for k, d in exports.items()})
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


# ---- results -----------------------------------------------------------------------------------------------
def summarize(done: dict[str, list[dict]]) -> dict:
    rows = {}
    for kind, ms in done.items():
        if not ms:
            continue
        search = [(m.get("test_tasks") or {}).get("search", {}).get("ndcg@10") for m in ms]
        rows[kind] = dict(row=ROWS[kind], seeds=len(ms), runs=[m["run"] for m in ms], params=ms[0]["params"],
                          best_epochs=[m["best_epoch"] for m in ms], epochs_run=[m["epochs_run"] for m in ms],
                          flags=sorted({f for m in ms for f in m["flags"]}),
                          train_seconds=[m.get("train_seconds") for m in ms],
                          search_ndcg10=S.mean_sd(search) if any(v is not None for v in search) else None,
                          **{k: S.mean_sd([m["test"][k] for m in ms]) for k in METRICS})
    return rows


def verdict(rows: dict, lat: dict | None) -> list[str]:
    """The issue's targets, computed from the rows: the online student against the teacher and scratch."""
    t, sc, on = rows.get("teacher"), rows.get("scratch"), rows.get("online")
    if not (t and sc and on):
        return ["Targets: not computed yet, a row is missing."]
    tn, sn, on_ = t["ndcg@10"]["mean"], sc["ndcg@10"], on["ndcg@10"]
    ratio = on["params"]["non_embedding"] / t["params"]["non_embedding"]
    keep = on_["mean"] / tn
    margin, sd = on_["mean"] - sn["mean"], max(sn["sd"], on_["sd"])
    out = [f"Non-embedding parameters: student {on['params']['non_embedding']:,} = {ratio:.1%} of the teacher's "
           f"(target <= 25%: {'met' if ratio <= 0.25 else '**not met**'}).",
           f"NDCG@10 kept: {on_['mean']:.4f} / {tn:.4f} = {keep:.1%} of the teacher "
           f"(target >= 95%: {'met' if keep >= 0.95 else '**not met**'}).",
           f"Above scratch: {margin:+.4f} NDCG@10, " + (
               f"{margin / sd:.1f} x the larger sd ({sd:.4f}; target > 2: "
               f"{'met' if margin > 2 * sd else '**not met**'})" if sd else
               "no sd yet (target > 2 sd: not computed)") + f" over {on['seeds']} vs {sc['seeds']} seeds"
           + (" (provisional: one side has a single seed, its spread is unknown)."
              if sd and min(on["seeds"], sc["seeds"]) < 2 else ".")]
    for kind in ("online", "labels"):
        if kind in rows and tn > sn["mean"]:
            rec = (rows[kind]["ndcg@10"]["mean"] - sn["mean"]) / (tn - sn["mean"])
            out.append(f"Gap recovered ({ROWS[kind]}): {rec:.0%} of the teacher-over-scratch NDCG@10 gap "
                       f"(Rec-Distill's published industrial figure: ~60%).")
    if tn <= sn["mean"]:
        out.append("Gap recovered: undefined, the teacher is not above the scratch student.")
    if lat:
        speed = lat["teacher"]["p50_ms"] / lat["student"]["p50_ms"]
        out.append(f"Serving p50: teacher {lat['teacher']['p50_ms']:.2f} ms, student {lat['student']['p50_ms']:.2f}"
                   f" ms = {speed:.1f}x lower (target >= 3x: {'met' if speed >= 3 else '**not met**'}).")
    else:
        out.append("Serving latency: not measured yet (needs the teacher and online_s0).")
    return out


def _cell(v: dict | None, fmt: str = ".4f") -> str:
    if v is None:
        return "-"
    return f"{v['mean']:{fmt}} ± {v['sd']:{fmt}}" if v["sd"] > 0 else f"{v['mean']:{fmt}}"


def _gap(rows: dict, kind: str) -> str:
    t, sc = rows.get("teacher"), rows.get("scratch")
    if kind in ("teacher", "scratch") or not (t and sc) or t["ndcg@10"]["mean"] <= sc["ndcg@10"]["mean"]:
        return "-"
    tn, sn = t["ndcg@10"]["mean"], sc["ndcg@10"]["mean"]
    return f"{(rows[kind]['ndcg@10']['mean'] - sn) / (tn - sn):.0%}"


def write(name: str, setup: Setup, rows: dict, lat: dict | None, args, out: Path) -> None:
    meta = metadata("python bench/distill.py " + " ".join(sys.argv[1:]))
    record = dict(**meta, setup=name, teacher_recipe=setup.teacher, student_config=setup.student,
                  teacher_epochs_cap=args.teacher_epochs, epochs_cap=args.epochs, rows=rows, latency=lat,
                  verdict=verdict(rows, lat))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"distill_{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    search = any(r["search_ndcg10"] for r in rows.values())
    lines = header(f"Distillation on {name}: teacher vs small student", meta) + [
        f"{setup.about}.", "",
        "| row | seeds | HR@10 | NDCG@10 |" + (" search NDCG@10 |" if search else "")
        + " non-emb params | emb params | gap recovered | p50 ms | p99 ms | best epoch of run | flags |",
        "|" + "---|" * (12 if search else 11)]
    for kind, r in rows.items():
        who = {"teacher": "teacher", "online": "student"}.get(kind)
        lat_cells = [f"{lat[who][k]:.2f}" if lat and who else "-" for k in ("p50_ms", "p99_ms")]
        lines.append(f"| {r['row']} | {r['seeds']} | {_cell(r['hr@10'])} | {_cell(r['ndcg@10'])} | "
                     + (f"{_cell(r['search_ndcg10'])} | " if search else "")
                     + f"{r['params']['non_embedding']:,} | {r['params']['embedding']:,} | {_gap(rows, kind)} | "
                     + " | ".join(lat_cells) + " | "
                     + ", ".join(f"{b} of {e}" for b, e in zip(r["best_epochs"], r["epochs_run"]))
                     + f" | {', '.join(r['flags']) or '-'} |")
    missing = [ROWS[k] for k in ROWS if k not in rows]
    lines += ["", *[f"- {v}" for v in verdict(rows, lat)], ""]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)} (`python bench/distill.py {name}` continues).", ""]
    lines += [
        "Test = each user's last event (leave-one-out), tested once at each run's best validation epoch; "
        "mean ± sd over seeds. Gap recovered = (student - scratch) / (teacher - scratch) on mean test NDCG@10."
        + (" HR@10 / NDCG@10 rank every user's test event as it happened (a search event with its query, a "
           "recommendation event from the history alone); search NDCG@10 = the search test targets only, ranked "
           "as search (metrics.json test_tasks.search)." if search else ""),
        f"Teacher: `{setup.teacher}`; students: `{setup.student}` (scratch = the same student config trained "
        "alone with `train pretrain`, runs/.../student.json). Parameters: non-embedding = blocks and heads, "
        "embedding = item / code / query / position tables (train/teacher.py param_counts; training-only "
        "layers excluded).",
        "Latency: `/recommend` of the teacher's and online_s0's exports, one bench/serve.py run, 1 server core, "
        f"eager encoder, concurrency 1, {args.requests} timed requests with histories of {setup.history} items "
        "(client on the other core); the scratch and label students have the online student's architecture, so "
        "its latency.",
        "Flags: capped = train.epochs below the recipe's (a 2-core compute budget, not a tuned value); still "
        "improving = the tested epoch was the last one run."]
    (out / f"distill_{name}.md").write_text("\n".join(lines) + "\n")
    write_index(out, "distill", "Distillation benchmark: every setup", sorted(SETUPS), "bench/distill.py")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setup", choices=sorted(SETUPS), help="which teacher -> student setup")
    p.add_argument("--data-root", default="../shared/data", help="folder holding ml-1m/, amazon-beauty/")
    p.add_argument("--runs", help="run folder (default runs/bench_distill_<setup>)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="cap the teacher's train.epochs (default: recipe)")
    p.add_argument("--epochs", type=int, default=None, help="cap every student's train.epochs (default: its YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every run, e.g. train.max_steps_per_epoch=5 for a smoke run")
    p.add_argument("--requests", type=int, default=400, help="timed requests per export in the latency run")
    p.add_argument("--no-train", action="store_true", help="only tabulate the finished runs")
    p.add_argument("--no-latency", action="store_true",
                   help="skip the serving latency run (run the command again without it when the machine is idle)")
    p.add_argument("--latency-only", action="store_true",
                   help="train nothing more: measure the latency of the finished teacher and online_s0 (alone on "
                   "the machine), then tabulate; the remaining runs train on a later call")
    p.add_argument("--out", default=str(S.ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.latency_only and (args.no_train or args.no_latency):
        p.error("--latency-only measures latency: it goes with neither --no-train nor --no-latency")
    setup = SETUPS[args.setup]
    runs = Path(args.runs) if args.runs else S.ROOT / "runs" / f"bench_distill_{args.setup}"
    runs.mkdir(parents=True, exist_ok=True)
    idle = args.no_train or args.latency_only
    shards = None if idle else prepare(args.setup, args.data_root)
    for kind, seed in [] if idle else plan():
        if train(kind, seed, setup, shards, runs, args) is None and kind == "teacher":
            sys.exit(f"the teacher run {runs / 'teacher_s0'} failed")
        write(args.setup, setup, summarize(finished(runs, setup)), None, args, Path(args.out))
    lat = latency(setup, runs, args.setup, args)
    write(args.setup, setup, summarize(finished(runs, setup)), lat, args, Path(args.out))
    print((Path(args.out) / f"distill_{args.setup}.md").read_text())


def finished(runs: Path, setup: Setup) -> dict[str, list[dict]]:
    """kind -> the finished runs' metrics (+ parameter counts), read off the run directories."""
    done: dict[str, list[dict]] = {}
    for kind, seed in plan():
        run_dir = runs / f"{kind}_s{seed}"
        if (run_dir / "metrics.json").exists():
            recipe = setup.teacher if kind == "teacher" else str(runs / "student.json")
            done.setdefault(kind, []).append(dict(S.load_run(run_dir, recipe), params=params(run_dir)))
    return done


if __name__ == "__main__":
    main()
