"""`python -m train adapt --base runs/<name>`: a pretrained backbone, frozen, + per-domain MLoRA adapters.

    base run's weights -> the same model with model.adapters=mlora (B = 0: starts as the base exactly)
    -> freeze every backbone parameter -> train the adapters of the chosen domains in mixed-domain batches
    -> validate each epoch; each domain keeps its own best epoch (its adapter saved alone to
       run_dir/adapters/<domain>.safetensors) and stops improving on its own patience
    -> the best adapter of every domain loaded back -> test -> ckpt/best + metrics.json (exportable)

The backbone is bit-identical to the base run's afterwards (tests/test_adapt.py): only adapter factors are
given to the optimizer, and with `--domains` the other domains' factor rows get a zero gradient.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from configs.load import ConfigError, load_config, save_config
from configs.provenance import git_sha
from configs.schema import PretrainConfig
from data_pipeline.read_shards import load_manifest, other_shards
from model.items import load_item_features
from model.lora import adapter_layers, domain_adapter_state, is_adapter_param, load_backbone, load_domain_adapter
from model.seqrec import build_model, serving_state
from train import engine as E
from train.loop import NonFiniteGuard, train_epoch
from train.pretrain import make_logger, run_eval, seed_everything, train_candidates


def base_config(base: Path, overrides: list[str], config: str | None = None) -> PretrainConfig:
    """The base run's resolved config with model.adapters=mlora, run_dir <base>_adapt and resume off,
    then the adapt YAML and the --set overrides on top (adapter rank, lr, epochs, ...)."""
    if not (base / "config.json").exists() or not (base / "metrics.json").exists():
        raise FileNotFoundError(f"{base} is not a finished run (config.json and metrics.json needed)")
    start = load_config(PretrainConfig, base / "config.json",
                        ["model.adapters=mlora", f"run_dir={base.parent / (base.name + '_adapt')}", "resume=false"])
    cfg = load_config(PretrainConfig, config, overrides, start=start)
    if cfg.model.adapters != "mlora":
        raise ConfigError("adapt trains MLoRA adapters: model.adapters must be 'mlora'")
    return cfg


def chosen_domains(manifest: dict, names: list[str]) -> list[int]:
    known = manifest["id_maps"]["domains"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown domain(s) {unknown}; this shard set has {known}")
    return [known.index(n) for n in names] if names else list(range(len(known)))


def freeze_backbone(model: torch.nn.Module, domains: list[int], num_domains: int) -> int:
    """requires_grad only on adapter factors; rows of domains not chosen get a zero gradient. Returns the
    number of trainable values (chosen domains only)."""
    keep = torch.zeros(num_domains, 1, 1)
    keep[domains] = 1.0
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))
        if is_adapter_param(name):
            if len(domains) < num_domains:
                p.register_hook(lambda g, keep=keep: g * keep.to(g.device, g.dtype))
            trainable += p[0].numel() * len(domains)
    return trainable


def save_adapter(model, domain: int, name: str, out: Path) -> None:
    layers = list(adapter_layers(model).values())
    with E.gathered([p for m in layers for p in (m.A, m.B)]):
        state = domain_adapter_state(model, domain)
    if E.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"),
                  metadata={"domain": name, "domain_id": str(domain)})
    E.barrier()


def load_adapters(model, domains: list[int], names: list[str], folder: Path) -> None:
    from safetensors.torch import load_file
    layers = list(adapter_layers(model).values())
    with E.gathered([p for m in layers for p in (m.A, m.B)], modify=True):  # under ZeRO-3 rank 0's copy wins
        for d in domains:
            load_domain_adapter(model, d, load_file(str(folder / f"{names[d]}.safetensors")))


def main(cfg: PretrainConfig, base: str | Path, domain_names: list[str] = ()) -> dict:
    # ---- setup: the base run, the shard set it trained on, the run directory -----------------------------
    base = Path(base)
    rank, world = E.setup_distributed()
    dev = E.device()
    cfg = replace(cfg, train=replace(cfg.train, precision=E.resolve_precision(cfg.train.precision, dev)))
    seed_everything(cfg.train.seed)
    gen = torch.Generator(device=dev).manual_seed(cfg.train.seed * 1000 + rank)
    manifest = load_manifest(cfg.shards)
    base_metrics = json.loads((base / "metrics.json").read_text())
    if why := other_shards(manifest, base_metrics, base):
        raise ConfigError(f"train adapt --base: {why}")
    names = manifest["id_maps"]["domains"]
    domains = chosen_domains(manifest, list(domain_names))
    num_items = manifest["vocab"]["num_items"]
    candidates = train_candidates(manifest, dev)
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / "adapters", ignore_errors=True)  # a fresh adapt: no stale domain may remain
        save_config(cfg, run_dir / "config.json")
        (run_dir / "adapt.json").write_text(json.dumps(dict(base=str(base), domains=[names[d] for d in domains])))
    E.barrier()
    log = make_logger(run_dir, rank)

    # ---- model: the base weights into the adapted model, backbone frozen, engine --------------------------
    model = build_model(cfg.model, manifest, cfg.data.max_len, load_item_features(cfg.shards, cfg.model))
    try:
        load_backbone(model, serving_state(E.consolidated_state_dict(base / "ckpt", "best")))
    except ValueError as e:  # a base of another model config: the user's to fix
        raise ConfigError(f"{base}: {e}") from e
    trainable = freeze_backbone(model, domains, len(names))
    eng = E.build_engine(model.to(dev), cfg.train, cfg.data.batch_size)
    guard = NonFiniteGuard(cfg.train, run_dir / "ckpt", 0)
    if rank == 0:
        total = sum(p.numel() for n, p in model.named_parameters() if not is_adapter_param(n))
        print(f"adapting {[names[d] for d in domains]}: {trainable:,} adapter values "
              f"({trainable / len(domains):,.0f} per domain = {100 * trainable / len(domains) / total:.2f}% of the "
              f"{total:,} backbone values)")

    # ---- loop: every domain keeps its own best epoch and patience ---------------------------------------
    best = {d: dict(ndcg=-1.0, epoch=-1, bad=0) for d in domains}
    history, t_start = [], time.perf_counter()
    for epoch in range(cfg.train.epochs):
        row = train_epoch(eng, cfg, epoch, num_items, gen, dev, log, guard, candidates)
        val = run_eval(eng, cfg, "valid", manifest, dev, task=cfg.eval.select_task)
        row["valid_per_domain"] = {n: m["ndcg@10"] for n, m in val["per_domain"].items()}
        for d in domains:
            score = val["per_domain"].get(names[d], {}).get("ndcg@10", float("nan"))
            if score > best[d]["ndcg"]:
                best[d].update(ndcg=score, epoch=epoch, bad=0)
                save_adapter(eng.module, d, names[d], run_dir / "adapters")
            else:
                best[d]["bad"] += 1
        history.append(row)
        log(dict(kind="epoch", **row))
        if rank == 0:
            print(f"epoch {epoch}: loss {row['loss']:.4f}  {row['seconds']}s  valid NDCG@10 "
                  + "  ".join(f"{n} {v:.4f}" for n, v in row["valid_per_domain"].items()))
        if cfg.train.patience and all(b["bad"] >= cfg.train.patience for b in best.values()):
            break

    # ---- test with every domain's best adapter; save as ckpt/best so `train export` takes it ------------
    load_adapters(eng.module, [d for d in domains if best[d]["epoch"] >= 0], names, run_dir / "adapters")
    state = dict(epoch=len(history) - 1, best_epoch=max(b["epoch"] for b in best.values()), history=history)
    E.save_checkpoint(eng, run_dir / "ckpt", "best", {"state": state}, gen)
    test = run_eval(eng, cfg, "test", manifest, dev)
    metrics = dict(base=str(base), base_test=base_metrics.get("test"), test=test, selected="best_valid_per_domain",
                   best_epoch=state["best_epoch"], epochs_run=len(history),
                   best_epoch_per_domain={names[d]: b["epoch"] for d, b in best.items()},
                   valid_ndcg_per_domain={names[d]: b["ndcg"] for d, b in best.items()},
                   trainable_adapter_values=trainable, train_seconds_this_run=round(time.perf_counter() - t_start, 1),
                   world_size=world, precision=cfg.train.precision, dataset=manifest["dataset"],
                   manifest_hash=manifest["content_hash"], git_sha=git_sha())
    E.write_json(run_dir / "metrics.json", metrics)
    if rank == 0:
        print(f"test (each domain at its best epoch {metrics['best_epoch_per_domain']}): HR@10 {test['hr@10']:.4f} "
              f"NDCG@10 {test['ndcg@10']:.4f}; base {base_metrics['test']['ndcg@10']:.4f}")
    return metrics
