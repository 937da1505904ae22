"""`python -m data_pipeline` and `python -m train`: end to end on the synthetic world, help text, and input
errors that end in one line and exit code 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _assert_one_line_error(res: subprocess.CompletedProcess, message: str):
    """Exit code 2, no traceback, and the problem on exactly one stderr line (library warnings aside)."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), res.stderr


def _bad_ml1m(raw: Path) -> Path:
    raw.mkdir()
    (raw / "movies.dat").write_text("1::Toy Story (1995)::Animation\n", encoding="latin-1")
    (raw / "ratings.dat").write_text("1::1::5::978300760\n1::1::five::978300761\n", encoding="latin-1")
    return raw


@pytest.mark.parametrize("case", ["config_type", "raw_missing", "bad_row", "unknown_dataset",
                                  "shards_missing"])
def test_data_pipeline_input_errors_exit_2_in_one_line(tmp_path, case):
    out = str(tmp_path / "out")
    args, message = {
        "config_type": (["synthetic", "--out", out, "--set", "synthetic.drift=high"],
                        "synthetic.drift: expected a number, got 'high'"),
        "raw_missing": (["prepare", "--dataset", "ml-1m", "--raw", str(tmp_path / "nowhere"), "--out", out],
                        "ml-1m: raw folder does not exist"),
        "bad_row": (["prepare", "--dataset", "ml-1m", "--raw", str(tmp_path / "raw"), "--out", out],
                    r"ratings.dat:2: field 'Rating'"),
        "unknown_dataset": (["prepare", "--dataset", "ml-2m", "--raw", str(tmp_path), "--out", out],
                            "unknown dataset 'ml-2m'"),
        "shards_missing": (["inspect", str(tmp_path / "nowhere")], "manifest.json not found"),
    }[case]
    if case == "bad_row":
        _bad_ml1m(tmp_path / "raw")
    _assert_one_line_error(_cli("data_pipeline", *args), message)


@pytest.mark.parametrize("case", ["unknown_key", "config_missing", "shards_missing"])
def test_train_input_errors_exit_2_in_one_line(tmp_path, case):
    run = ["--set", f"run_dir={tmp_path / 'run'}"]
    args, message = {
        "unknown_key": (["--set", "train.lrr=1e-3"], "unknown key train.lrr"),
        "config_missing": (["--config", str(tmp_path / "none.yaml")], "config file .*none.yaml not found"),
        "shards_missing": (["--set", f"shards={tmp_path / 'nowhere'}", "--set", "train.lr=1e-3"],
                           "nowhere/manifest.json not found"),  # 1e-3 parses: the shards are the problem
    }[case]
    _assert_one_line_error(_cli("train", "pretrain", *run, *args), message)
