"""Test doubles shared by several test files."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FixedTableModel(nn.Module):
    """A stand-in for SeqRecModel holding only what the losses and the evaluator read: `embed.item`, a
    fixed item table (I+1, D) whose row 0 is the padding, and a forward pass whose every state is the
    first axis e_1, whatever the batch; tests work out the expected scores, ranks and logits by hand.

    FixedTableModel(scores): item i (1..I) gets the unit row [s_i, sqrt(1 - s_i^2)], so it scores s_i
    against every state and items rank in the order of `scores` (equal scores tie exactly).
    FixedTableModel(table=T): any (I+1, D) table, e.g. random and `trainable` for gradient checks."""

    def __init__(self, scores=None, *, table: torch.Tensor | None = None, trainable: bool = False):
        super().__init__()
        if table is None:
            s = torch.as_tensor(scores, dtype=torch.float32)  # (I,), each in [-1, 1]
            table = torch.cat([torch.zeros(1, 2), torch.stack([s, (1 - s**2).clamp_min(0).sqrt()], 1)])  # (I+1, 2)
        self.embed = nn.Module()
        self.embed.item = nn.Embedding.from_pretrained(table, freeze=not trainable)

    def forward(self, batch, last_only: bool = False) -> torch.Tensor:
        w = self.embed.item.weight
        e1 = F.one_hot(torch.tensor(0), w.shape[1]).to(w.dtype)  # (D,)
        return e1.expand(batch.num_sequences if last_only else batch.item_ids.numel(), -1)  # (B or L, D)
