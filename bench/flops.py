"""How far from the hardware: the model's FLOPs per token from its config, and the machine's measured peak.

    flops = train_flops(cfg, lengths, positions, negatives)   # dict: per part, total, per token
    peak  = measure_peak(threads)                             # large fp32 / bf16 matmuls, GFLOP/s

FLOPs count multiply-adds as 2 and only the useful work: attention over the allowed (causal) pairs of
each sequence, not the padded squares an implementation may compute, so a faster layout shows up as
more GFLOP/s only when it does the same useful work faster. Training = 3 x forward (the backward of a
matmul is two matmuls of the same size), the usual convention (e.g. the PaLM/MFU accounting).
Element-wise work (SiLU, LayerNorm, softmax) is left out: it costs time, not FLOPs, on a 2-core CPU,
which is why the achieved GFLOP/s of a D = 50 model sits far below the matmul peak.
"""
from __future__ import annotations

import time

import torch

from configs.schema import ModelConfig


def attention_pairs(lengths: list[int], targets: int = 0) -> int:
    """Allowed (query, key) pairs of causal jagged attention; with `targets` candidates per sequence,
    a candidate sees the history and itself (M-FALCON)."""
    pairs = 0
    for n in lengths:
        t = min(targets, n)
        h = n - t
        pairs += h * (h + 1) // 2 + t * (h + 1)
    return pairs


def forward_flops(cfg: ModelConfig, lengths: list[int], positions: int, negatives: int) -> dict:
    """Forward FLOPs of one batch (sequence `lengths`, `positions` tokens with a target), by part."""
    D, L, layers = cfg.dim, sum(lengths), cfg.num_layers
    if cfg.arch == "hstu":
        out_in = D if cfg.layer_variant == "research" else 3 * D
        linear = 2 * L * (D * 4 * D + out_in * D) * layers  # uvqk (D -> 4D), output projection
        attention = 2 * (D + D) * attention_pairs(lengths) * layers  # q.k and a.v over all heads (H x d = D)
    else:  # SASRec: q, k, v, o projections + a 2-layer FFN of width D
        linear = 2 * L * (4 * D * D + 2 * D * D) * layers
        attention = 2 * (D + D) * attention_pairs(lengths) * layers
    loss = 2 * positions * (1 + negatives) * D  # the positive and every sampled negative: one D-dot each
    return dict(linear=linear, attention=attention, loss=loss)


def train_flops(cfg: ModelConfig, lengths: list[int], positions: int, negatives: int) -> dict:
    """Training FLOPs (3 x forward) of one batch, by part, plus the total and the per-token figure."""
    parts = {k: 3 * v for k, v in forward_flops(cfg, lengths, positions, negatives).items()}
    total = sum(parts.values())
    return dict(parts=parts, total=total, per_token=total / max(1, sum(lengths)))


def measure_peak(n: int = 2048, reps: int = 5, native_bf16: bool = True) -> dict:
    """GFLOP/s of an (n x n) @ (n x n) matmul in fp32 and bf16, best of `reps`, on the current thread
    count. Without native bf16 (torch emulates it, ~30x slower) the bf16 matmul is n / 4 wide so that
    measuring it does not take a minute; its size is recorded."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = n if dtype == torch.float32 or native_bf16 else max(64, n // 4)
        a, b = torch.randn(m, m, dtype=dtype), torch.randn(m, m, dtype=dtype)
        a @ b  # warm-up: oneDNN/MKL pick their kernels on the first call
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[name], out[f"{name}_size"] = round(2 * m ** 3 / best / 1e9, 1), m
    return out
