"""The throughput benchmark compares like with like: its naive padded HSTU computes the same function
as the reference-attention HSTU (so the ratio measures implementation, not math), and the script runs."""
from __future__ import annotations

import json

import pytest
import torch

from bench import throughput
from configs.schema import LoaderConfig, ModelConfig
from data_pipeline.collate import make_loader
from data_pipeline.read_shards import load_manifest


def test_naive_padded_hstu_equals_reference_hstu(shard_dir):
    torch.manual_seed(0)
    manifest = load_manifest(shard_dir)
    cfg = ModelConfig(num_layers=2, dim=16, num_heads=2, attention_backend="ref")
    ref, naive = throughput.build("hstu", cfg, manifest, 40), throughput.build("hstu_naive", cfg, manifest, 40)
    with torch.no_grad():  # random (not zero-initialised) biases, so the bias path is really compared
        for block in ref.blocks:
            block.pos_bias.normal_()
            block.time_bias.normal_()
    naive.load_state_dict(ref.state_dict())
    ref.eval(), naive.eval()
    batch = next(iter(make_loader(shard_dir, "train", LoaderConfig(batch_size=8, max_len=40, num_workers=0))))
    assert batch.num_sequences > 1 and int(batch.lengths.min()) < int(batch.lengths.max())  # really jagged
    torch.testing.assert_close(naive(batch), ref(batch), atol=1e-5, rtol=1e-4)


def test_throughput_script_writes_results(shard_dir, tmp_path):
    throughput.main(["--shards", str(shard_dir), "--batches", "1", "--warmup", "0", "--dim", "16",
                     "--out", str(tmp_path)])
    res = json.loads((tmp_path / "throughput_l2_h1.json").read_text())
    assert set(res["results"]) == {"hstu", "hstu_naive", "sasrec"}
    assert all(r["tokens_per_s"] > 0 for r in res["results"].values())


def test_throughput_script_refuses_too_few_batches(shard_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--shards", str(shard_dir), "--batches", "50", "--out", str(tmp_path)])
    assert "train batches" in capsys.readouterr().err


def test_ml1m_variants_table_reads_changes_off_the_run_configs(tmp_path):
    """A variant's row names exactly the fields that differ from its model's YAML (seed/paths ignored)."""
    import dataclasses

    from bench import ml1m_variants as mv
    from bench.seqrec import ROOT
    from configs.load import load_config
    from configs.schema import PretrainConfig
    base = dataclasses.asdict(load_config(PretrainConfig, ROOT / mv.CONFIGS["hstu_large"]))
    test = {k: 0.1 for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50")}
    for name, change in (("hstu_large_rw_s1", 0.5), ("hstu_large_s0", 0.0)):
        cfg = json.loads(json.dumps(base))
        cfg["data"]["random_window"], cfg["train"]["seed"], cfg["run_dir"] = change, 1, f"/x/{name}"
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        (tmp_path / name / "metrics.json").write_text(json.dumps(dict(test=test, best_epoch=3, epochs_run=5,
                                                                      valid={"hr@10": 0.2})))
    (tmp_path / "hstu_large_s9").mkdir()  # unfinished: no metrics.json, skipped
    rows = {r["run"]: r for r in mv.collect(tmp_path)}
    assert set(rows) == {"hstu_large_rw_s1", "hstu_large_s0"}
    assert rows["hstu_large_rw_s1"]["changes"] == ["data.random_window=0.5"]
    assert rows["hstu_large_s0"]["changes"] == [] and rows["hstu_large_s0"]["model"] == "hstu_large"
    mv.write(list(rows.values()), tmp_path / "out", "cmd")
    table = (tmp_path / "out" / "ml1m_variants.md").read_text()
    assert "| hstu_large_s0 | paper recipe | best valid epoch | 0.2000 |" in table
