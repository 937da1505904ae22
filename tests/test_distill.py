"""Distillation: the KD loss on hand-computed cases, a frozen teacher, teacher label files (round trip,
refusal, the same loss as online forwards), and a distilled small student beating the same student alone
on the synthetic world. One teacher (2 layers, D 32, 8 epochs, ~5 s) serves every test."""
from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from configs.load import ConfigError, load_config
from configs.schema import KDConfig, LoaderConfig, LossConfig, ModelConfig, PretrainConfig, ShardConfig, SyntheticConfig
from data_pipeline.collate import make_loader
from data_pipeline.read_shards import load_manifest
from data_pipeline.synthetic import generate
from data_pipeline.write_shards import write_shards
from model.seqrec import build_model
from train import losses
from train.__main__ import main as cli
from train.distill import distill_config
from train.distill import main as distill
from train.pretrain import main as pretrain
from train.pretrain import train_candidates
from train.teacher import OnlineTeacher, allowed_items, load_teacher
from train.teacher_labels import LabelError, TeacherLabels

BASE = ["data.batch_size=32", "data.max_len=30", "data.num_workers=0", "loss.num_negatives=32", "eval.batch_size=128",
        "train.patience=0", "model.attention_backend=ref", "train.lr=5e-3"]
STUDENT = ["model.dim=16", "model.num_layers=1", "model.num_heads=1", "model.attention_backend=ref", "train.lr=5e-3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread runs them faster than two (the runs here took 3.5 s each on one
    thread and ~25 s on two of two busy cores), and the measured numbers below are one-thread ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """200 users, 120 items in 3 domains, 15% searches (query tokens are distilled too)."""
    out = tmp_path_factory.mktemp("distill") / "shards"
    ds = generate(SyntheticConfig(num_users=200, items_per_domain=40, mean_events=14, search_prob=0.15)).dataset
    write_shards(ds, out, ShardConfig(samples_per_shard=50), progress=False)
    return out


@pytest.fixture(scope="module")
def teacher(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "teacher"
    pretrain(load_config(PretrainConfig, None, BASE + [f"shards={world}", f"run_dir={run}", "train.epochs=8",
                                                       "model.dim=32", "model.num_heads=2"]))
    return run


@pytest.fixture(scope="module")
def labels(teacher, tmp_path_factory):
    """`python -m train teacher-labels` (in process), K = 20."""
    out = tmp_path_factory.mktemp("labels") / "labels"
    assert cli(["teacher-labels", "--teacher", str(teacher), "--out", str(out), "--set", "distill.top_k=20"]) == 0
    return out


def _batch(shards, batch_size=32, seed=None):
    """The first train batch: in file order, or shuffled by `seed` (another batch composition)."""
    cfg = LoaderConfig(batch_size=batch_size, max_len=30, num_workers=0, seed=seed or 0)
    return next(iter(make_loader(shards, "train", cfg, shuffle=seed is not None)))


def _student(world, align_dim: int = 0):
    manifest = load_manifest(world)
    model = build_model(ModelConfig(dim=16, num_layers=1, num_heads=1, attention_backend="ref"), manifest, 30)
    if align_dim:
        model.add_module("distill_align", nn.Linear(16, align_dim, bias=False))
    return model.eval(), manifest


# ---- the loss, by hand ---------------------------------------------------------------------------------
def test_candidate_set_is_the_union_and_temperature_on_a_hand_computed_case():
    ids, valid = losses.kd_candidates(torch.tensor([[3, 5]]), torch.tensor([5]), torch.tensor([[3, 7, 0]]))
    assert ids.tolist() == [[3, 5, 5, 3, 7, 0]]
    assert valid.tolist() == [[True, True, False, False, True, False]]  # {3, 5, 7}: repeats and padding out
    teacher = torch.tensor([[2.0, 0.0, 9.0, 9.0, -2.0, 9.0]])  # the masked columns' values must not matter
    student = torch.tensor([[0.0, 0.0, -9.0, 5.0, 0.0, 3.0]])
    T = 2.0
    z = [math.exp(1.0), math.exp(0.0), math.exp(-1.0)]  # teacher / T over {3, 5, 7}
    p = [x / sum(z) for x in z]
    want = T**2 * sum(pi * math.log(pi * 3) for pi in p)  # the student is uniform over the 3
    got = losses.ranking_kd(student, teacher, valid, T)
    assert got.shape == (1,) and got.item() == pytest.approx(want, rel=1e-5)
    # T^2 scaling: logits x T at temperature T give the T = 1 distributions, so the KL is T^2 times it
    base = losses.ranking_kd(student / T, teacher / T, valid, 1.0)
    assert got.item() == pytest.approx(T**2 * base.item(), rel=1e-5)


def test_kd_is_zero_when_the_student_equals_the_teacher_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, 12, generator=g) * 5
    valid = torch.rand(40, 12, generator=g) > 0.2
    valid[:, 0] = True
    assert losses.ranking_kd(t.clone(), t, valid, 1.5).abs().max() < 1e-5
    assert (losses.ranking_kd(t + 0.3 * torch.randn(40, 12, generator=g), t, valid, 1.5) > 0).all()
    same = t.masked_fill(~valid, 0.0) + 100.0 * (~valid)  # differences only where invalid: still zero
    assert losses.ranking_kd(same, t, valid, 1.5).abs().max() < 1e-5


def test_distill_loss_of_the_teacher_as_its_own_student_has_a_zero_kd_term(world, teacher):
    """The same model on both sides: every candidate is scored alike (the top-K logits from the teacher's
    full scoring, the rest from its table; the student's from its own): KL 0; hidden alignment MSE 0."""
    model = load_teacher(teacher, torch.device("cpu"))
    manifest = load_manifest(world)
    allowed = allowed_items(manifest["vocab"]["num_items"], None, torch.device("cpu"))
    online = OnlineTeacher(model, 20, 0.05, allowed)
    batch = _batch(world)
    model.add_module("distill_align", nn.Identity())
    kd = KDConfig(top_k=20, hidden_weight=1.0)
    _, m = losses.distill_loss(model, batch, LossConfig(num_negatives=32), kd, online(batch),
                               manifest["vocab"]["num_items"], torch.Generator().manual_seed(0))
    assert abs(m["terms"]["distill"]) < 1e-4 and abs(m["terms"]["hidden"]) < 1e-8
    assert m["terms"]["retrieval"] > 0


def test_the_task_term_is_the_pretraining_loss(world, teacher):
    student, manifest = _student(world)
    n = manifest["vocab"]["num_items"]
    batch = _batch(world)
    online = OnlineTeacher(load_teacher(teacher, torch.device("cpu")), 20, 0.05, allowed_items(n, None, "cpu"))
    for cfg in (LossConfig(num_negatives=32), LossConfig(num_negatives=32, shared_negatives=True)):
        plain, _ = losses.compute_loss(student, batch, cfg, n, torch.Generator().manual_seed(3))
        kd = KDConfig(top_k=20, kd_weight=0.0)
        both, m = losses.distill_loss(student, batch, cfg, kd, online(batch), n, torch.Generator().manual_seed(3))
        torch.testing.assert_close(both, plain)  # the same negatives, drawn once, scored by both terms
        assert m["terms"]["distill"] > 0


def test_search_positions_are_distilled_like_recommendation_ones(world, teacher):
    """loss.rec_weight = 0: only query tokens train, and their KD term is computed on the teacher's labels
    at exactly those positions (the teacher's rows are picked out of all target positions)."""
    from data_pipeline.schema import TOKEN_QUERY
    student, manifest = _student(world)
    n = manifest["vocab"]["num_items"]
    batch = _batch(world, batch_size=64)
    queries = int(((batch.token_types == TOKEN_QUERY) & (batch.targets > 0)).sum())
    assert queries > 0
    online = OnlineTeacher(load_teacher(teacher, torch.device("cpu")), 20, 0.05, allowed_items(n, None, "cpu"))
    _, m = losses.distill_loss(student, batch, LossConfig(num_negatives=32, rec_weight=0.0), KDConfig(top_k=20),
                               online(batch), n, torch.Generator().manual_seed(0))
    assert m["positions"] == queries and m["terms"]["distill"] > 0


# ---- the teacher is frozen -----------------------------------------------------------------------------
def _ckpt_digest(run) -> str:
    h = hashlib.sha256()
    for p in sorted((run / "ckpt" / "best").rglob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_teacher_parameters_get_no_gradient_and_never_change(world, teacher):
    model = load_teacher(teacher, torch.device("cpu"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student, manifest = _student(world, align_dim=32)
    student.train()
    n = manifest["vocab"]["num_items"]
    online = OnlineTeacher(model, 20, 0.05, allowed_items(n, None, "cpu"))
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    align = student.distill_align.weight.clone()
    for seed in range(2):
        batch = _batch(world, seed=seed + 1)
        loss, _ = losses.distill_loss(student, batch, LossConfig(num_negatives=32), KDConfig(top_k=20, hidden_weight=1),
                                      online(batch), n, torch.Generator().manual_seed(seed))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(student.distill_align.weight, align)  # the student's side did train
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- label files ---------------------------------------------------------------------------------------
def _labels_cfg(teacher, labels, extra=()):
    return distill_config(str(teacher), None, STUDENT + ["distill.top_k=20", f"distill.labels={labels}", *extra])


def test_label_files_round_trip_to_the_online_teacher(world, teacher, labels):
    rec = json.loads((labels / "labels.json").read_text())
    manifest = load_manifest(world)
    train = list(make_loader(world, "train", LoaderConfig(max_len=30, num_workers=0), shuffle=False))
    assert rec["users"] == sum(b.num_sequences for b in train) > 150
    assert rec["positions"] == sum(int((b.targets > 0).sum()) for b in train)
    assert rec["top_k"] == 20 and rec["parts"] == ["part-00000-of-00001"]
    assert rec["identity"]["manifest_hash"] == manifest["content_hash"]
    allowed = allowed_items(manifest["vocab"]["num_items"], train_candidates(manifest, "cpu"), "cpu")
    stored = TeacherLabels(labels, _labels_cfg(teacher, labels), manifest, allowed, "cpu")
    online = OnlineTeacher(load_teacher(teacher, torch.device("cpu")), 20, 0.05, allowed)
    batch = _batch(world, batch_size=16, seed=7)  # another composition than the labels were written in
    a, b = stored(batch), online(batch)
    assert torch.equal(a.topk_ids, b.topk_ids)
    for x, y in ((a.topk_logits, b.topk_logits), (a.states, b.states), (a.table, b.table)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    assert (a.topk_logits[:, :-1] >= a.topk_logits[:, 1:]).all()  # best first
    # a lock-step dummy batch (a rank out of data) gets placeholder labels of the right shapes
    from train.loop import dummy_batch
    dummy = stored(dummy_batch("cpu"), real=False)
    assert dummy.topk_ids.shape == (1, 20) and dummy.states.shape == (1, 32)
    student, _ = _student(world)
    loss, _ = losses.distill_loss(student, dummy_batch("cpu"), LossConfig(num_negatives=8), KDConfig(top_k=20), dummy,
                                  manifest["vocab"]["num_items"], torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    # a smaller distill.top_k reads the first columns
    five = TeacherLabels(labels, _labels_cfg(teacher, labels, ["distill.top_k=5"]), manifest, allowed, "cpu")(batch)
    assert torch.equal(five.topk_ids, a.topk_ids[:, :5])


def test_online_and_precomputed_labels_give_the_same_loss(world, teacher, labels):
    student, manifest = _student(world, align_dim=32)
    n = manifest["vocab"]["num_items"]
    cfg = _labels_cfg(teacher, labels, ["distill.hidden_weight=0.5", "distill.temperature=2"])
    allowed = allowed_items(n, None, "cpu")
    stored = TeacherLabels(labels, cfg, manifest, allowed, "cpu")
    online = OnlineTeacher(load_teacher(teacher, torch.device("cpu")), 20, 0.05, allowed)
    for seed in (3, 4):
        batch = _batch(world, seed=seed)
        got = [losses.distill_loss(student, batch, LossConfig(num_negatives=32), cfg.distill, src(batch), n,
                                   torch.Generator().manual_seed(seed)) for src in (online, stored)]
        torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-6, atol=1e-6)
        assert got[0][1]["terms"]["distill"] > 0 and got[0][1]["terms"]["hidden"] > 0


def _rewrite(src, dst, change):
    import shutil
    shutil.copytree(src, dst)
    rec = json.loads((dst / "labels.json").read_text())
    change(rec)
    (dst / "labels.json").write_text(json.dumps(rec))
    return dst


def _torchrun(args: list[str]):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "train", *args], cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def test_two_ranks_write_labels_that_read_back_like_one_ranks(world, teacher, labels, tmp_path):
    """`torchrun --nproc_per_node 2 -m train teacher-labels`: each rank writes the users it reads; read
    back (by a one-process run), every batch gets what the one-rank labels give it."""
    out = tmp_path / "two"
    _torchrun(["teacher-labels", "--teacher", str(teacher), "--out", str(out), "--set", "distill.top_k=20"])
    rec, one_rec = (json.loads((f / "labels.json").read_text()) for f in (out, labels))
    assert rec["parts"] == ["part-00000-of-00002", "part-00001-of-00002"]
    assert (rec["users"], rec["positions"]) == (one_rec["users"], one_rec["positions"])
    assert all(len(np.load(out / p / "users.npy")) > 0 for p in rec["parts"])  # both ranks had examples
    manifest = load_manifest(world)
    allowed = allowed_items(manifest["vocab"]["num_items"], None, "cpu")
    two, one = (TeacherLabels(f, _labels_cfg(teacher, f), manifest, allowed, "cpu") for f in (out, labels))
    for batch in make_loader(world, "train", LoaderConfig(batch_size=64, max_len=30, num_workers=0)):
        a, b = two(batch), one(batch)
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.states, b.states, rtol=0, atol=1e-5)


def test_label_files_are_refused_when_they_do_not_match(world, teacher, labels, tmp_path):
    from train.teacher_labels import identity_hash
    manifest = load_manifest(world)
    allowed = allowed_items(manifest["vocab"]["num_items"], None, "cpu")
    load = lambda folder, extra=(): TeacherLabels(folder, _labels_cfg(teacher, folder, extra), manifest, allowed, "cpu")

    def other_shards(rec):
        rec["identity"]["manifest_hash"] = "0" * 64
        rec["identity_hash"] = identity_hash(rec["identity"])
    with pytest.raises(LabelError, match="another shard set"):
        load(_rewrite(labels, tmp_path / "a", other_shards))
    with pytest.raises(LabelError, match="does not match its own hash"):
        load(_rewrite(labels, tmp_path / "b", lambda rec: rec["identity"].update(max_len=20)))
    with pytest.raises(LabelError, match=r"data.max_len=30, this run has data.max_len=20"):
        load(labels, ["data.max_len=20"])
    with pytest.raises(LabelError, match=r"exceeds the labels' K \(20"):
        load(labels, ["distill.top_k=50"])
    with pytest.raises(ConfigError, match="data.random_window"):
        load(labels, ["data.random_window=0.5"])
    with pytest.raises(LabelError, match="labels.json not found"):
        load(tmp_path)
    # positions that do not match the batch's (here: other targets) are refused per batch
    broken = _rewrite(labels, tmp_path / "c", lambda rec: None)
    t = np.load(broken / "part-00000-of-00001" / "targets.npy")
    np.save(broken / "part-00000-of-00001" / "targets.npy", t % 7 + 1)
    with pytest.raises(LabelError, match="differ from this batch"):
        load(broken)(_batch(world))


# ---- end to end ----------------------------------------------------------------------------------------
def test_a_distilled_student_beats_the_same_student_alone(world, teacher, tmp_path):
    """A 1-layer D 16 student, 8 epochs, seed 0. Measured on this world (seeds 0, 1, 2; test NDCG@10):
    alone .343 .336 .359, distilled (kd_weight 3, K 100) .381 .406 .409, the teacher .402."""
    digest = _ckpt_digest(teacher)
    alone = pretrain(load_config(PretrainConfig, None, BASE + STUDENT + [f"shards={world}", f"run_dir={tmp_path / 'a'}",
                                                                         "train.epochs=8"]))
    cfg = distill_config(str(teacher), None, STUDENT + [f"run_dir={tmp_path / 'kd'}", "train.epochs=8",
                                                        "distill.kd_weight=3"])
    kd = distill(cfg)
    assert kd["test"]["ndcg@10"] > alone["test"]["ndcg@10"] + 0.02, (kd["test"], alone["test"])
    assert kd["teacher"]["test"]["ndcg@10"] > alone["test"]["ndcg@10"]
    assert kd["params"]["non_embedding"] < kd["teacher"]["params"]["non_embedding"] / 4
    assert _ckpt_digest(teacher) == digest  # the teacher's weights on disk are untouched


def test_distill_from_labels_with_hidden_alignment_resumes_and_exports(world, teacher, labels, tmp_path, capsys):
    from serve import load_export
    from train.export import main as export
    run = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), "--set", f"run_dir={run}", "--set", f"distill.labels={labels}",
            "--set", "distill.top_k=20", "--set", "distill.hidden_weight=0.5", "--set", "distill.hidden_loss=cosine"]
    args += [a for kv in STUDENT for a in ("--set", kv)]
    assert cli(args + ["--set", "train.epochs=1"]) == 0
    assert cli(args + ["--set", "train.epochs=2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and m["teacher"]["labels"] == str(labels) and m["distill"]["hidden_weight"] == 0.5
    assert json.loads((run / "distill.json").read_text())["config"]["distill"]["labels"] == str(labels)
    load_config(PretrainConfig, run / "config.json")  # a plain pretraining config: export reads it
    export(run, tmp_path / "export", command="test")
    exp = load_export(tmp_path / "export")
    assert not any(k.startswith("distill_align") for k in exp.model.state_dict())
    assert exp.model.cfg.dim == 16


def test_two_process_zero3_distillation_from_labels(world, teacher, labels, tmp_path):
    """ZeRO-3 partitions the student and its alignment layer (gathered by module calls); both ranks step
    in lock-step, a rank out of data feeding dummy batches (their labels are placeholders)."""
    run = tmp_path / "z3"
    sets = STUDENT + [f"run_dir={run}", f"distill.labels={labels}", "distill.top_k=20", "distill.hidden_weight=0.5",
                      "train.epochs=1", "train.zero_stage=3", "data.batch_size=7"]
    _torchrun(["distill", "--teacher", str(teacher)] + [a for kv in sets for a in ("--set", kv)])
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["test"]["count"] == 200 and m["test"]["nonfinite_states"] == 0
    from train.engine import consolidated_state_dict
    assert consolidated_state_dict(run / "ckpt", "best")["distill_align.weight"].shape == (32, 16)


def test_bad_input_is_one_clear_line(world, teacher, tmp_path, capsys):
    run = ["--set", f"run_dir={tmp_path / 'x'}"]
    cases = [
        (["distill"] + run, "no teacher"),
        (["distill", "--teacher", str(tmp_path / "nope")] + run, "nope/config.json not found"),
        (["distill", "--teacher", str(teacher), "--set", "distill.top_kk=3"] + run, "unknown key distill.top_kk"),
        (["distill", "--teacher", str(teacher), "--set", "distill.top_k=0"] + run, "distill.top_k must be >= 1"),
        (["distill", "--teacher", str(teacher), "--set", "distill.hidden_loss=l1"] + run, "distill.hidden_loss"),
        (["distill", "--teacher", str(teacher), "--set", "data.max_len=64"] + run, r"data.max_len \(64\) exceeds"),
        (["distill", "--teacher", str(teacher), "--set", "distill.top_k=500"] + run, r"top_k \(500\) exceeds the \d+"),
        (["teacher-labels", "--teacher", str(teacher), "--out", str(tmp_path / "l"), "--set",
          "data.random_window=0.5"], "data.random_window"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and re.search(message, last), (message, last)


def test_an_adapted_run_is_a_teacher_with_its_adapters(world, teacher, tmp_path):
    from train.adapt import base_config
    from train.adapt import main as adapt
    cfg = base_config(teacher, ["train.epochs=1", "train.lr=0.01", f"run_dir={tmp_path / 'adapt'}"])
    adapt(cfg, teacher)
    model = load_teacher(tmp_path / "adapt", torch.device("cpu"))
    assert model.adapted and not any(p.requires_grad for p in model.parameters())
    assert any(v.abs().sum() > 0 for k, v in model.state_dict().items() if k.endswith(".B"))  # the trained adapters


def test_bench_scratch_row_trains_exactly_the_distilled_students_config(teacher, tmp_path):
    """bench/distill.py's scratch row is the distill YAML's student resolved against the teacher, as a
    pretrain config: same model, data, loss, train and eval keys, no teacher."""
    from bench import distill as B
    yaml = tmp_path / "student.yaml"
    yaml.write_text("model:\n  dim: 16\n  num_layers: 1\ntrain:\n  epochs: 3\ndistill:\n  kd_weight: 2.0\n")
    path = B.student_recipe(B.Setup(str(teacher) + "/unused.yaml", str(yaml), 30, ""), teacher, tmp_path)
    scratch = load_config(PretrainConfig, path)
    want = distill_config(str(teacher), yaml, [])
    assert {k: v for k, v in vars(want).items() if k != "distill"} == vars(scratch)
    assert (scratch.model.dim, scratch.train.epochs, scratch.shards) == (16, 3, want.shards)


def test_bench_verdict_computes_gap_keep_and_margin():
    from bench.distill import _gap, verdict
    cell = lambda mean, sd=0.0: dict(mean=mean, sd=sd)
    p = lambda non: dict(non_embedding=non, embedding=1000)
    rows = dict(teacher=dict(ndcg=cell(0.20), params=p(400)), scratch=dict(ndcg=cell(0.10, 0.005), params=p(100)),
                online=dict(ndcg=cell(0.19, 0.004), params=p(100), seeds=3),
                labels=dict(ndcg=cell(0.16), params=p(100)))
    rows = {k: {**r, "ndcg@10": r.pop("ndcg"), "seeds": r.get("seeds", 1)} for k, r in rows.items()}
    lat = dict(teacher=dict(p50_ms=9.0), student=dict(p50_ms=2.0))
    lines = "\n".join(verdict(rows, lat))
    assert "25.0% of the teacher's (target <= 25%: met)" in lines
    assert "95.0% of the teacher (target >= 95%: met)" in lines
    assert "+0.0900 NDCG@10, 18.0 x the larger sd (0.0050; target > 2: met)" in lines
    assert "(distilled student (online teacher)): 90%" in lines and "(precomputed labels)): 60%" in lines
    assert "4.5x lower (target >= 3x: met)" in lines
    assert (_gap(rows, "online"), _gap(rows, "labels"), _gap(rows, "scratch")) == ("90%", "60%", "-")
    rows["online"]["ndcg@10"] = cell(0.18, 0.05)  # keeps 90%, margin 0.08 < 2 x 0.05
    lines = "\n".join(verdict(rows, None))
    assert "target >= 95%: **not met**" in lines and "target > 2: **not met**" in lines
    assert "Serving latency: not measured yet" in lines


def test_bench_latency_only_trains_nothing(tmp_path, capsys):
    """--latency-only measures what finished and trains nothing more; it refuses the flags that skip latency."""
    from bench import distill as bench_distill
    with pytest.raises(SystemExit):
        bench_distill.main(["synthetic", "--latency-only", "--no-latency", "--runs", str(tmp_path / "r")])
    assert "--latency-only" in capsys.readouterr().err
    bench_distill.main(["synthetic", "--latency-only", "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    assert not any((tmp_path / "r").iterdir())  # no run started, no latency (nothing finished)
    assert (tmp_path / "o" / "distill_synthetic.md").exists()
