"""A finished run as a frozen teacher, and what distillation reads from it at every training position.

    runs/<teacher>/config.json + metrics.json + ckpt/best
      -> the model built exactly as that run built it (its model config, max_len, shard features: adapters,
         query path, semantic IDs and content included) -> its best weights -> eval(), requires_grad False
      -> per batch, under no_grad: unit-norm states at the target positions, its top-K items among those
         training may touch, their logits (cosine / the teacher's loss temperature)  = TeacherTargets

`python -m train teacher-labels` (train/teacher_labels.py) writes the same TeacherTargets to files once;
`python -m train distill` reads them online (here) or from the files, through the same `teacher_topk`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from configs.load import ConfigError, load_config
from configs.schema import PretrainConfig
from data_pipeline.read_shards import load_manifest, other_shards
from model.items import load_item_features
from model.seqrec import TRAIN_ONLY, SeqRecModel, build_model, serving_state
from train import engine as E
from train.export import item_table
from train.losses import TeacherTargets

TOPK_CHUNK = 4096  # positions scored against the whole catalogue at once: (4096 x I) floats at a time


def teacher_run(run: str | Path) -> tuple[PretrainConfig, dict]:
    """A finished run's resolved config and metrics.json; a clear error naming what is missing."""
    run = Path(run)
    for name in ("config.json", "metrics.json"):
        if not (run / name).is_file():
            raise ConfigError(f"distill.teacher: {run / name} not found (a finished run directory is needed)")
    return load_config(PretrainConfig, run / "config.json"), json.loads((run / "metrics.json").read_text())


def fingerprint(run: str | Path) -> str:
    """sha256 of the run's config.json + metrics.json: a retrained teacher at the same path differs."""
    h = hashlib.sha256()
    for name in ("config.json", "metrics.json"):
        h.update((Path(run) / name).read_bytes())
    return h.hexdigest()


def check_teacher_data(run: Path, tcfg: PretrainConfig, metrics: dict, manifest: dict, data) -> None:
    """The teacher must have trained on this shard set (item ids mean the same items) and read the student's
    batches as it read its own: no longer sequences than its max_len, query tokens the same way."""
    if why := other_shards(manifest, metrics, run):
        raise ConfigError(f"distill.teacher: {why}")
    if data.max_len > tcfg.data.max_len:
        raise ConfigError(f"data.max_len ({data.max_len}) exceeds the teacher's ({tcfg.data.max_len}, "
                          f"{run / 'config.json'}): it has no positions beyond its own")
    if data.query_tokens != tcfg.data.query_tokens:
        raise ConfigError(f"data.query_tokens ({data.query_tokens}) differs from the teacher's "
                          f"({tcfg.data.query_tokens}, {run / 'config.json'})")


def load_teacher(run: str | Path, dev: torch.device) -> SeqRecModel:
    """The run's model with its ckpt/best weights, frozen: eval mode, no parameter requires grad."""
    run = Path(run)
    tcfg, _ = teacher_run(run)
    manifest = load_manifest(tcfg.shards)
    model = build_model(tcfg.model, manifest, tcfg.data.max_len, load_item_features(tcfg.shards, tcfg.model))
    if not (run / "ckpt" / "best").is_dir():
        raise ConfigError(f"distill.teacher: no checkpoint {run / 'ckpt' / 'best'}")
    try:
        model.load_state_dict(serving_state(E.consolidated_state_dict(run / "ckpt", "best")), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"distill.teacher: {run}'s weights do not fit its own config.json: {e}") from e
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(dev).eval()


def allowed_items(num_items: int, candidates: torch.Tensor | None, dev) -> torch.Tensor:
    """(I+1,) bool: the items a teacher's top-K may name, those training may touch (never padding 0, never
    a held-out cold item)."""
    if candidates is None:
        allowed = torch.ones(num_items + 1, dtype=torch.bool, device=dev)
    else:
        allowed = torch.zeros(num_items + 1, dtype=torch.bool, device=dev)
        allowed[candidates] = True
    allowed[0] = False
    return allowed


@torch.no_grad()
def teacher_topk(states: torch.Tensor, table: torch.Tensor, k: int, temperature: float,
                 allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """states (P, Dt), table (I+1, Dt) unit norm -> (P, k) ids of the best allowed items, best first, and
    their logits (cosine / temperature). Scored TOPK_CHUNK positions at a time: memory (chunk x I).
    Only the allowed rows are scored (their ids mapped back) instead of masking the rest with -inf: on an
    ML-1M step (13,116 positions x 3,707 items, k 100, 1 thread, a shared machine) 0.80 s against 1.01 s,
    the same logits (ids may differ only in the order of exactly tied scores, as topk does not fix it)."""
    keep = allowed.nonzero().squeeze(1)  # (n,) allowed ids, sorted
    sub = table[keep].float()  # (n, Dt)
    ids, logits = [], []
    for lo in range(0, states.shape[0], TOPK_CHUNK):
        top = (states[lo:lo + TOPK_CHUNK].float() @ sub.T).topk(k, dim=1)  # (chunk, k), sorted
        ids.append(keep[top.indices])
        logits.append(top.values / temperature)
    if not ids:
        return states.new_zeros(0, k, dtype=torch.long), states.new_zeros(0, k, dtype=torch.float32)
    return torch.cat(ids), torch.cat(logits)


class OnlineTeacher:
    """Teacher forwards every step: batch -> TeacherTargets at its target positions (batch.targets > 0)."""

    def __init__(self, model: SeqRecModel, k: int, temperature: float, allowed: torch.Tensor):
        if k > int(allowed.sum()):
            raise ConfigError(f"distill.top_k ({k}) exceeds the {int(allowed.sum())} items training may touch")
        self.model, self.k, self.temperature, self.allowed = model, k, temperature, allowed
        self.table = item_table(model).to(allowed.device)  # (I+1, Dt) fixed: the teacher never changes

    @torch.no_grad()
    def __call__(self, batch, real: bool = True) -> TeacherTargets:
        states = self.model(batch)[batch.targets > 0].float()  # (P, Dt)
        ids, logits = teacher_topk(states, self.table, self.k, self.temperature, self.allowed)
        return TeacherTargets(states, ids, logits, self.table, self.temperature)


def param_counts(model: torch.nn.Module) -> dict:
    """Embedding (every `embed.*` table: items, codes, queries, positions, actions) and non-embedding
    parameters (the blocks and heads: what a forward pass computes with), training-only layers left out."""
    emb = non = 0
    for name, p in model.named_parameters():
        if name.split(".", 1)[0] in TRAIN_ONLY:
            continue
        if name.startswith("embed."):
            emb += p.numel()
        else:
            non += p.numel()
    return dict(embedding=emb, non_embedding=non)
