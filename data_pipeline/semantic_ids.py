"""Content vectors -> semantic-ID codes (residual k-means or TIGER's RQ-VAE) + a collision level, saved with
the tokenizer so new items get codes without retraining.

Input `{modality: (I+1, d) float32}` aligned with dense item ids; row 0 is padding: never quantised, codes all
0, never part of collisions (nor of the trie). Each modality is L2-normalised per row (so under 'concat' each
weighs the same); an all-zero row (missing modality) stays zero and IS quantised, so such items share one
base tuple and differ only in the collision level (`stats["zero_vector_items"]` counts them).
Output codes (I+1, L') int64: `levels` residual levels per tokenizer, level-wise concatenated over tokenizers
('per_modality': [text levels, image levels]), then TIGER's dedup level (0, 1, 2, ... in item order).
k-means with N < k points reduces k to N with a warning (that level's size is then N); the RQ-VAE needs
N >= codebook_size (fixed codebook shape) and raises ValueError otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from configs.schema import SemanticIdConfig
from data_pipeline.quantize import RQVAE, fit_rq_kmeans, rq_assign, train_rqvae

FORMAT_VERSION = 1
TENSORS_FILE = "semantic_ids.safetensors"
META_FILE = "semantic_ids.json"


# ----------------------------------------------------------------------------- collisions and stats

def resolve_collisions(codes: np.ndarray) -> np.ndarray:
    """codes (N, L) with row 0 = padding -> (N, L+1): items sharing an L-tuple get 0, 1, 2, ... in item order
    as an extra last level; row 0 gets all zeros and is not counted. Rows 1.. are then unique."""
    codes = np.asarray(codes, dtype=np.int64)
    out = np.zeros((codes.shape[0], codes.shape[1] + 1), dtype=np.int64)
    if codes.shape[0] <= 1:
        return out
    _, group = np.unique(codes[1:], axis=0, return_inverse=True)
    group = group.reshape(-1)  # (N-1,)
    order = np.argsort(group, kind="stable")  # items grouped, item order kept inside a group
    starts = np.searchsorted(group[order], group[order], side="left")  # first slot of each item's group
    rank = np.empty_like(group)
    rank[order] = np.arange(len(group)) - starts
    out[1:, :-1] = codes[1:]
    out[1:, -1] = rank
    return out


def code_stats(codes_base: np.ndarray, codebook_size: int | Sequence[int]) -> dict:
    """Base codes of real items (N, L) -- no padding row -- -> usage per level (distinct codes / level size),
    distinct tuples, collision rate (share of items whose tuple another item also has), max group size."""
    codes_base = np.asarray(codes_base, dtype=np.int64)
    n, levels = codes_base.shape
    sizes = [codebook_size] * levels if isinstance(codebook_size, int) else list(codebook_size)
    _, counts = np.unique(codes_base, axis=0, return_counts=True)
    return dict(
        items=int(n),
        usage=[len(np.unique(codes_base[:, i])) / sizes[i] for i in range(levels)],
        distinct_tuples=int(len(counts)),
        collision_rate=float(counts[counts > 1].sum() / n) if n else 0.0,
        max_group=int(counts.max()) if n else 0,
    )


def relative_error(x: Tensor, recon: Tensor) -> float:
    """Mean over rows with ||x|| > 0 of ||x - recon||^2 / ||x||^2 (all-zero rows have no relative error)."""
    norm = x.float().pow(2).sum(1)
    keep = norm > 0
    if not bool(keep.any()):
        return 0.0
    return float(((x.float() - recon).pow(2).sum(1)[keep] / norm[keep]).mean())


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class Tokenizer:
    """A fitted tokenizer reading `modalities` (each L2-normalised, concatenated). rq_kmeans: state holds
    'codebook.<l>' (k_l, d); rqvae: state is RQVAE.state_dict() and arch its constructor arguments."""

    method: str
    modalities: list[str]
    state: dict[str, Tensor]
    arch: dict = field(default_factory=dict)

    def level_sizes(self) -> list[int]:
        if self.method == "rqvae":
            return [self.arch["codebook_size"]] * self.arch["levels"]
        return [self.state[f"codebook.{i}"].shape[0] for i in range(len(self.state))]

    def assign(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, d) prepared vectors -> codes (N, levels) int64, reconstruction (N, d)."""
        if self.method == "rqvae":
            model = RQVAE(**self.arch)
            model.load_state_dict(self.state)
            return model.eval().encode(x)
        return rq_assign(x, [self.state[f"codebook.{i}"] for i in range(len(self.state))])


@dataclass
class SemanticIds:
    """Codes (I+1, L') int64 (row 0 padding, collision level last), the size of every level, the fitted
    tokenizers by name ('text', or 'text+image' under concat), fusion, stats, config and input dims."""

    codes: np.ndarray
    level_sizes: list[int]
    tokenizers: dict[str, Tokenizer]
    fusion: str
    stats: dict
    config: SemanticIdConfig
    modality_dims: dict[str, int]


def _prepare(vectors: dict[str, np.ndarray], modalities: Sequence[str], dims: dict[str, int] | None = None) -> Tensor:
    """{name: (N, d)} -> (N, sum d) float32: every selected modality L2-normalised per row, then concatenated."""
    parts = []
    for m in modalities:
        if m not in vectors:
            raise ValueError(f"semantic IDs: modality {m!r} missing from the vectors (have {sorted(vectors)})")
        v = torch.as_tensor(np.asarray(vectors[m], dtype=np.float32))
        if v.ndim != 2 or (dims is not None and v.shape[1] != dims[m]):
            want = f"(N, {dims[m]})" if dims is not None else "(N, d)"
            raise ValueError(f"semantic IDs: modality {m!r} has shape {tuple(v.shape)}, expected {want}")
        parts.append(v / v.norm(dim=1, keepdim=True).clamp_min(1e-12))  # zero rows stay zero
    if len({p.shape[0] for p in parts}) > 1:
        raise ValueError(f"semantic IDs: modalities have different row counts {[p.shape[0] for p in parts]}")
    return torch.cat(parts, 1)


def _fit_tokenizer(x: Tensor, modalities: list[str], cfg: SemanticIdConfig, progress: bool) -> Tokenizer:
    """Prepared item vectors x (I, d) -> a fitted Tokenizer of cfg.method."""
    if cfg.method == "rqvae":
        model = train_rqvae(x, cfg, progress)
        return Tokenizer("rqvae", modalities, {k: v.detach().clone() for k, v in model.state_dict().items()},
                         model.arch)
    books = fit_rq_kmeans(x, cfg.levels, cfg.codebook_size, cfg.kmeans_iters, cfg.seed)
    return Tokenizer("rq_kmeans", modalities, {f"codebook.{i}": b for i, b in enumerate(books)})


def build_semantic_ids(vectors: dict[str, np.ndarray], cfg: SemanticIdConfig, progress: bool = True) -> SemanticIds:
    """Per-modality item vectors {name: (I+1, d)} (row 0 padding) -> SemanticIds with codes (I+1, L'),
    L' = levels * (1 if concat else #modalities) + 1."""
    if cfg.method not in ("rq_kmeans", "rqvae") or cfg.fusion not in ("concat", "per_modality"):
        raise ValueError(f"semantic IDs: unknown method {cfg.method!r} or fusion {cfg.fusion!r}")
    if not cfg.modalities:
        raise ValueError("semantic IDs: cfg.modalities is empty")
    groups = [list(cfg.modalities)] if cfg.fusion == "concat" else [[m] for m in cfg.modalities]
    tokenizers, parts, sizes, recon_err = {}, [], [], {}
    for mods in groups:
        x = _prepare(vectors, mods)[1:]  # (I, d): row 0 is padding, never quantised
        if x.shape[0] == 0:
            raise ValueError("semantic IDs: no items (only the padding row)")
        name = "+".join(mods)
        tokenizers[name] = _fit_tokenizer(x, mods, cfg, progress)
        codes, recon = tokenizers[name].assign(x)
        parts.append(codes)
        sizes += tokenizers[name].level_sizes()
        recon_err[name] = relative_error(x, recon)
    base = torch.cat(parts, 1).numpy()  # (I, L)
    padded = np.zeros((base.shape[0] + 1, base.shape[1]), dtype=np.int64)
    padded[1:] = base
    codes = resolve_collisions(padded)
    stats = code_stats(base, sizes)
    stats["recon_rel_error"] = recon_err
    stats["zero_vector_items"] = {m: int((~np.asarray(vectors[m][1:]).any(1)).sum()) for m in cfg.modalities}
    sizes.append(int(codes[1:, -1].max()) + 1)  # collision level: max group size
    dims = {m: int(np.asarray(vectors[m]).shape[1]) for m in cfg.modalities}
    return SemanticIds(codes, sizes, tokenizers, cfg.fusion, stats, cfg, dims)


def assign_new_items(sid: SemanticIds, new_vectors: dict[str, np.ndarray]) -> np.ndarray:
    """New items {name: (M, d)} (no padding row) -> codes (M, L') with the saved tokenizers (no retraining).
    The collision level takes the next free index of each base tuple, counting existing items and earlier
    new items, so existing + new codes stay unique. Warns when it outgrows level_sizes[-1] (the model's
    vocabulary for that level)."""
    parts = [tok.assign(_prepare(new_vectors, tok.modalities, sid.modality_dims))[0]
             for tok in sid.tokenizers.values()]
    base = torch.cat(parts, 1).numpy()  # (M, L)
    next_free: dict[bytes, int] = {}
    for row in sid.codes[1:]:
        key = row[:-1].tobytes()
        next_free[key] = max(next_free.get(key, 0), int(row[-1]) + 1)
    extra = np.zeros(base.shape[0], dtype=np.int64)
    for i, row in enumerate(base):
        key = row.tobytes()
        extra[i] = next_free.get(key, 0)
        next_free[key] = int(extra[i]) + 1
    if len(extra) and extra.max() >= sid.level_sizes[-1]:
        warnings.warn(f"new items need collision index {int(extra.max())} >= collision level size "
                      f"{sid.level_sizes[-1]}; the model's code vocabulary must grow to use them")
    return np.concatenate([base, extra[:, None]], 1)


# ----------------------------------------------------------------------------- save / load

def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) next to `path`, then rename over it: a crash never leaves a half-written file at `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_semantic_ids(sid: SemanticIds, folder: Path) -> None:
    """-> folder/semantic_ids.safetensors (codes + tokenizer tensors '<tokenizer>/<key>') and
    folder/semantic_ids.json (config, level sizes, stats, dims, tokenizer layout), written last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"codes": torch.from_numpy(np.ascontiguousarray(sid.codes, dtype=np.int64))}
    for name, tok in sid.tokenizers.items():
        tensors.update({f"{name}/{k}": v.detach().contiguous().clone() for k, v in tok.state.items()})
    meta = dict(format_version=FORMAT_VERSION, config=dataclasses.asdict(sid.config), fusion=sid.fusion,
                level_sizes=list(sid.level_sizes), stats=sid.stats, modality_dims=sid.modality_dims,
                tokenizers={name: dict(method=t.method, modalities=t.modalities, arch=t.arch, keys=list(t.state))
                            for name, t in sid.tokenizers.items()})
    _atomic_write(folder / TENSORS_FILE, lambda p: save_file(tensors, str(p)))
    # the json, written last, pins the tensors file: a save interrupted between the two renames is detected
    meta["tensors_sha256"] = hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest()
    _atomic_write(folder / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


def load_semantic_ids(folder: Path) -> SemanticIds:
    """Inverse of save_semantic_ids; FileNotFoundError naming the missing file, ValueError on a mismatch."""
    folder = Path(folder)
    for path in (folder / META_FILE, folder / TENSORS_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"semantic IDs: {path} not found (written by save_semantic_ids)")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / META_FILE}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    if hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest() != meta["tensors_sha256"]:
        raise ValueError(f"{folder / TENSORS_FILE} does not match {META_FILE} (interrupted save?); rebuild it")
    tensors = load_file(str(folder / TENSORS_FILE))
    tokenizers = {name: Tokenizer(t["method"], t["modalities"], {k: tensors[f"{name}/{k}"] for k in t["keys"]},
                                  t["arch"]) for name, t in meta["tokenizers"].items()}
    return SemanticIds(tensors["codes"].numpy(), meta["level_sizes"], tokenizers, meta["fusion"], meta["stats"],
                       SemanticIdConfig(**meta["config"]), meta["modality_dims"])
