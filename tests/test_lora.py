"""Per-domain LoRA adapters (model/lora.py): zero init is the base layer, merged equals unmerged, a mixed
batch equals each domain run alone (outputs and gradients), and no domain's rows touch another's adapter."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.lora import (
    DomainLoRALinear,
    add_domain_adapters,
    domain_adapter_state,
    load_domain_adapter,
    lora_rank,
)


def _layer(num_domains=3, rank=4, trained=True, seed=0):
    torch.manual_seed(seed)
    layer = DomainLoRALinear(nn.Linear(16, 24), num_domains, rank, scale=0.5)
    if trained:  # B away from zero, as after training
        with torch.no_grad():
            layer.B.normal_(std=0.3)
    return layer


def test_rank_is_width_over_alpha_or_fixed():
    assert lora_rank(64, 16) == 4 and lora_rank(50, 16) == 3 and lora_rank(8, 16) == 1
    assert lora_rank(64, 16, rank=7) == 7
    with pytest.raises(ValueError):
        lora_rank(64, 0)


def test_zero_initialised_adapters_give_exactly_the_base_layer():
    layer = _layer(trained=False)
    x, dom = torch.randn(11, 16), torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 0, 1])
    assert torch.equal(layer(x, dom), layer.base(x))


def test_merged_equals_unmerged_per_domain():
    layer = _layer()
    x = torch.randn(9, 16)
    for d in range(3):
        got = layer(x, torch.full((9,), d))
        torch.testing.assert_close(layer.merged_linear(d)(x), got, atol=1e-6, rtol=0)


def test_a_mixed_batch_equals_each_domain_alone_outputs_and_gradients():
    x, dom = torch.randn(13, 16), torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 0, 2, 1])
    mixed = _layer()
    out = mixed(x, dom)
    (out ** 2).sum().backward()
    alone = _layer()
    for d in range(3):  # the rows of one domain at a time, gradients accumulated
        rows = dom == d
        part = alone(x[rows], dom[rows])
        torch.testing.assert_close(part, out[rows], atol=1e-6, rtol=0)
        (part ** 2).sum().backward()
    for (name, a), (_, b) in zip(mixed.named_parameters(), alone.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_rows_of_one_domain_put_no_gradient_into_another_domains_adapter():
    layer = _layer()
    x = torch.randn(6, 16)
    layer(x, torch.full((6,), 1)).sum().backward()
    for p in (layer.A, layer.B):
        assert p.grad[1].abs().sum() > 0
        assert not p.grad[0].any() and not p.grad[2].any()


def test_swap_into_named_layers_and_one_domains_adapter_saves_and_loads_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    names = add_domain_adapters(model, [r"0", r"2\.0"], num_domains=2, alpha=4)
    assert names == ["0", "2.0"] and model[0].rank == 2 and isinstance(model[2][0], DomainLoRALinear)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        add_domain_adapters(nn.Sequential(nn.Linear(2, 2)), ["uvqk"], num_domains=2)
    with torch.no_grad():
        for layer in (model[0], model[2][0]):
            layer.B.normal_()
    state = domain_adapter_state(model, 1)
    assert set(state) == {"0.A", "0.B", "2.0.A", "2.0.B"} and state["0.A"].shape == (8, 2)
    other = model[0].A[0].clone()
    with torch.no_grad():
        model[0].B.zero_()
        model[2][0].B.zero_()
    load_domain_adapter(model, 1, state)
    assert torch.equal(model[0].B[1], state["0.B"]) and torch.equal(model[2][0].B[0], torch.zeros(2, 4))
    assert torch.equal(model[0].A[0], other)  # domain 0 untouched
    with pytest.raises(ValueError, match="missing"):
        load_domain_adapter(model, 1, {"0.A": state["0.A"]})


def test_unknown_domain_id_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        _layer()(torch.randn(2, 16), torch.tensor([0, 5]))
