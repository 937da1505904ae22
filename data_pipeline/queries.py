"""Query strings -> text vectors, with the same offline encoder as item content (MiniLM by default).

    manifest id_maps["queries"] (Q+1 strings, 0 = no query) -> embed_texts (cached) -> content/queries.npy (Q+1, H)

Row q is query id q's vector (row 0 zeros), so a query token can be embedded from its text
(`model.query_repr = text | id+text`): a query that never occurs in training still has a vector, since
every query string of the shard set (training, validation and test events alike) is encoded here, and
the server encodes new ones with the same encoder. `content/queries.json` records the encoder's
identity (folder + sha256 of its files) and the settings, so a mismatched encoder can be refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from configs.schema import ContentConfig
from data_pipeline.content import (
    CONTENT_DIR,
    ContentError,
    _atomic_save_npy,
    _atomic_write_text,
    embed_texts,
    encoder_fingerprint,
    text_encoder_path,
)
from data_pipeline.read_shards import load_manifest

QUERIES, QUERIES_META = "queries.npy", "queries.json"


def embed_queries(shards_dir: str | Path, cfg: ContentConfig, progress: bool = True) -> np.ndarray:
    """Encode every query string of a shard set -> (Q+1, H) float32 unit rows (row 0 zeros), written to
    content/queries.npy + content/queries.json. Cached like item content (a re-run loads no model)."""
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    queries = manifest["id_maps"]["queries"]  # [""] + sorted strings
    vectors = embed_texts(queries[1:], cfg, progress)  # (Q, H)
    encoder = text_encoder_path(cfg)
    hidden = vectors.shape[1] if len(vectors) else json.loads((encoder / "config.json").read_text())["hidden_size"]
    out = np.zeros((len(queries), hidden), dtype=np.float32)
    out[1:] = vectors
    _atomic_save_npy(shards_dir / CONTENT_DIR / QUERIES, out)
    meta = dict(num_queries=len(queries) - 1, dim=int(hidden), manifest_content_hash=manifest["content_hash"],
                encoder=str(encoder), encoder_sha256=encoder_fingerprint(encoder), max_length=cfg.max_length,
                bf16=cfg.bf16)
    _atomic_write_text(shards_dir / CONTENT_DIR / QUERIES_META, json.dumps(meta, indent=1) + "\n")
    return out


def load_query_vectors(shards_dir: str | Path) -> tuple[np.ndarray, dict]:
    """content/queries.npy, checked against its record and the shard set -> ((Q+1, H), the record)."""
    shards_dir = Path(shards_dir)
    meta_path = shards_dir / CONTENT_DIR / QUERIES_META
    fix = f"run `python -m data_pipeline content --shards {shards_dir}`"
    if not meta_path.is_file():
        raise ContentError(f"{meta_path} not found: model.query_repr 'text' needs query vectors; {fix}")
    meta = json.loads(meta_path.read_text())
    if meta["manifest_content_hash"] != load_manifest(shards_dir).get("content_hash"):
        raise ContentError(f"{meta_path} was made for another version of this shard set; {fix}")
    vectors = np.load(shards_dir / CONTENT_DIR / QUERIES, allow_pickle=False)
    if vectors.shape != (meta["num_queries"] + 1, meta["dim"]):
        raise ContentError(f"{shards_dir / CONTENT_DIR / QUERIES} has shape {vectors.shape}, {QUERIES_META} says "
                           f"({meta['num_queries'] + 1}, {meta['dim']})")
    return vectors, meta
