"""Export: the padded (exportable) formulation equals the jagged model, the export folder round-trips,
and a damaged export is refused by name. The HTTP server over an export: tests/test_serve.py."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configs.schema import ModelConfig
from kernels.hstu_attention import hstu_attention, hstu_attention_padded
from model.seqrec import SeqRecModel
from serve import ExportLoadError, load_export
from train.export import ExportError, export_program, random_histories, verify_program

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "hstu research": dict(arch="hstu"),
    "hstu production, norm by length": dict(arch="hstu", layer_variant="production", norm_by_length=True),
    "hstu no time bias, actions": dict(arch="hstu", time_bias=False, use_actions=True),
    "sasrec": dict(arch="sasrec"),
}


def random_model(kw: dict, num_items: int = 40, max_len: int = 17) -> SeqRecModel:
    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(dim=12, num_heads=2, **kw), num_items, 0, max_len).eval()
    with torch.no_grad():  # bias tables start near zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("_bias") and p.dim() == 1:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_padded_encoder_equals_the_jagged_model_for_every_length(name):
    model = random_model(MODELS[name])
    gen = torch.Generator().manual_seed(1)
    lengths = list(range(1, 18)) + [17, 1, 5]  # every length 1..max_len in one padded batch
    h = random_histories(40, 17, lengths, gen)
    with torch.no_grad():
        want = model(h["batch"], last_only=True)  # (B, D), the jagged path evaluation uses
        got = model.encode_padded(*h["padded"].values())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["hstu research", "sasrec"])
def test_exported_program_is_dynamic_and_checked(name):
    """One program for any batch size and history length 1..max_len, equal to eager; a program that
    differs fails the export-time check loudly."""
    model = random_model(MODELS[name])
    program = export_program(model, 17).module()
    assert verify_program(program, model, 40, 17) <= 1e-5
    h = random_histories(40, 17, [1], torch.Generator().manual_seed(3))  # B = 1, N = 1: not specialised away
    with torch.no_grad():
        torch.testing.assert_close(program(*h["padded"].values()), model(h["batch"], last_only=True), rtol=0, atol=1e-5)
    off = lambda *a: program(*a) + 1e-3  # noqa: E731
    with pytest.raises(ExportError, match="differs from the eager model"):
        verify_program(off, model, 40, 17)


@pytest.mark.parametrize("norm_by_length", [False, True])
def test_padded_attention_equals_jagged_attention_on_every_row(norm_by_length):
    torch.manual_seed(0)
    lengths = torch.tensor([5, 1, 9, 3])
    B, N, H, d = 4, 9, 2, 6
    q, k, v = (torch.randn(B, N, H, d) for _ in range(3))
    ts = torch.sort(torch.randint(0, 10**6, (B, N)), 1).values
    nts = ts + torch.randint(0, 10**4, (B, N))
    kw = dict(alpha=0.7, norm_const=9.0, norm_by_length=norm_by_length, pos_bias=torch.randn(9),
              time_bias=torch.randn(20), time_bucket_div=0.5)
    valid = torch.arange(N)[None] < lengths[:, None]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    jag = hstu_attention(q[valid], k[valid], v[valid], offsets, backend="ref", ts_q=nts[valid], ts_k=ts[valid], **kw)
    pad = hstu_attention_padded(q, k, v, lengths, ts_q=nts, ts_k=ts, **kw)
    torch.testing.assert_close(pad[valid], jag, rtol=0, atol=1e-5)
    last = hstu_attention_padded(q, k, v, lengths, ts_q=nts, ts_k=ts, last_only=True, **kw)
    torch.testing.assert_close(last, jag[offsets[1:] - 1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        hstu_attention_padded(q, k, v, lengths[:2], ts_q=nts, ts_k=ts, **kw)


def test_export_round_trip(tiny_run, tiny_export):
    """Weights, item table, items, provenance and the model card, against the run they came from."""
    from train.engine import consolidated_state_dict
    exp = load_export(tiny_export)
    state = consolidated_state_dict(tiny_run / "ckpt", "best")
    for k, v in exp.model.state_dict().items():
        torch.testing.assert_close(v, state[k].to(v.dtype), rtol=0, atol=0, msg=k)
    with torch.no_grad():
        table = F.normalize(exp.model.embed.item(torch.arange(exp.num_items + 1)), dim=-1, eps=1e-6)
    torch.testing.assert_close(exp.table, table, rtol=0, atol=1e-6)
    shards = Path(json.loads((tiny_run / "config.json").read_text())["shards"])
    manifest = json.loads((shards / "manifest.json").read_text())
    assert [r["item_id"] for r in exp.items] == manifest["id_maps"]["items"][1:]
    cold = set(manifest["split_rule"]["cold_items"])
    assert cold and all(exp.servable[i] == (i not in cold) for i in range(1, exp.num_items + 1))
    assert not exp.servable[0]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    rec = exp.record
    assert rec["test"]["hr@10"] == metrics["test"]["hr@10"] and rec["manifest_hash"] == manifest["content_hash"]
    assert len(rec["git_sha"]) >= 7 and rec["program_max_abs_diff"] <= 1e-5
    assert set(rec["files"]) == {p.name for p in tiny_export.iterdir()} - {"export.json"}
    card = (tiny_export / "README.md").read_text()
    assert f"{metrics['test']['hr@10']:.4f}" in card and "POST /recommend" in card
    assert exp.config["max_len"] == 24 and exp.config["has_timestamps"] is True


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, name", [
    ("flip a byte", "model.safetensors"), ("flip a byte", "program.pt2"), ("delete", "items.jsonl.gz"),
    ("delete", "export.json"), ("edit", "config.json"), ("unlist", "item_index.safetensors"),
])
def test_load_refuses_a_damaged_export_by_name(tiny_export, tmp_path, damage, name):
    exp = _copy(tiny_export, tmp_path / "exp")
    p = exp / name
    if damage == "flip a byte":
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif damage == "delete":
        p.unlink()
    elif damage == "edit":
        cfg = json.loads(p.read_text())
        cfg["max_len"] = 1000
        p.write_text(json.dumps(cfg))
    else:
        rec = json.loads((exp / "export.json").read_text())
        del rec["files"][name]
        (exp / "export.json").write_text(json.dumps(rec))
    with pytest.raises(ExportLoadError, match=name.replace(".", r"\.")):
        load_export(exp)


def test_load_refuses_another_format(tiny_export, tmp_path):
    exp = _copy(tiny_export, tmp_path / "exp")
    rec = json.loads((exp / "export.json").read_text())
    rec["format_version"] = 99
    (exp / "export.json").write_text(json.dumps(rec))
    with pytest.raises(ExportLoadError, match="version 99"):
        load_export(exp)


def test_export_refuses_what_it_cannot_do(tiny_run, tiny_export, tmp_path):
    from train.export import main as export
    with pytest.raises(ExportError, match="exists"):
        export(tiny_run, tiny_export)
    with pytest.raises(ExportError, match="no checkpoint"):
        export(tiny_run, tmp_path / "x", tag="nope")
    run = _copy(tiny_run, tmp_path / "run")
    m = json.loads((run / "metrics.json").read_text())
    m["manifest_hash"] = "0" * 64  # the run trained on another shard set
    (run / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match="not the shard set"):
        export(run, tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.partial"))


def test_bf16_export_and_the_cli(tiny_run, tmp_path):
    """--dtype bf16 halves the weights; the export still loads and serves (its check ran on fp32)."""
    out = tmp_path / "bf16"
    res = subprocess.run([sys.executable, "-m", "train", "export", "--run", str(tiny_run), "--out", str(out),
                          "--dtype", "bf16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exported" in res.stdout
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("embed.item.id.weight").dtype == torch.bfloat16
    assert load_export(out).record["dtype"] == "bf16"
    with gzip.open(out / "items.jsonl.gz", "rt") as f:
        assert sum(1 for _ in f) == load_export(out).num_items
    bad = subprocess.run([sys.executable, "-m", "train", "export", "--run", str(tmp_path / "none"), "--out",
                          str(tmp_path / "z")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "config.json" in bad.stderr


def test_serving_imports_neither_train_nor_deepspeed():
    """The serving team gets an export folder and serve/: nothing of the trainer may come along."""
    code = ("import sys, serve, serve.app, serve.engine, serve.__main__, serve.demo; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('train', 'deepspeed')]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="AOTInductor needs a C++ compiler")
def test_aoti_package_is_checked_and_served_by_auto(tiny_run, tmp_path):
    """--aoti compiles the same program (checked against eager at export time, like program.pt2); the
    server's default encoder 'auto' picks it, and its answers equal the program's (~1 min: C++ build)."""
    import numpy as np

    from serve.engine import Recommender
    from train.export import main as export
    rec = export(tiny_run, tmp_path / "aoti", aoti=True, command="test")
    assert "program_aoti.pt2" in rec["files"] and rec["aoti_max_abs_diff"] <= 1e-5
    exp = load_export(tmp_path / "aoti")
    auto, program = Recommender(exp, "auto"), Recommender(exp, "program")
    assert auto.encoder == "aoti"
    ids = [r["item_id"] for r in exp.items if r["servable"]]
    rng = np.random.default_rng(0)
    for n in (1, 7, 24, 30):  # 30 > max_len: cut to the last 24
        hist = [ids[i] for i in rng.choice(len(ids), n, replace=False)]
        a, p = (r.run([r.prepare(hist, k=10)])[0].hits for r in (auto, program))
        assert [i for i, _ in a] == [i for i, _ in p]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in p], atol=1e-5)
