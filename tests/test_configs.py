"""Typed configs: YAML + overrides, strict keys and types, docstrings for every field, saved JSON."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from configs import schema
from configs.load import ConfigError, describe, field_docs, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = [c for c in vars(schema).values() if dataclasses.is_dataclass(c)]


def test_defaults_without_file():
    cfg = load_config(schema.PrepareConfig)
    assert cfg == schema.PrepareConfig()


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: ml-1m\nshards:\n  samples_per_shard: 7\nsynthetic:\n  domains: [a, b]\n")
    cfg = load_config(schema.PrepareConfig, f, ["shards.samples_per_shard=9", "synthetic.drift=0.5"])
    assert cfg.dataset == "ml-1m" and cfg.shards.samples_per_shard == 9
    assert cfg.synthetic.domains == ["a", "b"] and cfg.synthetic.drift == 0.5
    assert cfg.shards.seed == 0  # untouched keys keep defaults


@pytest.mark.parametrize("override,message", [
    ("shards.samples_per_shardd=3", "unknown key shards.samples_per_shardd"),
    ("nope.x=1", "unknown key nope"),
    ("shards.samples_per_shard=many", "shards.samples_per_shard: expected an integer"),
    ("overwrite=1", "overwrite: expected true/false"),
    ("synthetic.domains=movies", "synthetic.domains: expected a list"),
    ("synthetic.domains=[1, 2]", r"synthetic.domains\[0\]: expected a string"),
    ("synthetic.drift=high", "synthetic.drift: expected a number"),
    ("shards", "must look like section.key=value"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(schema.PrepareConfig, None, [override])


def test_unknown_key_in_yaml_names_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("shards:\n  sample_per_shard: 3\n")
    with pytest.raises(ConfigError, match="unknown key shards.sample_per_shard"):
        load_config(schema.PrepareConfig, f)


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_describe_lists_nested_keys():
    keys = {k for k, _, _ in describe(schema.PrepareConfig)}
    assert {"dataset", "shards.samples_per_shard", "synthetic.num_users"} <= keys


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(schema.PrepareConfig, None, ["synthetic.num_users=17"])
    save_config(cfg, tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["synthetic"]["num_users"] == 17
    f = tmp_path / "back.yaml"
    f.write_text(json.dumps(data))  # JSON is YAML
    assert load_config(schema.PrepareConfig, f) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("**/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_yaml_files_load(path):
    cls = {"pretrain": schema.PretrainConfig, "data": schema.PrepareConfig, "content": schema.ContentStageConfig}
    load_config(cls[path.parent.name], path)
