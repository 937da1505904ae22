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
from torch import Tensor, nn
from tqdm import tqdm

from configs.schema import SemanticIdConfig

FORMAT_VERSION = 1
TENSORS_FILE = "semantic_ids.safetensors"
META_FILE = "semantic_ids.json"
# distance blocks of at most 2**22 floats (16 MiB): 12,101 x 256 Beauty distances fit in one block, a
# 1M-item catalogue takes 62 blocks instead of a 1 GiB matrix
CHUNK_ELEMS = 1 << 22
ENCODE_ROWS = 8192  # RQ-VAE inference rows per forward: 8192 x 512 hidden floats = 16 MiB


# ----------------------------------------------------------------------------- k-means

def nearest(x: Tensor, c: Tensor, chunk_elems: int = CHUNK_ELEMS) -> tuple[Tensor, Tensor]:
    """x (N, d), c (k, d) -> index of the nearest row of c (N,) int64, its squared distance (N,).
    Computed in row blocks so memory stays at `chunk_elems` floats whatever N is."""
    rows = max(1, chunk_elems // max(1, c.shape[0]))
    c_sq = c.pow(2).sum(1)  # (k,)
    idx, dist = [x.new_zeros(0, dtype=torch.int64)], [x.new_zeros(0)]
    for s in range(0, x.shape[0], rows):
        xb = x[s:s + rows]  # (b, d)
        d2 = (xb.pow(2).sum(1, keepdim=True) - 2 * xb @ c.T + c_sq).clamp_min_(0)  # (b, k)
        m, i = d2.min(1)
        idx.append(i)
        dist.append(m)
    return torch.cat(idx), torch.cat(dist)


def kmeans_pp_init(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: x (N, d) -> k initial centroids (k, d), each drawn with probability ~ D(x)^2.
    When every point already sits on a centroid (D = 0 everywhere, duplicated data) draws are uniform."""
    n = x.shape[0]
    x_sq = x.pow(2).sum(1)  # (N,)
    # ||x - c||^2 as a mat-vec: 4x faster than (x - c).pow(2).sum(1) on 12,101 x 384 (0.27 s vs 1.1 s per 256)
    dist_to = lambda j: (x_sq - 2 * (x @ x[j]) + x_sq[j]).clamp_min_(0)
    j = int(torch.randint(n, (1,), generator=generator))
    chosen = [j]
    d2 = dist_to(j)  # (N,) squared distance to the nearest chosen centroid
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            j = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:
            j = int(torch.randint(n, (1,), generator=generator))
        chosen.append(j)
        d2 = torch.minimum(d2, dist_to(j))
    return x[chosen].clone()


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator, chunk_elems: int = CHUNK_ELEMS) -> Tensor:
    """Lloyd's k-means with k-means++ seeding: x (N, d) -> centroids (k', d), k' = min(k, N) (warns if N < k).
    An empty cluster is re-seeded at the points farthest from their centroid (they are the worst served).
    Stops early once assignments no longer change."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n < k:
        warnings.warn(f"k-means: {n} points < k={k}; using k={n} (this level then has {n} codes)")
        k = n
    c = kmeans_pp_init(x, k, generator)
    prev: Tensor | None = None
    for _ in range(iters):
        assign, d2 = nearest(x, c, chunk_elems)  # (N,), (N,)
        counts = torch.bincount(assign, minlength=k)  # (k,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # (k, d)
        c = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):
            far = torch.argsort(d2, descending=True, stable=True)[:len(empty)]
            c[empty] = x[far]
        elif prev is not None and torch.equal(assign, prev):
            break
        prev = assign
    return c


def fit_rq_kmeans(x: Tensor, levels: int, k: int, iters: int, seed: int) -> list[Tensor]:
    """Residual k-means: x (N, d) -> `levels` codebooks (k', d); level l clusters what levels < l left over."""
    g = torch.Generator().manual_seed(seed)
    residual = x.float()
    books = []
    for _ in range(levels):
        book = kmeans(residual, k, iters, g)
        idx, _ = nearest(residual, book)
        residual = residual - book[idx]
        books.append(book)
    return books


def rq_assign(x: Tensor, codebooks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """x (N, d) -> codes (N, levels) int64 (nearest centroid of the residual at every level), recon (N, d)."""
    residual = x.float()
    codes = []
    for book in codebooks:
        idx, _ = nearest(residual, book)
        residual = residual - book[idx]
        codes.append(idx)
    return torch.stack(codes, 1), x.float() - residual


# ----------------------------------------------------------------------------- RQ-VAE

def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through `dims` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """TIGER's tokenizer: MLP encoder d -> hidden -> latent, residual quantiser (levels x codebook_size
    entries of size latent), mirrored MLP decoder. `history` holds the per-epoch means of train_rqvae."""

    def __init__(self, in_dim: int, hidden: Sequence[int], latent: int, levels: int, codebook_size: int,
                 commitment: float = 0.25):
        super().__init__()
        self.arch = dict(in_dim=in_dim, hidden=list(hidden), latent=latent, levels=levels,
                         codebook_size=codebook_size, commitment=commitment)
        self.commitment = commitment
        self.encoder = _mlp([in_dim, *hidden, latent])
        self.decoder = _mlp([latent, *reversed(hidden), in_dim])
        self.codebooks = nn.Parameter(torch.zeros(levels, codebook_size, latent))  # set by init_codebooks
        self.history: list[dict[str, float]] = []

    def quantise(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, latent) -> codes (B, levels), z_q (B, latent) = sum of chosen entries, rq loss (scalar):
        sum over levels of ||sg[r] - e||^2 (moves the codebook) + beta ||r - sg[e]||^2 (moves the encoder)."""
        residual, z_q, loss, codes = z, torch.zeros_like(z), z.new_zeros(()), []
        for book in self.codebooks:  # (K, latent)
            idx, _ = nearest(residual.detach(), book.detach())
            e = book[idx]  # (B, latent)
            loss = loss + (residual.detach() - e).pow(2).sum(1).mean()
            loss = loss + self.commitment * (residual - e.detach()).pow(2).sum(1).mean()
            z_q = z_q + e
            residual = residual - e.detach()  # each codebook learns only from its own level's loss
            codes.append(idx)
        return torch.stack(codes, 1), z_q, loss

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, d) -> reconstruction (B, d), codes (B, levels), rq loss; straight-through z -> z_q."""
        z = self.encoder(x)
        codes, z_q, rq_loss = self.quantise(z)
        z_st = z + (z_q - z).detach()  # forward value z_q, gradient of the decoder flows to the encoder
        return self.decoder(z_st), codes, rq_loss

    @torch.no_grad()
    def init_codebooks(self, z: Tensor, iters: int, generator: torch.Generator) -> None:
        """k-means-initialise every level on latents z (B, latent), level by level on the residuals, so no
        entry starts dead (TIGER asks for > 80% usage). Needs B >= codebook_size."""
        k = self.codebooks.shape[1]
        if z.shape[0] < k:
            raise ValueError(f"RQ-VAE codebook init needs >= codebook_size={k} items, got {z.shape[0]}; "
                             "use method 'rq_kmeans' or a smaller codebook_size")
        residual = z
        for level in range(self.codebooks.shape[0]):
            book = kmeans(residual, k, iters, generator)
            idx, _ = nearest(residual, book)
            residual = residual - book[idx]
            self.codebooks[level].copy_(book)

    @torch.no_grad()
    def restart_dead(self, z: Tensor, used: Tensor, generator: torch.Generator) -> int:
        """Move entries unused for a whole epoch (used (levels, K) bool) onto random residuals of latents
        z (B, latent) at their level, where data now is. Returns how many moved."""
        residual, moved = z, 0
        for level, book in enumerate(self.codebooks):
            dead = (~used[level]).nonzero().squeeze(1)
            if len(dead):
                rows = torch.randperm(z.shape[0], generator=generator)[:len(dead)]
                book[dead[:len(rows)]] = residual[rows]
                moved += len(rows)
            residual = residual - book[nearest(residual, book)[0]]
        return moved

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, d) -> codes (N, levels) int64, decoded reconstruction (N, d); in blocks of ENCODE_ROWS."""
        codes, recon = [], []
        for s in range(0, x.shape[0], ENCODE_ROWS):
            x_hat, c, _ = self(x[s:s + ENCODE_ROWS].float())
            codes.append(c)
            recon.append(x_hat)
        if not codes:
            return torch.zeros(0, self.codebooks.shape[0], dtype=torch.int64), x.float()
        return torch.cat(codes), torch.cat(recon)

    def encode_codes(self, x: Tensor) -> Tensor:
        """x (N, d) -> codes (N, levels) int64."""
        return self.encode(x)[0]


def _rqvae_epoch(model: RQVAE, opt: torch.optim.Optimizer, x: Tensor, bs: int,
                 g: torch.Generator) -> tuple[dict, Tensor]:
    """One shuffled pass over x (N, d) -> (mean recon / rq / total loss and usage per level, used (levels, K))."""
    perm = torch.randperm(x.shape[0], generator=g)
    sums = torch.zeros(2, dtype=torch.float64)
    used = torch.zeros(model.codebooks.shape[:2], dtype=torch.bool)  # (levels, K)
    for s in range(0, x.shape[0], bs):
        xb = x[perm[s:s + bs]]  # (B, d)
        x_hat, codes, rq_loss = model(xb)
        recon = (x_hat - xb).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        (recon + rq_loss).backward()
        opt.step()
        sums += torch.tensor([recon.item(), rq_loss.item()], dtype=torch.float64) * len(xb)
        used.scatter_(1, codes.T, True)
    r, q = (sums / x.shape[0]).tolist()
    return dict(loss=r + q, recon=r, rq=q, usage=used.float().mean(1).tolist()), used


def train_rqvae(x: Tensor, cfg: SemanticIdConfig, progress: bool = True) -> RQVAE:
    """Fit an RQ-VAE on x (N, d): AdamW, loss = squared error summed over features (mean over the batch) +
    rq loss. Seeded (weights, shuffles, k-means) and deterministic on CPU; global RNG state is left as is.
    model.history gets one dict per epoch (loss, recon, rq, usage per level before any restart).

    restart_dead (beyond TIGER's recipe): after every epoch but the last, entries no item picked move onto
    current residuals. The k-means init sits on the latents of the untrained encoder, which then spread
    out: on 12,101 x 384 clustered vectors (3 x 256) level-0 usage fell 91% -> 11% within 5 epochs without
    it and reached 100% by epoch 20 with it (recon 0.356 -> 0.348 after 30 epochs)."""
    x = x.float()
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = RQVAE(x.shape[1], cfg.rqvae_hidden, cfg.rqvae_latent, cfg.levels, cfg.codebook_size,
                      cfg.commitment)
    # no weight decay: decay would pull codebook entries towards 0 at every step, not only unused ones
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rqvae_lr, weight_decay=0.0)
    bs = cfg.rqvae_batch_size
    first = torch.randperm(x.shape[0], generator=g)[:max(bs, cfg.codebook_size)]
    with torch.no_grad():
        model.init_codebooks(model.encoder(x[first]), cfg.kmeans_iters, g)
    bar = tqdm(range(cfg.rqvae_epochs), desc="rq-vae", disable=not progress)
    for epoch in bar:
        stats, used = _rqvae_epoch(model, opt, x, bs, g)
        if cfg.rqvae_restart_dead and epoch < cfg.rqvae_epochs - 1:
            sample = torch.randperm(x.shape[0], generator=g)[:max(bs, cfg.codebook_size)]
            with torch.no_grad():
                stats["restarted"] = model.restart_dead(model.encoder(x[sample]), used, g)
        model.history.append(dict(epoch=epoch, **stats))
        bar.set_postfix(loss=f"{stats['loss']:.4f}", usage0=f"{stats['usage'][0]:.2f}")
    return model


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
