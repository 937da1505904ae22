"""HSTU pointwise attention over jagged sequences: the PyTorch reference, i.e. the spec.

For sequence b with n tokens (values offsets[b]:offsets[b+1]), per head, rows i and columns j in [0, n):

    s_ij  = alpha * <q_i, k_j> + pos_bias[clamp(p_i - p_j, 0, P-1)] + time_bias[bucket(tq_i - tk_j)]
    a_ij  = SiLU(s_ij) / norm_i          if (i, j) is allowed, else 0
    out_i = sum_j a_ij v_j

- allowed: causal (j <= i). With `num_targets[b] = t`, the last t tokens are candidates: a candidate row
  sees the h = n - t history tokens and itself, never another candidate (M-FALCON scoring).
- p_i = min(i, h): candidates share the history-end position, so permuting them changes nothing.
- bucket(dt) = clamp(floor(ln(max(|dt|, 1)) / time_bucket_div), 0, T-1) with T = len(time_bias); the
  research value time_bucket_div = 0.301 gives 1 min -> 13, 1 day -> 37, 1 year -> 57.
- norm_i = `norm_const` (the research recipe: the padded max length), or, with `norm_by_length`, row i's
  number of allowed keys (i + 1 causally), so outputs do not depend on how a batch was padded.

Implementation: sequences are sorted by length and grouped so each group's padded area is at most 10%
over its real area (groups of >= 16), each group is computed densely, and all groups gather from and
scatter to the jagged tensors through one flat index. Measured 2026-11-22 on an idle 2-core machine by
`python bench/attention_ref.py --shards shards/ml-1m` (ML-1M's length mix, batch 128 truncated to 200,
mean length 108; q, k, v fwd + bwd with position and time bias; median of 4; under load times inflate):

    one padded (B, N, N) block     H1 d50 133 ms   H2 d25 252 ms
    length-bucketed (this file)    H1 d50  41 ms   H2 d25  49 ms
    a loop over sequences          H1 d50 218 ms   H2 d25 180 ms

Two custom backward passes carry much of that: a bias gather from a 129-entry table by 5M indices and a
row gather by token index both default to an accumulating index_put, ~40 ms of the first 93 ms version.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SmallTableGather(torch.autograd.Function):
    """table[idx] for a small 1-D table and a large index tensor. Autograd's own backward for this is an
    accumulating index_put, ~10x slower on CPU than bincount for 5M indices into 129 bins (measured)."""

    @staticmethod
    def forward(ctx, table, idx):
        ctx.save_for_backward(idx)
        ctx.n = table.numel()
        return table[idx]

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        g = torch.bincount(idx.reshape(-1), weights=grad.reshape(-1).to(torch.float64), minlength=ctx.n)
        return g.to(grad.dtype), None


class _GatherRows(torch.autograd.Function):
    """x[idx] along dim 0 where idx repeats only `dump` (a row appended by the caller for padding).
    Backward writes instead of accumulating: an accumulating index_put (autograd's default) costs ~5x
    more on CPU, and the only collisions land on the discarded padding row."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return x[idx]

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_put_((idx,), grad), None


def gather_small(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _SmallTableGather.apply(table, idx)


def time_buckets(dt: torch.Tensor, time_bucket_div: float, num_buckets: int) -> torch.Tensor:
    """|dt| (any shape, seconds) -> bucket index in [0, num_buckets)."""
    x = dt.abs().clamp(min=1).to(torch.float32).log() / time_bucket_div
    return x.floor().clamp(0, num_buckets - 1).long()


def _dense_block(q, k, v, lengths, num_targets, N, alpha, norm_const, norm_by_length, pos_bias, time_bias,
                 ts_q, ts_k, time_bucket_div):
    """Padded dense attention for one bucket: q, k (B, N, H, dqk), v (B, N, H, dv), lengths (B,)."""
    dev = q.device
    i = torch.arange(N, device=dev)
    h = lengths - (num_targets if num_targets is not None else 0)  # (B,) history lengths
    valid = i[None, :] < lengths[:, None]  # (B, N)
    allowed = (i[None, :, None] >= i[None, None, :]) & valid[:, :, None] & valid[:, None, :]  # (B, N, N)
    if num_targets is not None:
        is_cand_col = i[None, None, :] >= h[:, None, None]  # (B, 1, N)
        allowed &= ~is_cand_col | (i[None, :, None] == i[None, None, :])
    s = torch.einsum("bihd,bjhd->bhij", q, k) * alpha  # (B, H, N, N)
    rab = None
    if pos_bias is not None:
        if num_targets is None:
            dist = (i[:, None] - i[None, :]).clamp(0, pos_bias.numel() - 1)  # (N, N), shared by the batch
        else:
            p = torch.minimum(i[None, :], h[:, None])  # (B, N)
            dist = (p[:, :, None] - p[:, None, :]).clamp(0, pos_bias.numel() - 1)  # (B, N, N)
        rab = gather_small(pos_bias, dist)
    if time_bias is not None:
        tb = gather_small(time_bias, time_buckets(ts_q[:, :, None] - ts_k[:, None, :], time_bucket_div,
                                                  time_bias.numel()))
        rab = tb if rab is None else rab + tb  # (B, N, N)
    if rab is not None:
        s = s + (rab if rab.dim() == 3 else rab[None]).unsqueeze(1)
    a = F.silu(s) * allowed.unsqueeze(1)  # (B, H, N, N)
    if norm_by_length:
        a = a / allowed.sum(-1).clamp(min=1)[:, None, :, None]  # (B, 1, N, 1) keys per row
    else:
        a = a / norm_const
    return torch.einsum("bhij,bjhd->bihd", a, v)  # (B, N, H, dv)


def _buckets(lengths: list[int], max_waste: float = 0.1, min_size: int = 16) -> list[list[int]]:
    """Group sequence indices (sorted by length, descending) so that each group's padded area exceeds
    its real area by at most `max_waste`; tiny groups are merged to bound the number of launches."""
    order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
    groups, cur = [], []
    for b in order:
        if cur:
            top = lengths[cur[0]]
            real = sum(lengths[x] ** 2 for x in cur) + lengths[b] ** 2
            if len(cur) >= min_size and top * top * (len(cur) + 1) > (1 + max_waste) * real:
                groups.append(cur)
                cur = []
        cur.append(b)
    if cur:
        groups.append(cur)
    return groups


def hstu_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                       alpha: float = 1.0, norm_const: float = 1.0, norm_by_length: bool = False,
                       pos_bias: torch.Tensor | None = None, time_bias: torch.Tensor | None = None,
                       ts_q: torch.Tensor | None = None, ts_k: torch.Tensor | None = None,
                       time_bucket_div: float = 0.301, num_targets: torch.Tensor | None = None,
                       bucketed: bool = True) -> torch.Tensor:
    """Jagged q, k (L, H, dqk), v (L, H, dv), offsets (B+1,) -> (L, H, dv). See the module docstring."""
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    starts = offsets[:-1].tolist()
    L = q.shape[0]
    if L == 0:
        return v.new_zeros(v.shape)
    # every group is padded to its own N; all groups gather through one flat index into [x; 0-row]
    groups = [g for g in (_buckets(lengths) if bucketed else [list(range(len(lengths)))])
              if max(lengths[b] for b in g) > 0]
    src, shapes = [], []
    for g in groups:
        N = max(lengths[b] for b in g)
        pos = torch.arange(N)
        idx = torch.tensor([starts[b] for b in g])[:, None] + pos[None, :]  # (G, N)
        idx = idx.masked_fill(pos[None, :] >= torch.tensor([lengths[b] for b in g])[:, None], L)
        src.append(idx.reshape(-1))
        shapes.append((len(g), N))
    src = torch.cat(src).to(q.device)  # (sum G*N,) token index, L = padding
    zero = lambda x: torch.cat([x, x.new_zeros((1,) + x.shape[1:])])  # noqa: E731
    qp, kp, vp = (_GatherRows.apply(zero(x), src) for x in (q, k, v))  # (sum G*N, H, d)
    tq = zero(ts_q)[src] if ts_q is not None else None
    tk = zero(ts_k)[src] if ts_k is not None else None
    outs, at = [], 0
    for g, (G, N) in zip(groups, shapes):
        sl = slice(at, at + G * N)
        at += G * N
        lens = torch.tensor([lengths[b] for b in g], device=q.device)
        nt = num_targets[torch.tensor(g, device=q.device)] if num_targets is not None else None
        view = lambda x: x[sl].view(G, N, *x.shape[1:]) if x is not None else None  # noqa: E731
        o = _dense_block(view(qp), view(kp), view(vp), lens, nt, N, alpha, norm_const, norm_by_length,
                         pos_bias, time_bias, view(tq), view(tk), time_bucket_div)  # (G, N, H, dv)
        outs.append(o.reshape(G * N, *o.shape[2:]))
    flat = torch.cat(outs)  # (sum G*N, H, dv) in group order
    # token t sits at the flat row where src == t; padding rows are dropped
    where = torch.empty(L + 1, dtype=torch.long, device=q.device)
    where[src] = torch.arange(src.numel(), device=q.device)
    return _GatherRows.apply(flat, where[:L])
