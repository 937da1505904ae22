"""HSTU pointwise attention in Triton: jagged forward, deterministic backward, relative bias fused in-kernel.

The math is kernels/hstu_attention_ref.py's (the spec). Per sequence b (n tokens, h = n - num_targets[b]
history tokens, clamped to [0, n]; h = n without targets), per head, rows i and columns j:

    s_ij = alpha * <q_i, k_j> + pos_bias[clamp(p_i - p_j, 0, P-1)] + time_bias[bucket(tq_i - tk_j)]
    a_ij = SiLU(s_ij) / norm_i  where allowed: j <= i and (j < h or j == i), else 0
    out_i = sum_j a_ij v_j

with p_i = min(i, h) and norm_i = norm_const, or (norm_by_length) p_i + 1, which is exactly the number of
keys row i may see (i + 1 for history rows, h + 1 for candidates).

Forward (`_fwd_kernel`, grid (cdiv(max_len, BLOCK_M), B*H)): a program owns BLOCK_M query rows of one
(sequence, head), keeps q in registers and walks key blocks, accumulating SiLU(S)/n @ V in fp32. No softmax,
so there is no running max / log-sum-exp and nothing is saved for the backward but the inputs. Key range:
keys < min(end_m, h) (history and causal part), then, only with targets, the diagonal block(s) past that
for candidate rows (a candidate sees itself). The bias is gathered from the 1-D tables in-kernel from the
row/column positions and timestamps (int64 seconds, passed as an exact fp32 (hi, lo) split, see
_split_ts), so no (L, L) bias tensor ever exists.

Backward, recomputing S (no attention matrix stored), with sigma = sigmoid(S):
    dV = A^T dO,  dA = dO V^T,  dS = dA * sigma * (1 + S (1 - sigma)) / norm (masked),
    dK = alpha dS^T Q,  dQ = alpha dS K,  d_pos_bias[b] = sum_{bin(i,j)=b} dS_ij (over heads too), same for time.
  - `_bwd_dkdv_kernel`, grid (cdiv(max_len, BLOCK_N), B*H): a program owns BLOCK_N keys, walks the query
    rows that can see them and keeps dK, dV in fp32 registers. It also bins dS into per-program partial
    histograms of the bias tables.
  - `_bwd_dq_kernel`, grid (cdiv(max_len, BLOCK_M), B*H): a program owns BLOCK_M rows and walks the key
    blocks like the forward, keeping dQ in registers (S is recomputed a second time: the price of no locks).

Determinism: every output element (O, dQ, dK, dV) is written by exactly one program, which sums its
contributions in a fixed loop order with no atomics. Bias gradients go to a buffer of one row per dkdv
program ([programs, P] and [programs, T], fp32), each row written only by its program, then reduced by
torch `.sum(0)` (a fixed reduction order for a fixed shape). Meta's kernels instead read-modify-write dQ
under spin locks and used `atomic_add` for dTW/dPW, so their sums depend on scheduling. Two backward runs
here on the same inputs, config and device give bitwise identical gradients.

Histograms inside a program: Triton has no weighted histogram or conflict-free scatter-add, so each dS
tile is binned with a one-hot compare over a chunk of BLOCK_BIN bins and `tl.sum` ([BM, BN, BLOCK_BIN]
elements per chunk). Only chunks between the tile's smallest and largest valid bin are visited: a tile
far below the diagonal has every pair clamped to bin P-1 (one chunk), and time buckets of one tile
usually span ~10-40 of the 129 buckets, not all of them. It is expected to be the costliest part of the
backward on GPU when a bias needs a gradient (CUDA-core work next to tensor-core matmuls); a frozen bias
(requires_grad False) compiles it out (constexpr).

Head dims that are not powers of two (25, 50 in the research configs) are padded to the next power of two
(at least 16, tl.dot's minimum) with masked loads.

Precision: all elementwise math (S, bias, SiLU and its derivative, dS, histograms) and every accumulator
is fp32; bias tables are widened right after their load. q, k, v, dO tiles are only ever matmul operands,
so they stay in the input dtype; fp32 intermediates that feed a matmul (A, dS) are rounded to it (bf16
tensor cores on GPU). The Triton CPU interpreter multiplies bf16 bits wrongly and its fp32 -> bf16 cast
truncates, so there operands are widened to fp32 after a round-to-nearest on the bits (_round_lowp): the
same values as on GPU, exact products. fp32 inputs use 3xTF32 matmuls on GPU (TF32 if torch allows it).
Outputs are stored in the input dtype; bias gradients in the table's dtype.

Checked without a GPU: the interpreter tests (tests/test_hstu_attention_triton.py), and every autotune
config compiled for sm_90 with ptxas reporting spills (configs that spilled > ~100 B a thread dropped).
Not yet run on a GPU, so kernels/hstu_attention.py's backend="auto" does not pick these kernels; the
proof is `python bench/kernels.py --parity-only` and `pytest -m gpu tests/test_hstu_attention_triton.py`.

Tuning: on CUDA each kernel is autotuned with keys bucketed to powers of two (batch size, max_len), so a
new jagged length mix does not re-tune. In deterministic mode (torch.use_deterministic_algorithms(True))
nothing is autotuned: each kernel runs one config pinned per key (_pinned_row), so every process sums in
the same order (see the comment there). Under TRITON_INTERPRET=1 (tests on CPU) there is no autotune and
one fixed config with large blocks (the interpreter's cost scales with programs x loop steps), or the
pinned one in deterministic mode. TRITON_INTERPRET=1 must be set before triton is first imported in the
process, not only before this module.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Whether the kernels below were decorated in interpreter mode (triton.jit reads TRITON_INTERPRET when it
# decorates, i.e. at this module's import; triton.language's own helpers read it at triton's import).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter's fixed config. 64-wide blocks: B4 H2 N256 d64 took 0.66 s fwd at 64 vs 11.7 s at 16
# (STACK.md). Tests may override these (smaller blocks exercise more block boundaries on short sequences).
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_BIN": 32}


# --------------------------------------------------------------------------------------------------------
# Small device helpers
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _round_lowp(x, LOWP: tl.constexpr):
    """fp32 x rounded to the nearest LOWP value, kept in fp32: for the interpreter only. Its fp32 -> bf16
    cast truncates toward zero (measured: 2103 of 4096 randn values off torch's round-to-nearest-even, all
    smaller in magnitude), a bias that adds up over a row (a 2.2x larger bf16 forward error than the
    reference's). So bf16 is rounded on the bits there; fp16 casts round correctly (measured: 0 of 4096)."""
    if LOWP == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even on the top 16 bits
        return bits.to(tl.float32, bitcast=True)
    return x.to(LOWP).to(tl.float32)


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, PREC: tl.constexpr):
    """(M, K) @ (K, N) -> fp32. Operands are loaded q/k/v/dO tiles (input dtype) or fp32 intermediates.
    LOWP (bf16/fp16 inputs): both operands in the input dtype (tensor cores on GPU; fp32 intermediates are
    rounded). The interpreter multiplies low-precision bits wrongly, so there (NATIVE_LOWP False) operands
    are rounded the same way but multiplied in fp32: exact products of the same rounded values."""
    if LOWP is not None:
        if NATIVE_LOWP:
            return tl.dot(a.to(LOWP), b.to(LOWP))
        a = _round_lowp(a.to(tl.float32), LOWP)
        b = _round_lowp(b.to(tl.float32), LOWP)
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _allowed(offs_m, offs_n, n, hist):
    """(BM, BN) bool: row inside the sequence, causal, and candidate keys (j >= hist) visible only to
    themselves. j <= i < n implies j < n."""
    i = offs_m[:, None]
    j = offs_n[None, :]
    return (i < n) & (j <= i) & ((j < hist) | (j == i))


@triton.jit
def _inv_norm(offs_m, hist, norm_const, NORM_BY_LENGTH: tl.constexpr):
    """(BM,) 1 / norm_i: keys visible to row i = min(i, hist) + 1, or the constant."""
    if NORM_BY_LENGTH:
        return 1.0 / (tl.minimum(offs_m, hist) + 1).to(tl.float32)
    return tl.zeros(offs_m.shape, tl.float32) + 1.0 / norm_const


@triton.jit
def _pos_bins(offs_m, offs_n, hist, P):
    """(BM, BN) int32 index into pos_bias: clamp(p_i - p_j, 0, P-1), p = min(pos, hist)."""
    pi = tl.minimum(offs_m, hist)
    pj = tl.minimum(offs_n, hist)
    return tl.minimum(tl.maximum(pi[:, None] - pj[None, :], 0), P - 1)


@triton.jit
def _time_bins(tq, tk, time_bucket_div, T):
    """(BM, BN) int32 index into time_bias: clamp(floor(ln(max(|tq - tk|, 1)) / div), 0, T-1).

    tq = (hi, lo) rows (BM,), tk = (hi, lo) columns (BN,), fp32, with t - base = hi * 4096 + lo (see
    _split_ts). fp32 cannot hold unix seconds (~1.6e9 > 2^24) and int64 tiles cost twice the registers, so
    the difference is assembled from exact parts: hi_q - hi_k (integers < 2^23) and lo_q - lo_k (< 4096)
    are exact in fp32, and (dhi * 4096 + dlo) rounds once, i.e. equals fp32(tq - tk) as the reference's
    int64 subtraction then .to(float32) gives it."""
    dt = (tq[0][:, None] - tk[0][None, :]) * 4096.0 + (tq[1][:, None] - tk[1][None, :])
    # tl.log is libdevice's logf (<= 1 ulp, as torch's); div_rn is IEEE division like torch's CPU kernel
    # (a plain "/" compiles to div.full.f32, up to 2 ulp off), so buckets flip only where torch's own log
    # implementations would disagree with each other at a bucket boundary.
    x = tl.floor(tl.div_rn(tl.log(tl.maximum(tl.abs(dt), 1.0)), time_bucket_div))
    return tl.minimum(tl.maximum(x, 0.0), T - 1.0).to(tl.int32)


@triton.jit
def _scores(q, k, offs_m, offs_n, n, hist, tq, tk, POS_BIAS, TIME_BIAS, alpha, time_bucket_div, P, T,
            HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
            LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, PREC: tl.constexpr):
    """q (BM, DQK), k (BN, DQK) in the input dtype -> S (BM, BN) fp32 with the bias added, the mask, and the
    bias bins (0 where a bias is off)."""
    s = _dot(q, tl.trans(k), LOWP, NATIVE_LOWP, PREC) * alpha
    pb = 0
    tb = 0
    if HAS_POS:
        pb = _pos_bins(offs_m, offs_n, hist, P)
        s += tl.load(POS_BIAS + pb).to(tl.float32)  # bins are clamped in range: no mask needed
    if HAS_TIME:
        tb = _time_bins(tq, tk, time_bucket_div, T)
        s += tl.load(TIME_BIAS + tb).to(tl.float32)
    return s, _allowed(offs_m, offs_n, n, hist), pb, tb


@triton.jit
def _hist_add(acc, bins, ds, mask, BLOCK_BIN: tl.constexpr):
    """acc (NCH, BLOCK_BIN) += histogram of ds (BM, BN) over bins (BM, BN), bin b at acc[b // BB, b % BB].

    One-hot compare + tl.sum per chunk of BLOCK_BIN bins (deterministic; Triton has no weighted histogram
    and a scatter-add would need atomics). Only chunks between the smallest and largest valid bin of the
    tile are visited. ds is already 0 where masked."""
    lo = tl.min(tl.where(mask, bins, 1 << 30))
    hi = tl.max(tl.where(mask, bins, -1))
    chunk = tl.arange(0, acc.shape[0])
    for c in range(lo // BLOCK_BIN, hi // BLOCK_BIN + 1):  # empty when the tile has no valid pair
        ids = c * BLOCK_BIN + tl.arange(0, BLOCK_BIN)
        hit = bins[:, :, None] == ids[None, None, :]  # (BM, BN, BLOCK_BIN)
        part = tl.sum(tl.sum(tl.where(hit, ds[:, :, None], 0.0), axis=1), axis=0)  # (BLOCK_BIN,)
        acc = tl.where(chunk[:, None] == c, acc + part[None, :], acc)
    return acc


@triton.jit
def _store_hist(BUF, row, acc, NB, BLOCK_BIN: tl.constexpr):
    """BUF[row, b] = acc[b // BLOCK_BIN, b % BLOCK_BIN] for b < NB. BUF is (rows, NB) fp32."""
    idx = tl.arange(0, acc.shape[0])[:, None] * BLOCK_BIN + tl.arange(0, BLOCK_BIN)[None, :]
    tl.store(BUF + row.to(tl.int64) * NB + idx, acc, mask=idx < NB)


@triton.jit
def _seq_info(OFFSETS, NUM_TARGETS, pid_bh, H, HAS_TARGETS: tl.constexpr):
    """-> (head, first token (int64), n, hist) for program column pid_bh = b * H + head."""
    b = pid_bh // H
    head = pid_bh % H
    seq_start = tl.load(OFFSETS + b)
    n = (tl.load(OFFSETS + b + 1) - seq_start).to(tl.int32)
    hist = n
    if HAS_TARGETS:
        hist = tl.minimum(tl.maximum(n - tl.load(NUM_TARGETS + b).to(tl.int32), 0), n)
    return head, seq_start, n, hist


@triton.jit
def _load_rows(X, seq_start, offs, n, head, stride_t, stride_h, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(len(offs), BLOCK_D) tile of X (L, H, D) for sequence positions offs, zeros outside, in X's dtype:
    q, k, v, dO tiles are only ever matmul operands (see _dot), so they are not widened to fp32 (a bf16
    64 x 64 tile held as fp32 costs 16 more registers a thread at 4 warps)."""
    offs_d = tl.arange(0, BLOCK_D)
    ptr = X + (seq_start + offs)[:, None] * stride_t + head * stride_h + offs_d[None, :]
    return tl.load(ptr, mask=(offs < n)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _store_rows(X, val, seq_start, offs, n, head, stride_t, stride_h, D: tl.constexpr, BLOCK_D: tl.constexpr,
                LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr):
    """X[seq_start + offs, head, :D] = fp32 val in X's dtype (round to nearest, on the interpreter too)."""
    if LOWP is not None and not NATIVE_LOWP:
        val = _round_lowp(val, LOWP)  # now exact in LOWP, so the truncating cast below is exact
    offs_d = tl.arange(0, BLOCK_D)
    ptr = X + (seq_start + offs)[:, None] * stride_t + head * stride_h + offs_d[None, :]
    tl.store(ptr, val.to(X.dtype.element_ty), mask=(offs < n)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _load_ts(TS, seq_start, offs, n, HAS_TIME: tl.constexpr):
    """(hi, lo) fp32 vectors (len(offs),) from TS (L, 2) (see _split_ts), or (0, 0) without a time bias."""
    hi = 0.0
    lo = 0.0
    if HAS_TIME:
        ptr = TS + (seq_start + offs) * 2
        hi = tl.load(ptr, mask=offs < n, other=0.0)
        lo = tl.load(ptr + 1, mask=offs < n, other=0.0)
    return hi, lo


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, OFFSETS, NUM_TARGETS, POS_BIAS, TIME_BIAS, TS_Q, TS_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    alpha, norm_const, time_bucket_div, P, T, H,
    AUTOTUNE_B, AUTOTUNE_MAX_LEN,  # autotune keys only (powers of two)
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, NORM_BY_LENGTH: tl.constexpr,
    LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    head, seq_start, n, hist = _seq_info(OFFSETS, NUM_TARGETS, pid_bh, H, HAS_TARGETS)
    start_m = pid_m * BLOCK_M
    if start_m >= n:  # rows past this sequence's end: the grid is sized for max_len
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, seq_start, offs_m, n, head, stride_qt, stride_qh, DQK, BLOCK_DQK)  # (BM, DQK)
    tq = _load_ts(TS_Q, seq_start, offs_m, n, HAS_TIME)  # (BM,)
    inv_norm = _inv_norm(offs_m, hist, norm_const, NORM_BY_LENGTH)  # (BM,)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    end_m = tl.minimum(start_m + BLOCK_M, n)
    # keys < min(end_m, hist) hold every key a history row sees and the history part of candidate rows
    lo_end = tl.minimum(end_m, hist)
    for start_n in range(0, lo_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, seq_start, offs_n, n, head, stride_kt, stride_kh, DQK, BLOCK_DQK)  # (BN, DQK)
        v = _load_rows(V, seq_start, offs_n, n, head, stride_vt, stride_vh, DV, BLOCK_DV)  # (BN, DV)
        tk = _load_ts(TS_K, seq_start, offs_n, n, HAS_TIME)
        s, mask, _pb, _tb = _scores(q, k, offs_m, offs_n, n, hist, tq, tk, POS_BIAS, TIME_BIAS, alpha,
                                    time_bucket_div, P, T, HAS_POS, HAS_TIME, LOWP, NATIVE_LOWP, PREC)
        a = tl.where(mask, s * tl.sigmoid(s) * inv_norm[:, None], 0.0)
        acc += _dot(a, v, LOWP, NATIVE_LOWP, PREC)
    if HAS_TARGETS:
        # candidate rows also see themselves: keys in [start_m, end_m) that the loop above did not cover
        lo2 = tl.maximum(tl.cdiv(lo_end, BLOCK_N) * BLOCK_N, start_m)
        for start_n in range(lo2, end_m, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(K, seq_start, offs_n, n, head, stride_kt, stride_kh, DQK, BLOCK_DQK)
            v = _load_rows(V, seq_start, offs_n, n, head, stride_vt, stride_vh, DV, BLOCK_DV)
            tk = _load_ts(TS_K, seq_start, offs_n, n, HAS_TIME)
            s, mask, _pb, _tb = _scores(q, k, offs_m, offs_n, n, hist, tq, tk, POS_BIAS, TIME_BIAS, alpha,
                                        time_bucket_div, P, T, HAS_POS, HAS_TIME, LOWP, NATIVE_LOWP, PREC)
            a = tl.where(mask, s * tl.sigmoid(s) * inv_norm[:, None], 0.0)
            acc += _dot(a, v, LOWP, NATIVE_LOWP, PREC)
    _store_rows(OUT, acc, seq_start, offs_m, n, head, stride_ot, stride_oh, DV, BLOCK_DV, LOWP, NATIVE_LOWP)


@triton.jit
def _dq_tile(q, do, tq, inv_norm, offs_m, start_n, seq_start, n, hist, head, K, V, TS_K, POS_BIAS, TIME_BIAS,
             stride_kt, stride_kh, stride_vt, stride_vh, alpha, time_bucket_div, P, T,
             DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
             HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
             LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """dS @ K for one key block: (BM, DQK) fp32 (alpha applied by the caller)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, seq_start, offs_n, n, head, stride_kt, stride_kh, DQK, BLOCK_DQK)  # (BN, DQK)
    v = _load_rows(V, seq_start, offs_n, n, head, stride_vt, stride_vh, DV, BLOCK_DV)  # (BN, DV)
    tk = _load_ts(TS_K, seq_start, offs_n, n, HAS_TIME)
    s, mask, _pb, _tb = _scores(q, k, offs_m, offs_n, n, hist, tq, tk, POS_BIAS, TIME_BIAS, alpha,
                                time_bucket_div, P, T, HAS_POS, HAS_TIME, LOWP, NATIVE_LOWP, PREC)
    sig = tl.sigmoid(s)
    da = _dot(do, tl.trans(v), LOWP, NATIVE_LOWP, PREC)  # (BM, BN)
    ds = tl.where(mask, da * sig * (1.0 + s * (1.0 - sig)) * inv_norm[:, None], 0.0)
    return _dot(ds, k, LOWP, NATIVE_LOWP, PREC)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, OFFSETS, NUM_TARGETS, POS_BIAS, TIME_BIAS, TS_Q, TS_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    alpha, norm_const, time_bucket_div, P, T, H,
    AUTOTUNE_B, AUTOTUNE_MAX_LEN,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, NORM_BY_LENGTH: tl.constexpr,
    LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    head, seq_start, n, hist = _seq_info(OFFSETS, NUM_TARGETS, pid_bh, H, HAS_TARGETS)
    start_m = pid_m * BLOCK_M
    if start_m >= n:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, seq_start, offs_m, n, head, stride_qt, stride_qh, DQK, BLOCK_DQK)  # (BM, DQK)
    do = _load_rows(DO, seq_start, offs_m, n, head, stride_dot, stride_doh, DV, BLOCK_DV)  # (BM, DV)
    tq = _load_ts(TS_Q, seq_start, offs_m, n, HAS_TIME)
    inv_norm = _inv_norm(offs_m, hist, norm_const, NORM_BY_LENGTH)
    dq = tl.zeros((BLOCK_M, BLOCK_DQK), tl.float32)
    end_m = tl.minimum(start_m + BLOCK_M, n)
    lo_end = tl.minimum(end_m, hist)  # same key ranges as the forward
    for start_n in range(0, lo_end, BLOCK_N):
        dq += _dq_tile(q, do, tq, inv_norm, offs_m, start_n, seq_start, n, hist, head, K, V, TS_K, POS_BIAS,
                       TIME_BIAS, stride_kt, stride_kh, stride_vt, stride_vh, alpha, time_bucket_div, P, T,
                       DQK, DV, BLOCK_DQK, BLOCK_DV, HAS_POS, HAS_TIME, LOWP, NATIVE_LOWP, PREC, BLOCK_N)
    if HAS_TARGETS:
        lo2 = tl.maximum(tl.cdiv(lo_end, BLOCK_N) * BLOCK_N, start_m)
        for start_n in range(lo2, end_m, BLOCK_N):
            dq += _dq_tile(q, do, tq, inv_norm, offs_m, start_n, seq_start, n, hist, head, K, V, TS_K,
                           POS_BIAS, TIME_BIAS, stride_kt, stride_kh, stride_vt, stride_vh, alpha,
                           time_bucket_div, P, T, DQK, DV, BLOCK_DQK, BLOCK_DV, HAS_POS, HAS_TIME, LOWP,
                           NATIVE_LOWP, PREC, BLOCK_N)
    _store_rows(DQ, dq * alpha, seq_start, offs_m, n, head, stride_dqt, stride_dqh, DQK, BLOCK_DQK, LOWP,
                NATIVE_LOWP)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_OUT, D_POS, D_TIME, OFFSETS, NUM_TARGETS, POS_BIAS, TIME_BIAS, TS_Q, TS_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    alpha, norm_const, time_bucket_div, P, T, H,
    AUTOTUNE_B, AUTOTUNE_MAX_LEN,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, NORM_BY_LENGTH: tl.constexpr,
    LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, PREC: tl.constexpr,
    GRAD_POS: tl.constexpr, GRAD_TIME: tl.constexpr, P_PAD: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_BIN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    head, seq_start, n, hist = _seq_info(OFFSETS, NUM_TARGETS, pid_bh, H, HAS_TARGETS)
    start_n = pid_n * BLOCK_N
    if start_n >= n:  # its histogram rows stay as zero-initialised
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, seq_start, offs_n, n, head, stride_kt, stride_kh, DQK, BLOCK_DQK)  # (BN, DQK)
    v = _load_rows(V, seq_start, offs_n, n, head, stride_vt, stride_vh, DV, BLOCK_DV)  # (BN, DV)
    tk = _load_ts(TS_K, seq_start, offs_n, n, HAS_TIME)
    dk = tl.zeros((BLOCK_N, BLOCK_DQK), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    # partial histograms in registers, bin b at [b // BLOCK_BIN, b % BLOCK_BIN]
    if GRAD_POS:
        hp = tl.zeros(((P_PAD + BLOCK_BIN - 1) // BLOCK_BIN, BLOCK_BIN), tl.float32)
    if GRAD_TIME:
        ht = tl.zeros(((T_PAD + BLOCK_BIN - 1) // BLOCK_BIN, BLOCK_BIN), tl.float32)
    # rows that see a key in [start_n, start_n + BN): all rows >= start_n if the block holds a history key;
    # a block of candidate keys only is seen by those same candidates (their own diagonal)
    hi = n
    if HAS_TARGETS:
        hi = tl.where(start_n < hist, n, tl.minimum(start_n + BLOCK_N, n))
    for start_m in range(start_n, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, seq_start, offs_m, n, head, stride_qt, stride_qh, DQK, BLOCK_DQK)  # (BM, DQK)
        do = _load_rows(DO, seq_start, offs_m, n, head, stride_dot, stride_doh, DV, BLOCK_DV)  # (BM, DV)
        tq = _load_ts(TS_Q, seq_start, offs_m, n, HAS_TIME)
        inv_norm = _inv_norm(offs_m, hist, norm_const, NORM_BY_LENGTH)
        s, mask, pb, tb = _scores(q, k, offs_m, offs_n, n, hist, tq, tk, POS_BIAS, TIME_BIAS, alpha,
                                  time_bucket_div, P, T, HAS_POS, HAS_TIME, LOWP, NATIVE_LOWP, PREC)
        sig = tl.sigmoid(s)
        a = tl.where(mask, s * sig * inv_norm[:, None], 0.0)  # (BM, BN)
        dv += _dot(tl.trans(a), do, LOWP, NATIVE_LOWP, PREC)
        da = _dot(do, tl.trans(v), LOWP, NATIVE_LOWP, PREC)  # (BM, BN)
        ds = tl.where(mask, da * sig * (1.0 + s * (1.0 - sig)) * inv_norm[:, None], 0.0)
        dk += _dot(tl.trans(ds), q, LOWP, NATIVE_LOWP, PREC)
        if GRAD_POS:
            hp = _hist_add(hp, pb, ds, mask, BLOCK_BIN)
        if GRAD_TIME:
            ht = _hist_add(ht, tb, ds, mask, BLOCK_BIN)
    _store_rows(DK, dk * alpha, seq_start, offs_n, n, head, stride_dkt, stride_dkh, DQK, BLOCK_DQK, LOWP,
                NATIVE_LOWP)
    _store_rows(DV_OUT, dv, seq_start, offs_n, n, head, stride_dvt, stride_dvh, DV, BLOCK_DV, LOWP,
                NATIVE_LOWP)
    row = pid_n * tl.num_programs(1) + pid_bh  # one buffer row per program: no two programs share a row
    if GRAD_POS:
        _store_hist(D_POS, row, hp, P, BLOCK_BIN)
    if GRAD_TIME:
        _store_hist(D_TIME, row, ht, T, BLOCK_BIN)


# --------------------------------------------------------------------------------------------------------
# Launch configs: autotuned on CUDA, pinned in deterministic mode, one fixed config under the interpreter
# --------------------------------------------------------------------------------------------------------

# autotune keys: batch size and max_len bucketed to powers of two, so a new length mix does not re-tune
_KEYS = ["AUTOTUNE_B", "AUTOTUNE_MAX_LEN", "H", "DQK", "DV", "HAS_TARGETS", "HAS_POS", "HAS_TIME"]


def _configs(rows) -> list[triton.Config]:
    return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_BIN"), r[:-2])), num_warps=r[-2], num_stages=r[-1])
            for r in rows]


# Candidates chosen by compiling for sm_90 (bf16, both biases, targets) and reading ptxas' spill bytes a
# thread: configs that spilled more than ~100 B are left out (e.g. fwd 64x64 at 4 warps: 304 B; at 8: 8 B).
# (BLOCK_M, BLOCK_N, warps, stages)
_FWD_ROWS = [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2), (32, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 3)]
_DQ_ROWS = [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 32, 8, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_BIN, warps, stages). The one-hot histogram tile (BM, BN, BLOCK_BIN) is what
# spills: 32x32x8 at 8 warps 0 B, 32x32x16 at 4 warps 1256 B, 64x64x4 at 4 warps 2200 B. 64x64 is for the
# frozen-bias case (no histogram; 48 B at 8 warps).
_DKDV_ROWS = [(32, 32, 8, 8, 2), (32, 32, 4, 4, 2), (32, 32, 8, 4, 2), (32, 64, 8, 8, 2), (64, 64, 4, 8, 2),
              (64, 32, 4, 8, 2)]

# Deterministic mode (torch.are_deterministic_algorithms_enabled(), which train.deterministic=true turns
# on): no autotune, one config per kernel and shape bucket. Autotune keeps whichever candidate timed
# fastest in this process, and timings are noisy, so two processes (two ranks, a rerun) can pick another
# BLOCK_N / warps for the same key: another key-block order in the O / dQ / dK / dV sums and another split
# of the bias-gradient histograms. The fp32 accumulators then differ at ~1e-7 relative, enough to flip the
# last bit of a bf16 output (2^-8 = 0.4% relative). A pinned config is a function of the key alone, so
# every process sums in the same order (torch.empty then fills O / dQ / dK / dV with NaN first, torch's
# deterministic-mode default: a memset, and a check that every element is written). The choice is untimed
# (no GPU run yet; bench/kernels.py prints autotune's pick per key, to revise this with):
#  - the candidate with the largest tiles (fewest programs and loop steps) among the (nearly) spill-free:
#    fwd / dq 64x64 at 8 warps (fwd: 8 B a thread, vs 304 B at 4 warps); dkdv 32x32x8 at 8 warps (0 B)
#    when a bias needs a gradient (the one-hot histogram tile), 64x64 at 8 warps (48 B) when none does;
#  - buckets of max_len <= 32: fwd / dq 32-row query blocks (32x64 at 4 warps), since 64-row blocks there
#    compute >= 50% padding rows.
def _pinned_row(name: str, const: dict) -> tuple:
    """The (BLOCK_M, BLOCK_N[, BLOCK_BIN], warps, stages) row of _FWD/_DQ/_DKDV_ROWS that kernel `name`
    runs in deterministic mode, from its constexprs / autotune key (`const`) alone."""
    if name == "dkdv":
        return (32, 32, 8, 8, 2) if const["GRAD_POS"] or const["GRAD_TIME"] else (64, 64, 4, 8, 2)
    return (32, 64, 4, 2) if const["AUTOTUNE_MAX_LEN"] <= 32 else (64, 64, 8, 2)


def _fixed_config(name: str, const: dict) -> dict | None:
    """Launch meta-parameters (BLOCK_*, num_warps, num_stages) when no autotune runs: the pinned config
    in deterministic mode (under the interpreter too, so CPU tests run this path; it ignores warps and
    stages), else the interpreter's fixed one; None = autotune. Read at every launch, since the mode can
    change between calls."""
    if torch.are_deterministic_algorithms_enabled():
        row = _pinned_row(name, const)
        return {**dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_BIN"), row[:-2])), "num_warps": row[-2],
                "num_stages": row[-1]}
    if INTERPRET:
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_BIN") if name == "dkdv" else ("BLOCK_M", "BLOCK_N")
        return {k: INTERPRET_CONFIG[k] for k in keys}
    return None


# Smallest BLOCK_N autotune may pick for dkdv: sizes the bias-gradient buffers (a row per program).
_MIN_TUNED_BLOCK_N = min(r[1] for r in _DKDV_ROWS)

if not INTERPRET:
    _TUNED = {
        "fwd": triton.autotune(configs=_configs(_FWD_ROWS), key=_KEYS)(_fwd_kernel),
        "dq": triton.autotune(configs=_configs(_DQ_ROWS), key=_KEYS)(_bwd_dq_kernel),
        # reset_to_zero: each benchmarked config must start from zeroed partial histograms
        "dkdv": triton.autotune(configs=_configs(_DKDV_ROWS), key=[*_KEYS, "GRAD_POS", "GRAD_TIME", "P_PAD", "T_PAD"],
                                reset_to_zero=["D_POS", "D_TIME"])(_bwd_dkdv_kernel),
    }


def autotune_picks() -> list[dict]:
    """What autotune chose in this process, per kernel and key, next to what deterministic mode pins for
    that key: [{"kernel", "key", "autotuned", "pinned"}], configs as rows of _FWD/_DQ/_DKDV_ROWS. Empty
    under the interpreter. bench/kernels.py reports it, to revise _pinned_row with measured picks."""
    picks = []
    for name, tuner in ({} if INTERPRET else _TUNED).items():
        for key, cfg in tuner.cache.items():
            named = dict(zip(tuner.keys, key))
            blocks = [cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_BIN") if k in cfg.kwargs]
            picks.append({"kernel": name, "key": named, "autotuned": (*blocks, cfg.num_warps, cfg.num_stages),
                          "pinned": _pinned_row(name, named)})
    return picks


def _launch(name, kernel, cfg, n_blocks, bh, args, const):
    """kernel[(n_blocks(config), bh)](*args): with cfg (from _fixed_config) as given, else autotuned.
    n_blocks(config) -> row (BLOCK_M) or column (BLOCK_N) blocks covering max_len for that config."""
    if cfg is not None:
        kernel[(n_blocks(cfg), bh)](*args, **const, **cfg)
    else:
        _TUNED[name][lambda meta: (n_blocks(meta), bh)](*args, **const)


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _prev_pow2(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


_LOWP = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: None}


def _shared_args(q, v, pos_bias, time_bias, offsets, ts_q, ts_k, num_targets, meta):
    """(pointer args OFFSETS..TS_K, scalar args alpha..H, constexprs + autotune keys) common to all kernels.
    Absent optional tensors are replaced by `offsets`: never read, their constexpr flag is off."""
    opt = [num_targets, pos_bias, time_bias, ts_q, ts_k]
    ptrs = [offsets] + [t if t is not None else offsets for t in opt]
    scalars = [meta["alpha"], meta["norm_const"], meta["time_bucket_div"], meta["P"], meta["T"], meta["H"]]
    dqk, dv = q.shape[2], v.shape[2]
    const = {
        "AUTOTUNE_B": _prev_pow2(meta["bh"] // meta["H"]), "AUTOTUNE_MAX_LEN": _next_pow2(meta["max_len"]),
        "DQK": dqk, "DV": dv, "BLOCK_DQK": max(16, _next_pow2(dqk)), "BLOCK_DV": max(16, _next_pow2(dv)),
        "HAS_TARGETS": num_targets is not None, "HAS_POS": pos_bias is not None, "HAS_TIME": time_bias is not None,
        "NORM_BY_LENGTH": meta["norm_by_length"], "LOWP": _LOWP[q.dtype], "NATIVE_LOWP": not INTERPRET,
        # fp32 inputs on GPU: TF32 when torch allows it, else 3xTF32 (about fp32 accuracy on tensor cores;
        # "ieee" falls back to FMA dot products that spill ~10 KB a thread at 64 x 64, measured with ptxas)
        "PREC": ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3") if q.is_cuda else "ieee",
    }
    return ptrs, scalars, const


def _rows(x):
    """(token stride, head stride) of an (L, H, D) tensor with unit stride on D."""
    return [x.stride(0), x.stride(1)]


# --------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------

class _HSTUAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, pos_bias, time_bias, offsets, ts_q, ts_k, num_targets, meta):
        ctx.save_for_backward(q, k, v, pos_bias, time_bias, offsets, ts_q, ts_k, num_targets)
        ctx.meta = meta
        o = torch.empty(v.shape, dtype=v.dtype, device=v.device)  # (L, H, dv); each row written by one program
        if q.shape[0] == 0:
            return o
        ptrs, scalars, const = _shared_args(q, v, pos_bias, time_bias, offsets, ts_q, ts_k, num_targets, meta)
        _launch("fwd", _fwd_kernel, _fixed_config("fwd", const),
                lambda c: triton.cdiv(meta["max_len"], c["BLOCK_M"]), meta["bh"],
                [q, k, v, o, *ptrs, *_rows(q), *_rows(k), *_rows(v), *_rows(o), *scalars], const)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, pos_bias, time_bias, offsets, ts_q, ts_k, num_targets = ctx.saved_tensors
        meta = ctx.meta
        grad_pos = pos_bias is not None and ctx.needs_input_grad[3]
        grad_time = time_bias is not None and ctx.needs_input_grad[4]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ptrs, scalars, const = _shared_args(q, v, pos_bias, time_bias, offsets, ts_q, ts_k, num_targets, meta)
        const_kv = {**const, "GRAD_POS": grad_pos, "GRAD_TIME": grad_time, "P_PAD": _next_pow2(meta["P"]),
                    "T_PAD": _next_pow2(meta["T"])}
        cfg_kv = _fixed_config("dkdv", const_kv)
        # per-program partial histograms, one row per dkdv program (B*H per column block), zero where a
        # program exits early: (programs, P) and (programs, T) fp32. Autotune sizes them for its smallest
        # BLOCK_N, so the shape (and the .sum(0) order below) does not depend on the config it picks.
        block_n = cfg_kv["BLOCK_N"] if cfg_kv is not None else _MIN_TUNED_BLOCK_N
        rows = triton.cdiv(meta["max_len"], block_n) * meta["bh"]
        d_pos = torch.zeros((rows if grad_pos else 1, meta["P"]), dtype=torch.float32, device=q.device)
        d_time = torch.zeros((rows if grad_time else 1, meta["T"]), dtype=torch.float32, device=q.device)
        if q.shape[0] > 0:
            do = do if do.stride(-1) == 1 else do.contiguous()  # (L, H, dv)
            strides = [*_rows(q), *_rows(k), *_rows(v), *_rows(do)]
            _launch("dq", _bwd_dq_kernel, _fixed_config("dq", const),
                    lambda c: triton.cdiv(meta["max_len"], c["BLOCK_M"]), meta["bh"],
                    [q, k, v, do, dq, *ptrs, *strides, *_rows(dq), *scalars], const)
            _launch("dkdv", _bwd_dkdv_kernel, cfg_kv,
                    lambda c: triton.cdiv(meta["max_len"], c["BLOCK_N"]), meta["bh"],
                    [q, k, v, do, dk, dv, d_pos, d_time, *ptrs, *strides, *_rows(dk), *_rows(dv), *scalars],
                    const_kv)
        # fixed-order reduction of the partial histograms (in fp64, as the reference bins)
        g_pos = d_pos.sum(0, dtype=torch.float64).to(pos_bias.dtype) if grad_pos else None
        g_time = d_time.sum(0, dtype=torch.float64).to(time_bias.dtype) if grad_time else None
        return dq, dk, dv, g_pos, g_time, None, None, None, None, None


def _split_ts(ts_q: torch.Tensor, ts_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestamps (L,) (int64 seconds, or float) -> (L, 2) fp32 [hi, lo] with t - base = hi * 4096 + lo,
    base = the smallest timestamp of the batch. Exact for integer seconds when the batch spans < 2^35 s
    (~1000 years): hi < 2^23 and lo < 4096 are then integers fp32 holds exactly; see _time_bins."""
    if ts_q.is_floating_point():
        ts_q, ts_k = ts_q.to(torch.float64), ts_k.to(torch.float64)
    else:
        ts_q, ts_k = ts_q.to(torch.int64), ts_k.to(torch.int64)
    if ts_q.numel() == 0:
        return (ts_q.new_zeros((0, 2), dtype=torch.float32),) * 2
    base = torch.minimum(ts_q.min(), ts_k.min())  # stays on the device: no sync

    def split(t):
        rel = t - base  # >= 0
        if rel.is_floating_point():
            hi = torch.floor(rel / 4096)
            return torch.stack([hi, rel - hi * 4096], -1).to(torch.float32)
        return torch.stack([rel >> 12, rel & 4095], -1).to(torch.float32)

    return split(ts_q).contiguous(), split(ts_k).contiguous()


def hstu_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                          max_len: int, alpha: float = 1.0, norm_const: float = 1.0, norm_by_length: bool = False,
                          pos_bias: torch.Tensor | None = None, time_bias: torch.Tensor | None = None,
                          ts_q: torch.Tensor | None = None, ts_k: torch.Tensor | None = None,
                          time_bucket_div: float = 0.301, num_targets: torch.Tensor | None = None) -> torch.Tensor:
    """Jagged q, k (L, H, dqk), v (L, H, dv), offsets (B+1,) -> (L, H, dv); differentiable in q, k, v,
    pos_bias, time_bias. max_len must be >= every sequence length (it sizes the grid). Same math as
    hstu_attention_ref; see the module docstring."""
    if q.dtype not in _LOWP or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {list(_LOWP)}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not INTERPRET and not q.is_cuda:
        raise RuntimeError("hstu_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before this "
                           "module is imported)")
    B, H = offsets.numel() - 1, q.shape[1]
    if q.shape[0] > 0 and max_len < 1:
        raise ValueError(f"max_len must bound the sequence lengths, got {max_len} for L = {q.shape[0]}")
    if B * H > 65535:
        raise ValueError(f"B * H = {B * H} exceeds the CUDA grid's second dimension (65535)")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    offsets = offsets.to(torch.int64).contiguous()
    ts_q, ts_k = _split_ts(ts_q, ts_k) if time_bias is not None else (None, None)
    if num_targets is not None:
        num_targets = num_targets.to(torch.int32).contiguous()
    meta = {"max_len": int(max_len), "alpha": float(alpha), "norm_const": float(norm_const),
            "norm_by_length": bool(norm_by_length), "time_bucket_div": float(time_bucket_div),
            "P": pos_bias.numel() if pos_bias is not None else 1,
            "T": time_bias.numel() if time_bias is not None else 1, "H": H, "bh": B * H}
    pos_bias = pos_bias.contiguous() if pos_bias is not None else None
    time_bias = time_bias.contiguous() if time_bias is not None else None
    return _HSTUAttention.apply(q, k, v, pos_bias, time_bias, offsets, ts_q, ts_k, num_targets, meta)
