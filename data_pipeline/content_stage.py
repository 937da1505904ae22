"""`python -m data_pipeline content`: a shard folder's catalog -> content vectors -> semantic IDs.

    catalog.jsonl.gz -> content.embed_catalog -> content/<modality>.npy        (I+1, d) per modality
                     -> semantic_ids.build_semantic_ids on the WARM items       codebooks fitted here
                     -> semantic_ids.assign_new_items on the cold items         saved codebook, no refit
                     -> semantic_ids/semantic_ids.{safetensors,json}; manifest["semantic_ids"] points there

Cold items (manifest split_rule.cold_items) are treated exactly like items that arrive after training:
the tokenizer never sees them, they get codes from the saved codebook. So a cold-start number measures
what a brand-new item would get, not a codebook that has already seen it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np

from configs.schema import ContentStageConfig
from data_pipeline.content import embed_catalog
from data_pipeline.queries import embed_queries
from data_pipeline.read_shards import cold_items, load_manifest
from data_pipeline.semantic_ids import SemanticIds, assign_new_items, build_semantic_ids, code_stats, save_semantic_ids

SID_DIR = "semantic_ids"


def semantic_ids_with_holdout(vectors: dict[str, np.ndarray], cfg, holdout: np.ndarray,
                              progress: bool = True) -> SemanticIds:
    """Fit on items 1..I except `holdout` (sorted dense ids), assign the holdout with the fitted
    tokenizer; returns codes for all I+1 rows, unique, collision level sized to fit both."""
    n = next(iter(vectors.values())).shape[0]  # I + 1
    warm = np.setdiff1d(np.arange(n), holdout)  # keeps row 0 (padding) first
    sid = build_semantic_ids({k: v[warm] for k, v in vectors.items()}, cfg, progress)
    codes = np.zeros((n, sid.codes.shape[1]), dtype=np.int64)
    codes[warm] = sid.codes
    if len(holdout):  # collision indices continue after the warm items' (sid.codes holds only those)
        with warnings.catch_warnings():  # "collision level must grow": it does, two lines below
            warnings.filterwarnings("ignore", message="new items need collision index")
            codes[holdout] = assign_new_items(sid, {k: v[holdout] for k, v in vectors.items()})
    sizes = list(sid.level_sizes)
    sizes[-1] = max(sizes[-1], int(codes[1:, -1].max()) + 1)  # the collision level must cover new items
    stats = dict(sid.stats, **code_stats(codes[1:, :-1], sizes[:-1]))  # usage/collisions over all items
    stats.update(fitted_on_items=int(len(warm) - 1), assigned_after_fit=int(len(holdout)))
    return dataclasses.replace(sid, codes=codes, level_sizes=sizes, stats=stats)


def run(cfg: ContentStageConfig, progress: bool = True) -> dict:
    """Embed the catalog and build semantic IDs into cfg.shards; returns the summary put in the manifest."""
    shards = Path(cfg.shards)
    manifest = load_manifest(shards)
    vectors = embed_catalog(shards, cfg.content, progress)
    if manifest["vocab"]["num_queries"]:  # query tokens can then be embedded from their text
        embed_queries(shards, cfg.content, progress)
    sid = semantic_ids_with_holdout(vectors, cfg.semantic_ids, cold_items(manifest), progress)
    save_semantic_ids(sid, shards / SID_DIR)
    summary = dict(path=SID_DIR, method=cfg.semantic_ids.method, fusion=sid.fusion, level_sizes=sid.level_sizes,
                   stats=sid.stats, content_modalities={k: int(v.shape[1]) for k, v in vectors.items()})
    manifest["semantic_ids"] = summary
    tmp = shards / f".manifest.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, shards / "manifest.json")  # atomic: readers see the old or the new manifest
    return summary
