"""Full-ranking evaluation: every sequence's last state scored against the whole catalogue.

rank = 1 + #(items scoring above the target) + #(other items scoring exactly the target's score)
(ties are pessimistic: a tie with the target ranks above it, so a constant model scores rank = I).
HR@K = 1[rank <= K], NDCG@K = 1[rank <= K] / log2(rank + 1), MRR = 1 / rank, averaged over sequences,
overall and per domain. A miss (an unrankable or non-finite target, or one outside a generative beam)
has rank MISS: HR = NDCG = MRR = 0 at every K (a rank of I + 1 would count as a hit at any K > I).
`eval.exclude_history` says which of the user's earlier items are never ranked ('full': all of them,
'window': those in the max_len-cut input; the target itself is never excluded, since it can be a repeat
and excluding it would count a correct repeat as a miss).
The catalogue is scored in chunks of `item_chunk`, so memory is (B x item_chunk) whatever the catalogue.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from configs.schema import EvalConfig
from model.generative import beam_search

MISS = torch.iinfo(torch.int64).max  # the rank of a target that was not ranked at all


def metric_names(ks: list[int]) -> list[str]:
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]


def rank_metrics(ranks: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """ranks (B,) >= 1 -> per-sequence metric values (B, M) in metric_names(ks) order."""
    r = ranks.to(torch.float64)
    hr = [(r <= k).double() for k in ks]
    ndcg = [torch.where(r <= k, 1.0 / torch.log2(r + 1.0), 0.0) for k in ks]
    mrr = torch.where(ranks == MISS, 0.0, 1.0 / r)
    return torch.stack(hr + ndcg + [mrr], dim=1)


HISTORY_RULES = ("full", "window", "none")


@dataclass
class BatchRanks:
    """Pessimistic 1-based ranks of each sequence's target; MISS where it was not ranked."""

    ranks: torch.Tensor  # (B,) among every rankable item
    nonfinite: torch.Tensor  # (B,) bool: the state or the target's score is NaN/inf (counted as a miss)
    warm: torch.Tensor | None = None  # (B,) among the warm items only (cold ones not candidates), given `cold`
    cold_in_top: torch.Tensor | None = None  # (B,) how many of the COLD_SHARE_AT top slots are cold items


# the served list length whose cold share is reported (issue 17: cold items flooded 29% of the top-10 slots
# of a content model on a held-out category, against 4.6% of the targets being cold)
COLD_SHARE_AT = 10


def _history_mask(batch, ids_lo: int, ids_hi: int, targets: torch.Tensor, rule: str) -> torch.Tensor:
    """(B, ids_hi - ids_lo) True where the item is in the user's history (per `rule`) and is not the target.
    'window': the input tokens (cut to max_len); 'full': batch.seen, every item before the target."""
    if rule not in HISTORY_RULES:
        raise ValueError(f"eval.exclude_history must be one of {HISTORY_RULES}, got {rule!r}")
    B = batch.num_sequences
    mask = torch.zeros(B, ids_hi - ids_lo, dtype=torch.bool, device=batch.offsets.device)
    if rule == "none":
        return mask
    if rule == "full":
        if batch.seen is None:
            raise ValueError("eval.exclude_history='full' needs batch.seen (the full history): batches of the "
                             "valid/test splits from data_pipeline.collate.make_loader carry it")
        items, offsets = batch.seen, batch.seen_offsets
    else:
        items, offsets = batch.item_ids, batch.offsets
    seq = torch.repeat_interleave(torch.arange(B, device=offsets.device), offsets[1:] - offsets[:-1])
    keep = (items >= ids_lo) & (items < ids_hi) & (items != targets[seq])
    mask[seq[keep], items[keep] - ids_lo] = True
    return mask


def item_scores(model, q: torch.Tensor, lo: int, hi: int, cold: torch.Tensor | None = None,
                cold_offset: float = 0.0) -> torch.Tensor:
    """q (B, D) states -> (B, hi - lo) retrieval scores of items lo..hi-1: state . unit item vector, + the
    cold items' `cold_offset` (eval.cold_offset). Through the embedding module, so ZeRO-3 gathers it."""
    ids = torch.arange(lo, hi, device=q.device)
    s = q @ F.normalize(model.embed.item(ids).float(), dim=-1, eps=1e-6).T
    if cold_offset and cold is not None:
        s = s + cold_offset * torch.isin(ids, cold).to(s.dtype)
    return s


def score_batch(model, batch, cfg: EvalConfig, num_items: int, unrankable: torch.Tensor | None = None,
                cold: torch.Tensor | None = None, item_domain: torch.Tensor | None = None) -> BatchRanks:
    """Full-ranking ranks of each sequence's target among items 1..num_items.
    `unrankable` (sorted ids): items the model has no representation for (an ID-only model's never-trained
    items): never ranked, and a target among them is a miss. `cold` (sorted ids): also rank every target
    among the warm items only (BatchRanks.warm), so models that can and cannot rank cold items compare on
    one candidate set. Non-finite scores never help: a NaN state or target score is a miss, and a NaN
    candidate score counts as beating the target (NaN compares False, so it would otherwise rank first).
    `item_domain` (num_items + 1,): rank each target only among the items of its sequence's domain.
    Cold items' scores get cfg.cold_offset."""
    q = model(batch, last_only=True).float()  # (B, D)
    scores = lambda lo, hi: item_scores(model, q, lo, hi, cold, cfg.cold_offset)  # (B, hi - lo)
    return rank_targets(scores, batch, cfg, num_items, torch.isfinite(q).all(1), unrankable, cold, item_domain)


def rank_targets(scores: Callable[[int, int], torch.Tensor], batch, cfg: EvalConfig, num_items: int,
                 finite_state: torch.Tensor | None = None, unrankable: torch.Tensor | None = None,
                 cold: torch.Tensor | None = None, item_domain: torch.Tensor | None = None) -> BatchRanks:
    """The ranking rules of `score_batch` for any scorer: `scores(lo, hi)` -> (B, hi - lo) scores of items
    lo..hi-1 for each sequence (column 0, the padding id, is never ranked); `finite_state` (B,) bool, False
    where the sequence's state was NaN/inf (a miss). Non-model scorers (train/search_baselines.py) call it
    directly, so they rank by exactly the models' rules."""
    targets = batch.targets[batch.offsets[1:] - 1]  # (B,)
    chunks = [(lo, min(lo + cfg.item_chunk, num_items + 1)) for lo in range(0, num_items + 1, cfg.item_chunk)]
    cache = scores(*chunks[0]) if len(chunks) == 1 else None
    t_score = None
    for lo, hi in chunks:  # the target's score from the same matmul that scores everything else
        s = cache if cache is not None else scores(lo, hi)
        if t_score is None:
            t_score = torch.empty_like(targets, dtype=s.dtype)
        inside = (targets >= lo) & (targets < hi)
        t_score[inside] = s[inside, targets[inside] - lo]
    above, above_cold = torch.zeros_like(targets), torch.zeros_like(targets)
    top_s, top_cold = None, None  # running top COLD_SHARE_AT scores (B, K) of the ranked items, and is-cold
    for lo, hi in chunks:
        s = cache if cache is not None else scores(lo, hi)
        excluded = _history_mask(batch, lo, hi, targets, cfg.exclude_history)
        if lo == 0:
            excluded[:, 0] = True  # padding id
        ids = torch.arange(lo, hi, device=targets.device)
        if unrankable is not None:
            excluded |= torch.isin(ids, unrankable)[None, :]
        if item_domain is not None:  # only the target's domain competes (a target outside it: see below)
            excluded |= item_domain[ids][None, :] != batch.domain[:, None]
        beats = (s > t_score[:, None]) | ((s == t_score[:, None]) & (ids[None, :] != targets[:, None])) | s.isnan()
        beats &= ~excluded
        above += beats.sum(1)
        if cold is not None:
            is_cold = torch.isin(ids, cold)
            above_cold += (beats & is_cold[None, :]).sum(1)
            top_s, top_cold = _running_top(top_s, top_cold, s.masked_fill(excluded | s.isnan(), -math.inf),
                                           is_cold.expand_as(s))
    nonfinite = ~torch.isfinite(t_score) if finite_state is None else ~finite_state | ~torch.isfinite(t_score)
    miss = nonfinite if unrankable is None else nonfinite | torch.isin(targets, unrankable)
    if item_domain is not None:  # cannot happen when batch.domain is the target's domain; never a hit
        miss |= item_domain[targets] != batch.domain
    ranks = torch.where(miss, MISS, above + 1)
    warm, cold_in_top = None, None
    if cold is not None:  # a cold target has no rank among warm items: a miss in that column
        warm = torch.where(miss | torch.isin(targets, cold), MISS, above - above_cold + 1)
        cold_in_top = (top_cold & torch.isfinite(top_s)).sum(1)
    return BatchRanks(ranks, nonfinite, warm, cold_in_top)


def _running_top(top_s: torch.Tensor | None, top_flag: torch.Tensor | None, s: torch.Tensor,
                 flag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a chunk's scores (B, n) and per-item flags into the running top COLD_SHARE_AT (B, K)."""
    if top_s is not None:
        s, flag = torch.cat([top_s, s], 1), torch.cat([top_flag, flag], 1)
    k = min(COLD_SHARE_AT, s.shape[1])
    top_s, idx = s.topk(k, dim=1)
    return top_s, flag.gather(1, idx)


def ranks_for_batch(model, batch, cfg: EvalConfig, num_items: int,
                    unrankable: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) ranks of `score_batch` (see there)."""
    return score_batch(model, batch, cfg, num_items, unrankable).ranks


def generative_ranks(model, batch, cfg: EvalConfig, num_items: int, cold: torch.Tensor | None = None) -> BatchRanks:
    """Rank of each sequence's target in the generative head's trie-constrained beam: its 1-based
    position among the top max(cfg.ks) decoded items, or MISS when absent.
    The trie holds every item the index serves (cold ones included). With `cold`, a second decode with
    the cold items excluded gives the rank among warm items (BatchRanks.warm).
    cfg.ks must not exceed cfg.beam: a beam of width W cannot say where an item below W would rank."""
    last = batch.offsets[1:] - 1
    q, targets = model(batch, last_only=True), batch.targets[last]  # (B, D) in the head's dtype (bf16 under bf16)
    nonfinite = ~torch.isfinite(q.float()).all(1)
    exclude = _history_mask(batch, 0, num_items + 1, targets, cfg.exclude_history)

    def decode(excl):
        items, _ = beam_search(model.gen_head, model.code_trie(), q, cfg.beam, max(cfg.ks), excl)  # (B, K)
        hit = items == targets[:, None]
        first = hit.float().argmax(1) + 1  # 1-based position of the target (items are distinct per row)
        return torch.where(hit.any(1) & ~nonfinite, first, torch.full_like(first, MISS)), items

    ranks, items = decode(exclude)
    warm, cold_in_top = None, None
    if cold is not None:
        no_cold = exclude.clone()
        no_cold[:, cold] = True
        warm = torch.where(torch.isin(targets, cold), MISS, decode(no_cold)[0])
        cold_in_top = torch.isin(items[:, :COLD_SHARE_AT], cold).sum(1)  # beam slots past its end are id 0
    return BatchRanks(ranks, nonfinite, warm, cold_in_top)


@torch.no_grad()
def evaluate(model, batches: Iterable, cfg: EvalConfig, num_items: int, domains: list[str],
             all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             cold: torch.Tensor | None = None, ranker: Callable | None = None,
             unrankable: torch.Tensor | None = None,
             slices: QuerySlices | None = None, num_users: int = 0,
             item_domain: torch.Tensor | None = None) -> dict:
    """Mean metrics over all sequences, per domain, and (when `cold`, sorted item ids held out of
    training, is non-empty) per slice: targets that are cold items, warm ones, and warm ones ranked among
    the warm items only ('warm_among_warm': the same candidate set for every model). `batches` yields
    (batch, is_real): fake batches keep ranks in lock-step (ZeRO-3 forwards are collective) and are not
    counted. `all_reduce` sums a tensor over ranks. `ranker(model, batch, cold) -> BatchRanks` replaces
    the dot-product full ranking (e.g. the generative head's beam search); `unrankable`: see score_batch.
    `nonfinite_states` counts sequences whose state or target score was NaN/inf (each one a miss).
    `slices(batch) -> {name: (B,) bool}` (names in slices.names): more slices of the sequences (e.g. seen /
    unseen query), reported in per_slice with the same metrics. `num_users` > 0: also return
    out["ranks"], the rank of each user's target (index = dense user; 0 = no target, -1 = a miss), for
    confidence intervals over targets (one target per user per split, so ranks sum across ranks exactly).
    `item_domain` (num_items + 1,) domain id per item: rank each target among its own domain's items only
    (eval.within_domain; the dot-product ranking only)."""
    names = metric_names(cfg.ks)
    cold = cold if cold is not None and len(cold) else None
    D = len(domains)
    sums = torch.zeros(D + 3, len(names) + 1, dtype=torch.float64)  # domains, warm, cold, warm-among-warm
    nonfinite = torch.zeros(1, dtype=torch.float64)
    cold_slots = torch.zeros(2, dtype=torch.float64)  # cold items in the top COLD_SHARE_AT lists, lists
    # slice name -> (M+1,) sums, made up front: every rank all-reduces the same names, even one without data
    named = {n: torch.zeros(len(names) + 1, dtype=torch.float64) for n in (slices.names if slices else ())}
    by_user = torch.zeros(num_users, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for batch, is_real in batches:
        r = ranker(model, batch, cold) if ranker else score_batch(model, batch, cfg, num_items, unrankable, cold,
                                                                  item_domain)
        if not is_real:
            continue
        vals = _with_count(rank_metrics(r.ranks, cfg.ks))
        if num_users:
            by_user[batch.user.cpu()] = torch.where(r.ranks == MISS, -1, r.ranks).double().cpu()
        sums.index_add_(0, batch.domain.cpu(), vals)
        nonfinite += r.nonfinite.sum().item()
        if cold is not None:
            is_cold = torch.isin(batch.targets[batch.offsets[1:] - 1], cold).cpu()
            sums.index_add_(0, D + is_cold.long(), vals)
            sums[D + 2] += _with_count(rank_metrics(r.warm, cfg.ks))[~is_cold].sum(0)
            if r.cold_in_top is not None:
                cold_slots += torch.tensor([float(r.cold_in_top.sum()), len(is_cold)], dtype=torch.float64)
        for name, member in (slices(batch) if slices else {}).items():
            named[name] += vals[member.cpu()].sum(0)
    model.train(was_training)
    sums, nonfinite, cold_slots = all_reduce(sums), all_reduce(nonfinite), all_reduce(cold_slots)
    named = {k: all_reduce(v) for k, v in sorted(named.items())}
    by_user = all_reduce(by_user) if num_users else by_user
    out = summarize(sums[:D], names, domains)
    out["nonfinite_states"] = int(nonfinite.item())
    out["exclude_history"] = cfg.exclude_history
    if cold is not None:
        out["per_slice"] = {name: _means(sums[D + i], names)
                            for i, name in enumerate(("warm", "cold", "warm_among_warm"))}
        # the share of served slots cold items take, against the share of targets that are cold: a model
        # that floods every list with new items has the first far above the second
        lists = float(cold_slots[1])
        out[f"cold_share@{COLD_SHARE_AT}"] = float(cold_slots[0]) / (COLD_SHARE_AT * lists) if lists else math.nan
        out["cold_target_share"] = float(sums[D + 1, -1]) / max(1.0, float(sums[D:D + 2, -1].sum()))
    if num_users:
        out["ranks"] = by_user.long().tolist()
    if named:
        out["per_slice"] = {**out.get("per_slice", {}), **{k: _means(v, names) for k, v in named.items()}}
    return out


class QuerySlices:
    """Slices for `evaluate`: search targets whose query occurs in training inputs ('seen_query') or never
    does ('unseen_query': manifest counts.search.unseen_test_queries, sorted ids)."""

    names = ("seen_query", "unseen_query")

    def __init__(self, unseen_queries: torch.Tensor):
        self.unseen = unseen_queries

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        q = batch.target_query
        unseen = torch.isin(q, self.unseen.to(q.device))
        return {"seen_query": (q > 0) & ~unseen, "unseen_query": (q > 0) & unseen}


class PopularitySlices:
    """Slices for `evaluate` by how often the target was trained on: 'head_target' = one of the most trained
    items that together hold `head_share` of the training occurrences, 'tail_target' = any other (cold
    items included: they were never trained). Whether quality on the tail diverges from the head."""

    names = ("head_target", "tail_target")

    def __init__(self, counts: np.ndarray, head_share: float = 0.5):
        order = np.argsort(-counts, kind="stable")  # (I+1,) most trained first
        cum = np.cumsum(counts[order])
        n_head = int(np.searchsorted(cum, head_share * cum[-1])) + 1
        self.head = torch.from_numpy(np.sort(order[:n_head]))
        self.head_items = n_head  # how many items hold head_share of the occurrences

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        targets = batch.targets[batch.offsets[1:] - 1]
        head = torch.isin(targets, self.head.to(targets.device))
        return {"head_target": head, "tail_target": ~head}


class SliceSet:
    """Several slicers (QuerySlices, PopularitySlices, ...) as one `slices` argument of `evaluate`."""

    def __init__(self, *parts):
        self.parts = [p for p in parts if p is not None]
        self.names = tuple(n for p in self.parts for n in p.names)

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        return {k: v for p in self.parts for k, v in p(batch).items()}


def _with_count(metrics: torch.Tensor) -> torch.Tensor:
    """(B, M) metric values -> (B, M+1) on the CPU, the last column 1 (the sequence count)."""
    return torch.cat([metrics, torch.ones(len(metrics), 1, dtype=torch.float64, device=metrics.device)], 1).cpu()


def _means(row: torch.Tensor, names: list[str]) -> dict:
    n = float(row[-1])
    return {"count": int(n), **{m: (float(row[i]) / n if n else math.nan) for i, m in enumerate(names)}}


def summarize(sums: torch.Tensor, names: list[str], domains: list[str]) -> dict:
    """(domains, M+1) sums of metrics + count -> overall means + per-domain means."""
    out = _means(sums.sum(0), names)
    out["per_domain"] = {d: _means(sums[i], names) for i, d in enumerate(domains) if sums[i, -1] > 0}
    return out
