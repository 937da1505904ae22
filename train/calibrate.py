"""Cold-item score calibration (eval.calibrate_cold, eval.cold_offset; issue 17).

A content model scores a cold item (never trained, never a negative) by its code and content parts alone,
so how often cold items enter the lists is a matter of calibration between two kinds of vectors: the same
model put cold items in 32% of Beauty's top-10 slots with no id dropout and in 2.9% with id dropout 0.1,
for 4.6% of the targets. An offset b on every cold item's score moves that share; `offset_sweep` ranks a
split once per offset (each batch's scores computed once), by the rules of train/evaluate.py, and
`choose_offset` picks b from validation alone: validation has no cold targets, so the rule is the share
of the validation lists cold items take, set to their share of the catalogue.

    curve = offset_sweep(model, batches, cfg.eval, num_items, cold, OFFSETS)   # offset -> metrics
    b = choose_offset({o: m["cold_share"] for o, m in curve.items()}, len(cold) / num_items)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from configs.schema import EvalConfig
from train.evaluate import COLD_SHARE_AT, _means, _with_count, item_scores, metric_names, rank_metrics, rank_targets

# -0.10 .. +0.10 cosine units, step 0.005. Beauty, id+sid+content, seed 0: the test lists' cold share goes
# 0.03% -> 32% -> 83% from b = -0.10 -> 0 -> +0.10 (no id dropout), 0.01% -> 2.9% -> 50% (id dropout 0.1);
# a first sweep at step 0.02 over +-0.30 was flat outside +-0.10 and too coarse inside it
OFFSETS = [round(-0.1 + 0.005 * i, 3) for i in range(41)]
SLICES = ("all", "cold", "warm")  # every target; cold targets; warm targets (ranked among all items)


@torch.no_grad()
def offset_sweep(model, batches: Iterable, cfg: EvalConfig, num_items: int, cold: torch.Tensor,
                 offsets: list[float], all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                 ) -> dict[float, dict]:
    """offset -> {'all'|'cold'|'warm': means of metric_names(cfg.ks) (+ count), 'cold_share': cold items'
    share of the top-COLD_SHARE_AT slots} with every cold item's score + offset (cfg.cold_offset is
    replaced by each offset in turn). `batches` yields (batch, is_real) as for `evaluate` (fake batches keep
    ZeRO-3 ranks in lock-step and are not counted); `all_reduce` sums over ranks."""
    if not len(cold):
        raise ValueError("offset_sweep needs cold items (manifest split_rule.cold_items is empty)")
    names = metric_names(cfg.ks)
    sums = torch.zeros(len(offsets), len(SLICES), len(names) + 1, dtype=torch.float64)
    slots = torch.zeros(len(offsets), 2, dtype=torch.float64)  # cold items in the top lists, lists
    one_chunk = replace(cfg, item_chunk=num_items + 1)  # each batch's (B, I+1) scores once, then offsets
    is_cold = torch.isin(torch.arange(num_items + 1, device=cold.device), cold).float()  # (I+1,)
    was_training = model.training
    model.eval()
    for batch, is_real in batches:
        q = model(batch, last_only=True).float()  # (B, D)
        s = item_scores(model, q, 0, num_items + 1)  # (B, I+1): memory B x I, a calibration tool's price
        if not is_real:
            continue
        target_cold = torch.isin(batch.targets[batch.offsets[1:] - 1], cold).cpu()
        for j, b in enumerate(offsets):
            r = rank_targets(lambda lo, hi, b=b: (s + b * is_cold)[:, lo:hi], batch, one_chunk, num_items,
                             torch.isfinite(q).all(1), None, cold)
            vals = _with_count(rank_metrics(r.ranks, cfg.ks))  # (B, M+1)
            sums[j, 0] += vals.sum(0)
            sums[j, 1] += vals[target_cold].sum(0)
            sums[j, 2] += vals[~target_cold].sum(0)
            slots[j] += torch.tensor([float(r.cold_in_top.sum()), len(vals)], dtype=torch.float64)
    model.train(was_training)
    sums, slots = all_reduce(sums), all_reduce(slots)
    return {b: {**{name: _means(sums[j, i], names) for i, name in enumerate(SLICES)},
                "cold_share": float(slots[j, 0] / (COLD_SHARE_AT * slots[j, 1])) if slots[j, 1] else float("nan")}
            for j, b in enumerate(offsets)}


def choose_offset(shares: dict[float, float], target: float) -> float:
    """The offset whose cold share is closest to `target`; ties go to the smaller |offset|."""
    return min(shares, key=lambda b: (abs(shares[b] - target), abs(b)))
