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
