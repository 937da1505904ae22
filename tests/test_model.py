"""Model: causality, batch independence (jagged == one sequence at a time), both HSTU variants and
SASRec learn on the synthetic world, losses agree with direct formulas."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from configs.schema import LoaderConfig, LossConfig, ModelConfig, ShardConfig, SyntheticConfig
from data_pipeline.collate import collate, example_to_tokens, make_loader
from data_pipeline.read_shards import load_manifest, read_shards
from data_pipeline.synthetic import generate
from data_pipeline.write_shards import write_shards
from model.seqrec import SeqRecModel, build_model
from tests.helpers import FixedTableModel
from train import losses

VARIANTS = [dict(arch="hstu", layer_variant="research"), dict(arch="hstu", layer_variant="production"),
            dict(arch="hstu", layer_variant="research", norm_by_length=True), dict(arch="sasrec")]


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "shards"
    ds = generate(SyntheticConfig(num_users=300, items_per_domain=60, mean_events=20)).dataset
    write_shards(ds, out, ShardConfig(samples_per_shard=100), progress=False)
    return out


def tiny(**kw) -> ModelConfig:
    return ModelConfig(num_layers=2, dim=16, num_heads=2, input_dropout=0.0, linear_dropout=0.0,
                       attention_backend="ref", **kw)


def some_batch(shards, n=6, max_len=40):
    exs = [example_to_tokens(ex, True, max_len) for ex in read_shards(shards, "test", LoaderConfig(), shuffle=False)]
    return collate([e for e in exs if e is not None][:n])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_causality(world_shards, variant):
    torch.manual_seed(0)
    m = build_model(tiny(**variant), load_manifest(world_shards), 40).eval()
    b = some_batch(world_shards)
    base = m(b)
    s, e = int(b.offsets[2]), int(b.offsets[3])  # change the second half of sequence 2
    cut = (s + e) // 2
    b2 = dataclasses.replace(b, item_ids=b.item_ids.clone(), timestamps=b.timestamps.clone())
    b2.item_ids[cut:e] = (b2.item_ids[cut:e] % 50) + 1
    b2.timestamps[cut:e] += 10_000
    moved = m(b2)
    torch.testing.assert_close(moved[:cut], base[:cut])
    torch.testing.assert_close(moved[e:], base[e:])
    assert not torch.allclose(moved[cut:e], base[cut:e])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_jagged_batch_equals_one_sequence_at_a_time(world_shards, variant):
    torch.manual_seed(0)
    m = build_model(tiny(**variant), load_manifest(world_shards), 40).eval()
    b = some_batch(world_shards, n=5)
    together = m(b)
    exs = [example_to_tokens(ex, True, 40) for ex in read_shards(world_shards, "test", LoaderConfig(), shuffle=False)]
    alone = torch.cat([m(collate([e])) for e in [e for e in exs if e is not None][:5]])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_loss_falls_on_synthetic_world(world_shards, variant):
    torch.manual_seed(0)
    manifest = load_manifest(world_shards)
    m = build_model(tiny(**variant), manifest, 40)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    cfg = LossConfig(num_negatives=32)
    gen = torch.Generator().manual_seed(0)
    batches = list(make_loader(world_shards, "train", LoaderConfig(batch_size=64, max_len=40, num_workers=0)))
    first = last = None
    for epoch in range(6):
        total = 0.0
        for b in batches:
            loss, _ = losses.compute_loss(m, b, cfg, manifest["vocab"]["num_items"], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        first = total if first is None else first
        last = total
    assert last < 0.85 * first, (first, last)


def test_per_position_logits_match_a_direct_gather_with_repeated_ids():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 11, (37, 5), generator=g)  # 185 draws of 11 rows: many repeats in and across rows
    idx[0] = 3  # one row drawing the same item 5 times
    direct = torch.einsum("pd,prd->pr", states, table[idx])
    gout = torch.randn(37, 5, generator=g, dtype=torch.float64)
    out = losses._PerPositionLogits.apply(states, table, idx)
    torch.testing.assert_close(out, direct)
    want = torch.autograd.grad(direct, (states, table), gout)
    for a, b in zip(torch.autograd.grad(out, (states, table), gout), want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("num_items", [5, 5000])  # whole-table path, then the unique() path (P x R < items)
def test_sampled_softmax_paths_equal_the_formula(num_items):
    torch.manual_seed(0)
    model = FixedTableModel(table=torch.randn(num_items + 1, 6, dtype=torch.float64), trainable=True)
    states = F.normalize(torch.randn(7, 6, dtype=torch.float64), dim=-1)
    targets = torch.randint(1, num_items + 1, (7,))
    cfg = LossConfig(num_negatives=9)
    logits = losses.sampled_softmax_logits(states, targets, model, cfg, num_items, torch.Generator().manual_seed(1))
    neg = torch.randint(1, num_items + 1, (7, 9), generator=torch.Generator().manual_seed(1))  # the same draws
    emb = F.normalize(model.embed.item.weight, dim=-1)
    want = torch.einsum("pd,prd->pr", states, emb[torch.cat([targets[:, None], neg], 1)])
    want[:, 1:] = want[:, 1:].masked_fill(neg == targets[:, None], losses.MASKED)
    torch.testing.assert_close(logits, want)


@pytest.mark.parametrize("shared", [False, True])
def test_sampled_softmax_masks_the_positive_among_negatives(shared):
    torch.manual_seed(0)
    model = FixedTableModel(table=torch.randn(4, 6), trainable=True)
    states = F.normalize(torch.randn(50, 6), dim=-1)
    targets = torch.randint(1, 4, (50,))
    cfg = LossConfig(num_negatives=64, shared_negatives=shared)
    logits = losses.sampled_softmax_logits(states, targets, model, cfg, 3, torch.Generator().manual_seed(1))
    emb = F.normalize(model.embed.item.weight, dim=-1)
    torch.testing.assert_close(logits[:, 0], (states * emb[targets]).sum(-1))
    # only 3 items: about a third of the negatives hit the positive and must be masked, the rest not
    masked = logits[:, 1:] == losses.MASKED
    assert 0.2 < masked.float().mean() < 0.5
    assert (logits[:, 1:][~masked].abs() <= 1.0 + 1e-5).all()  # cosines


def test_full_softmax_is_cross_entropy_over_the_catalogue():
    torch.manual_seed(0)
    model = FixedTableModel(table=torch.randn(6, 4), trainable=True)
    states = F.normalize(torch.randn(9, 4), dim=-1)
    logits = losses.full_softmax_logits(states, model, 5)
    emb = F.normalize(model.embed.item.weight, dim=-1)
    torch.testing.assert_close(logits[:, 1:], states @ emb[1:].T)
    assert (logits[:, 0] == losses.MASKED).all()


def test_in_batch_logq_correction():
    torch.manual_seed(0)
    model = FixedTableModel(table=torch.randn(5, 4), trainable=True)
    states = F.normalize(torch.randn(6, 4), dim=-1)
    targets = torch.tensor([1, 1, 1, 2, 3, 3])
    logits, logq, hit = losses.in_batch_logits(states, targets, model)
    torch.testing.assert_close(logq, torch.log(torch.tensor([3 / 6, 1 / 6, 2 / 6])))
    assert hit.tolist()[0] == [True, False, False] and hit.tolist()[3] == [False, True, False]


def test_model_rejects_bad_config():
    with pytest.raises(ValueError, match="arch"):
        SeqRecModel(ModelConfig(arch="gru"), 10, 0, 20)
    with pytest.raises(ValueError, match="divisible"):
        SeqRecModel(ModelConfig(dim=10, num_heads=3), 10, 0, 20)
