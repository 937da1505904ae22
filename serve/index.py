"""Top-k retrieval over the exported item table: exact (default) or faiss (very large catalogues).

    index = build_index(table, servable, kind="exact", bias=bias)   # table (I+1, D) unit rows, row 0 = padding
    ids, scores = index.search(states, k, exclude)        # states (B, D) -> (B, k) int64, (B, k) float32

Scores are the model's retrieval scores, <state, item> on unit vectors (cosine) + the item's `bias`
(the export's eval.cold_offset on cold items, 0 elsewhere; the evaluation adds the same). Row 0 (padding) and
rows with `servable` False (an ID-only model's never-trained items: offline evaluation does not rank
them either) are never returned; `exclude[b]` (dense ids) are never returned for request b.
Ties are broken by the lower item id, so an answer does not depend on the batch it was computed in.
"""
from __future__ import annotations

import numpy as np
import torch

INDEX_KINDS = ("exact", "faiss")


class ExactIndex:
    """Brute-force inner product in fp32: (B x D) @ (D x I), then a top-k. 12k items x D 64 is 0.8M
    multiply-adds per request; a 1M-item catalogue ~50M (a few ms on one core)."""

    def __init__(self, table: torch.Tensor, servable: torch.Tensor, bias: torch.Tensor | None = None):
        self.table_t = table.float().T.contiguous()  # (D, I+1)
        blocked = ~servable.bool()
        blocked[0] = True
        offset = torch.zeros(len(blocked)) if bias is None else bias.float().clone()
        self.offset = offset.masked_fill_(blocked, -torch.inf)  # (I+1,) added to every row
        self.num_servable = int((~blocked).sum())

    def search(self, states: torch.Tensor, k: int, exclude: list[np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        scores = torch.as_tensor(states, dtype=torch.float32) @ self.table_t  # (B, I+1)
        scores += self.offset  # one pass blocks padding and unservable rows (a boolean index_put: 3x slower)
        for b, ex in enumerate(exclude or []):
            if len(ex):
                scores[b].index_fill_(0, torch.as_tensor(ex, dtype=torch.long), -torch.inf)
        k = min(k, scores.shape[1])
        values, ids = torch.topk(scores, k, dim=1)  # (B, k); its order among equal scores is unspecified
        # ties resolve to the lower id whatever the batch: re-sort the k by (-score, id); a row whose k-th
        # score is shared with an item outside the k is redone over every item at or above that score
        tied_out = (scores == values[:, -1:]).sum(1) > (values == values[:, -1:]).sum(1)  # (B,)
        out_ids, out_scores = ids.numpy().copy(), values.numpy().copy()
        for b in range(len(scores)):
            cand, s = ids[b].numpy(), values[b].numpy()
            if tied_out[b]:
                c = torch.nonzero(scores[b] >= values[b, -1], as_tuple=True)[0]
                cand, s = c.numpy(), scores[b, c].numpy()
            order = np.lexsort((cand, -s))[:k]
            out_ids[b], out_scores[b] = cand[order], s[order]
        return _drop_blocked(out_ids, out_scores)


def _drop_blocked(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slots that could only be filled by blocked items (k > what is left) get id 0 and score -inf;
    callers trim them (`valid_hits`)."""
    bad = ~np.isfinite(scores)
    ids[bad], scores[bad] = 0, -np.inf
    return ids, scores


def valid_hits(ids: np.ndarray, scores: np.ndarray) -> list[tuple[int, float]]:
    """One row of `search` -> [(id, score)] without the unfillable slots."""
    return [(int(i), float(s)) for i, s in zip(ids, scores) if i > 0]


class FaissIndex:
    """faiss IVF-Flat inner-product index over the servable rows (faiss-cpu, the `faiss` extra). It
    searches `nprobe` of `nlist` clusters, so it is approximate: bench/serve.py reports its recall@100
    against ExactIndex. Excluded ids are filtered after an over-fetch of k + len(exclude). A non-zero `bias`
    is one more column of the indexed rows, met by a constant 1 in every state: <[s, 1], [v, b]> = <s, v> + b."""

    def __init__(self, table: torch.Tensor, servable: torch.Tensor, nlist: int | None = None, nprobe: int = 32,
                 seed: int = 0, bias: torch.Tensor | None = None):
        try:
            import faiss
        except ImportError as e:
            raise ImportError("--index faiss needs faiss-cpu: pip install -e '.[faiss]'") from e
        servable = servable.bool().clone()
        servable[0] = False
        self.ids = torch.nonzero(servable, as_tuple=True)[0].numpy().astype(np.int64)  # faiss row -> dense id
        x = table.float().numpy()[self.ids]  # (n, D)
        self.biased = bias is not None and bool(bias.abs().max() > 0)
        if self.biased:
            x = np.concatenate([x, bias.float().numpy()[self.ids, None]], axis=1)  # (n, D+1)
        x = np.ascontiguousarray(x)
        n, D = x.shape
        self.nlist = nlist or max(1, min(4 * int(np.sqrt(n)), n // 39))  # faiss warns below 39 points per list
        quantizer = faiss.IndexFlatIP(D)
        self.index = faiss.IndexIVFFlat(quantizer, D, self.nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x[rng.choice(n, size=min(n, 256 * self.nlist), replace=False)]
        self.index.train(train)
        self.index.add(x)
        self.index.nprobe = min(nprobe, self.nlist)
        self.num_servable = n

    def search(self, states: torch.Tensor, k: int, exclude: list[np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        q = torch.as_tensor(states, dtype=torch.float32).numpy()
        if self.biased:
            q = np.concatenate([q, np.ones((len(q), 1), np.float32)], axis=1)
        q = np.ascontiguousarray(q)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        fetch = min(k + extra, self.num_servable)
        scores, rows = self.index.search(q, fetch)  # (B, fetch); rows -1 where a probe found too few
        out_ids, out_scores = np.zeros((len(q), k), np.int64), np.full((len(q), k), -np.inf, np.float32)
        for b in range(len(q)):
            ids = np.where(rows[b] >= 0, self.ids[np.maximum(rows[b], 0)], 0)
            keep = (rows[b] >= 0) & ~np.isin(ids, exclude[b] if exclude else [])
            order = np.lexsort((ids[keep], -scores[b][keep]))[:k]
            out_ids[b, :len(order)], out_scores[b, :len(order)] = ids[keep][order], scores[b][keep][order]
        return _drop_blocked(out_ids, out_scores)


def build_index(table: torch.Tensor, servable: torch.Tensor, kind: str = "exact", bias: torch.Tensor | None = None,
                **kw) -> ExactIndex | FaissIndex:
    """table (I+1, D) unit rows, servable (I+1,) bool, bias (I+1,) or None -> an index with
    `search(states, k, exclude)`."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {kind!r}")
    return ExactIndex(table, servable, bias) if kind == "exact" else FaissIndex(table, servable, bias=bias, **kw)
