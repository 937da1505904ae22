"""read_shards + collate: node x worker split, shuffling, tokens, jagged batches, bad shards."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from configs.schema import LoaderConfig
from data_pipeline import schema
from data_pipeline.collate import collate, example_to_tokens, make_loader, tokenize
from data_pipeline.read_shards import ShardError, load_manifest, read_shards

CFG = LoaderConfig(batch_size=5, max_len=16, num_workers=0, shuffle_buffer=10, seed=3)


def keys_seen(shard_dir, cfg, monkeypatch, rank, world, worker, workers, epoch=0, split="train"):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", str(workers))
    return [(ex["url"], ex["key"]) for ex in read_shards(shard_dir, split, cfg, epoch)]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 1), (5, 1), (7, 2)])
@pytest.mark.parametrize("split", ["train", "test"])
def test_node_and_worker_split_reads_every_sample_once(shard_dir, monkeypatch, world, workers, split):
    """6 shards over ranks x workers readers that do not divide 6 (4, 5, 14): every user exactly once."""
    m = load_manifest(shard_dir)
    all_urls = {str(shard_dir / s["name"]) for s in m["shards"]}
    parts = [keys_seen(shard_dir, CFG, monkeypatch, r, world, w, workers, split=split)
             for r in range(world) for w in range(workers)]
    assert set().union(*[{u for u, _ in p} for p in parts]) == all_urls
    keys = [k for p in parts for _, k in p]
    expected = m["counts"]["users"] if split == "train" else m["counts"]["split"]["test_targets"]
    assert len(keys) == len(set(keys)) == expected
    sizes = [len(p) for p in parts]
    # balanced: this fixture's shard sizes differ by <= 1, and remainder shards are dealt by sample
    assert max(sizes) - min(sizes) <= 3, sizes


def test_shuffle_is_seeded_per_epoch(shard_dir, monkeypatch):
    a = keys_seen(shard_dir, CFG, monkeypatch, 0, 1, 0, 1, epoch=0)
    b = keys_seen(shard_dir, CFG, monkeypatch, 0, 1, 0, 1, epoch=0)
    c = keys_seen(shard_dir, CFG, monkeypatch, 0, 1, 0, 1, epoch=1)
    assert a == b and a != c and sorted(a) == sorted(c)


def test_tokens_for_search_events():
    # history: plain event, search event; target: a search event
    hist = np.array([[5, 7], [100, 200], [schema.ACTION_INTERACT, schema.ACTION_SEARCH_CLICK], [0, 1], [0, 4]])
    target = np.array([9, 300, schema.ACTION_SEARCH_CLICK, 1, 2])
    tok = tokenize(hist, target, query_tokens=True, max_len=100)
    assert tok["item_ids"].tolist() == [5, 0, 7, 0]
    assert tok["query_ids"].tolist() == [0, 4, 0, 2]
    assert tok["token_types"].tolist() == [schema.TOKEN_ITEM, schema.TOKEN_QUERY, schema.TOKEN_ITEM,
                                           schema.TOKEN_QUERY]
    assert tok["actions"].tolist() == [schema.ACTION_INTERACT, schema.ACTION_QUERY,
                                       schema.ACTION_SEARCH_CLICK, schema.ACTION_QUERY]
    assert tok["targets"].tolist() == [7, 7, 9, 9]  # the clicked item 9 is only ever a target
    assert tok["timestamps"].tolist() == [100, 200, 200, 300]
    assert tok["next_timestamps"].tolist() == [200, 200, 300, 300]
    assert tok["domains"].tolist() == [0, 1, 1, 1]
    flat = tokenize(hist, target, query_tokens=False, max_len=100)
    assert flat["item_ids"].tolist() == [5, 7] and flat["targets"].tolist() == [7, 9]


def test_max_len_keeps_most_recent():
    hist = np.stack([np.arange(1, 11), np.arange(10) * 10, np.full(10, 2), np.zeros(10, int), np.zeros(10, int)])
    tok = tokenize(hist, None, query_tokens=True, max_len=4)
    assert tok["item_ids"].tolist() == [7, 8, 9, 10]
    assert tok["targets"].tolist() == [8, 9, 10, 0]  # no target after the last training event


def test_jagged_batches_are_consistent(shard_dir):
    cfg = LoaderConfig(batch_size=4, max_len=7, num_workers=0, shuffle_buffer=0)
    seen = 0
    for batch in make_loader(shard_dir, "test", cfg):
        off = batch.offsets
        assert off[0] == 0 and torch.all(off[1:] >= off[:-1]) and off[-1] == batch.item_ids.numel()
        assert torch.all(batch.lengths >= 1) and torch.all(batch.lengths <= 7)
        for name in ("query_ids", "timestamps", "next_timestamps", "actions", "token_types", "domains", "targets"):
            assert getattr(batch, name).shape == batch.item_ids.shape
        assert batch.domain.shape == batch.user.shape == (batch.num_sequences,)
        last = off[1:] - 1
        assert torch.all(batch.targets[last] > 0)  # every eval sequence ends with its target
        # item tokens carry items, query tokens carry queries
        is_q = batch.token_types == schema.TOKEN_QUERY
        assert torch.all(batch.item_ids[~is_q] > 0) and torch.all(batch.item_ids[is_q] == 0)
        assert torch.all(batch.query_ids[is_q] > 0)
        seen += batch.num_sequences
    assert seen == load_manifest(shard_dir)["counts"]["split"]["test_targets"]


def test_collate_matches_samples():
    rng = np.random.default_rng(0)
    samples = []
    for n in (1, 4, 2):
        hist = np.stack([rng.integers(1, 50, n), np.arange(n), np.full(n, 2), np.zeros(n, int), np.zeros(n, int)])
        samples.append(example_to_tokens(dict(history=hist, target=np.array([3, n, 2, 0, 0]), user=n),
                                         True, 100))
    b = collate(samples)
    assert b.offsets.tolist() == [0, 1, 5, 7]
    for i, s in enumerate(samples):
        sl = slice(b.offsets[i], b.offsets[i + 1])
        assert b.item_ids[sl].tolist() == s["item_ids"].tolist()
        assert b.targets[sl].tolist() == s["targets"].tolist()
    assert b.user.tolist() == [1, 4, 2]


def test_two_worker_loader_yields_every_user(shard_dir):
    cfg = LoaderConfig(batch_size=3, max_len=50, num_workers=2, shuffle_buffer=4)
    users = [u for b in make_loader(shard_dir, "train", cfg) for u in b.user.tolist()]
    # every user except one-event users (their training history has no next item to predict)
    one_event = sum(1 for ex in read_shards(shard_dir, "train", CFG) if ex["history"].shape[1] == 1)
    assert one_event >= 1
    assert len(users) == len(set(users)) == load_manifest(shard_dir)["counts"]["users"] - one_event


def _break_shard(shard_dir, how):
    m = load_manifest(shard_dir)
    first = shard_dir / m["shards"][0]["name"]
    data = first.read_bytes()
    if how == "truncate":
        first.write_bytes(data[: len(data) // 2])
    else:  # same size, garbage in the middle, and a manifest that agrees on the size
        first.write_bytes(data[:700] + b"\xff" * 1200 + data[1900:])
    return first


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_bad_shard_gives_clear_error(shard_dir, how):
    bad = _break_shard(shard_dir, how)
    with pytest.raises(ShardError, match=bad.name):
        list(read_shards(shard_dir, "train", CFG, shuffle=False))


def test_truncated_shard_with_matching_manifest_still_named(shard_dir):
    """A cut shard and a manifest edited to match its size and sha256: tar parsing must still name it."""
    m = load_manifest(shard_dir)
    first = shard_dir / m["shards"][0]["name"]
    data = first.read_bytes()
    cut = data[: len(data) // 2 + 100]
    first.write_bytes(cut)
    m["shards"][0]["bytes"] = len(cut)
    m["shards"][0]["sha256"] = hashlib.sha256(cut).hexdigest()
    (shard_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=first.name):
        list(read_shards(shard_dir, "train", CFG, shuffle=False))


def test_bad_shard_skipped_when_configured(shard_dir):
    _break_shard(shard_dir, "truncate")
    cfg = LoaderConfig(**{**CFG.__dict__, "skip_bad_shards": True})
    with pytest.warns(UserWarning, match="skipping"):
        users = [ex["user"] for ex in read_shards(shard_dir, "train", cfg, shuffle=False)]
    m = load_manifest(shard_dir)
    assert len(users) == m["counts"]["users"] - m["shards"][0]["samples"]


def test_incomplete_shard_set_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ShardError, match="not a complete shard set"):
        read_shards(tmp_path / "half", "train", CFG)


def _train_items(shard_dir, cfg, epoch):
    return {u: b.item_ids[b.offsets[i]:b.offsets[i + 1]].tolist()
            for b in make_loader(shard_dir, "train", cfg, epoch=epoch) for i, u in enumerate(b.user.tolist())}


def test_random_window_is_a_seeded_contiguous_slice_of_the_training_history(shard_dir):
    full = {ex["user"]: ex["history"][schema.ROW_ITEM].tolist() for ex in read_shards(shard_dir, "train", CFG)}
    cfg = LoaderConfig(batch_size=4, max_len=6, num_workers=0, query_tokens=False, random_window=1.0)
    ep0, ep1 = _train_items(shard_dir, cfg, 0), _train_items(shard_dir, cfg, 1)
    assert ep0 == _train_items(shard_dir, cfg, 0)  # same seed and epoch: same windows
    assert ep0 != ep1  # a new epoch draws new windows
    recent = _train_items(shard_dir, LoaderConfig(batch_size=4, max_len=6, num_workers=0, query_tokens=False), 0)
    moved = 0
    for u, items in ep0.items():
        hist = full[u]
        assert recent[u] == hist[-6:]  # random_window = 0: the most recent events (reference recipe)
        starts = [s for s in range(len(hist) - len(items) + 1) if hist[s:s + len(items)] == items]
        assert len(items) == min(6, len(hist)) and starts, (u, items, hist)  # contiguous, full length
        moved += starts[0] != len(hist) - len(items)
    assert moved > len(ep0) // 3  # most long histories were cut somewhere else


def test_random_window_leaves_eval_splits_alone(shard_dir):
    cfg = LoaderConfig(batch_size=4, max_len=6, num_workers=0, random_window=1.0)
    base = replace(cfg, random_window=0.0)
    for split in ("valid", "test"):
        got = [b.item_ids.tolist() for b in make_loader(shard_dir, split, cfg)]
        assert got == [b.item_ids.tolist() for b in make_loader(shard_dir, split, base)]


def test_train_through_valid_adds_each_users_validation_event(shard_dir):
    base = {ex["user"]: ex["history"].shape[1] for ex in read_shards(shard_dir, "train", CFG)}
    refit = {ex["user"]: ex["history"].shape[1]
             for ex in read_shards(shard_dir, "train", replace(CFG, train_through_valid=True))}
    valid_users = {ex["user"] for ex in read_shards(shard_dir, "valid", CFG)}
    assert refit == {u: n + (u in valid_users) for u, n in base.items()}
