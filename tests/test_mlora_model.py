"""MLoRA inside the HSTU and SASRec models: zero-init adapters give the base model exactly, a mixed-domain
batch equals each domain's sequences alone (outputs and gradients), a sequence of domain d trains only
domain d's factors, the padded (exportable) path equals the jagged one, and a merged model
equals the adapted one for its domain."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from configs.schema import ModelConfig
from data_pipeline.collate import jagged_from_padded
from model.lora import adapter_layers, merged_state
from model.seqrec import SeqRecModel

NUM_ITEMS, DOMAINS, MAX_LEN = 40, 3, 12


def _cfg(arch: str, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, dim=16, num_heads=2, num_layers=2, input_dropout=0.0, linear_dropout=0.0,
                       attention_backend="ref", **kw)


def _model(arch: str, seed: int = 0, trained: bool = True, **kw) -> SeqRecModel:
    torch.manual_seed(seed)
    model = SeqRecModel(_cfg(arch, **kw), NUM_ITEMS, 0, MAX_LEN, num_domains=DOMAINS)
    if trained:  # B away from zero, as after training
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                layer.B.normal_(std=0.2)
    return model


def _padded(seed: int = 1, B: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 12, 3, 8, 2, 7])[:B]
    N = int(lengths.max())
    ids = torch.randint(1, NUM_ITEMS + 1, (B, N), generator=g)
    ts = torch.arange(N)[None].expand(B, N) * 100
    return ids, torch.full((B, N), 2), ts, ts + 100, lengths


def _batch(domains: torch.Tensor, seed: int = 1):
    ids, act, ts, nts, lengths = _padded(seed, domains.numel())
    return dataclasses.replace(jagged_from_padded(ids, act, ts, nts, lengths), domain=domains)


MIXED = torch.tensor([2, 0, 1, 1, 0, 2, 0])


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_zero_initialised_adapters_give_exactly_the_base_model(arch):
    base, adapted = _model(arch, trained=False), _model(arch, trained=False, adapters="mlora")
    own = {k.replace(".base.", "."): v for k, v in adapted.state_dict().items() if not k.endswith((".A", ".B"))}
    base.load_state_dict(own, strict=True)
    b = _batch(MIXED)
    assert torch.equal(adapted(b), base(b))


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_a_mixed_domain_batch_equals_each_domain_alone(arch):
    mixed, alone = _model(arch, adapters="mlora"), _model(arch, adapters="mlora")
    b = _batch(MIXED)
    out = mixed(b, last_only=True)  # (B, D)
    out.pow(3).sum().backward()
    for d in range(DOMAINS):
        rows = (MIXED == d).nonzero().squeeze(1)
        ids, act, ts, nts, lengths = (t[rows] for t in _padded(1, MIXED.numel()))
        part_batch = dataclasses.replace(jagged_from_padded(ids, act, ts, nts, lengths), domain=MIXED[rows])
        part = alone(part_batch, last_only=True)
        torch.testing.assert_close(part, out[rows], atol=1e-5, rtol=0)
        part.pow(3).sum().backward()
    for (name, p), (_, q) in zip(mixed.named_parameters(), alone.named_parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_a_sequence_of_one_domain_trains_only_that_domains_adapter(arch):
    model = _model(arch, adapters="mlora")
    model(_batch(torch.full((7,), 1))).sum().backward()
    layers = adapter_layers(model)
    assert len(layers) == (4 if arch == "hstu" else 8)  # every dense layer of both blocks by default
    for name, layer in layers.items():
        for p in (layer.A, layer.B):
            assert p.grad[1].abs().sum() > 0, name
            assert not p.grad[0].any() and not p.grad[2].any(), name


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_padded_exportable_path_equals_the_jagged_one(arch):
    model = _model(arch, adapters="mlora", domain_embedding=True).eval()
    with torch.no_grad():
        model.domain_emb.weight.normal_(std=0.1)
        got = model.encode_padded(*_padded(1, 7), domains=MIXED)
        want = model(_batch(MIXED), last_only=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pass domains"):
        model.encode_padded(*_padded(1, 7))


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_merged_model_equals_the_adapted_model_for_its_domain(arch):
    model = _model(arch, adapters="mlora").eval()
    for d in range(DOMAINS):
        plain = SeqRecModel(_cfg(arch), NUM_ITEMS, 0, MAX_LEN, num_domains=DOMAINS).eval()
        plain.load_state_dict(merged_state(model, d), strict=True)
        b = _batch(torch.full((7,), d))
        with torch.no_grad():
            torch.testing.assert_close(plain(b), model(b), atol=1e-6, rtol=0)


def test_adapter_targets_pick_layers_and_rank_follows_alpha():
    model = _model("hstu", adapters="mlora", adapter_targets=["out"], adapter_alpha=4)
    layers = adapter_layers(model)
    assert sorted(layers) == ["blocks.0.out", "blocks.1.out"] and layers["blocks.0.out"].rank == 4  # 16 // 4
    with pytest.raises(ValueError, match="match no nn.Linear"):
        _model("hstu", adapters="mlora", adapter_targets=["qkv"])  # a SASRec name on HSTU
    with pytest.raises(ValueError, match="outside"):
        _model("hstu", adapters="mlora")(_batch(torch.tensor([0, 1, 2, 3, 0, 0, 0])))


def test_within_domain_ranks_a_target_among_its_own_domains_items_only():
    from configs.schema import EvalConfig
    from train.evaluate import rank_targets
    # items 1..4: domains 0, 1, 0, 1; two sequences (domain 0 then 1) whose targets are items 3 and 2
    item_domain = torch.tensor([-1, 0, 1, 0, 1])
    batch = dataclasses.replace(jagged_from_padded(*_padded(1, 2)), domain=torch.tensor([0, 1]),
                                targets=torch.zeros(13, dtype=torch.long))
    last = batch.offsets[1:] - 1
    batch.targets[last] = torch.tensor([3, 2])
    scores = lambda lo, hi: torch.tensor([[0.0, 0.9, 0.8, 0.5, 0.7], [0.0, 0.9, 0.1, 0.5, 0.7]])[:, lo:hi]  # noqa: E731
    cfg = EvalConfig(exclude_history="none", item_chunk=8)
    everywhere = rank_targets(scores, batch, cfg, 4).ranks
    within = rank_targets(scores, batch, cfg, 4, item_domain=item_domain).ranks
    assert everywhere.tolist() == [4, 4] and within.tolist() == [2, 2]  # item 1 beats 3; item 4 beats 2
