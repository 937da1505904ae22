"""Semantic IDs: k-means, residual codes, RQ-VAE, collisions, stats, save/load, new items. Synthetic data only."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from configs.schema import SemanticIdConfig
from data_pipeline.quantize import fit_rq_kmeans, kmeans, kmeans_pp_init, rq_assign, train_rqvae
from data_pipeline.semantic_ids import (
    assign_new_items,
    build_semantic_ids,
    code_stats,
    load_semantic_ids,
    resolve_collisions,
    save_semantic_ids,
)


def clustered(n_per: int, k: int, d: int, seed: int = 0, spread: float = 10.0, noise: float = 0.1):
    """k Gaussian blobs in d dims -> points (k*n_per, d) float32, true labels (k*n_per,), shuffled."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * spread
    labels = rng.permutation(np.repeat(np.arange(k), n_per))
    x = centers[labels] + rng.normal(size=(len(labels), d)) * noise
    return x.astype(np.float32), labels


def purity(pred: np.ndarray, true: np.ndarray) -> float:
    """Share of points whose predicted cluster's majority true label is their own."""
    hits = sum(np.bincount(true[pred == c]).max() for c in np.unique(pred))
    return hits / len(true)


def item_vectors(n_items: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    """(n_items+1, d) with row 0 = padding zeros, the rest clustered."""
    x, _ = clustered(n_items // clusters + 1, clusters, d, seed=seed, spread=1.0, noise=0.05)
    return np.concatenate([np.zeros((1, d), np.float32), x[:n_items]])


# ----------------------------------------------------------------------------- k-means

def test_kmeans_recovers_separated_clusters():
    x, labels = clustered(50, 8, 16)
    books = fit_rq_kmeans(torch.from_numpy(x), levels=1, k=8, iters=20, seed=0)
    codes, recon = rq_assign(torch.from_numpy(x), books)
    assert codes.shape == (400, 1) and recon.shape == (400, 16)
    assert purity(codes[:, 0].numpy(), labels) == 1.0
    assert len(np.unique(codes[:, 0].numpy())) == 8


def test_kmeans_pp_init_deterministic_for_seed():
    x = torch.from_numpy(clustered(30, 5, 8)[0])
    a = kmeans_pp_init(x, 6, torch.Generator().manual_seed(3))
    b = kmeans_pp_init(x, 6, torch.Generator().manual_seed(3))
    c = kmeans_pp_init(x, 6, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kmeans_fewer_points_than_k_warns_and_reduces():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="5 points < k=8"):
        c = kmeans(x, 8, 10, torch.Generator().manual_seed(0))
    assert c.shape == (5, 3)


def test_kmeans_reseeds_empty_clusters_on_duplicated_data():
    x = torch.cat([torch.zeros(20, 4), torch.ones(3, 4)])  # 2 distinct points, k = 4
    c = kmeans(x, 4, 5, torch.Generator().manual_seed(0))
    assert c.shape == (4, 4) and torch.isfinite(c).all()


def test_two_level_residual_codes_recover_hierarchy():
    """x = top[i] (far apart) + sub[j] (shared offsets, smaller) + noise: level 1 finds i, level 2 finds j."""
    rng = np.random.default_rng(1)
    top, sub = rng.normal(size=(4, 16)) * 20, rng.normal(size=(4, 16)) * 2
    i, j = rng.integers(0, 4, 800), rng.integers(0, 4, 800)
    x = torch.from_numpy((top[i] + sub[j] + rng.normal(size=(800, 16)) * 0.05).astype(np.float32))
    codes, _ = rq_assign(x, fit_rq_kmeans(x, levels=2, k=4, iters=30, seed=0))
    assert purity(codes[:, 0].numpy(), i) == 1.0
    assert purity(codes[:, 1].numpy(), j) == 1.0


# ----------------------------------------------------------------------------- collisions and stats

@settings(max_examples=60, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 40), st.integers(1, 3)), elements=st.integers(0, 3)))
def test_resolve_collisions_makes_tuples_unique(codes):
    out = resolve_collisions(codes)
    assert out.shape == (codes.shape[0], codes.shape[1] + 1)
    assert (out[0] == 0).all() and (out[1:, :-1] == codes[1:]).all()
    assert len({tuple(r) for r in out[1:]}) == codes.shape[0] - 1
    for row in np.unique(codes[1:], axis=0):  # each group numbered 0..g-1 in item order
        members = np.flatnonzero((codes[1:] == row).all(1))
        assert out[1 + members, -1].tolist() == list(range(len(members)))


def test_resolve_collisions_unique_input_only_gains_zero():
    codes = np.array([[0, 0], [1, 2], [2, 1], [0, 0], [3, 3]])  # row 0 padding; (0,0) at row 3 is a real item
    out = resolve_collisions(codes)
    assert (out[:, :-1] == codes).all() and (out[:, -1] == 0).all()


def test_code_stats_hand_made():
    s = code_stats(np.array([[0, 1], [0, 1], [1, 2], [3, 2]]), codebook_size=4)
    assert s == dict(items=4, usage=[0.75, 0.5], distinct_tuples=3, collision_rate=0.5, max_group=2)


# ----------------------------------------------------------------------------- RQ-VAE

def small_rqvae_cfg(**kw) -> SemanticIdConfig:
    base = dict(method="rqvae", levels=2, codebook_size=16, kmeans_iters=20, rqvae_hidden=[64, 32],
                rqvae_latent=8, rqvae_epochs=15, rqvae_lr=3e-3, rqvae_batch_size=128, seed=0)
    return SemanticIdConfig(**{**base, **kw})


def test_rqvae_trains_loss_falls_and_codebooks_used():
    x = torch.nn.functional.normalize(torch.from_numpy(clustered(40, 16, 32, spread=1.0, noise=0.05)[0]), dim=1)
    init_only = train_rqvae(x, small_rqvae_cfg(rqvae_epochs=0), progress=False)
    first_codes = init_only.encode_codes(x)
    assert first_codes.shape == (640, 2)
    assert len(np.unique(first_codes[:, 0].numpy())) / 16 > 0.5  # k-means init: no dead codebook
    model = train_rqvae(x, small_rqvae_cfg(), progress=False)
    h = model.history
    assert len(h) == 15 and h[-1]["loss"] < 0.6 * h[0]["loss"] and h[-1]["recon"] < h[0]["recon"]
    assert h[0]["usage"][0] > 0.5 and "restarted" in h[0] and "restarted" not in h[-1]
    codes = model.encode_codes(x).numpy()
    assert all(len(np.unique(codes[:, lv])) / 16 > 0.5 for lv in range(2))
    again = train_rqvae(x, small_rqvae_cfg(), progress=False)  # seeded: bit-identical on CPU
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_rqvae_too_few_items_is_a_clear_error():
    with pytest.raises(ValueError, match="codebook_size=16"):
        train_rqvae(torch.randn(10, 8), small_rqvae_cfg(), progress=False)


# ----------------------------------------------------------------------------- pipeline

def test_fusion_shapes():
    text, image = item_vectors(300, 24, 10, seed=0), item_vectors(300, 16, 10, seed=1)
    image[5] = 0  # a missing image still gets codes
    cfg = SemanticIdConfig(modalities=["text", "image"], levels=2, codebook_size=8, kmeans_iters=10)
    concat = build_semantic_ids({"text": text, "image": image}, cfg, progress=False)
    per = build_semantic_ids({"text": text, "image": image}, dataclasses.replace(cfg, fusion="per_modality"),
                             progress=False)
    assert concat.codes.shape == (301, 3) and per.codes.shape == (301, 5)
    assert list(concat.tokenizers) == ["text+image"] and list(per.tokenizers) == ["text", "image"]
    for sid in (concat, per):
        assert sid.codes.dtype == np.int64 and (sid.codes[0] == 0).all()
        assert len({tuple(r) for r in sid.codes[1:]}) == 300
        assert len(sid.level_sizes) == sid.codes.shape[1]
        assert (sid.codes.max(0) < np.array(sid.level_sizes)).all()
        assert sid.stats["zero_vector_items"] == {"text": 0, "image": 1}
    assert per.level_sizes[:4] == [8, 8, 8, 8] and 0 < per.stats["recon_rel_error"]["text"] < 1


@pytest.mark.parametrize("method", ["rq_kmeans", "rqvae"])
def test_save_load_round_trip_and_new_items(tmp_path, method):
    vecs = item_vectors(400, 32, 20)
    cfg = small_rqvae_cfg(method=method, rqvae_epochs=5)
    sid = build_semantic_ids({"text": vecs}, cfg, progress=False)
    save_semantic_ids(sid, tmp_path / "sid")
    back = load_semantic_ids(tmp_path / "sid")
    assert np.array_equal(back.codes, sid.codes) and back.codes.dtype == np.int64
    assert (back.level_sizes, back.fusion, back.stats, back.config, back.modality_dims) == \
        (sid.level_sizes, sid.fusion, sid.stats, sid.config, sid.modality_dims)
    for name, tok in sid.tokenizers.items():
        assert back.tokenizers[name].arch == tok.arch and back.tokenizers[name].state.keys() == tok.state.keys()
        assert all(torch.equal(back.tokenizers[name].state[k], v) for k, v in tok.state.items())

    rng = np.random.default_rng(5)
    copy = vecs[7] + rng.normal(size=32).astype(np.float32) * 1e-4
    far = np.full(32, 50.0, np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = assign_new_items(back, {"text": np.stack([copy, far, copy])})  # no retraining
    assert bool(caught) == (new[:, -1].max() >= sid.level_sizes[-1])  # warns iff the dedup level must grow
    assert new.shape == (3, sid.codes.shape[1])
    assert (new[0, :-1] == sid.codes[7, :-1]).all() and (new[2, :-1] == new[0, :-1]).all()
    group = (sid.codes[1:, :-1] == sid.codes[7, :-1]).all(1).sum()
    assert new[0, -1] == group and new[2, -1] == group + 1  # next free index, also among the new items
    both = np.concatenate([sid.codes[1:], new])
    assert len({tuple(r) for r in both}) == len(both)


def test_load_missing_or_mismatched_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/semantic_ids.json"):
        load_semantic_ids(tmp_path / "nowhere")
    cfg = SemanticIdConfig(levels=1, codebook_size=4, kmeans_iters=5)
    save_semantic_ids(build_semantic_ids({"text": item_vectors(30, 8, 4)}, cfg, progress=False), tmp_path / "a")
    save_semantic_ids(build_semantic_ids({"text": item_vectors(30, 8, 4, seed=1)}, cfg, progress=False), tmp_path / "b")
    (tmp_path / "b" / "semantic_ids.json").replace(tmp_path / "a" / "semantic_ids.json")  # tensors of a, json of b
    with pytest.raises(ValueError, match="does not match"):
        load_semantic_ids(tmp_path / "a")
