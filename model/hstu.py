"""HSTU blocks on jagged input (Zhai et al. 2024). Attention goes through kernels.hstu_attention.

Research layer (the one behind the public tables), per block on x (L, D):
    U, V, Q, K = split(SiLU(LN(x) @ W_uvqk));  A V = HSTU-attention(Q, K, V, rab)
    y = x + W_o(dropout(U * LN(A V)))                      LN without affine, no 1/sqrt(d)
Production layer: U, V, Q, K = split(LN_affine(x) @ W_uvqk + b), SiLU on U only, alpha = 1/sqrt(d),
    y = x + W_o(dropout([U, A V, U * LN_affine(A V)]))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import ModelConfig
from kernels.hstu_attention import (
    AttentionPlan,
    attention_plan,
    hstu_attention,
    hstu_attention_last,
    hstu_attention_padded,
)
from model.lora import dense


class HSTUBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"model.dim {cfg.dim} is not divisible by model.num_heads {cfg.num_heads}")
        if cfg.layer_variant not in ("research", "production"):
            raise ValueError(f"model.layer_variant must be research or production, got {cfg.layer_variant!r}")
        self.cfg, self.H, self.d = cfg, cfg.num_heads, cfg.dim // cfg.num_heads
        D, research = cfg.dim, cfg.layer_variant == "research"
        self.research = research
        self.uvqk = nn.Linear(D, 4 * D, bias=not research)
        nn.init.normal_(self.uvqk.weight, std=0.02)
        if not research:
            nn.init.zeros_(self.uvqk.bias)
            self.norm_in, self.norm_attn = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
        self.out = nn.Linear(D if research else 3 * D, D, bias=research)
        nn.init.xavier_uniform_(self.out.weight)
        self.dropout = nn.Dropout(cfg.linear_dropout)
        # table sizes kept as ints: under ZeRO-3 a parameter's numel() is 0 outside its module's forward
        self.pos_len = max_len if cfg.pos_bias else 0
        self.time_len = cfg.num_time_buckets + 1 if cfg.time_bias else 0
        self.pos_bias = nn.Parameter(torch.randn(self.pos_len) * 0.02) if cfg.pos_bias else None
        self.time_bias = nn.Parameter(torch.randn(self.time_len) * 0.02) if cfg.time_bias else None
        self.norm_const = float(cfg.attn_norm_const or max_len)

    def attention_plan(self, offsets: torch.Tensor, ts: torch.Tensor, next_ts: torch.Tensor) -> AttentionPlan | None:
        """Index work shared by every block of a model (same bias table sizes): build once per batch."""
        return attention_plan(offsets, backend=self.cfg.attention_backend,
                              pos_len=self.pos_len, time_len=self.time_len,
                              ts_q=next_ts, ts_k=ts, time_bucket_div=self.cfg.time_bucket_div,
                              norm_by_length=self.cfg.norm_by_length)

    def _project(self, x: torch.Tensor, dom: torch.Tensor | None):
        """x (..., D), dom (...) row domains (None without adapters) -> u, v, q, k (..., D) each."""
        D = x.shape[-1]
        if self.research:
            return F.silu(dense(self.uvqk, F.layer_norm(x, (D,), eps=1e-6), dom)).split(D, dim=-1)
        u, v, q, k = dense(self.uvqk, self.norm_in(x), dom).split(D, dim=-1)
        return F.silu(u), v, q, k

    def _output(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor, dom: torch.Tensor | None) -> torch.Tensor:
        """Residual + W_o(dropout(gated attention)); x, u, attn (..., D), dom (...)."""
        if self.research:
            o = u * F.layer_norm(attn, (attn.shape[-1],), eps=1e-6)
        else:
            o = torch.cat([u, attn, u * self.norm_attn(attn)], dim=-1)  # (..., 3D)
        return x + dense(self.out, self.dropout(o), dom)

    def _attention_kw(self) -> dict:
        return dict(alpha=1.0 if self.research else 1.0 / math.sqrt(self.d), norm_const=self.norm_const,
                    norm_by_length=self.cfg.norm_by_length, pos_bias=self.pos_bias, time_bias=self.time_bias,
                    time_bucket_div=self.cfg.time_bucket_div)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, ts: torch.Tensor, next_ts: torch.Tensor,
                max_len: int, plan: AttentionPlan | None = None, last_only: bool = False,
                domains: torch.Tensor | None = None) -> torch.Tensor:
        """x (L, D) -> (L, D); with `last_only`, (B, D): only each sequence's last token's output (a final
        layer at evaluation: keys and values still come from every token, queries from the last ones).
        domains (L,): each token's domain, read by adapted layers (None without adapters)."""
        L, D = x.shape
        u, v, q, k = self._project(x, domains)
        kw = dict(backend=self.cfg.attention_backend, max_len=max_len, ts_q=next_ts, ts_k=ts, **self._attention_kw())
        shape = (L, self.H, self.d)
        if last_only:
            last = offsets[1:] - 1
            attn = hstu_attention_last(q.reshape(shape), k.reshape(shape), v.reshape(shape), offsets, **kw)
            x, u, attn = x[last], u[last], attn.reshape(-1, D)  # (B, D)
            domains = None if domains is None else domains[last]
        else:
            attn = hstu_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), offsets, plan=plan,
                                  **kw).reshape(L, D)  # (L, D)
        return self._output(x, u, attn, domains)

    def forward_padded(self, x: torch.Tensor, lengths: torch.Tensor, ts: torch.Tensor, next_ts: torch.Tensor,
                       last_only: bool = False, domains: torch.Tensor | None = None) -> torch.Tensor:
        """The same layer on right-padded input, free of data-dependent shapes (torch.export): x (B, N, D),
        lengths (B,) >= 1, ts / next_ts (B, N) -> (B, N, D), or (B, D) with `last_only`. Rows past a
        sequence's length are computed but never read by a valid row (keys past the length are masked).
        domains (B,): each sequence's domain for adapted layers."""
        B, N, D = x.shape
        dom = None if domains is None else domains[:, None].expand(B, N)  # (B, N)
        u, v, q, k = self._project(x, dom)
        shape = (B, N, self.H, self.d)
        attn = hstu_attention_padded(q.reshape(shape), k.reshape(shape), v.reshape(shape), lengths,
                                     ts_q=next_ts, ts_k=ts, last_only=last_only, **self._attention_kw())
        if last_only:
            last = (lengths - 1)[:, None, None].expand(B, 1, D)
            x, u, dom = x.gather(1, last)[:, 0], u.gather(1, last)[:, 0], domains  # (B, D), (B,)
        return self._output(x, u, attn.reshape(*x.shape[:-1], D), dom)
