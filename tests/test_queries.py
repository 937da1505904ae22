"""Query text vectors (data_pipeline/queries.py) and the model's query_repr: a query token embedded from
its text, so a query string never trained on still has a meaningful vector."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from configs.schema import ContentConfig, ModelConfig, ShardConfig, SyntheticConfig
from data_pipeline import content, queries, synthetic
from data_pipeline.collate import JaggedBatch
from data_pipeline.schema import TOKEN_QUERY
from data_pipeline.write_shards import write_shards
from model.items import ItemFeatures
from model.seqrec import SeqRecModel


@pytest.fixture(scope="module")
def search_shards(tmp_path_factory):
    """A synthetic world with searches (query strings made of the clicked item's words)."""
    root = tmp_path_factory.mktemp("queries")
    world = synthetic.generate(SyntheticConfig(num_users=60, items_per_domain=20, num_topics=4, mean_events=12,
                                               search_prob=0.3))
    write_shards(world.dataset, root / "shards", ShardConfig(samples_per_shard=20), progress=False)
    return root


def test_every_query_string_is_encoded_once_and_cached(search_shards, monkeypatch):
    shards, cfg = search_shards / "shards", ContentConfig(cache_dir=str(search_shards / "cache"))
    strings = json.loads((shards / "manifest.json").read_text())["id_maps"]["queries"]
    assert strings[0] == "" and len(strings) > 20
    first = queries.embed_queries(shards, cfg, progress=False)
    assert first.shape == (len(strings), 384) and not first[0].any()
    np.testing.assert_allclose(np.linalg.norm(first[1:], axis=1), 1.0, atol=1e-5)
    # row q is query id q's text: the same vector embed_texts gives that string alone
    one = content.embed_texts([strings[5]], ContentConfig(cache_dir=""), progress=False)[0]
    np.testing.assert_allclose(first[5], one, atol=1e-5)
    monkeypatch.setattr(content, "load_text_encoder", lambda path: pytest.fail("cache miss: the model was loaded"))
    again = queries.embed_queries(shards, cfg, progress=False)  # a re-run: no model, same bytes
    assert np.array_equal(again, first)
    vectors, meta = queries.load_query_vectors(shards)
    assert np.array_equal(vectors, first) and meta["encoder_sha256"] and meta["num_queries"] == len(strings) - 1


def test_query_vectors_of_another_shard_version_are_refused(search_shards, tmp_path):
    import shutil
    shards = tmp_path / "shards"
    shutil.copytree(search_shards / "shards", shards)
    queries.embed_queries(shards, ContentConfig(cache_dir=str(search_shards / "cache")), progress=False)
    m = json.loads((shards / "manifest.json").read_text())
    m["content_hash"] = "0" * 64
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(content.ContentError, match="another version"):
        queries.load_query_vectors(shards)
    (shards / "content" / "queries.json").unlink()
    with pytest.raises(content.ContentError, match="query_repr"):
        queries.load_query_vectors(shards)


def _query_batch(query_ids: list[int]) -> JaggedBatch:
    """One sequence per query: [item 1, query q]."""
    B = len(query_ids)
    z = lambda: torch.zeros(2 * B, dtype=torch.long)  # noqa: E731
    items, qids, types = z(), z(), z()
    items[0::2], qids[1::2], types[1::2] = 1, torch.tensor(query_ids), TOKEN_QUERY
    return JaggedBatch(item_ids=items, query_ids=qids, timestamps=z(), next_timestamps=z(), actions=z(),
                       token_types=types, domains=z(), targets=z(), offsets=torch.arange(0, 2 * B + 1, 2),
                       domain=torch.zeros(B, dtype=torch.long), user=torch.arange(B))


@pytest.mark.parametrize("query_repr", ["text", "id+text"])
def test_query_token_is_embedded_from_its_text(query_repr):
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text[0] = 0
    text[4] = text[2]  # two query strings with the same text vector
    cfg = ModelConfig(dim=4, num_heads=1, query_repr=query_repr, input_dropout=0.0, abs_pos_emb=False)
    model = SeqRecModel(cfg, num_items=3, num_queries=5, max_len=4, feats=ItemFeatures(query_text=text)).eval()
    emb, batch = model.embed, _query_batch([2, 4, 0])
    x = emb(batch, torch.zeros(6, dtype=torch.long))[1::2]  # (3, D) the query tokens
    want = emb.query_proj(text[[2, 4, 0]]) * emb.scale + emb.token_type.weight[TOKEN_QUERY]
    if query_repr == "id+text":
        want = want + emb.query.weight[[2, 4, 0]] * emb.scale
    torch.testing.assert_close(x, want)
    if query_repr == "text":
        torch.testing.assert_close(x[0], x[1])  # the text decides; the id carries nothing
        assert emb.query is None
    torch.testing.assert_close(x[2], emb.token_type.weight[TOKEN_QUERY])  # query id 0: no text, no id


def test_text_query_repr_without_vectors_says_how_to_make_them():
    with pytest.raises(ValueError, match="data_pipeline content"):
        SeqRecModel(ModelConfig(dim=4, query_repr="text"), num_items=3, num_queries=5, max_len=4)
    with pytest.raises(ValueError, match="query_repr"):
        SeqRecModel(ModelConfig(dim=4, query_repr="words"), num_items=3, num_queries=5, max_len=4)


def test_pretraining_with_text_queries(search_shards, tmp_path):
    """query_repr=text through the real loader and DeepSpeed engine; the export round-trips its buffer."""
    from configs.load import load_config
    from configs.schema import PretrainConfig
    from serve import load_export
    from train.export import main as export
    from train.pretrain import main
    shards = search_shards / "shards"
    queries.embed_queries(shards, ContentConfig(cache_dir=str(search_shards / "cache")), progress=False)
    run = tmp_path / "run"
    metrics = main(load_config(PretrainConfig, None, [
        f"shards={shards}", f"run_dir={run}", "train.epochs=2", "data.batch_size=16", "data.max_len=30",
        "data.num_workers=0", "model.dim=16", "model.num_heads=2", "loss.num_negatives=16", "train.patience=0",
        "model.query_repr=text", "model.attention_backend=ref", "eval.batch_size=64"]))
    assert np.isfinite(metrics["test"]["ndcg@10"]) and metrics["test"]["count"] == 60
    export(run, tmp_path / "export", command="test")
    exp = load_export(tmp_path / "export")
    vectors, _ = queries.load_query_vectors(shards)
    assert np.array_equal(exp.model.embed.query_text.numpy(), vectors)
