"""Full-ranking evaluation: every sequence's last state scored against the whole catalogue.

rank = 1 + #(items scoring above the target) + #(other items scoring exactly the target's score)
(ties are pessimistic: a tie with the target ranks above it, so a constant model scores rank = I).
HR@K = 1[rank <= K], NDCG@K = 1[rank <= K] / log2(rank + 1), MRR = 1 / rank, averaged over sequences,
overall and per domain. With `exclude_history`, items in the sequence's input are never ranked (except
the target itself, which can be a repeat: excluding it would count a correct repeat as a miss).
The catalogue is scored in chunks of `item_chunk`, so memory is (B x item_chunk) whatever the catalogue.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from configs.schema import EvalConfig
from model.generative import beam_search


def metric_names(ks: list[int]) -> list[str]:
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]


def rank_metrics(ranks: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """ranks (B,) >= 1 -> per-sequence metric values (B, M) in metric_names(ks) order."""
    r = ranks.to(torch.float64)
    hr = [(r <= k).double() for k in ks]
    ndcg = [torch.where(r <= k, 1.0 / torch.log2(r + 1.0), 0.0) for k in ks]
    return torch.stack(hr + ndcg + [1.0 / r], dim=1)


def _history_mask(batch, ids_lo: int, ids_hi: int, targets: torch.Tensor) -> torch.Tensor:
    """(B, ids_hi - ids_lo) True where the item is in the sequence's input and is not its target."""
    B = batch.num_sequences
    seq = torch.repeat_interleave(torch.arange(B, device=batch.offsets.device), batch.lengths)
    items = batch.item_ids
    keep = (items >= ids_lo) & (items < ids_hi) & (items != targets[seq])
    mask = torch.zeros(B, ids_hi - ids_lo, dtype=torch.bool, device=items.device)
    mask[seq[keep], items[keep] - ids_lo] = True
    return mask


def ranks_for_batch(model, batch, cfg: EvalConfig, num_items: int,
                    unrankable: torch.Tensor | None = None) -> torch.Tensor:
    """Pessimistic 1-based rank of each sequence's target among items 1..num_items. (B,)
    `unrankable` (sorted ids): items the model has no representation for (an ID-only model's never-trained
    items): never ranked, and a target among them is a miss (rank num_items + 1)."""
    states = model(batch)  # (L, D)
    last = batch.offsets[1:] - 1
    q, targets = states[last].float(), batch.targets[last]  # (B, D), (B,)
    chunks = [(lo, min(lo + cfg.item_chunk, num_items + 1)) for lo in range(0, num_items + 1, cfg.item_chunk)]

    def scores(lo, hi):  # (B, hi - lo); through the embedding module so ZeRO-3 gathers its weight
        ids = torch.arange(lo, hi, device=q.device)
        return q @ F.normalize(model.embed.item(ids).float(), dim=-1, eps=1e-6).T

    cache = scores(*chunks[0]) if len(chunks) == 1 else None
    t_score = torch.empty_like(targets, dtype=q.dtype)
    for lo, hi in chunks:  # the target's score from the same matmul that scores everything else
        s = cache if cache is not None else scores(lo, hi)
        inside = (targets >= lo) & (targets < hi)
        t_score[inside] = s[inside, targets[inside] - lo]
    above = torch.zeros_like(targets)
    for lo, hi in chunks:
        s = cache if cache is not None else scores(lo, hi)
        excluded = torch.zeros_like(s, dtype=torch.bool)
        if lo == 0:
            excluded[:, 0] = True  # padding id
        if cfg.exclude_history:
            excluded |= _history_mask(batch, lo, hi, targets)
        ids = torch.arange(lo, hi, device=q.device)
        if unrankable is not None:
            excluded |= torch.isin(ids, unrankable)[None, :]
        beats = (s > t_score[:, None]) | ((s == t_score[:, None]) & (ids[None, :] != targets[:, None]))
        above += (beats & ~excluded).sum(1)
    if unrankable is not None:
        return torch.where(torch.isin(targets, unrankable), num_items + 1, above + 1)
    return above + 1


def generative_ranks(model, batch, cfg: EvalConfig, num_items: int) -> torch.Tensor:
    """Rank of each sequence's target in the generative head's trie-constrained beam (B,): its 1-based
    position among the top max(cfg.ks) decoded items, or num_items + 1 (a miss at every K) when absent.
    cfg.ks must not exceed cfg.beam: a beam of width W cannot say where an item below W would rank."""
    states = model(batch)  # (L, D)
    last = batch.offsets[1:] - 1
    q, targets = states[last], batch.targets[last]  # (B, D) in the head's dtype (bf16 under a bf16 engine)
    exclude = _history_mask(batch, 0, num_items + 1, targets) if cfg.exclude_history else None
    items, _ = beam_search(model.gen_head, model.code_trie(), q, cfg.beam, max(cfg.ks), exclude)  # (B, K)
    hit = items == targets[:, None]
    first = hit.float().argmax(1) + 1  # 1-based position of the target (items are distinct per row)
    return torch.where(hit.any(1), first, torch.full_like(first, num_items + 1))


@torch.no_grad()
def evaluate(model, batches: Iterable, cfg: EvalConfig, num_items: int, domains: list[str],
             all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             cold: torch.Tensor | None = None, ranker: Callable | None = None,
             unrankable: torch.Tensor | None = None) -> dict:
    """Mean metrics over all sequences, per domain, and (when `cold`, sorted item ids held out of
    training, is non-empty) per slice: targets that are cold items vs warm ones. `batches` yields
    (batch, is_real): fake batches keep ranks in lock-step (ZeRO-3 forwards are collective) and are not
    counted. `all_reduce` sums a tensor over ranks. `ranker(model, batch) -> ranks (B,)` replaces the
    dot-product full ranking (e.g. the generative head's beam search); `unrankable`: see ranks_for_batch."""
    names = metric_names(cfg.ks)
    sums = torch.zeros(len(domains) + 2, len(names) + 1, dtype=torch.float64)  # domains, warm, cold: + count
    was_training = model.training
    model.eval()
    for batch, is_real in batches:
        ranks = ranker(model, batch) if ranker else ranks_for_batch(model, batch, cfg, num_items, unrankable)
        if not is_real:
            continue
        vals = torch.cat([rank_metrics(ranks, cfg.ks), torch.ones(len(ranks), 1, dtype=torch.float64)], 1).cpu()
        sums.index_add_(0, batch.domain.cpu(), vals)
        target = batch.targets[batch.offsets[1:] - 1]  # on the batch's device, like `cold`
        is_cold = torch.isin(target, cold) if cold is not None else torch.zeros_like(target, dtype=torch.bool)
        sums.index_add_(0, len(domains) + is_cold.long().cpu(), vals)
    model.train(was_training)
    sums = all_reduce(sums)
    out = summarize(sums[:len(domains)], names, domains)
    if cold is not None and len(cold):
        out["per_slice"] = {name: _means(sums[len(domains) + i], names) for i, name in enumerate(("warm", "cold"))}
    return out


def _means(row: torch.Tensor, names: list[str]) -> dict:
    n = float(row[-1])
    return {"count": int(n), **{m: (float(row[i]) / n if n else math.nan) for i, m in enumerate(names)}}


def summarize(sums: torch.Tensor, names: list[str], domains: list[str]) -> dict:
    """(domains, M+1) sums of metrics + count -> overall means + per-domain means."""
    out = _means(sums.sum(0), names)
    out["per_domain"] = {d: _means(sums[i], names) for i, d in enumerate(domains) if sums[i, -1] > 0}
    return out
