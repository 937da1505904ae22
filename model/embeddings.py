"""Token input embeddings: item id (x sqrt(D)), query id, absolute position, action, token type."""
from __future__ import annotations

import math

import torch
from torch import nn

from configs.schema import ModelConfig
from data_pipeline import schema
from model.items import ItemEncoder, ItemFeatures


def jagged_positions(offsets: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """offsets (B+1,) -> (sequence index (L,), position within its sequence (L,))."""
    lengths = offsets[1:] - offsets[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=L)
    return seq, torch.arange(L, device=offsets.device) - offsets[seq]


class TokenEmbedding(nn.Module):
    """Sum of the embeddings of one token's fields -> (L, D), then dropout."""

    def __init__(self, cfg: ModelConfig, num_items: int, num_queries: int, max_len: int,
                 feats: ItemFeatures | None = None):
        super().__init__()
        D = cfg.dim
        self.scale = math.sqrt(D)  # the research recipe: item_emb * sqrt(D), embeddings init with std 0.02
        self.item = ItemEncoder(cfg.item_repr, num_items, D, feats)  # also the retrieval table
        self.query = None
        if num_queries > 0:  # query tokens: a query id embedding + a token-type embedding
            self.query = nn.Embedding(num_queries + 1, D, padding_idx=0)
            self.token_type = nn.Embedding(schema.NUM_TOKEN_TYPES, D)
            nn.init.trunc_normal_(self.query.weight, std=0.02)
            nn.init.zeros_(self.token_type.weight)
        self.pos = nn.Embedding(max_len, D) if cfg.abs_pos_emb else None
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos.weight, std=math.sqrt(1.0 / D))
        self.action = nn.Embedding(schema.NUM_ACTIONS, D) if cfg.use_actions else None
        if self.action is not None:
            nn.init.zeros_(self.action.weight)
        self.dropout = nn.Dropout(cfg.input_dropout)

    def forward(self, batch, positions: torch.Tensor) -> torch.Tensor:
        x = self.item(batch.item_ids) * self.scale  # (L, D); query tokens have item id 0 -> zero row
        if self.query is not None:
            x = x + self.query(batch.query_ids) * self.scale + self.token_type(batch.token_types)
        if self.pos is not None:
            x = x + self.pos(positions.clamp(max=self.pos.num_embeddings - 1))
        if self.action is not None:
            x = x + self.action(batch.actions)
        return self.dropout(x)
