"""content.py: item text, offline MiniLM (published similarities), cache, catalog alignment, image path."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from configs.schema import ContentConfig, ShardConfig, SyntheticConfig
from data_pipeline import content, synthetic
from data_pipeline.schema import DataError
from data_pipeline.write_shards import write_shards

# The sentence-transformers example for all-MiniLM-L6-v2 and its published cosine similarities.
SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
PUBLISHED = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """~60 items over 2 domains x 4 topics, with categories [domain, topic, sub-category]."""
    world = synthetic.generate(SyntheticConfig(num_users=60, domains=["movies", "books"], items_per_domain=30,
                                               num_topics=4, mean_events=12))
    out = tmp_path_factory.mktemp("content") / "shards"
    write_shards(world.dataset, out, ShardConfig(samples_per_shard=20), progress=False)
    return out


def test_item_text_order_attributes_lists_and_missing():
    row = {"title": "  Heat\nwave ", "brand": "", "categories": ["Beauty", "Skin Care"],
           "description": "A cream.", "attributes": {"price": 5.04, "year": 1995.0, "genres": ["Drama", "War"],
                                                    "tags": None, "category_paths": [["A", "B"], ["C"]]}}
    fields = ["title", "brand", "categories", "genres", "year", "price", "colour", "description", "tags"]
    assert content.item_text(row, fields) == ("Title: Heat wave. Categories: Beauty, Skin Care. Genres: Drama, "
                                              "War. Year: 1995. Price: 5.04. Description: A cream")
    assert content.item_text(row, ["category_paths"]) == "Category paths: A > B, C"
    assert content.item_text({"title": "x"}, ["price", "title"]) == "Title: x"  # no attributes key at all
    assert content.item_text({}, ["title"]) == ""
    assert content.item_text({"title": "", "attributes": {"title": "from attrs"}}, ["title"]) == "Title: from attrs"


def test_encoder_path_errors(tmp_path):
    with pytest.raises(content.ContentError, match="config.json"):
        content.text_encoder_path(ContentConfig(encoder=str(tmp_path)))
    assert (content.text_encoder_path(ContentConfig()) / "config.json").is_file()


def test_minilm_offline_reproduces_published_similarities():
    v = content.embed_texts(SENTENCES, ContentConfig(cache_dir=""), progress=False)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    for (i, j), want in PUBLISHED.items():
        assert abs(sims[i, j] - want) < 1e-3, (i, j, sims[i, j], want)


def test_deterministic_and_batching_does_not_matter():
    texts = [f"Title: item {i}. " + "word " * (i % 7 * 5) for i in range(13)] + SENTENCES
    cfg = ContentConfig(cache_dir="", batch_size=4)
    a = content.embed_texts(texts, cfg, progress=False)
    b = content.embed_texts(texts, cfg, progress=False)
    assert np.array_equal(a, b)
    one_by_one = content.embed_texts(texts, dataclasses.replace(cfg, batch_size=1), progress=False)  # no padding
    np.testing.assert_allclose(a, one_by_one, atol=1e-5)  # sorting + padding only move float noise


def test_cache_hit_skips_model_and_key_covers_settings(tmp_path, monkeypatch):
    cfg = ContentConfig(cache_dir=str(tmp_path / "cache"))
    first = content.embed_texts(SENTENCES, cfg, progress=False)
    assert len(list((tmp_path / "cache").glob("text-*.npy"))) == 1
    assert not list((tmp_path / "cache").glob(".*"))  # no temp file left behind

    def no_model(path):
        raise AssertionError("the model was loaded on a cache hit")

    monkeypatch.setattr(content, "load_text_encoder", no_model)
    assert np.array_equal(content.embed_texts(SENTENCES, cfg, progress=False), first)
    with pytest.warns(UserWarning, match="no native bf16"):  # emulated bf16 is not used: fp32, the same key
        monkeypatch.setattr(content, "cpu_has_native_bf16", lambda: False)
        assert np.array_equal(content.embed_texts(SENTENCES, dataclasses.replace(cfg, bf16=True), progress=False),
                              first)
    monkeypatch.setattr(content, "cpu_has_native_bf16", lambda: True)
    for changed in (dict(max_length=16), dict(bf16=True)):  # other settings -> other key -> a miss
        with pytest.raises(AssertionError, match="cache hit"):
            content.embed_texts(SENTENCES, dataclasses.replace(cfg, **changed), progress=False)
    with pytest.raises(AssertionError, match="cache hit"):
        content.embed_texts(SENTENCES[:2] + ["another"], cfg, progress=False)


def test_embed_catalog_text_and_image_round_trip(tiny_shards, tmp_path):
    manifest, rows = content.read_catalog(tiny_shards)
    num_items = manifest["vocab"]["num_items"]
    feats = content.make_image_features(tiny_shards, tmp_path / "feats" / "image", seed=0)
    assert feats.name == "image.npy" and (tmp_path / "feats" / "image.ids.txt").is_file()
    # drop two items and shuffle the rest: alignment must follow the ids file, not the row order
    vecs, ids = np.load(feats), (tmp_path / "feats" / "image.ids.txt").read_text().splitlines()
    keep = np.random.default_rng(0).permutation(len(ids))[:-2]
    part = content.write_modality(tmp_path / "part.npy", vecs[keep], [ids[k] for k in keep])
    cfg = ContentConfig(cache_dir=str(tmp_path / "cache"), extra_modalities=[f"image={part}"])
    out = content.embed_catalog(tiny_shards, cfg, progress=False)

    assert out["text"].shape == (num_items + 1, 384) and not out["text"][0].any()
    np.testing.assert_allclose(np.linalg.norm(out["text"][1:], axis=1), 1.0, atol=1e-5)
    image = out["image"]
    assert image.shape == (num_items + 1, 64) and not image[0].any()
    dense = {raw: k for k, raw in enumerate(manifest["id_maps"]["items"])}
    for k in keep:
        assert np.array_equal(image[dense[ids[k]]], vecs[k])
    assert int((~image[1:].any(axis=1)).sum()) == 2
    meta = json.loads((tiny_shards / "content" / "content.json").read_text())["modalities"]
    assert meta["image"]["count"] == num_items - 2 and meta["image"]["missing"] == 2
    assert meta["text"]["fields"] == cfg.fields and len(meta["text"]["encoder_sha256"]) == 64
    loaded = content.load_content(tiny_shards)
    assert set(loaded) == {"text", "image"}
    assert all(np.array_equal(loaded[k], out[k]) for k in out)
    assert rows[0]["id"] == 1


def test_unknown_id_names_file_and_line(tiny_shards, tmp_path):
    _, rows = content.read_catalog(tiny_shards)
    ids = [rows[0]["item_id"], "no-such-item", rows[1]["item_id"]]
    path = content.write_modality(tmp_path / "audio.npy", np.ones((3, 4)), ids)
    with pytest.raises(DataError, match=r"audio\.ids\.txt:2: .*no-such-item"):
        content.align_modality(path, ["<pad>"] + [r["item_id"] for r in rows])
    aligned, info = content.align_modality(path, ["<pad>"] + [r["item_id"] for r in rows], skip_unknown=True)
    assert info["unknown_ids_skipped"] == 1 and info["count"] == 2 and aligned[1:3].all()
    np.save(path, np.ones((2, 4)))  # rows no longer match the ids file
    with pytest.raises(content.ContentError, match=r"audio\.npy: expected .*N = 3"):
        content.align_modality(path, ["<pad>"] + [r["item_id"] for r in rows])


def test_load_content_says_which_command(tmp_path, tiny_shards):
    with pytest.raises(content.ContentError, match="python -m data_pipeline content --shards"):
        content.load_content(tmp_path)
    with pytest.raises(content.ContentError, match="name=path"):
        content.embed_catalog(tiny_shards, ContentConfig(extra_modalities=["image.npy"]), progress=False)


def test_images_carry_category_signal(tiny_shards):
    _, rows = content.read_catalog(tiny_shards)
    images = content.synthetic_item_images(rows, seed=0)
    assert images.shape == (len(rows), 3, 32, 32) and images.dtype == np.uint8
    assert np.array_equal(images, content.synthetic_item_images(rows, seed=0))
    state = torch.random.get_rng_state()
    v = content.embed_images(images, seed=0, batch_size=16)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert np.array_equal(v, content.embed_images(images, seed=0))
    assert v.shape == (len(rows), 64)
    cats = np.array([content._category_key(r) for r in rows])
    same = cats[:, None] == cats[None, :]
    off_diag = ~np.eye(len(rows), dtype=bool)
    sims = v @ v.T
    within, across = sims[same & off_diag].mean(), sims[~same].mean()
    assert within > across + 0.1, (within, across)
