"""`python -m train adapt`: the backbone stays bit-identical, each domain's adapter is saved alone and
only the chosen domains train; joint MLoRA pretraining runs under ZeRO-3 on 2 processes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from configs.load import ConfigError, load_config
from configs.schema import PretrainConfig
from tests.test_pretrain import TINY, params, shards, torchrun  # noqa: F401  (shards: the fixture)
from train.adapt import base_config
from train.adapt import main as adapt
from train.pretrain import main as pretrain


@pytest.fixture(scope="module")
def base_run(shards, tmp_path_factory):  # noqa: F811  (the imported fixture)
    run = tmp_path_factory.mktemp("adapt_base") / "base"
    pretrain(load_config(PretrainConfig, None, TINY + [f"shards={shards}", f"run_dir={run}", "train.epochs=2"]))
    return run


def _adapt(base, extra=(), domains=()):
    cfg = base_config(base, ["train.epochs=2", "train.lr=0.01", f"run_dir={base.parent / 'adapt'}", *extra])
    return cfg, adapt(cfg, base, domains)  # the same run_dir each time: a rerun must drop stale adapters


def test_adapt_leaves_the_backbone_bit_identical_and_saves_each_domain_alone(base_run):
    cfg, metrics = _adapt(base_run)
    before, after = params(base_run, "best"), params(cfg.run_dir and base_run.parent / "adapt", "best")
    backbone = {k.replace(".base.", "."): v for k, v in after.items() if not k.endswith((".A", ".B"))}
    assert backbone.keys() == before.keys()
    for k in before:
        assert torch.equal(backbone[k], before[k]), k
    assert any(after[k].abs().sum() > 0 for k in after if k.endswith(".B"))  # the adapters did train
    names = json.loads((base_run.parent / "adapt" / "adapt.json").read_text())["domains"]
    assert names == ["beauty", "books", "movies"]
    for d, name in enumerate(names):
        alone = load_file(str(base_run.parent / "adapt" / "adapters" / f"{name}.safetensors"))
        assert set(alone) == {f"blocks.{i}.{layer}.{p}" for i in (0, 1) for layer in ("uvqk", "out") for p in "AB"}
        for k, v in alone.items():  # the saved best epoch of each domain is what ckpt/best holds
            assert torch.equal(v, after[k][d]), k
    per_domain = metrics["trainable_adapter_values"] / 3
    assert per_domain < 0.2 * sum(v.numel() for v in before.values())
    assert set(metrics["best_epoch_per_domain"]) == set(names)


def test_adapt_with_domains_trains_only_those(base_run):
    _adapt(base_run, domains=["books"])
    after = params(base_run.parent / "adapt", "best")
    for k in (k for k in after if k.endswith(".B")):
        assert after[k][1].abs().sum() > 0, k  # books (id 1) trained
        assert not after[k][0].any() and not after[k][2].any(), k  # the others keep B = 0
    assert [p.name for p in (base_run.parent / "adapt" / "adapters").iterdir()] == ["books.safetensors"]
    with pytest.raises(ConfigError, match="unknown domain"):
        _adapt(base_run, domains=["toys"])


def test_adapt_refuses_a_base_of_another_model(base_run):
    with pytest.raises(ConfigError, match=r"embed.item.id.weight: shape \(118, 16\), the model has \(118, 8\)"):
        _adapt(base_run, ["model.dim=8", "model.num_heads=1"])
    with pytest.raises(ConfigError, match="do not fit"):  # a layer the base lacks
        _adapt(base_run, ["model.domain_embedding=true"])


def test_zero3_two_processes_train_mlora_jointly(tmp_path, shards):  # noqa: F811
    run = tmp_path / "z3"
    torchrun(run, shards, ["train.epochs=1", "train.zero_stage=3", "model.adapters=mlora", "train.lr=0.01"])
    state = params(run)
    assert {k for k in state if k.endswith(".A")} == {f"blocks.{i}.{n}.A" for i in (0, 1) for n in ("uvqk", "out")}
    assert all(state[k].shape[0] == 3 and state[k].abs().sum() > 0 for k in state if k.endswith(".B"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["test"]["count"] > 0 and m["test"]["nonfinite_states"] == 0


def test_data_domains_keeps_only_that_domains_examples_in_every_split(shards):  # noqa: F811
    from configs.schema import LoaderConfig
    from data_pipeline.collate import make_loader
    names = json.loads((shards / "manifest.json").read_text())["id_maps"]["domains"]
    books = names.index("books")
    for split in ("train", "valid", "test"):
        every = torch.cat([b.domain for b in make_loader(shards, split, LoaderConfig(num_workers=0))])
        kept = torch.cat([b.domain for b in make_loader(shards, split, LoaderConfig(num_workers=0, domains=["books"]))])
        assert (kept == books).all() and len(kept) == int((every == books).sum()) > 0, split
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['toys'\]"):
        next(make_loader(shards, "test", LoaderConfig(num_workers=0, domains=["toys"])))


def test_init_from_starts_a_one_domain_fine_tune_from_the_base_weights(base_run, tmp_path):
    run = tmp_path / "ft"
    cfg = load_config(PretrainConfig, base_run / "config.json",
                      [f"run_dir={run}", "train.epochs=1", "train.lr=0", "train.init_from=" + str(base_run),
                       "data.domains=[books]"])
    metrics = pretrain(cfg)
    assert set(metrics["test"]["per_domain"]) == {"books"}  # tested on books' examples only
    before, after = params(base_run, "best"), params(run, "best")
    for k in before:  # lr 0: the fine-tune's weights are the base's, so init_from loaded all of them
        assert torch.equal(after[k], before[k]), k
    bad = load_config(PretrainConfig, base_run / "config.json",
                      [f"run_dir={tmp_path / 'bad'}", "model.domain_embedding=true", f"train.init_from={base_run}"])
    with pytest.raises(ConfigError, match="do not fit"):
        pretrain(bad)


def test_a_base_run_of_another_shard_set_is_refused_by_init_from_and_adapt(base_run, tmp_path):
    """Its item ids would mean other items: train.init_from and train adapt --base say so, naming the run."""
    import shutil
    other = tmp_path / "other"
    shutil.copytree(base_run, other)
    m = json.loads((other / "metrics.json").read_text())
    m["manifest_hash"] = "f" * 64
    (other / "metrics.json").write_text(json.dumps(m))
    cfg = load_config(PretrainConfig, base_run / "config.json",
                      [f"run_dir={tmp_path / 'ft'}", "train.epochs=1", f"train.init_from={other}"])
    with pytest.raises(ConfigError, match=r"train.init_from: .*other trained on another shard set .* ffffffffffff vs"):
        pretrain(cfg)
    with pytest.raises(ConfigError, match=r"train adapt --base: .*other trained on another shard set"):
        adapt(base_config(other, [f"run_dir={tmp_path / 'ad'}"]), other)
