"""Popularity baseline, scored by the same full-ranking code as the models (train/evaluate.py).

Popularity = item counts over the training split's histories. It is expressed as a model whose item
vectors are unit vectors at angle (pi/2) * (1 - count / max_count) and whose every state is (1, 0), so
score = cos(angle) rises with the count, equal counts tie exactly, and `evaluate` needs no special case.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from configs.schema import EvalConfig, LoaderConfig
from data_pipeline.collate import make_loader
from data_pipeline.read_shards import cold_items, load_manifest, read_shards
from data_pipeline.schema import ROW_ITEM
from train.evaluate import evaluate


def item_counts(shard_dir, num_items: int, all_reduce=lambda t: t, loader: LoaderConfig = LoaderConfig()) -> np.ndarray:
    """(I+1,) occurrences of each item in the training histories (index 0 = padding, always 0). Under
    several ranks each reads its share and `all_reduce` sums them. `loader`: split rule and bad-shard policy."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for ex in read_shards(shard_dir, "train", replace(loader, num_workers=0), shuffle=False):
        np.add.at(counts, ex["history"][ROW_ITEM], 1)
    counts[0] = 0
    return all_reduce(torch.from_numpy(counts).double()).long().numpy()


class PopularityModel(nn.Module):
    def __init__(self, counts: np.ndarray):
        super().__init__()
        c = torch.tensor(counts, dtype=torch.float64)
        angle = (math.pi / 2) * (1 - c / c.max().clamp(min=1))
        w = torch.stack([torch.cos(angle), torch.sin(angle)], 1).float()
        w[0] = 0
        self.embed = nn.Module()
        self.embed.item = nn.Embedding.from_pretrained(w)

    def forward(self, batch, last_only: bool = False) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]]).expand(batch.num_sequences if last_only else batch.item_ids.numel(), 2)


def popularity_metrics(shard_dir, split: str, loader: LoaderConfig, cfg: EvalConfig,
                       all_reduce=lambda t: t) -> dict:
    manifest = load_manifest(shard_dir)
    n = manifest["vocab"]["num_items"]
    model = PopularityModel(item_counts(shard_dir, n, all_reduce, loader))
    batches = ((b, True) for b in make_loader(shard_dir, split, replace(loader, batch_size=cfg.batch_size),
                                              shuffle=False))
    return evaluate(model, batches, cfg, n, manifest["id_maps"]["domains"], all_reduce=all_reduce,
                    cold=torch.from_numpy(cold_items(manifest)))
