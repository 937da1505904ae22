"""Item representations: how an item id becomes a vector, for the input tokens and the retrieval table.

    item_repr = "id"              E_id[i]                                   (memorises, knows nothing new)
              | "sid"             sum_l E_l[code_l(i)]                      (semantic-ID codes only)
              | "id+sid"          E_id[i] + sum_l E_l[code_l(i)]
              | "id+sid+content"  E_id[i] + sum_l E_l[code_l(i)] + W content(i)

The same module embeds input tokens and scores candidates, so an item never seen in training (a cold
item) still gets a vector from its codes and content, both derived from its catalog text / image.
Codes (I+1, Lc) and content vectors (I+1, F) are fixed buffers (saved with the weights, so an export is
self-contained); row 0 is padding and always embeds to zero (query tokens carry item id 0).
`id_dropout` (training only) embeds a share of the occurrences without the id part, as cold items are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from configs.schema import ModelConfig
from data_pipeline.content import load_content
from data_pipeline.queries import load_query_vectors
from data_pipeline.semantic_ids import load_semantic_ids

ITEM_REPRS = ("id", "sid", "id+sid", "id+sid+content")


@dataclass
class ItemFeatures:
    """Per-item side inputs, aligned with dense item ids 0..I (row 0 = padding)."""

    codes: torch.Tensor | None = None  # (I+1, Lc) int64 semantic-ID codes, last level = collision level
    level_sizes: list[int] | None = None  # codes per level, len Lc
    content: torch.Tensor | None = None  # (I+1, F) float32 content vectors (modalities concatenated)
    query_text: torch.Tensor | None = None  # (Q+1, H) float32 query text vectors (row 0 = no query)


def load_item_features(shards_dir: str | Path, cfg: ModelConfig) -> ItemFeatures:
    """What cfg.item_repr and cfg.generative_head need from a shard folder (written by
    `python -m data_pipeline content`): codes for 'sid' modes and the head, vectors for 'content'."""
    feats = ItemFeatures()
    if "sid" in cfg.item_repr or cfg.generative_head:
        sid = load_semantic_ids(Path(shards_dir) / "semantic_ids")
        feats.codes = torch.as_tensor(np.asarray(sid.codes), dtype=torch.int64)  # (I+1, Lc)
        feats.level_sizes = list(sid.level_sizes)
    if "content" in cfg.item_repr:
        vectors = load_content(shards_dir)  # modality name -> (I+1, d), concatenated in name order
        feats.content = torch.as_tensor(np.concatenate([vectors[n] for n in sorted(vectors)], axis=1))
    if "text" in cfg.query_repr:
        feats.query_text = torch.as_tensor(load_query_vectors(shards_dir)[0])
    return feats


class ItemEncoder(nn.Module):
    """ids (any shape) -> (*ids.shape, D). Mode per ITEM_REPRS; see the module docstring."""

    def __init__(self, item_repr: str, num_items: int, dim: int, feats: ItemFeatures | None = None,
                 id_dropout: float = 0.0, content_norm: str = "none"):
        super().__init__()
        if item_repr not in ITEM_REPRS:
            raise ValueError(f"model.item_repr must be one of {ITEM_REPRS}, got {item_repr!r}")
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"model.id_dropout must be in [0, 1), got {id_dropout}")
        if id_dropout and item_repr in ("id", "sid"):
            raise ValueError(f"model.id_dropout needs an id part and another one to fall back on "
                             f"(item_repr 'id+sid' or 'id+sid+content'), got item_repr={item_repr!r}")
        self.id_dropout = id_dropout
        feats = feats or ItemFeatures()
        self.item_repr, self.num_items = item_repr, num_items
        self.id = None
        if "id" in item_repr.split("+"):
            self.id = nn.Embedding(num_items + 1, dim, padding_idx=0)
            nn.init.trunc_normal_(self.id.weight, std=0.02)
            with torch.no_grad():
                self.id.weight[0].zero_()
        self.code_emb, self.level_sizes = None, None
        if feats.codes is not None:  # kept in every mode: the generative head decodes into these tuples
            codes = _checked(feats.codes, "semantic-ID codes", num_items).long()
            sizes = torch.as_tensor(feats.level_sizes, dtype=torch.int64)
            if codes.shape[1] != len(sizes) or (codes.max(0).values >= sizes).any() or codes.min() < 0:
                raise ValueError(f"codes {tuple(codes.shape)} do not fit the level sizes {feats.level_sizes}")
            self.level_sizes = [int(k) for k in sizes]
            self.register_buffer("codes", codes)  # (I+1, Lc)
            # one table for all levels: level l's code c is row offset_l + c
            self.register_buffer("code_offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        if "sid" in item_repr:
            if self.level_sizes is None:
                _checked(None, "semantic-ID codes", num_items)
            self.code_emb = nn.Embedding(sum(self.level_sizes), dim)
            nn.init.trunc_normal_(self.code_emb.weight, std=0.02)
        self.content_proj = None
        if "content" in item_repr:
            content = normalise_content(_checked(feats.content, "content vectors", num_items).float(), content_norm)
            self.register_buffer("content", content)
            self.content_proj = nn.Linear(content.shape[1], dim, bias=False)
            nn.init.normal_(self.content_proj.weight, std=0.02 / content.shape[1] ** 0.5)

    @torch.no_grad()
    def zero_id_rows(self, ids: torch.Tensor) -> None:
        """Zero the id rows of `ids` (model.cold_item_id='zero'); rows no loss reaches stay zero under AdamW
        (zero gradient, zero moments, decay of zero is zero). Needs an id part and another one."""
        if self.id is None or (self.code_emb is None and self.content_proj is None):
            raise ValueError(f"model.cold_item_id='zero' needs an id part and another one to fall back on "
                             f"(item_repr 'id+sid' or 'id+sid+content'), got item_repr={self.item_repr!r}")
        self.id.weight[ids.long()] = 0.0

    def parts(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """ids -> each part the mode has ('id', 'code', 'content'), (*ids.shape, D) each, in summation order."""
        out = {}
        if self.id is not None:
            out["id"] = self.id(ids)
        if self.code_emb is not None:
            out["code"] = self.code_emb(self.codes[ids] + self.code_offsets).sum(-2)  # (..., Lc, D) -> (..., D)
        if self.content_proj is not None:
            # the buffer stays fp32 when an engine casts parameters (DeepSpeed bf16): match the weight
            out["content"] = self.content_proj(self.content[ids].to(self.content_proj.weight.dtype))
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        parts = self.parts(ids)
        if self.training and self.id_dropout:  # not rescaled: a dropped occurrence looks like a cold item
            keep = torch.rand(ids.shape, device=ids.device) >= self.id_dropout
            parts["id"] = parts["id"] * keep.unsqueeze(-1).to(parts["id"].dtype)
        x = sum(parts.values())
        if self.id is None or self.code_emb is not None or self.content_proj is not None:
            x = x * (ids != 0).unsqueeze(-1).to(x.dtype)  # padding (id 0) embeds to zero: query tokens rely on it
        return x


CONTENT_NORMS = ("none", "center", "whiten")


def normalise_content(content: torch.Tensor, how: str) -> torch.Tensor:
    """(I+1, F) content vectors -> the same, centred or ZCA-whitened with statistics over rows 1..I (the
    catalogue's text, known for cold items too; no interaction is used); row 0 (padding) stays zero."""
    if how not in CONTENT_NORMS:
        raise ValueError(f"model.content_norm must be one of {CONTENT_NORMS}, got {how!r}")
    if how == "none":
        return content
    x = content[1:].double()
    x = x - x.mean(0)
    if how == "whiten":
        evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
        x = x @ (evecs * (evals.clamp_min(0) + 1e-5).rsqrt()) @ evecs.T  # ZCA: unit variance per direction
        x = x / x.norm(dim=1).mean()  # mean norm 1, the scale the projection's init assumes
    return torch.cat([torch.zeros_like(content[:1]), x.to(content.dtype)])


def content_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The code-embedding and content-projection weights of every ItemEncoder inside `model` (the parts
    train.content_weight_decay / train.content_lr_mult set apart)."""
    encs = [m for m in model.modules() if isinstance(m, ItemEncoder)]
    return [p for e in encs for part in (e.code_emb, e.content_proj) if part is not None for p in part.parameters()]


@torch.no_grad()
def part_norms(enc: ItemEncoder, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """(n,) L2 norm of each part of items `ids`' vectors ('id', 'code', 'content'; those the mode has) and
    of their sum ('all'), as eval builds them (no id dropout). Through the module calls (ZeRO-3 gathers)."""
    parts = enc.parts(ids)
    parts["all"] = sum(parts.values())
    return {k: v.float().norm(dim=-1) for k, v in parts.items()}


def _checked(t: torch.Tensor | None, what: str, num_items: int) -> torch.Tensor:
    if t is None:
        raise ValueError(f"item_repr needs {what}: run `python -m data_pipeline content --shards ...` first")
    if t.shape[0] != num_items + 1:
        raise ValueError(f"{what} have {t.shape[0]} rows, the shards have {num_items} items (+1 padding row)")
    return t
