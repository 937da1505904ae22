"""Pretraining: shards -> model -> DeepSpeed engine -> loop -> validation every epoch -> early stopping
-> best checkpoint -> test at the best epoch -> metrics.json.

    python -m train pretrain --config configs/pretrain/ml1m_hstu.yaml --set train.epochs=5
    deepspeed --num_gpus 2 -m train pretrain ...        OMP_NUM_THREADS=1 on CPU, or --bind_cores_to_rank
    torchrun --nproc_per_node 2 -m train pretrain ...

Model selection uses the validation split only; the test split is read once, at the end. (Two opt-in
exceptions: train.select=last tests the final epoch of a refit run; train.select=best_test reproduces the
HSTU reference code's optimistic protocol, test every epoch, to compare with numbers published that way.)
"""
from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from configs.load import ConfigError, save_config
from configs.provenance import git_sha
from configs.schema import PretrainConfig
from data_pipeline.collate import domain_ids, make_loader
from data_pipeline.read_shards import ShardError, check_shards, cold_items, load_manifest, other_shards
from model.items import content_parameters, load_item_features, part_norms
from model.seqrec import build_model, serving_state
from train import engine as E
from train.baselines import item_counts, popularity_metrics
from train.calibrate import OFFSETS, choose_offset, offset_sweep
from train.evaluate import PopularitySlices, QuerySlices, SliceSet, evaluate, generative_ranks
from train.loop import NonFiniteGuard, dummy_batch, train_epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_eval(eng, cfg: PretrainConfig, split: str, manifest: dict, dev, generative: bool = False,
             task: str = "auto", keep_ranks: bool = False) -> dict:
    """Full-ranking metrics of the dot-product head, or (`generative`) of the semantic-ID beam search;
    `task` poses each target as recommendation, search, ... (data_pipeline.collate.example_to_tokens)."""
    batches = (b.to(dev) for b in make_loader(cfg.shards, split, _eval_loader(cfg), shuffle=False, task=task))
    ecfg, ranker = cfg.eval, None
    if generative:
        ecfg = replace(cfg.eval, ks=[k for k in cfg.eval.ks if k <= cfg.eval.beam])
        ranker = lambda m, b, c: generative_ranks(m, b, ecfg, manifest["vocab"]["num_items"], c)
    cold = torch.from_numpy(cold_items(manifest)).to(dev)
    # an ID-only model has nothing but an untrained random row for a held-out item: a serving index would
    # not contain it, so it is not ranked (its cold recall is 0 by construction, not by luck)
    unrankable = cold if cfg.model.item_repr == "id" and len(cold) else None
    dummy = lambda: dummy_batch(dev, seen=True)  # its ranks are discarded: any item will do
    out = evaluate(eng, E.lockstep(batches, dummy), ecfg, manifest["vocab"]["num_items"],
                   manifest["id_maps"]["domains"], all_reduce=E.all_reduce_sum, cold=cold, ranker=ranker,
                   unrankable=unrankable,
                   slices=SliceSet(_query_slices(manifest, split), _popularity_slices(cfg, manifest)),
                   num_users=manifest["vocab"]["num_users"] if keep_ranks else 0,
                   item_domain=None if generative else domain_of_items(manifest, cfg.eval.within_domain, dev))
    out["task"] = task
    out["within_domain"] = cfg.eval.within_domain and not generative
    return out


def calibrate_cold(eng, cfg: PretrainConfig, manifest: dict, dev) -> dict:
    """eval.calibrate_cold: the validation split ranked at every offset of train.calibrate.OFFSETS; the
    offset whose validation cold share@10 is closest to the cold items' catalogue share (no test data)."""
    cold = torch.from_numpy(cold_items(manifest)).to(dev)
    num_items = manifest["vocab"]["num_items"]
    batches = (b.to(dev) for b in make_loader(cfg.shards, "valid", _eval_loader(cfg), shuffle=False,
                                              task=cfg.eval.select_task))
    curve = offset_sweep(eng, E.lockstep(batches, lambda: dummy_batch(dev, seen=True)), cfg.eval, num_items,
                         cold, OFFSETS, all_reduce=E.all_reduce_sum)
    shares = {b: m["cold_share"] for b, m in curve.items()}
    target = len(cold) / num_items
    return dict(offset=choose_offset(shares, target), target_share=target, rule="valid cold share@10 closest to "
                "the catalogue share", valid_cold_share={str(b): v for b, v in shares.items()})


def item_part_norms(model, manifest: dict, dev) -> dict:
    """Mean L2 norm of each item-vector part over the warm and the cold items (model.items.part_norms):
    whether the code/content parts grow while the id part is what fits (issue 17's diagnostics)."""
    n = manifest["vocab"]["num_items"]
    cold = torch.from_numpy(cold_items(manifest)).to(dev)
    ids = torch.arange(1, n + 1, device=dev)
    is_cold = torch.isin(ids, cold)
    norms = part_norms(model.embed.item, ids)
    return {part: {"warm": float(v[~is_cold].mean()), "cold": float(v[is_cold].mean()) if len(cold) else None}
            for part, v in norms.items()}


def domain_of_items(manifest: dict, within_domain: bool, dev) -> torch.Tensor | None:
    """(num_items + 1,) each item's domain id for eval.within_domain, else None."""
    if not within_domain:
        return None
    if manifest.get("domain_by", "source") != "source":
        raise ValueError(f"eval.within_domain needs item domains; this shard set's domains are user groups "
                         f"(domain_by={manifest['domain_by']!r}) that share every item")
    return torch.tensor(manifest["item_domain"], dtype=torch.long, device=dev)


def train_candidates(manifest: dict, dev) -> torch.Tensor | None:
    """Sorted ids of the items negatives are drawn from: every item but the cold ones (held out of
    training, never a negative either); None = all items."""
    cold = cold_items(manifest)
    if not len(cold):
        return None
    return torch.from_numpy(np.setdiff1d(np.arange(1, manifest["vocab"]["num_items"] + 1), cold)).to(dev)


def has_search_targets(manifest: dict) -> bool:
    return bool((manifest["counts"].get("search") or {}).get("test_search_targets"))


_POPULARITY: dict[str, PopularitySlices] = {}  # shards -> slices, counted once per process


def _popularity_slices(cfg: PretrainConfig, manifest: dict) -> PopularitySlices | None:
    """Head / tail target slices (eval.trace_test diagnostics only): every rank counts the same items."""
    if not cfg.eval.trace_test:
        return None
    if cfg.shards not in _POPULARITY:
        counts = item_counts(cfg.shards, manifest["vocab"]["num_items"], E.all_reduce_sum,
                             replace(cfg.data, num_workers=0))
        _POPULARITY[cfg.shards] = PopularitySlices(counts)
    return _POPULARITY[cfg.shards]


def _query_slices(manifest: dict, split: str) -> QuerySlices | None:
    """Seen / unseen-query slices of the test split (validation queries are all seen by construction)."""
    if split != "test" or not has_search_targets(manifest):
        return None
    return QuerySlices(torch.tensor(manifest["counts"]["search"]["unseen_test_queries"], dtype=torch.long))


def test_tasks(eng, cfg: PretrainConfig, manifest: dict, dev) -> dict:
    """Each search test target ranked as recommendation (history only), as search (history + its query)
    and query-only (no history); 'rec' also ranks every other test target. Empty without search data."""
    if not has_search_targets(manifest):
        return {}
    # per-target ranks kept for the search targets (bench/search.py's bootstrap intervals)
    out = {task: run_eval(eng, cfg, "test", manifest, dev, task=task, keep_ranks=task != "rec")
           for task in ("rec", "search", "query_only")}
    if cfg.model.generative_head:  # the generative head decodes from the query token's state too
        out["search_generative"] = run_eval(eng, cfg, "test", manifest, dev, generative=True, task="search")
    return out


def _eval_loader(cfg: PretrainConfig):
    return replace(cfg.data, batch_size=cfg.eval.batch_size)


def init_weights(model: torch.nn.Module, run: Path, manifest: dict, rank: int) -> None:
    """train.init_from: the finished run's ckpt/best weights into `model` (strict: same model config),
    refused when that run trained on another shard set (its item ids would mean other items)."""
    metrics = run / "metrics.json"
    if not metrics.exists():
        raise ConfigError(f"train.init_from: {metrics} not found (a finished run is needed)")
    if why := other_shards(manifest, json.loads(metrics.read_text()), run):
        raise ConfigError(f"train.init_from: {why}")
    try:
        got = model.load_state_dict(serving_state(E.consolidated_state_dict(run / "ckpt", "best")), strict=False)
    except RuntimeError as e:  # a shape differs
        raise ConfigError(f"train.init_from: {run}'s weights do not fit this model config: {e}") from e
    missing = list(serving_state(dict.fromkeys(got.missing_keys)))  # a training-only layer starts fresh
    if missing or got.unexpected_keys:
        raise ConfigError(f"train.init_from: {run}'s weights do not fit this model config: missing {missing[:5]}, "
                          f"unexpected {got.unexpected_keys[:5]}")
    if rank == 0:
        print(f"initialised from {run / 'ckpt' / 'best'}")


def make_logger(run_dir: Path, rank: int):
    path = run_dir / "log.jsonl"

    def log(row: dict):
        if rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return log


@dataclass
class Run:
    """What every stage of a training run reads: the resolved config, this process, the data, the run folder."""

    cfg: PretrainConfig  # precision resolved (DistillConfig for `train distill`)
    rank: int
    world: int
    dev: torch.device
    gen: torch.Generator  # negatives, per rank
    manifest: dict
    bad_shards: list[str]
    candidates: torch.Tensor | None  # the items training may touch (None = all)
    run_dir: Path
    log: Callable[[dict], None]
    select_split: str  # 'valid', or 'test' under train.select=best_test

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "ckpt"

    @property
    def num_items(self) -> int:
        return self.manifest["vocab"]["num_items"]


def as_pretrain(cfg: PretrainConfig) -> PretrainConfig:
    """The PretrainConfig keys of `cfg` (a DistillConfig's student run): what run_dir/config.json holds, so
    `train export`, `init_from` and a later distillation read a distilled run like any other."""
    return PretrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(PretrainConfig)})


def open_run(cfg: PretrainConfig) -> Run:
    """Checks, process group, seeds, data manifest and shard check, run directory with config.json."""
    if min(cfg.loss.rec_weight, cfg.loss.search_weight) < 0 or cfg.loss.rec_weight + cfg.loss.search_weight <= 0:
        raise ValueError(f"loss.rec_weight ({cfg.loss.rec_weight}) and loss.search_weight ({cfg.loss.search_weight}) "
                         "must be >= 0 and not both 0")
    if cfg.train.select not in ("best_valid", "last", "best_test"):
        raise ValueError(f"train.select must be 'best_valid', 'last' or 'best_test', got {cfg.train.select!r}")
    rank, world = E.setup_distributed()
    if cfg.train.deterministic:  # deterministic kernels (and the Triton attention's pinned configs); cuBLAS
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # raises in this mode without a fixed workspace
        torch.use_deterministic_algorithms(True)
    dev = E.device()
    precision = E.resolve_precision(cfg.train.precision, dev)
    if precision != cfg.train.precision and rank == 0:
        print(f"train.precision={cfg.train.precision}: {precision} on this {dev.type}")
    cfg = replace(cfg, train=replace(cfg.train, precision=precision))  # the saved config says what ran
    seed_everything(cfg.train.seed)
    gen = torch.Generator(device=dev).manual_seed(cfg.train.seed * 1000 + rank)  # negatives, per rank
    manifest = load_manifest(cfg.shards)
    bad_shards = check_shards(cfg.shards, manifest)
    if bad_shards and not cfg.data.skip_bad_shards:
        raise ShardError(f"{len(bad_shards)} bad shard(s), first: {bad_shards[0]} (data.skip_bad_shards=true "
                         "trains without them)")
    if bad_shards and rank == 0:
        print(f"warning: skipping {len(bad_shards)} of {len(manifest['shards'])} shards: " + "; ".join(bad_shards))
    if (cfg.eval.calibrate_cold or cfg.eval.cold_offset) and (not len(cold_items(manifest))
                                                             or cfg.model.item_repr == "id"):
        raise ConfigError(f"eval.calibrate_cold / eval.cold_offset need cold items the model can rank: {cfg.shards} "
                          f"holds {len(cold_items(manifest))} (shards.cold_item_frac) and model.item_repr is "
                          f"{cfg.model.item_repr!r} (an ID-only model does not rank cold items)")
    if cfg.eval.calibrate_cold and cfg.train.select == "best_test":
        raise ConfigError("eval.calibrate_cold chooses on validation: train.select='best_test' has none")
    try:
        domain_ids(cfg.shards, cfg.data.domains)  # data.domains names known domains, or the run stops here
    except ValueError as e:
        raise ConfigError(str(e)) from e
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(as_pretrain(cfg), run_dir / "config.json")
    E.barrier()
    return Run(cfg, rank, world, dev, gen, manifest, bad_shards, train_candidates(manifest, dev), run_dir,
               make_logger(run_dir, rank), "test" if cfg.train.select == "best_test" else "valid")


def make_engine(model: torch.nn.Module, run: Run):
    """train.init_from (a fresh run), the DeepSpeed engine, and ckpt/last when resuming -> (engine, loop
    state, NaN guard)."""
    cfg = run.cfg
    resuming = cfg.resume and E.has_checkpoint(run.ckpt, "last")
    if cfg.train.init_from and not resuming:
        init_weights(model, Path(cfg.train.init_from), run.manifest, run.rank)
    eng = E.build_engine(model, cfg.train, cfg.data.batch_size, content_parameters(model))
    state = dict(epoch=-1, best_ndcg=-1.0, best_epoch=-1, bad_evals=0, history=[], skipped_steps=0)
    if resuming:
        state = E.load_checkpoint(eng, run.ckpt, "last", run.gen)["state"]
        old_lr = E.set_lr(eng, cfg.train.lr)
        if run.rank == 0:
            print(f"resumed from {run.ckpt / 'last'} after epoch {state['epoch']}"
                  + (f" (train.lr {old_lr:g} -> {cfg.train.lr:g})" if old_lr != cfg.train.lr else ""))
    return eng, state, NonFiniteGuard(cfg.train, run.ckpt, state.get("skipped_steps", 0))


def fit(eng, run: Run, state: dict, guard: NonFiniteGuard, loss_fn=None) -> float:
    """Train an epoch, validate, keep the best (ckpt/best), checkpoint (ckpt/last), stop early; returns
    the seconds this process trained. `loss_fn`: see train.loop.train_epoch."""
    cfg, split = run.cfg, run.select_split
    t_start = time.perf_counter()
    for epoch in range(state["epoch"] + 1, cfg.train.epochs):
        t_epoch = time.perf_counter()
        guard.last_good_epoch = state["epoch"]
        row = train_epoch(eng, cfg, epoch, run.num_items, run.gen, run.dev, run.log, guard, run.candidates, loss_fn)
        row["eval_seconds"] = 0.0
        last_epoch = epoch + 1 == cfg.train.epochs
        if (epoch >= cfg.train.eval_from and (epoch + 1) % cfg.train.eval_every == 0) or last_epoch:
            t_eval = time.perf_counter()
            val = run_eval(eng, cfg, split, run.manifest, run.dev, task=cfg.eval.select_task)
            row["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
            row[split] = {k: v for k, v in val.items() if k != "per_domain"}
            if cfg.eval.trace_test:  # diagnostics only: nothing below reads it
                trace = run_eval(eng, cfg, "test", run.manifest, run.dev)
                row["test_trace"] = {k: v for k, v in trace.items() if k != "per_domain"}
                row["item_parts"] = item_part_norms(eng, run.manifest, run.dev)
            if val["ndcg@10"] > state["best_ndcg"]:  # NaN never beats: a diverged epoch is never best
                state.update(best_ndcg=val["ndcg@10"], best_epoch=epoch, bad_evals=0, best_valid=val)
                E.save_checkpoint(eng, run.ckpt, "best", {"state": state}, run.gen)
            else:
                state["bad_evals"] += 1
        state.update(epoch=epoch, skipped_steps=guard.skipped)
        state["history"].append(row)
        E.save_checkpoint(eng, run.ckpt, "last", {"state": state}, run.gen)
        row["wall_seconds"] = round(time.perf_counter() - t_epoch, 2)  # train + eval + checkpoints
        run.log(dict(kind="epoch", **row))
        if run.rank == 0:
            v = row.get(split, {})
            nan = float("nan")
            print(f"epoch {epoch}: loss {row['loss']:.4f}  {row['tokens_per_s']:,} tok/s  {row['seconds']}s  "
                  f"{split} HR@10 {v.get('hr@10', nan):.4f} NDCG@10 {v.get('ndcg@10', nan):.4f}  "
                  f"examples per rank {row['examples_per_rank']}")
        if cfg.train.select != "last" and cfg.train.patience and state["bad_evals"] >= cfg.train.patience:
            break
    return time.perf_counter() - t_start


def finish(eng, run: Run, state: dict, train_seconds: float, extra: dict | None = None) -> dict:
    """Test once with the weights train.select names (best validation epoch, last, or best test) ->
    metrics.json (+ `extra`) and meta.json; prints the test numbers."""
    cfg, split, rank, manifest, dev = run.cfg, run.select_split, run.rank, run.manifest, run.dev
    validated = [r["epoch"] for r in state["history"] if r.get(split)]
    if cfg.train.eval_from and validated and state["best_epoch"] == validated[0] and rank == 0:
        print(f"warning: the best epoch ({state['best_epoch']}) is the first validated one (train.eval_from="
              f"{cfg.train.eval_from}): an earlier, unvalidated epoch might have been better")
    if cfg.train.select == "last":
        state["best_epoch"] = state["epoch"]
    E.load_checkpoint(eng, run.ckpt, "last" if cfg.train.select == "last" else "best", None,
                      with_optimizer=False)
    calibration = calibrate_cold(eng, cfg, manifest, dev) if cfg.eval.calibrate_cold else None
    if calibration:  # every test evaluation below (and the export, from metrics.json) uses the chosen offset
        calibration["test_uncalibrated"] = run_eval(eng, cfg, "test", manifest, dev)  # what calibration changed
        cfg = replace(cfg, eval=replace(cfg.eval, cold_offset=calibration["offset"]))
    test = run_eval(eng, cfg, "test", manifest, dev)
    tasks = test_tasks(eng, cfg, manifest, dev)
    test_generative = None
    if cfg.model.generative_head:
        test_generative = run_eval(eng, cfg, "test", manifest, dev, generative=True)
    popularity = popularity_metrics(cfg.shards, "test", cfg.data, cfg.eval, all_reduce=E.all_reduce_sum)
    best_valid = state.get("best_valid") if split == "valid" else None  # best_test: no valid eval
    metrics = dict(best_epoch=state["best_epoch"], epochs_run=state["epoch"] + 1, valid=best_valid,
                   selected=cfg.train.select, train_through_valid=cfg.data.train_through_valid,
                   test=test, test_generative=test_generative, test_popularity=popularity, test_tasks=tasks,
                   train_seconds_this_run=round(train_seconds, 1), exclude_history=cfg.eval.exclude_history,
                   skipped_steps=state.get("skipped_steps", 0), skipped_shards=run.bad_shards, world_size=run.world,
                   precision=cfg.train.precision, cold_offset=cfg.eval.cold_offset, cold_calibration=calibration,
                   dataset=manifest["dataset"], manifest_hash=manifest["content_hash"], git_sha=git_sha(),
                   **(extra or {}))
    E.write_json(run.run_dir / "metrics.json", metrics)
    E.write_json(run.run_dir / "meta.json", dict(git_sha=metrics["git_sha"], step=int(eng.global_steps),
                                                 manifest_hash=manifest["content_hash"], metrics=test,
                                                 world_size=run.world, epochs=state["history"]))
    if rank == 0:
        report(metrics, cfg, split)
    return metrics


def show(m: dict) -> str:
    return "  ".join(f"{k} {m[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr") if k in m)


def report(metrics: dict, cfg: PretrainConfig, split: str) -> None:
    test, tasks = metrics["test"], metrics["test_tasks"]
    which = "last" if cfg.train.select == "last" else "best " + split
    print(f"test at {which} epoch {metrics['best_epoch']}: {show(test)}")
    if test["nonfinite_states"]:
        print(f"  warning: {test['nonfinite_states']:,} test states were NaN/inf (counted as misses)")
    for name, m in (test.get("per_slice") or {}).items():
        print(f"  {name} targets ({m['count']:,}): {show(m)}")
    if metrics["test_generative"]:
        print(f"generative head (beam {cfg.eval.beam}): {show(metrics['test_generative'])}")
    print(f"popularity baseline:     {show(metrics['test_popularity'])}")
    for name, m in tasks.items():
        seen, unseen = (m.get("per_slice") or {}).get("seen_query"), (m.get("per_slice") or {}).get("unseen_query")
        print(f"test as {name} ({m['count']:,} targets): {show(m)}"
              + (f"  | seen-query NDCG@10 {seen['ndcg@10']:.4f}, unseen {unseen['ndcg@10']:.4f}" if seen else ""))


def main(cfg: PretrainConfig) -> dict:
    run = open_run(cfg)  # process group, seeds, data manifest, run directory
    model = build_model(run.cfg.model, run.manifest, cfg.data.max_len,
                        load_item_features(cfg.shards, cfg.model)).to(run.dev)
    eng, state, guard = make_engine(model, run)  # init_from, DeepSpeed, resume
    train_seconds = fit(eng, run, state, guard)  # epochs, validation, best checkpoint, early stopping
    return finish(eng, run, state, train_seconds)  # test at the selected epoch, metrics.json
