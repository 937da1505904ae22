"""Speed changes keep their behaviour: skipping early validations changes nothing about training, the
compiled HSTU block equals the eager one (outputs and gradients) without recompiling on new length
mixes, and the bf16 path stays within a stated tolerance of fp32."""
from __future__ import annotations

import json

import pytest
import torch

from configs.load import load_config
from configs.schema import ModelConfig, PretrainConfig
from model.seqrec import SeqRecModel
from tests.test_pretrain import TINY, params, shards  # noqa: F401  (shards: a module fixture)


def _epoch_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "epoch"]


def test_skipping_early_validation_changes_no_training_number(tmp_path, shards):  # noqa: F811
    """eval_from=2: epochs 0-1 are not validated; the losses, the final weights, the validation numbers of
    the epochs both runs validate, the selected epoch and its test numbers are all identical."""
    from train.pretrain import main
    runs = {}
    for name, extra in (("every", []), ("from2", ["train.eval_from=2"])):
        cfg = load_config(PretrainConfig, None, TINY + [f"shards={shards}", f"run_dir={tmp_path / name}",
                                                        "train.epochs=4", "train.seed=3", *extra])
        runs[name] = (main(cfg), _epoch_rows(tmp_path / name))
    (m_all, rows_all), (m_from, rows_from) = runs["every"], runs["from2"]
    assert [("valid" in r) for r in rows_from] == [False, False, True, True]
    assert [r["loss"] for r in rows_all] == [r["loss"] for r in rows_from]
    assert [r["valid"] for r in rows_all[2:]] == [r["valid"] for r in rows_from[2:]]
    a, b = params(tmp_path / "every"), params(tmp_path / "from2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if m_all["best_epoch"] >= 2:  # the rule: identical selection whenever the best epoch is validated by both
        assert m_from["best_epoch"] == m_all["best_epoch"] and m_from["test"] == m_all["test"]


def _jagged(lengths, dim, seed):
    from data_pipeline.collate import JaggedBatch  # noqa: F401  (the model reads these fields only)
    g = torch.Generator().manual_seed(seed)
    L = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ts = torch.cumsum(torch.randint(1, 4000, (L,), generator=g), 0)
    return offsets, ts, torch.randn(L, dim, generator=g)


@pytest.mark.parametrize("variant", ["research"])
def test_model_forward_matches_with_attention_chunks(variant):
    """The causal row chunks of the reference attention are invisible in the model's output: a chunk
    size larger than any sequence (one chunk) and a small one (many) give the same states and grads."""
    import kernels.hstu_attention_ref as ref
    cfg = ModelConfig(num_layers=2, dim=16, num_heads=2, layer_variant=variant, attention_backend="ref")
    torch.manual_seed(0)
    model = SeqRecModel(cfg, num_items=50, num_queries=0, max_len=64).eval()
    block = model.blocks[0]
    offsets, ts, x = _jagged([37, 1, 5, 64, 20], 16, seed=1)
    outs = {}
    old = ref.ROW_CHUNK
    try:
        for chunk in (1000, 7):
            ref.ROW_CHUNK = chunk
            xi = x.clone().requires_grad_()
            y = block(xi, offsets, ts, ts + 30, 64)
            y.pow(2).sum().backward()
            outs[chunk] = (y.detach(), xi.grad, block.time_bias.grad.clone())
            block.zero_grad()
    finally:
        ref.ROW_CHUNK = old
    for a, b in zip(outs[1000], outs[7]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,variant", [("hstu", "research"), ("hstu", "production"), ("sasrec", "research")])
def test_last_only_states_equal_the_full_forwards_last_states(arch, variant):
    """Evaluation scores model(batch, last_only=True): the same states as the full forward's last ones."""
    from tests.test_evaluate import make_batch
    cfg = ModelConfig(arch=arch, num_layers=2, dim=16, num_heads=2, layer_variant=variant,
                      attention_backend="ref", pos_bias=True, time_bias=True)
    torch.manual_seed(0)
    model = SeqRecModel(cfg, num_items=30, num_queries=0, max_len=40).eval()
    batch = make_batch([[3, 4, 5, 6, 7, 8, 9], [2], [11, 12, 13]], [1, 2, 3])
    batch.timestamps = torch.cumsum(torch.randint(1, 5000, batch.timestamps.shape), 0)  # a time bias to see
    batch.next_timestamps = batch.timestamps + 100
    with torch.no_grad():
        full = model(batch)[batch.offsets[1:] - 1]
        torch.testing.assert_close(model(batch, last_only=True), full, rtol=1e-5, atol=1e-6)


def test_precision_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    import train.engine as E
    monkeypatch.setattr(E, "cpu_has_native_bf16", lambda: False)
    assert E.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.warns(UserWarning, match="emulates"):
        assert E.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for by name: kept, with a warning
    monkeypatch.setattr(E, "cpu_has_native_bf16", lambda: True)
    assert E.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert E.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        E.resolve_precision("fp16", torch.device("cpu"))


def test_bf16_model_is_within_tolerance_of_fp32():
    """The bf16 path (DeepSpeed bf16 mode: parameters and activations in bf16) against fp32 on the same
    weights and jagged batch: unit-norm states within 0.015 max-abs (bf16 keeps 8 significant bits, ~0.4%
    per op, through 2 blocks) and the loss within 0.5%. Emulated bf16 on a CPU without it: slow, tiny model."""
    from configs.schema import LossConfig
    from tests.test_evaluate import make_batch
    from train.losses import compute_loss
    cfg = ModelConfig(num_layers=2, dim=32, num_heads=2, attention_backend="ref", input_dropout=0.0,
                      linear_dropout=0.0)
    torch.manual_seed(0)
    model = SeqRecModel(cfg, num_items=40, num_queries=0, max_len=40).eval()
    batch = make_batch([list(range(1, 30)), [2, 5], [11, 12, 13, 14, 15, 16, 17, 18]], [30, 3, 19])
    batch.timestamps = torch.cumsum(torch.randint(1, 5000, batch.timestamps.shape), 0)
    batch.next_timestamps = batch.timestamps + 100
    loss_cfg = LossConfig(kind="full_softmax")
    with torch.no_grad():
        s32 = model(batch)
        l32, _ = compute_loss(model, batch, loss_cfg, 40)
        model.to(torch.bfloat16)
        s16 = model(batch)
        l16, _ = compute_loss(model, batch, loss_cfg, 40)
    assert s16.dtype == torch.bfloat16
    assert (s16.float() - s32).abs().max() < 0.015  # measured 0.0035
    assert abs(float(l16) - float(l32)) < 0.005 * float(l32)  # measured 0.04%
