"""Shards -> split by node and by worker -> decode -> seeded shuffle -> per-split samples.

Every epoch builds a fresh pipeline from (seed, epoch): the shard order is shuffled identically on every
rank, then `_split_for_slot` gives each of the S = ranks x workers readers ("slots") its share, so across
ranks x workers each *sample* is read exactly once per epoch, for any world size (tests/test_loader.py and
tests/test_train_trust.py check the union). Whole shards go round-robin while S divides what is left; the
last (n mod S) shards are read by every slot, each keeping the samples whose running index over those
shards is its slot mod S. Splitting whole shards alone leaves ranks unequal (ML-1M's 13 shards on 8 ranks:
five ranks read two shards, three read one): the old training loop stopped every rank at the shortest and
dropped the rest; lock-step training (train/loop.py) keeps everything, and this split keeps the ranks'
shares near equal (only the last, shorter shard makes a difference), so few dummy steps are needed.
Cost: the remainder shards are read S times (~10 ms per 4 MB).

A sample here is one user's example for one split, already cut so that nothing beyond the split's
boundary is visible (see `cut_for_split`): this is the one place that enforces "no validation or test
target is ever a training target".
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from configs.schema import LoaderConfig
from data_pipeline import schema

SPLITS = ("train", "valid", "test")


class ShardError(RuntimeError):
    """A shard set that is incomplete, corrupt or truncated; the message names the shard."""


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.exists():
        raise ShardError(f"{path} not found: {shard_dir} is not a complete shard set (an interrupted "
                         "write leaves only a hidden .tmp folder); run `python -m data_pipeline prepare`")
    return json.loads(path.read_text())


def other_shards(manifest: dict, run_metrics: dict, run: str | Path) -> str | None:
    """None when the run (its metrics.json) trained on this shard set, else why not, in words: a run's item
    ids mean the items of its own shards only (each caller raises its own error with this text)."""
    have, want = str(run_metrics.get("manifest_hash")), manifest["content_hash"]
    if have == want:
        return None
    return (f"{run} trained on another shard set than {manifest.get('dataset')!r} here (manifest hash "
            f"{have[:12]} vs {want[:12]})")


def shard_urls(shard_dir: str | Path, manifest: dict, skip_bad: bool = False) -> list[str]:
    """Paths of the manifest's shards, checked for presence and size (a truncated copy fails here)."""
    urls = []
    for s in manifest["shards"]:
        p = Path(shard_dir) / s["name"]
        problem = None
        if not p.exists():
            problem = "is missing"
        elif p.stat().st_size != s["bytes"]:
            problem = f"has {p.stat().st_size} bytes, the manifest says {s['bytes']} (truncated or replaced)"
        if problem:
            if not skip_bad:
                raise ShardError(f"shard {p} {problem}")
            warnings.warn(f"skipping shard {p}: it {problem}")
            continue
        urls.append(str(p))
    return urls


def check_shards(shard_dir: str | Path, manifest: dict) -> list[str]:
    """One line per manifest shard that is missing, has the wrong size or fails its sha256; [] = all good.
    Reads every shard once (~10 ms per 4 MB): a run calls it at start to count what skip_bad_shards skips."""
    problems = []
    for s in manifest["shards"]:
        p = Path(shard_dir) / s["name"]
        if not p.exists():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != s["bytes"]:
            problems.append(f"{p} has {p.stat().st_size} bytes, the manifest says {s['bytes']}")
        elif hashlib.sha256(p.read_bytes()).hexdigest() != s["sha256"]:
            problems.append(f"{p} fails its manifest sha256")
    return problems


def cut_for_split(seq: np.ndarray, split: str, cold: np.ndarray | None = None, through_valid: bool = False
                  ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """One user's sequence (5, n) -> (history (5, h), target event (5,) or None) for `split`.

    train: history = events[:n-2] (all events for users too short to evaluate), no target (the
    targets are the next items inside the history); valid: history = events[:n-2], target = events[n-2];
    test: history = events[:n-1], target = events[n-1]. Returns None when the user has no example.
    `through_valid` (refit runs only): the train history is events[:n-1], validation target included.

    `cold` (sorted dense item ids held out of training, manifest split_rule.cold_items): their events
    are removed from every history after the cut, and a cold validation target drops the user's
    validation example; a cold test target is kept (that is the cold-start slice).
    """
    n = seq.shape[1]
    if split == "train":
        hist, target = (seq[:, :n - 1 - (not through_valid)] if n >= 3 else seq), None
    elif n < 3:
        return None
    else:
        cut = n - 2 if split == "valid" else n - 1
        hist, target = seq[:, :cut], seq[:, cut]
    if cold is not None and len(cold):
        if split == "valid" and np.isin(target[schema.ROW_ITEM], cold):
            return None
        hist = hist[:, ~np.isin(hist[schema.ROW_ITEM], cold)]
    return hist, target


def cold_items(manifest: dict) -> np.ndarray:
    """Sorted dense ids of the items held out of training (empty when the shards have none)."""
    return np.asarray(manifest["split_rule"].get("cold_items", []), dtype=np.int64)


def _decode(skip: bool):
    def stage(src):
        for sample in src:
            try:
                user = int(sample["__key__"][1:])  # key "u000000042" -> dense user index 42
                seq = np.frombuffer(sample["seq.i64"], dtype="<i8").reshape(len(schema.SEQ_ROWS), -1)  # (5, n)
            except (KeyError, ValueError) as e:
                msg = f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r} does not decode ({e!r})"
                if skip:
                    warnings.warn("skipping " + msg)
                    continue
                raise ShardError(msg) from e
            yield dict(seq=seq, user=user, key=sample["__key__"], url=sample["__url__"])
    return stage


def _open_verified(checksums: dict[str, str], skip: bool):
    """Read each shard whole and check its sha256 against the manifest before parsing it: a shard of
    the right size with flipped bytes would otherwise decode into wrong item ids without any error.
    Costs ~10 ms per 4 MB shard (sha256 at ~400 MB/s), once per epoch."""
    def stage(src):
        for s in src:
            data = Path(s["url"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != checksums[s["url"]]:
                msg = f"shard {s['url']} fails its manifest sha256 (corrupt or modified)"
                if skip:
                    warnings.warn("skipping " + msg)
                    continue
                raise ShardError(msg)
            yield dict(url=s["url"], stream=io.BytesIO(data))
    return stage


def _to_example(split: str, cold: np.ndarray, through_valid: bool):
    def stage(src):
        for s in src:
            cut = cut_for_split(s["seq"], split, cold, through_valid)
            if cut is None:
                continue
            s["history"], s["target"] = cut
            if split != "train":  # every item before the target, uncut and cold ones included: the
                n = s["seq"].shape[1]  # evaluator's exclude_history='full' rule never ranks these
                s["seen"] = s["seq"][schema.ROW_ITEM, :n - 2 if split == "valid" else n - 1]
            del s["seq"]
            yield s
    return stage


def _seeded_shuffle(bufsize: int, seed: int, epoch: int):
    """Sample shuffle whose RNG depends on (seed, epoch, rank, worker): reproducible, distinct per worker."""
    def stage(src):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{seed}/{epoch}/{rank}/{worker}")
        yield from wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)
    return stage


def _split_for_slot(shared: dict, samples: dict[str, int]):
    """Shard dicts (the same order on every rank) -> this slot's shards. Fills `shared` (url -> (S, slot,
    offset)) with the remainder shards, whose samples `_take_slot_samples` then deals out; `samples`
    (url -> sample count, from the manifest) numbers the remainder samples across shards, so they go
    round-robin over all S slots (with 14 slots and 6 shards of 4, per-shard numbering fed slots 0-3 only)."""
    def stage(src):
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        slots, slot = world * workers, rank * workers + worker
        shards = list(src)
        whole, offset = len(shards) - len(shards) % slots, 0
        for i, s in enumerate(shards):
            if i >= whole:
                shared[s["url"]] = (slots, slot, offset)
                offset += samples[s["url"]]
                yield s
            elif i % slots == slot:
                yield s
    return stage


def _take_slot_samples(shared: dict):
    """Keep every sample of a whole shard, and sample j of a remainder shard when (offset + j) % S == slot."""
    def stage(src):
        seen: dict[str, int] = {}
        for sample in src:
            url = sample["__url__"]
            if url in shared:
                j = seen[url] = seen.get(url, -1) + 1
                slots, slot, offset = shared[url]
                if (offset + j) % slots != slot:
                    continue
            yield sample
    return stage


def _shard_handler(skip: bool):
    def handler(exn: Exception) -> bool:
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
        if url is None:  # raised inside a tar member; webdataset's shard-level stage adds the url
            raise exn
        if skip:
            warnings.warn(f"skipping corrupt or truncated shard {url}: {exn.args[0] if exn.args else exn}")
            return True
        raise ShardError(f"corrupt or truncated shard {url}: {exn.args[0] if exn.args else exn!r}") from exn
    return handler


def read_shards(shard_dir: str | Path, split: str, cfg: LoaderConfig, epoch: int = 0,
                shuffle: bool | None = None) -> wds.DataPipeline:
    """The sample pipeline for one epoch of `split` (shuffled by default only for train)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = load_manifest(shard_dir)
    urls = shard_urls(shard_dir, manifest, cfg.skip_bad_shards)
    shuffle = (split == "train") if shuffle is None else shuffle
    handler = _shard_handler(cfg.skip_bad_shards)
    checksums = {str(Path(shard_dir) / s["name"]): s["sha256"] for s in manifest["shards"]}
    samples = {str(Path(shard_dir) / s["name"]): s["samples"] for s in manifest["shards"]}
    shared: dict = {}  # remainder shard url -> (slots, slot), filled by _split_for_slot in this worker
    stages = [wds.SimpleShardList(urls, seed=cfg.seed + epoch if shuffle else None),
              _split_for_slot(shared, samples), _open_verified(checksums, cfg.skip_bad_shards),
              partial(tar_file_expander, handler=handler), partial(group_by_keys, handler=handler),
              _take_slot_samples(shared), _decode(cfg.skip_bad_shards),
              _to_example(split, cold_items(manifest), cfg.train_through_valid)]
    if shuffle and cfg.shuffle_buffer > 0:
        stages.append(_seeded_shuffle(cfg.shuffle_buffer, cfg.seed, epoch))
    return wds.DataPipeline(*stages)
