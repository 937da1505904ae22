"""`python -m data_pipeline`: end to end on the synthetic world, help text, clean errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from data_pipeline.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_end_to_end(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["synthetic", "--out", str(out), "--quiet", "--set", "synthetic.num_users=120",
               "--set", "shards.samples_per_shard=50"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "valid targets" in printed and "movies" in printed and "    120" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["users"] == 120 and len(manifest["shards"]) == 3
    saved = json.loads((out / "prepare_config.json").read_text())
    assert saved["synthetic"]["num_users"] == 120 and saved["dataset"] == "synthetic"
    assert main(["inspect", str(out)]) == 0
    # a second run refuses to clobber without --overwrite, and says so
    assert main(["synthetic", "--out", str(out), "--quiet", "--set", "synthetic.num_users=10"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_help_explains_every_option():
    res = subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    for flag in ("--dataset", "--raw", "--out", "--config", "--set", "--skip-bad-rows", "--overwrite"):
        assert flag in res.stdout
    assert "shards.samples_per_shard" in res.stdout  # config keys are listed with their docs


def test_content_and_images_commands(tmp_path, capsys):
    """synthetic shards -> `images` -> `content` with the image modality: codes, stats, saved config;
    a missing shard folder is a clean error."""
    out = tmp_path / "syn"
    assert main(["synthetic", "--out", str(out), "--quiet", "--set", "synthetic.num_users=80",
                 "--set", "synthetic.items_per_domain=30", "--set", "shards.cold_item_frac=0.1"]) == 0
    assert main(["images", "--shards", str(out), "--out", str(tmp_path / "img.npy")]) == 0
    rc = main(["content", "--shards", str(out), "--quiet", "--set", f"content.cache_dir={tmp_path / 'c'}",
               "--set", f"content.extra_modalities=[image={tmp_path / 'img.npy'}]",
               "--set", "semantic_ids.modalities=[text,image]", "--set", "semantic_ids.codebook_size=8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "collision rate" in printed and "codebook usage per level" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["semantic_ids"]["content_modalities"] == {"text": 384, "image": 64}
    assert (out / "semantic_ids" / "content_config.json").exists()
    assert main(["content", "--shards", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "nope" in capsys.readouterr().err
