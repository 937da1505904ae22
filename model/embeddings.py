"""Token input embeddings: item (x sqrt(D)), query (id and/or projected text, x sqrt(D)), absolute
position, action, token type."""
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


QUERY_REPRS = ("id", "text", "id+text")


class TokenEmbedding(nn.Module):
    """Sum of the embeddings of one token's fields -> (L, D), then dropout."""

    def __init__(self, cfg: ModelConfig, num_items: int, num_queries: int, max_len: int,
                 feats: ItemFeatures | None = None):
        super().__init__()
        D = cfg.dim
        self.scale = math.sqrt(D)  # the research recipe: item_emb * sqrt(D), embeddings init with std 0.02
        # also the retrieval table
        self.item = ItemEncoder(cfg.item_repr, num_items, D, feats, id_dropout=cfg.id_dropout,
                                content_norm=cfg.content_norm)
        self.query, self.query_proj, self.token_type, self.query_shared = None, None, None, False
        if cfg.query_repr not in QUERY_REPRS:
            raise ValueError(f"model.query_repr must be one of {QUERY_REPRS}, got {cfg.query_repr!r}")
        if num_queries > 0:  # query tokens: a query id embedding and/or its projected text + a token type
            self.token_type = nn.Embedding(schema.NUM_TOKEN_TYPES, D)
            nn.init.zeros_(self.token_type.weight)
            if "id" in cfg.query_repr.split("+"):
                self.query = nn.Embedding(num_queries + 1, D, padding_idx=0)
                nn.init.trunc_normal_(self.query.weight, std=0.02)
                with torch.no_grad():  # the init overwrote the padding row: item tokens (query id 0) add nothing
                    self.query.weight[0].zero_()
            if "text" in cfg.query_repr:
                text = feats.query_text if feats is not None else None
                if text is None or text.shape[0] != num_queries + 1:
                    raise ValueError(f"model.query_repr={cfg.query_repr!r} needs query text vectors for "
                                     f"{num_queries} queries (+1 padding row): run `python -m data_pipeline "
                                     f"content --shards ...`; got {None if text is None else tuple(text.shape)}")
                self.register_buffer("query_text", text.float())  # (Q+1, H), row 0 zeros
                self.query_proj = self._query_projection(cfg, text.shape[1], D)  # None = the item content one
        self.pos = nn.Embedding(max_len, D) if cfg.abs_pos_emb else None
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos.weight, std=math.sqrt(1.0 / D))
        self.action = nn.Embedding(schema.NUM_ACTIONS, D) if cfg.use_actions else None
        if self.action is not None:
            nn.init.zeros_(self.action.weight)
        self.dropout = nn.Dropout(cfg.input_dropout)

    def _query_projection(self, cfg: ModelConfig, H: int, D: int) -> nn.Module | None:
        """The query text projection; None = share the item content projection (not registered twice:
        one weight, one state-dict key, as safetensors requires)."""
        self.query_shared = cfg.query_text_proj == "item_content"
        if self.query_shared and cfg.content_norm != "none":
            raise ValueError(f"model.query_text_proj='item_content' feeds raw query text vectors to the item "
                             f"content projection: it needs model.content_norm='none', got {cfg.content_norm!r}")
        if self.query_shared:
            proj = self.item.content_proj
            if proj is None or proj.in_features != H:
                raise ValueError(f"model.query_text_proj='item_content' needs item_repr 'id+sid+content' with "
                                 f"text content vectors of size {H} (the query encoder's), got "
                                 f"{None if proj is None else proj.in_features}")
            return None
        if cfg.query_text_proj != "own":
            raise ValueError(f"model.query_text_proj must be 'own' or 'item_content', got {cfg.query_text_proj!r}")
        proj = nn.Linear(H, D, bias=False)  # unit text vectors through std 0.02: the id embedding's scale
        nn.init.normal_(proj.weight, std=0.02)
        return proj

    def forward(self, batch, positions: torch.Tensor) -> torch.Tensor:
        x = self.item(batch.item_ids) * self.scale  # (L, D); query tokens have item id 0 -> zero row
        if self.token_type is not None:  # query id 0 (item tokens) embeds to zero on both query paths
            x = x + self.token_type(batch.token_types)
            if self.query is not None:
                x = x + self.query(batch.query_ids) * self.scale
            proj = self.item.content_proj if self.query_shared else self.query_proj
            if proj is not None:
                vecs = getattr(batch, "query_vectors", None)  # (L, H) encoded at request time (serving)
                text = self.query_text[batch.query_ids] if vecs is None else vecs  # buffer stays fp32
                x = x + proj(text.to(proj.weight.dtype)) * self.scale
        if self.pos is not None:
            x = x + self.pos(positions.clamp(max=self.pos.num_embeddings - 1))
        if self.action is not None:
            x = x + self.action(batch.actions)
        return self.dropout(x)
