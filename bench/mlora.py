"""MLoRA benchmark: what per-domain adapters buy over one shared model, on two multi-domain setups.

    python bench/mlora.py beauty-sports                  # Amazon Beauty + Sports (item domains)
    python bench/mlora.py ml1m-age                       # ML-1M users split by users.dat age band
    python bench/mlora.py beauty-sports --no-train       # tabulate the finished runs only
    python bench/mlora.py beauty-sports --step-time      # + train step time per model, measured alone

Steps (each skipped when its output exists, so the command resumes run by run):
1. shards/<setup>: one multi-domain shard set (`python -m data_pipeline prepare --also ...` or
   `--domain-by age`), raw data read from --data-root;
2. runs under runs/bench_mlora_<setup>/, in priority order (the 1-seed rows first, extra seeds last):
   shared (no adapters), MLoRA joint (model.adapters=mlora), shared + domain embedding, frozen shared
   backbone + `python -m train adapt`, one single-domain model per domain (data.domains=[d]), one full
   fine-tune of the shared model per domain (train.init_from + data.domains=[d]), then seeds 1, 2 of the
   shared and MLoRA rows. Every run uses the setup's recipe YAML with train.epochs capped (--epochs) and
   validation every epoch; each is tested once, at its best validation epoch.
Results: bench/results/mlora_<setup>.{md,json}, rewritten after every run, read off the run directories.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import seqrec as S  # noqa: E402
from bench.record import header, loadavg, metadata, write_index  # noqa: E402


@dataclass
class Setup:
    prepare: list[str]  # `python -m data_pipeline prepare` arguments ({root} = --data-root)
    recipe: str  # pretrain YAML every run starts from
    within_domain: bool  # eval.within_domain: rank among the target's domain's items only
    note: str  # what "ranked within the domain" means here


SETUPS = {
    "beauty-sports": Setup(
        ["--dataset", "amazon-beauty", "--raw", "{root}/amazon-beauty", "--also", "amazon-sports={root}/amazon-sports",
         "--set", "shards.samples_per_shard=2000"], "configs/pretrain/beauty_hstu.yaml", True,
        "each target is ranked among the items of its own domain only (eval.within_domain=true): a Beauty "
        "target competes with Beauty items, a Sports target with Sports items"),
    "ml1m-age": Setup(
        ["--dataset", "ml-1m", "--raw", "{root}/ml-1m", "--domain-by", "age", "--set",
         "shards.samples_per_shard=500"], "configs/pretrain/ml1m_hstu.yaml", False,
        "domains are user groups (age bands) that share every movie, so ranking within the target's domain is "
        "ranking among all items: full ranking, as for ML-1M elsewhere"),
}
ROWS = ("single-domain", "shared", "shared + domain emb", "MLoRA joint", "shared + frozen + MLoRA adapt",
        "per-domain full fine-tune")
SEEDED = ("shared", "MLoRA joint")  # the rows with 3 seeds


@dataclass
class Run:
    name: str
    row: str
    kind: str  # "pretrain" or "adapt"
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    domain: str | None = None  # a one-domain run: data.domains=[domain]
    base: str | None = None  # adapt / fine-tune: the run it starts from


def plan(domains: list[str], seeds: int, epochs: int, ft_epochs: int) -> list[Run]:
    """Every run of the benchmark, in the order they are trained (1-seed rows first)."""
    runs = [Run("shared_s0", "shared", "pretrain"),
            Run("mlora_s0", "MLoRA joint", "pretrain", ["model.adapters=mlora"]),
            Run("emb_s0", "shared + domain emb", "pretrain", ["model.domain_embedding=true"]),
            Run("adapt_s0", "shared + frozen + MLoRA adapt", "adapt", [f"train.epochs={epochs}"], base="shared_s0")]
    runs += [Run(f"single_{d}_s0", "single-domain", "pretrain", [f"data.domains=[{d}]"], domain=d) for d in domains]
    runs += [Run(f"ft_{d}_s0", "per-domain full fine-tune", "pretrain",
                 [f"data.domains=[{d}]", f"train.epochs={ft_epochs}"], domain=d, base="shared_s0") for d in domains]
    for s in range(1, seeds):
        runs += [Run(f"shared_s{s}", "shared", "pretrain", seed=s),
                 Run(f"mlora_s{s}", "MLoRA joint", "pretrain", ["model.adapters=mlora"], seed=s)]
    return runs


def common_overrides(setup: Setup, epochs: int) -> list[str]:
    return [f"train.epochs={epochs}", "train.eval_from=0", f"eval.within_domain={str(setup.within_domain).lower()}"]


def ensure_shards(setup: Setup, shards: Path, root: str) -> dict:
    from data_pipeline.read_shards import load_manifest
    if not (shards / "manifest.json").exists():
        cmd = [sys.executable, "-m", "data_pipeline", "prepare", *[a.format(root=root) for a in setup.prepare],
               "--out", str(shards), "--quiet"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=S.ROOT, check=True)
    return load_manifest(shards)


def train(run: Run, setup: Setup, shards: Path, runs_dir: Path, epochs: int, extra: list[str] = ()) -> dict | None:
    run_dir = runs_dir / run.name
    if (run_dir / "metrics.json").exists():
        return S.load_run(run_dir, setup.recipe)
    over = common_overrides(setup, epochs) + list(extra) + run.overrides
    if run.kind == "pretrain":
        if run.base:
            over.append(f"train.init_from={runs_dir / run.base}")
        return S.run_one(setup.recipe, run_dir, shards, run.seed, over, nproc=1)
    cmd = [sys.executable, "-m", "train", "adapt", "--base", str(runs_dir / run.base), "--set", f"run_dir={run_dir}",
           *sum((["--set", o] for o in over), [])]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=S.ROOT).returncode != 0:
        print(f"run {run_dir} failed", file=sys.stderr)
        return None
    m = json.loads((run_dir / "metrics.json").read_text())
    m["wall_seconds"] = round(time.time() - t0, 1)
    (run_dir / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    return S.load_run(run_dir, setup.recipe)


# ---- tabulation: everything read off the run directories ------------------------------------------------
def finished(runs: list[Run], runs_dir: Path, recipe: str) -> dict[str, dict]:
    return {r.name: S.load_run(runs_dir / r.name, recipe) for r in runs
            if (runs_dir / r.name / "metrics.json").exists()}


def per_domain(m: dict, d: str) -> dict | None:
    return ((m.get("test") or {}).get("per_domain") or {}).get(d)


def row_trials(row: str, runs: list[Run], done: dict[str, dict], domains: list[str]) -> list[dict[str, dict]]:
    """A row's trials, each {domain: test metrics}: one per seed for whole-model rows; the one-domain runs
    of a row (single-domain, fine-tune) together make one trial, complete only when every domain ran."""
    mine = [r for r in runs if r.row == row and r.name in done]
    if any(r.domain for r in mine):
        trial = {r.domain: per_domain(done[r.name], r.domain) for r in mine}
        return [{d: v for d, v in trial.items() if v}]
    return [{d: v for d in domains if (v := per_domain(done[r.name], d))} for r in mine]


def weighted(trial: dict[str, dict], domains: list[str], key: str) -> float | None:
    """Example-weighted mean over the domains (= the whole test set's mean); None if a domain is missing."""
    if any(d not in trial for d in domains):
        return None
    n = sum(trial[d]["count"] for d in domains)
    return sum(trial[d][key] * trial[d]["count"] for d in domains) / n


def summarize(runs: list[Run], done: dict[str, dict], domains: list[str], params: dict) -> dict:
    out = {}
    for row in ROWS:
        trials = [t for t in row_trials(row, runs, done, domains) if t]
        if not trials:
            continue
        cells = {d: {k: S.mean_sd([t[d][k] if d in t else None for t in trials]) for k in ("hr@10", "ndcg@10")}
                 for d in domains}
        avg = {k: S.mean_sd([weighted(t, domains, k) for t in trials]) for k in ("hr@10", "ndcg@10")}
        out[row] = dict(trials=len(trials), per_domain=cells, weighted=avg,
                        runs=[r.name for r in runs if r.row == row and r.name in done],
                        params_per_domain=params.get(row), epochs=_epochs(runs, row, done))
    return out


def _epochs(runs: list[Run], row: str, done: dict[str, dict]) -> list[str]:
    return [f"{done[r.name]['best_epoch']} of {done[r.name]['epochs_run']}" for r in runs
            if r.row == row and r.name in done]


def params_per_domain(recipe: str, shards: Path, manifest: dict) -> dict:
    """Values added per domain by each row, as a share of the shared model's values (built, not trained)."""
    from configs.load import load_config
    from configs.schema import PretrainConfig
    from model.items import load_item_features
    from model.lora import is_adapter_param
    from model.seqrec import build_model

    def build(extra):
        cfg = load_config(PretrainConfig, S.ROOT / recipe, [f"shards={shards}", *extra])
        return build_model(cfg.model, manifest, cfg.data.max_len, load_item_features(shards, cfg.model))
    n_dom = manifest["vocab"]["num_domains"]
    base = sum(p.numel() for p in build([]).parameters())
    mlora = sum(p.numel() for n, p in build(["model.adapters=mlora"]).named_parameters() if is_adapter_param(n))
    emb = build(["model.domain_embedding=true"]).domain_emb.weight[0].numel()
    share = lambda n: dict(values=int(n), share=n / base)  # noqa: E731
    return {"single-domain": share(base), "shared": share(0), "shared + domain emb": share(emb),
            "MLoRA joint": share(mlora / n_dom), "shared + frozen + MLoRA adapt": share(mlora / n_dom),
            "per-domain full fine-tune": share(base), "_backbone": base}


def step_time(recipe: str, shards: Path, manifest: dict, batches: int = 20, warmup: int = 3) -> dict:
    """ms per train step (fwd + bwd + AdamW, bench/throughput.measure) of the shared, domain-embedding and
    MLoRA models on the same mixed-domain training batches, in this process, rounds interleaved (A B C A B C)
    so drift in the machine's speed hits every model alike; the best round of each is kept."""
    import torch

    from bench.throughput import measure
    from configs.load import load_config
    from configs.schema import PretrainConfig
    from data_pipeline.collate import make_loader
    from model.items import load_item_features
    from model.seqrec import build_model
    kinds = {"shared": [], "shared + domain emb": ["model.domain_embedding=true"],
             "MLoRA joint": ["model.adapters=mlora"]}
    cfg0 = load_config(PretrainConfig, S.ROOT / recipe, [f"shards={shards}", "data.num_workers=0"])
    data = [b for _, b in zip(range(warmup + batches), make_loader(shards, "train", cfg0.data))]
    best: dict[str, float] = {}
    for _ in range(3):
        for kind, extra in kinds.items():
            cfg = load_config(PretrainConfig, S.ROOT / recipe, [f"shards={shards}", *extra])
            torch.manual_seed(0)
            model = build_model(cfg.model, manifest, cfg.data.max_len, load_item_features(shards, cfg.model)).train()
            r = measure(model, data, cfg.loss, manifest["vocab"]["num_items"], warmup)
            best[kind] = min(best.get(kind, float("inf")), 1000 * r["seconds"] / batches)
    return dict(ms_per_step={k: round(v, 2) for k, v in best.items()}, batches=batches, warmup=warmup,
                batch_size=cfg0.data.batch_size, threads=torch.get_num_threads(),
                overhead={k: round(v / best["shared"] - 1, 4) for k, v in best.items()})


# ---- results -----------------------------------------------------------------------------------------------
def _ms(ms: dict | None, sd: bool = True) -> str:
    if ms is None:
        return "-"
    return f"{ms['mean']:.4f} ± {ms['sd']:.4f}" if sd and ms["sd"] > 0 else f"{ms['mean']:.4f}"  # sd 0: 1 seed


def verdict(summary: dict, domains: list[str]) -> list[str]:
    """The issue's target, computed: MLoRA joint vs shared on every domain and on the weighted NDCG@10."""
    sh, ml = summary.get("shared"), summary.get("MLoRA joint")
    if not sh or not ml:
        return ["Target (MLoRA joint vs shared): not computed yet, a row is missing."]
    out = []
    for d in domains:
        a, b = sh["per_domain"][d]["ndcg@10"], ml["per_domain"][d]["ndcg@10"]
        if a and b:
            gain = b["mean"] / a["mean"] - 1
            out.append(f"{d}: MLoRA {b['mean']:.4f} vs shared {a['mean']:.4f} NDCG@10 ({gain:+.1%}) -> "
                       + ("gains" if gain > 0 else "**does not gain**"))
    a, b = sh["weighted"]["ndcg@10"], ml["weighted"]["ndcg@10"]
    if a and b:
        gain = b["mean"] / a["mean"] - 1
        out.append(f"Weighted NDCG@10: MLoRA {b['mean']:.4f} vs shared {a['mean']:.4f} ({gain:+.1%}; target >= +3%: "
                   + ("met" if gain >= 0.03 else "**not met**") + f") over {ml['trials']} vs {sh['trials']} seed(s).")
    p = ml.get("params_per_domain")
    if p:
        out.append(f"Parameters added per domain: {p['values']:,} = {p['share']:.2%} of the shared model "
                   f"(target <= 3%: {'met' if p['share'] <= 0.03 else '**not met**'}).")
    return out


def write(name: str, setup: Setup, manifest: dict, summary: dict, steps: dict | None, args, out: Path) -> None:
    domains = manifest["id_maps"]["domains"]
    meta = metadata("python bench/mlora.py " + " ".join(sys.argv[1:]))
    out.mkdir(parents=True, exist_ok=True)
    record = dict(**meta, setup=name, domains=domains, within_domain=setup.within_domain, epochs_cap=args.epochs,
                  ft_epochs_cap=args.ft_epochs, rows=summary, step_time=steps, verdict=verdict(summary, domains),
                  domain_counts=(manifest.get("counts") or {}).get("per_domain"))
    (out / f"mlora_{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    head = "| row | seeds | " + " | ".join(f"{d} HR@10 | {d} NDCG@10" for d in domains) + \
        " | weighted HR@10 | weighted NDCG@10 | params/domain | best epoch of run |"
    lines = header(f"MLoRA on {name}: per-domain test HR@10 / NDCG@10", meta) + [head,
                                                                                "|" + "---|" * (2 * len(domains) + 6)]
    for row, r in summary.items():
        p = r["params_per_domain"]
        share = "-" if p is None else f"{p['share']:.2%}"
        cells = [f"{_ms(r['per_domain'][d]['hr@10'])} | {_ms(r['per_domain'][d]['ndcg@10'])}" for d in domains]
        lines.append(f"| {row} | {r['trials']} | " + " | ".join(cells) + f" | {_ms(r['weighted']['hr@10'])} | "
                     f"{_ms(r['weighted']['ndcg@10'])} | {share} | "
                     f"{', '.join(r['epochs'])} |")
    lines += ["", *[f"- {v}" for v in verdict(summary, domains)], ""]
    if steps:
        lines.append("Train step time (fwd + bwd + AdamW, batch "
                     f"{steps['batch_size']}, best of 3 interleaved rounds of {steps['batches']} steps, "
                     f"{steps['threads']} threads, measured alone): " + "; ".join(
                         f"{k} {v} ms ({steps['overhead'][k]:+.1%})" for k, v in steps["ms_per_step"].items()) + ".")
    lines += ["", f"Ranking: {setup.note}. Test = each user's last event (leave-one-out), tested once at the run's "
              f"best validation epoch; weighted = example-weighted mean over the domains (the whole test set).",
              f"Every run: `{setup.recipe}` with train.epochs capped at {args.epochs} (per-domain fine-tunes: "
              f"{args.ft_epochs}), validation every epoch, patience from the recipe. The cap is a compute budget "
              "(2 CPU cores), not a tuned value: a run whose best epoch is its last was still improving.",
              "Rows: single-domain = one model per domain trained on that domain's examples only (data.domains); "
              "shared = one model, no domain input; domain emb = + a learned per-domain input vector; MLoRA joint "
              "= backbone + adapters from scratch; frozen + adapt = `python -m train adapt` on shared seed 0; "
              "per-domain full fine-tune = shared seed 0, every weight fine-tuned on one domain (a full copy per "
              "domain). One-domain rows count as one trial when every domain has its run.",
              "Training budget differs by row: frozen + adapt and the fine-tunes start from shared seed 0's best "
              "checkpoint and train their own epochs on top (adapters only, or every weight), so where shared "
              "was still improving at its cap, part of their gain over shared is more training, not adaptation; "
              "MLoRA joint vs shared is the like-for-like comparison (same epochs from scratch) and is what the "
              "target above is computed on.",
              "Params/domain = values added per domain as a share of the shared model's values (item table "
              "included)."]
    (out / f"mlora_{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setup", choices=sorted(SETUPS), help="which multi-domain setup")
    p.add_argument("--data-root", default="../shared/data",
                   help="folder holding amazon-beauty/, amazon-sports/, ml-1m/ (default ../shared/data)")
    p.add_argument("--runs", help="run folder (default runs/bench_mlora_<setup>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every run, e.g. train.max_steps_per_epoch=5 for a smoke run")
    p.add_argument("--epochs", type=int, default=15, help="epoch cap of every run but the fine-tunes (default 15)")
    p.add_argument("--ft-epochs", type=int, default=5, help="epoch cap of the per-domain fine-tunes (default 5)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the shared and MLoRA rows (default 3)")
    p.add_argument("--only", default="", help="comma-separated run names to train (default: all, in order)")
    p.add_argument("--no-train", action="store_true", help="only tabulate the finished runs")
    p.add_argument("--step-time", action="store_true", help="also measure train step time (run with nothing else)")
    p.add_argument("--out", default=str(S.ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    setup = SETUPS[args.setup]
    shards = S.ROOT / "shards" / f"mlora-{args.setup}"
    runs_dir = Path(args.runs) if args.runs else S.ROOT / "runs" / f"bench_mlora_{args.setup}"
    manifest = ensure_shards(setup, shards, args.data_root)
    domains = manifest["id_maps"]["domains"]
    runs = plan(domains, args.seeds, args.epochs, args.ft_epochs)
    params = params_per_domain(setup.recipe, shards, manifest)
    only = {n for n in args.only.split(",") if n}
    steps_path = runs_dir / "step_time.json"
    if args.step_time:
        runs_dir.mkdir(parents=True, exist_ok=True)
        steps = dict(step_time(setup.recipe, shards, manifest), load_after=loadavg())
        steps_path.write_text(json.dumps(steps, indent=2) + "\n")
    steps = json.loads(steps_path.read_text()) if steps_path.exists() else None
    for run in runs:
        if args.no_train or (only and run.name not in only):
            continue
        if run.base and not (runs_dir / run.base / "metrics.json").exists():
            print(f"skip {run.name}: its base {run.base} has not finished", file=sys.stderr)
            continue
        train(run, setup, shards, runs_dir, args.epochs, args.set)
        done = finished(runs, runs_dir, setup.recipe)
        write(args.setup, setup, manifest, summarize(runs, done, domains, params), steps, args, Path(args.out))
    done = finished(runs, runs_dir, setup.recipe)
    write(args.setup, setup, manifest, summarize(runs, done, domains, params), steps, args, Path(args.out))
    write_index(Path(args.out), "mlora", "MLoRA benchmark: every setup", sorted(SETUPS), "bench/mlora.py")
    print((Path(args.out) / f"mlora_{args.setup}.md").read_text())


if __name__ == "__main__":
    main()
