"""SASRec blocks (Kang & McAuley 2018) on jagged input: the strong softmax-attention baseline.

Pre-LN: x = x + Drop(MHA(LN(x))); x = x + Drop(FFN(LN(x))), FFN hidden = D with ReLU (the sizes of the
HSTU paper's SASRec). Attention: flash-attn's varlen kernel on CUDA when installed (no padding at all),
otherwise torch SDPA on a padded (B, H, N, d) copy with a causal + padding mask.
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import ModelConfig
from model.embeddings import jagged_positions
from model.lora import dense


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func
    except ImportError:
        if torch.cuda.is_available():
            print("WARNING: flash-attn is not installed; SASRec uses torch SDPA on padded batches "
                  "(pip install -e '.[gpu]' for the varlen kernel).", file=sys.stderr)
        return None


def causal_attention(q, k, v, offsets: torch.Tensor, max_len: int, dropout: float) -> torch.Tensor:
    """Softmax causal attention over jagged q, k, v (L, H, d) -> (L, H, d)."""
    L, H, d = q.shape
    flash = _flash_attn_varlen() if q.is_cuda else None
    if flash is not None:
        cu = offsets.to(torch.int32)
        return flash(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, causal=True)
    B = offsets.numel() - 1
    seq, pos = jagged_positions(offsets, L)
    N = max(int((offsets[1:] - offsets[:-1]).max()), 1) if B else 1
    pad = lambda x: x.new_zeros(B, N, H, d).index_put((seq, pos), x).transpose(1, 2)  # noqa: E731  (B, H, N, d)
    valid = torch.zeros(B, N, dtype=torch.bool, device=q.device)
    valid[seq, pos] = True  # (B, N)
    mask = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()[None] & valid[:, None, :]  # (B, N, N)
    mask = mask | ~valid[:, :, None]  # padded query rows attend to something, else SDPA returns NaN
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask[:, None], dropout_p=dropout)
    return o.transpose(1, 2)[seq, pos]  # (L, H, d)


class SASRecBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.dim
        self.H, self.p = cfg.num_heads, cfg.linear_dropout
        self.norm_attn, self.norm_ffn = nn.LayerNorm(D, eps=1e-8), nn.LayerNorm(D, eps=1e-8)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ffn = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Dropout(cfg.linear_dropout), nn.Linear(D, D))
        self.dropout = nn.Dropout(cfg.linear_dropout)

    def _ffn(self, x: torch.Tensor, dom: torch.Tensor | None) -> torch.Tensor:
        """self.ffn's layers applied one by one, so an adapted Linear gets the rows' domains (the
        nn.Sequential stays: its state-dict keys ffn.0 / ffn.3 are those of every saved SASRec)."""
        h = self.ffn[2](self.ffn[1](dense(self.ffn[0], x, dom)))
        return dense(self.ffn[3], h, dom)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, ts, next_ts, max_len: int,
                domains: torch.Tensor | None = None) -> torch.Tensor:
        """x (L, D) -> (L, D); domains (L,): each token's domain for adapted layers (None without)."""
        L, D = x.shape
        qkv = dense(self.qkv, self.norm_attn(x), domains)
        q, k, v = qkv.reshape(L, 3, self.H, D // self.H).unbind(1)  # (L, H, d) each
        a = causal_attention(q, k, v, offsets, max_len, self.p if self.training else 0.0).reshape(L, D)
        x = x + self.dropout(dense(self.proj, a, domains))
        return x + self.dropout(self._ffn(self.norm_ffn(x), domains))

    def forward_padded(self, x: torch.Tensor, lengths: torch.Tensor, ts=None, next_ts=None,
                       last_only: bool = False, domains: torch.Tensor | None = None) -> torch.Tensor:
        """The same block on right-padded x (B, N, D) with lengths (B,) >= 1 (the exportable form; eval
        only, no attention dropout) -> (B, N, D), or (B, D) with `last_only`; domains (B,) per sequence."""
        B, N, D = x.shape
        dom = None if domains is None else domains[:, None].expand(B, N)  # (B, N)
        qkv = dense(self.qkv, self.norm_attn(x), dom)
        q, k, v = qkv.reshape(B, N, 3, self.H, D // self.H).unbind(2)  # (B, N, H, d)
        j = torch.arange(N, device=x.device)
        # causal and in-range keys; a padded row still sees key 0, so SDPA never returns NaN
        mask = (j[:, None] >= j[None, :])[None] & (j[None, :] < lengths[:, None])[:, None, :]  # (B, N, N)
        t = lambda y: y.transpose(1, 2)  # noqa: E731  (B, N, H, d) <-> (B, H, N, d)
        a = t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask[:, None])).reshape(B, N, D)
        x = x + self.dropout(dense(self.proj, a, dom))
        x = x + self.dropout(self._ffn(self.norm_ffn(x), dom))
        return x.gather(1, (lengths - 1)[:, None, None].expand(B, 1, D))[:, 0] if last_only else x
