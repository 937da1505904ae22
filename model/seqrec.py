"""The sequence model: token embeddings -> blocks -> L2-normalised states, and the item table.

    states = model(batch)                                # (L, D), one per token, unit norm
    items  = F.normalize(model.embed.item(ids), dim=-1)  # (n, D), rows `ids` of the item table, unit norm
    score(token t, item i) = <states[t], items[i]>

The item table is read through the `model.embed.item` module call (train/losses.py; train/evaluate.py,
a chunk of ids at a time), never through a weight tensor, so ZeRO-3's parameter gathering hooks fire.

One encoder serves recommendation (history -> next item) and search (history + query token -> next
item); both score the same item table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import ModelConfig
from data_pipeline.read_shards import cold_items
from model.embeddings import TokenEmbedding, jagged_positions
from model.generative import CodeTrie, GenerativeHead
from model.hstu import HSTUBlock
from model.items import ItemFeatures
from model.lora import add_domain_adapters
from model.sasrec import SASRecBlock


class SeqRecModel(nn.Module):
    def __init__(self, cfg: ModelConfig, num_items: int, num_queries: int, max_len: int,
                 feats: ItemFeatures | None = None, num_domains: int = 1):
        super().__init__()
        if cfg.arch not in ("hstu", "sasrec"):
            raise ValueError(f"model.arch must be 'hstu' or 'sasrec', got {cfg.arch!r}")
        self.cfg, self.max_len, self.num_domains = cfg, max_len, num_domains
        self.embed = TokenEmbedding(cfg, num_items, num_queries, max_len, feats)
        if cfg.arch == "hstu":
            self.blocks = nn.ModuleList(HSTUBlock(cfg, max_len) for _ in range(cfg.num_layers))
            self.final_norm = nn.Identity()  # research HSTU: no final LN, output L2-normalised
        else:
            self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_layers))
            self.final_norm = nn.LayerNorm(cfg.dim, eps=1e-8)
        self.adapted = _add_adapters(self.blocks, cfg, num_domains)  # [] = no adapters
        self.domain_emb = nn.Embedding(num_domains, cfg.dim) if cfg.domain_embedding else None
        if self.domain_emb is not None:
            nn.init.zeros_(self.domain_emb.weight)  # starts as the shared model
        self.gen_head, self._tries = None, {}  # item set key -> CodeTrie
        if cfg.generative_head:
            if self.embed.item.level_sizes is None:
                raise ValueError("model.generative_head needs semantic-ID codes: run `python -m data_pipeline content`")
            self.gen_head = GenerativeHead(cfg.dim, self.embed.item.level_sizes)

    @property
    def per_domain(self) -> bool:
        """The model has per-domain parameters (MLoRA adapters or a domain embedding): it reads domain ids."""
        return bool(self.adapted) or self.domain_emb is not None

    def forward(self, batch, last_only: bool = False) -> torch.Tensor:
        """JaggedBatch -> states (L, D), L2-normalised; with `last_only`, (B, D): each sequence's last state
        only (evaluation and serving score nothing else). HSTU's final layer then computes one query row per
        sequence: 1 of 2 layers' attention saved on HSTU, 1 of 8 on HSTU-large."""
        L = batch.item_ids.numel()
        _, positions = jagged_positions(batch.offsets, L)
        x = self.embed(batch, positions)  # (L, D)
        dom = self._token_domains(batch, L)  # (L,) the sequence's domain on each token, None if unused
        if self.domain_emb is not None:
            x = x + self.domain_emb(dom)
        dom = dom if self.adapted else None
        max_len = int(batch.lengths.max()) if batch.num_sequences else 0
        if self.cfg.arch != "hstu":
            for block in self.blocks:
                x = block(x, batch.offsets, batch.timestamps, batch.next_timestamps, max_len, domains=dom)
            x = x[batch.offsets[1:] - 1] if last_only else x
            return F.normalize(self.final_norm(x), dim=-1, eps=1e-6)
        # HSTU: masks and bias indices once per batch, shared by every layer
        plan = self.blocks[0].attention_plan(batch.offsets, batch.timestamps, batch.next_timestamps)
        for i, block in enumerate(self.blocks):
            final = last_only and i == len(self.blocks) - 1
            x = block(x, batch.offsets, batch.timestamps, batch.next_timestamps, max_len, plan, last_only=final,
                      domains=dom)
        return F.normalize(self.final_norm(x), dim=-1, eps=1e-6)

    def _token_domains(self, batch, L: int) -> torch.Tensor | None:
        """Each token takes its sequence's domain (the predicted event's): (B,) -> (L,)."""
        if not self.per_domain:
            return None
        dom = batch.domain
        if dom.numel() and (int(dom.min()) < 0 or int(dom.max()) >= self.num_domains):
            raise ValueError(f"domain ids {sorted(set(dom.tolist()))} outside 0..{self.num_domains - 1}")
        return torch.repeat_interleave(dom, batch.lengths, output_size=L)

    def encode_padded(self, item_ids: torch.Tensor, actions: torch.Tensor, timestamps: torch.Tensor,
                      next_timestamps: torch.Tensor, lengths: torch.Tensor,
                      domains: torch.Tensor | None = None) -> torch.Tensor:
        """Right-padded histories (B, N) + lengths (B,) >= 1 -> each sequence's last state (B, D), unit
        norm: what `forward(batch, last_only=True)` returns for the jagged form of the same tokens (item
        tokens only, no queries), written without data-dependent shapes so torch.export can trace it
        with symbolic B and N (serving's program.pt2). Equality: tests/test_export.py. domains (B,): each
        sequence's domain, needed by a model with adapters or a domain embedding (else ignored)."""
        B, N = item_ids.shape
        positions = torch.arange(N, device=item_ids.device)[None, :].expand(B, N)
        zeros = torch.zeros_like(item_ids)
        tokens = _Tokens(item_ids=item_ids, query_ids=zeros, token_types=zeros, actions=actions)
        x = self.embed(tokens, positions)  # (B, N, D)
        if self.per_domain and domains is None:
            raise ValueError("this model has per-domain parameters: pass domains (B,)")
        if self.domain_emb is not None:
            x = x + self.domain_emb(domains)[:, None]
        dom = domains if self.adapted else None
        for i, block in enumerate(self.blocks):
            x = block.forward_padded(x, lengths, timestamps, next_timestamps, last_only=i == len(self.blocks) - 1,
                                     domains=dom)
        return F.normalize(self.final_norm(x), dim=-1, eps=1e-6)

    def code_trie(self, items: torch.Tensor | None = None) -> CodeTrie:
        """Prefix trie of the semantic-ID tuples of `items` (sorted ids; None = every item), built once per
        item set, on the codes' device. Training passes the warm items, decoding uses every item."""
        codes = self.embed.item.codes
        key = None if items is None else (items.numel(), int(items[0]), int(items[-1]), int(items.sum()))
        trie = self._tries.get(key)
        if trie is None or trie.device != codes.device:
            trie = self._tries[key] = CodeTrie(codes, self.embed.item.level_sizes, items).to(codes.device)
        return trie


@dataclass
class _Tokens:
    """The per-token fields TokenEmbedding reads, in any shape (here (B, N))."""

    item_ids: torch.Tensor
    query_ids: torch.Tensor
    token_types: torch.Tensor
    actions: torch.Tensor


def build_model(cfg: ModelConfig, manifest: dict, max_len: int, feats: ItemFeatures | None = None) -> SeqRecModel:
    """The model for a shard set: vocab sizes come from its manifest; `feats` (semantic-ID codes, content
    vectors) from `model.items.load_item_features` when cfg.item_repr needs them."""
    v = manifest["vocab"]
    model = SeqRecModel(cfg, v["num_items"], v["num_queries"], max_len, feats, num_domains=v.get("num_domains", 1))
    if cfg.cold_item_id == "zero":
        model.embed.item.zero_id_rows(torch.from_numpy(cold_items(manifest)))
    elif cfg.cold_item_id != "random":
        raise ValueError(f"model.cold_item_id must be 'random' or 'zero', got {cfg.cold_item_id!r}")
    return model


def _add_adapters(blocks: nn.ModuleList, cfg: ModelConfig, num_domains: int) -> list[str]:
    """model.adapters='mlora': per-domain LoRA on the blocks' dense layers named by adapter_targets
    (every nn.Linear of the blocks when empty); returns the adapted layer names."""
    if cfg.adapters == "none":
        return []
    if cfg.adapters != "mlora":
        raise ValueError(f"model.adapters must be 'none' or 'mlora', got {cfg.adapters!r}")
    patterns = [rf"\d+\.{re.escape(t)}" for t in cfg.adapter_targets] or [r".*"]
    return add_domain_adapters(blocks, patterns, num_domains, cfg.adapter_alpha, cfg.adapter_rank,
                               cfg.adapter_scale, cfg.adapter_dropout)


TRAIN_ONLY = ("distill_align",)  # submodules training attaches to a model (train/distill.py), never served


def serving_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights without training-only submodules (TRAIN_ONLY, e.g. distillation's alignment
    projection): exactly what a SeqRecModel of the run's model config holds."""
    return {k: v for k, v in state.items() if k.split(".", 1)[0] not in TRAIN_ONLY}


ENCODE_INPUTS = ("item_ids", "actions", "timestamps", "next_timestamps", "lengths")  # encode_padded's arguments


def model_from_state(cfg: ModelConfig, facts: dict, state: dict[str, torch.Tensor]) -> SeqRecModel:
    """The eval-mode model from exported weights alone (train/export.py writes them, serve/ reads them):
    semantic-ID codes and content vectors are buffers inside `state`. facts: num_items, num_queries,
    max_len, level_sizes (None without codes). Loads strictly: a missing or extra tensor raises."""
    feats = ItemFeatures(codes=state.get("embed.item.codes"), level_sizes=facts.get("level_sizes"),
                         content=state.get("embed.item.content"), query_text=state.get("embed.query_text"))
    model = SeqRecModel(cfg, facts["num_items"], facts["num_queries"], facts["max_len"], feats,
                        num_domains=facts.get("num_domains", 1))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval()
