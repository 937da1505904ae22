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

Re-run 2026-12-01 on an AMD EPYC without AVX-512 (two runs, same command), after the causal row chunks
and the hand-written backward of _DenseAttention: length-bucketed H1 d50 119-140 ms, H2 d25 132-165 ms
(the code before them: 118 / 152 ms in the same session); padded block 226-260 / 253-309; loop 745-873 /
803-813. At 2 threads the attention alone gains little; the full HSTU-large step gained 10-13% (README,
Speed) and the 1-thread attention 26% (see _DenseAttention).

Two custom backward passes carry much of that: a bias gather from a 129-entry table by 5M indices and a
row gather by token index both default to an accumulating index_put, ~40 ms of the first 93 ms version.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class _SmallTableGather(torch.autograd.Function):
    """table[idx] for a small 1-D table and a large index tensor. Autograd's own backward for this is an
    accumulating index_put, ~10x slower on CPU than bincount for 5M indices into 129 bins (measured)."""

    @staticmethod
    def forward(ctx, table, idx):
        ctx.save_for_backward(idx)
        ctx.n = table.numel()
        return table.take(idx)  # = table[idx]; take is ~2x faster on CPU (5.1 vs 9.5 ms, 2.3M indices, 2 threads)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        w = grad.reshape(-1).to(torch.float64)
        if idx.is_cuda and torch.are_deterministic_algorithms_enabled():
            # weighted bincount on CUDA has no deterministic kernel (it raises in deterministic mode);
            # index_add_ on CUDA is among the ops torch makes deterministic in that mode (its docs)
            g = torch.zeros(ctx.n, dtype=torch.float64, device=idx.device).index_add_(0, idx.reshape(-1), w)
        else:
            g = torch.bincount(idx.reshape(-1), weights=w, minlength=ctx.n)
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


@dataclass
class _Group:
    """One length bucket: G sequences padded to N; its rows are src[sl] in the flat padded layout."""

    sl: slice
    G: int
    N: int
    allowed: torch.Tensor  # (G, 1, N, N) bool: causal, in-range and candidate mask
    pos_idx: torch.Tensor | None  # (N, N) or (G, N, N) index into pos_bias
    time_idx: torch.Tensor | None  # (G, N, N) index into time_bias
    keys: torch.Tensor | None  # (G, 1, N, 1) allowed keys per row (norm_by_length)
    _weights: dict = field(default_factory=dict)

    def weight(self, norm_const: float, dtype: torch.dtype) -> torch.Tensor:
        """(G, 1, N, N) allowed / norm in `dtype`: one multiply applies mask and normalisation. Built once
        per batch and shared by every layer (the norm constant is the same model-wide)."""
        key = (norm_const, dtype)
        if key not in self._weights:
            norm = self.keys.to(dtype) if self.keys is not None else norm_const
            self._weights[key] = self.allowed.to(dtype) / norm
        return self._weights[key]


@dataclass
class AttentionPlan:
    """Everything about a batch's attention that does not depend on the layer: the length buckets, the
    gather/scatter indices, the masks and the bias indices. Built once per batch and shared by every
    layer (HSTU-large: 8 layers), it removes ~60 ms of index work per ML-1M step (see module docstring)."""

    L: int
    src: torch.Tensor  # (S,) token index of every padded slot, L = padding
    where: torch.Tensor  # (L,) slot of every token
    groups: list[_Group]


def _group_masks(lengths, num_targets, N, dev):
    i = torch.arange(N, device=dev)
    h = lengths - (num_targets if num_targets is not None else 0)  # (G,) history lengths
    valid = i[None, :] < lengths[:, None]  # (G, N)
    allowed = (i[None, :, None] >= i[None, None, :]) & valid[:, :, None] & valid[:, None, :]  # (G, N, N)
    if num_targets is not None:
        is_cand_col = i[None, None, :] >= h[:, None, None]  # (G, 1, N)
        allowed &= ~is_cand_col | (i[None, :, None] == i[None, None, :])
    return i, h, allowed


def _plan_group(sl, lengths, num_targets, N, num_pos, num_time, tq, tk, time_bucket_div, norm_by_length):
    i, h, allowed = _group_masks(lengths, num_targets, N, lengths.device)
    pos_idx = time_idx = keys = None
    if num_pos:
        if num_targets is None:
            pos_idx = (i[:, None] - i[None, :]).clamp(0, num_pos - 1)  # (N, N), shared by the group
        else:
            p = torch.minimum(i[None, :], h[:, None])  # (G, N)
            pos_idx = (p[:, :, None] - p[:, None, :]).clamp(0, num_pos - 1)  # (G, N, N)
    if num_time:
        time_idx = time_buckets(tq[:, :, None] - tk[:, None, :], time_bucket_div, num_time)  # (G, N, N)
    if norm_by_length:
        keys = allowed.sum(-1).clamp(min=1)[:, None, :, None]  # (G, 1, N, 1)
    return _Group(sl, len(lengths), N, allowed.unsqueeze(1), pos_idx, time_idx, keys)


def plan_attention(offsets: torch.Tensor, *, num_pos: int = 0, num_time: int = 0,
                   ts_q: torch.Tensor | None = None, ts_k: torch.Tensor | None = None,
                   time_bucket_div: float = 0.301, num_targets: torch.Tensor | None = None,
                   norm_by_length: bool = False, bucketed: bool = True) -> AttentionPlan:
    """The layer-independent part of `hstu_attention_ref` for one batch. num_pos / num_time: sizes of
    the position / time bias tables (0 = that bias is off)."""
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    starts = offsets[:-1].tolist()
    L, dev = int(offsets[-1]), offsets.device
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
    src = torch.cat(src).to(dev) if src else torch.zeros(0, dtype=torch.long, device=dev)
    tq = _pad_row(ts_q)[src] if num_time else None
    tk = _pad_row(ts_k)[src] if num_time else None
    plans, at = [], 0
    for g, (G, N) in zip(groups, shapes):
        sl = slice(at, at + G * N)
        at += G * N
        lens = torch.tensor([lengths[b] for b in g], device=dev)
        nt = num_targets[torch.tensor(g, device=dev)] if num_targets is not None else None
        view = lambda x: x[sl].view(G, N) if x is not None else None  # noqa: E731
        plans.append(_plan_group(sl, lens, nt, N, num_pos, num_time, view(tq), view(tk), time_bucket_div,
                                 norm_by_length))
    where = torch.empty(L + 1, dtype=torch.long, device=dev)
    where[src] = torch.arange(src.numel(), device=dev)  # token t sits at the flat row where src == t
    return AttentionPlan(L, src, where[:L], plans)


def _pad_row(x: torch.Tensor) -> torch.Tensor:
    """x (L, ...) -> (L+1, ...) with a zero row at index L (the padding slot)."""
    return torch.cat([x, x.new_zeros((1,) + x.shape[1:])])


ROW_CHUNK = 64  # causal tiling: rows in chunks of about this many (the sweep in _DenseAttention)


def _row_chunks(N: int, chunk: int) -> list[tuple[int, int]]:
    """[(r0, r1)] splitting rows 0..N into ceil(N / chunk) near-equal chunks."""
    T = max(1, -(-N // chunk))
    bounds = [round(N * t / T) for t in range(T + 1)]
    return [(r0, r1) for r0, r1 in zip(bounds, bounds[1:]) if r1 > r0]


class _DenseAttention(torch.autograd.Function):
    """One bucket's attention with the backward written out: out = (SiLU(alpha q k^T + rab) * w) v.

    q, k (G, H, N, dqk), v (G, H, N, dv); rab (G or 1, N, N) or None; w (G, 1, N, N) = allowed / norm.
    Every allowed pair has j <= i (causal; candidates see fewer keys, never later ones), so rows are
    taken in chunks [r0, r1) against keys [0, r1) only: with T chunks the scores cover (T + 1) / 2T of
    the N x N square (T = 4 at N = 200: 62%). Autograd on the same expression makes ~8 passes over the
    scores forward and ~12 back (each product is its own kernel and saves its inputs); here forward is
    one matmul, two in-place passes and one SiLU per chunk, backward one fused silu_backward.
    Measured 2026-12-01 (a one-off A/B script, not kept: one ML-1M batch of 128, H 2 d 25 as in HSTU-large,
    position + time bias, fwd + bwd, 1 thread, median of 5, another job sharing the machine): the autograd expression
    this replaced 240 ms; this function untiled 247, ROW_CHUNK 100: 224, 64: 178, 50: 188, 32: 181."""

    @staticmethod
    def forward(ctx, q, k, v, rab, w, alpha: float):
        chunks, saved, outs = _row_chunks(q.shape[2], ROW_CHUNK), [], []
        for r0, r1 in chunks:
            s = torch.matmul(q[:, :, r0:r1], k[:, :, :r1].transpose(-1, -2))  # (G, H, c, r1)
            if alpha != 1.0:
                s.mul_(alpha)
            if rab is not None:
                s.add_(rab[:, None, r0:r1, :r1])
            a = F.silu(s).mul_(w[:, :, r0:r1, :r1])
            outs.append(torch.matmul(a, v[:, :, :r1]))  # (G, H, c, dv)
            saved += [s, a]
        ctx.save_for_backward(q, k, v, w, *saved)
        ctx.alpha, ctx.chunks = alpha, chunks
        ctx.rab_shape = None if rab is None else rab.shape
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (G, H, N, dv)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, w, *saved = ctx.saved_tensors
        dout = dout.to(v.dtype)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        want_rab = ctx.rab_shape is not None and ctx.needs_input_grad[3]
        drab = q.new_zeros(ctx.rab_shape) if want_rab else None
        for i, (r0, r1) in enumerate(ctx.chunks):
            s, a, g = saved[2 * i], saved[2 * i + 1], dout[:, :, r0:r1]
            dv[:, :, :r1] += torch.matmul(a.transpose(-1, -2), g)
            da = torch.matmul(g, v[:, :, :r1].transpose(-1, -2)).mul_(w[:, :, r0:r1, :r1])  # (G, H, c, r1)
            ds = torch.ops.aten.silu_backward(da, s)
            if want_rab:
                drab[:, r0:r1, :r1] += ds.sum(1) if ctx.rab_shape[0] == ds.shape[0] else ds.sum((0, 1))
            if ctx.alpha != 1.0:
                ds.mul_(ctx.alpha)
            dq[:, :, r0:r1] = torch.matmul(ds, k[:, :, :r1])
            dk[:, :, :r1] += torch.matmul(ds.transpose(-1, -2), q[:, :, r0:r1])
        return dq, dk, dv, drab, None, None


def _dense_block(q, k, v, grp: _Group, alpha, norm_const, pos_bias, time_bias):
    """Padded dense attention for one bucket: q, k (G, N, H, dqk), v (G, N, H, dv) -> (G, N, H, dv)."""
    rab = gather_small(pos_bias, grp.pos_idx) if grp.pos_idx is not None else None  # (N, N) or (G, N, N)
    if grp.time_idx is not None:
        tb = gather_small(time_bias, grp.time_idx)  # (G, N, N)
        rab = tb if rab is None else rab + tb
    if rab is not None and rab.dim() == 2:
        rab = rab[None]
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731  (G, N, H, d) -> (G, H, N, d)
    o = _DenseAttention.apply(t(q), t(k), t(v), rab, grp.weight(norm_const, q.dtype), float(alpha))
    return o.transpose(1, 2)  # (G, N, H, dv)


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
                       bucketed: bool = True, plan: AttentionPlan | None = None) -> torch.Tensor:
    """Jagged q, k (L, H, dqk), v (L, H, dv), offsets (B+1,) -> (L, H, dv). See the module docstring.
    `plan` (from `plan_attention` with the same offsets, timestamps, targets and table sizes) skips the
    per-call index work; without it one is built here."""
    if q.shape[0] == 0:
        return v.new_zeros(v.shape)
    if plan is None:
        plan = plan_attention(offsets, num_pos=pos_bias.numel() if pos_bias is not None else 0,
                              num_time=time_bias.numel() if time_bias is not None else 0, ts_q=ts_q, ts_k=ts_k,
                              time_bucket_div=time_bucket_div, num_targets=num_targets,
                              norm_by_length=norm_by_length, bucketed=bucketed)
    qp, kp, vp = (_GatherRows.apply(_pad_row(x), plan.src) for x in (q, k, v))  # (S, H, d)
    outs = []
    for grp in plan.groups:
        view = lambda x: x[grp.sl].view(grp.G, grp.N, *x.shape[1:])  # noqa: E731
        o = _dense_block(view(qp), view(kp), view(vp), grp, alpha, norm_const, pos_bias, time_bias)
        outs.append(o.reshape(grp.G * grp.N, *o.shape[2:]))
    return _GatherRows.apply(torch.cat(outs), plan.where)  # padding rows dropped


def hstu_attention_last_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                            alpha: float = 1.0, norm_const: float = 1.0, norm_by_length: bool = False,
                            pos_bias: torch.Tensor | None = None, time_bias: torch.Tensor | None = None,
                            ts_q: torch.Tensor | None = None, ts_k: torch.Tensor | None = None,
                            time_bucket_div: float = 0.301) -> torch.Tensor:
    """The output rows of `hstu_attention_ref` at each sequence's last token only: (B, H, dv), every
    sequence non-empty, no candidates. What a model's final layer needs at evaluation and serving, where
    only the last state is scored: one query row per sequence instead of n (B x N work, not B x N^2)."""
    L = q.shape[0]
    lengths = offsets[1:] - offsets[:-1]  # (B,)
    N = int(lengths.max()) if lengths.numel() else 0
    last = offsets[1:] - 1  # (B,)
    j = torch.arange(N, device=q.device)
    valid = j[None, :] < lengths[:, None]  # (B, N)
    src = torch.where(valid, offsets[:-1, None] + j[None, :], L)  # (B, N) token of each key slot, L = padding
    kp, vp = _pad_row(k)[src], _pad_row(v)[src]  # (B, N, H, d)
    s = torch.einsum("bhd,bjhd->bhj", q[last], kp) * alpha  # (B, H, N)
    if pos_bias is not None:
        s = s + pos_bias[(lengths[:, None] - 1 - j[None, :]).clamp(0, pos_bias.numel() - 1)][:, None, :]
    if time_bias is not None:
        dt = ts_q[last][:, None] - _pad_row(ts_k)[src]  # (B, N)
        s = s + time_bias[time_buckets(dt, time_bucket_div, time_bias.numel())][:, None, :]
    norm = lengths.clamp(min=1).to(q.dtype)[:, None, None] if norm_by_length else norm_const
    a = F.silu(s) * valid[:, None, :] / norm
    return torch.einsum("bhj,bjhd->bhd", a, vp)  # (B, H, dv)


def hstu_attention_padded_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *,
                              alpha: float = 1.0, norm_const: float = 1.0, norm_by_length: bool = False,
                              pos_bias: torch.Tensor | None = None, time_bias: torch.Tensor | None = None,
                              ts_q: torch.Tensor | None = None, ts_k: torch.Tensor | None = None,
                              time_bucket_div: float = 0.301, last_only: bool = False) -> torch.Tensor:
    """The same attention on right-padded input: q, k (B, N, H, dqk), v (B, N, H, dv), lengths (B,),
    ts_q / ts_k (B, N) -> (B, N, H, dv), or (B, H, dv) for each sequence's last row with `last_only`.
    One dense (B, H, R, N) block with no data-dependent shapes or host syncs, so torch.export can trace
    it with symbolic B and N (the bucketed path above reads lengths on the host). No candidates."""
    B, N, H, d = q.shape
    j = torch.arange(N, device=q.device)
    valid = j[None, :] < lengths[:, None]  # (B, N)
    if last_only:  # one query row per sequence, at its last valid position
        rows = (lengths - 1).clamp(min=0)[:, None]  # (B, 1)
        q = q.gather(1, rows[:, :, None, None].expand(B, 1, H, d))  # (B, 1, H, dqk)
        tq = ts_q.gather(1, rows) if ts_q is not None else None  # (B, 1)
    else:
        rows, tq = j[None, :].expand(B, N), ts_q  # (B, N)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * alpha  # (B, H, R, N)
    allowed = (j[None, None, :] <= rows[:, :, None]) & valid[:, None, :]  # (B, R, N)
    if pos_bias is not None:
        s = s + pos_bias[(rows[:, :, None] - j[None, None, :]).clamp(0, pos_bias.numel() - 1)][:, None]
    if time_bias is not None:
        s = s + time_bias[time_buckets(tq[:, :, None] - ts_k[:, None, :], time_bucket_div, time_bias.numel())][:, None]
    norm = allowed.sum(-1).clamp(min=1).to(q.dtype)[:, None, :, None] if norm_by_length else norm_const
    a = F.silu(s) * allowed[:, None].to(s.dtype) / norm
    out = torch.einsum("bhij,bjhd->bihd", a, v)  # (B, R, H, dv)
    return out[:, 0] if last_only else out
