"""Benchmarks say what produced their numbers. The throughput benchmark compares like with like (its
naive padded HSTU computes the same function as the reference-attention HSTU, so the ratio measures
implementation, not math) and times whole epochs through the real trainer; the results tables read the
protocol, exclusion rule, training sha and flags off the run directories, and beauty.py is named after
the dataset it ran on."""
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
                     "--peak-size", "128", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "throughput_l2_h1.json").read_text())
    assert set(res["results"]) == {"hstu", "hstu_naive", "sasrec"}
    assert all(r["tokens_per_s"] > 0 and r["gflops_per_s"] > 0 for r in res["results"].values())
    assert res["peak"]["fp32"] > 0 and res["peak"]["bf16"] > 0
    assert "% of fp32 peak" in (tmp_path / "throughput_l2_h1.md").read_text()


def test_train_flops_counts_linears_causal_pairs_and_loss():
    from bench.flops import attention_pairs, train_flops
    cfg = ModelConfig(num_layers=1, dim=4, num_heads=1)
    # lengths [3, 1]: 4 tokens; pairs 3*4/2 + 1 = 7; 2 positions with a target, 3 negatives
    f = train_flops(cfg, [3, 1], positions=2, negatives=3)
    assert f["parts"] == {"linear": 3 * 2 * 4 * (4 * 16 + 4 * 4), "attention": 3 * 2 * 8 * 7, "loss": 3 * 2 * 2 * 4 * 4}
    assert f["per_token"] == f["total"] / 4
    assert attention_pairs([5], targets=2) == 3 * 4 // 2 + 2 * 4  # candidates see the 3 history tokens + themselves


def test_throughput_script_refuses_too_few_batches(shard_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--shards", str(shard_dir), "--batches", "50", "--out", str(tmp_path)])
    assert "train batches" in capsys.readouterr().err


def test_ml1m_variants_table_reads_changes_off_the_run_configs(tmp_path):
    """A variant's row names exactly the fields that differ from its model's YAML (seed/paths ignored)."""
    import dataclasses

    from bench import ml1m_variants as mv
    from bench.seqrec import ROOT, exclusion_rule
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
    rule = exclusion_rule({}, base)  # the schema's default rule, as the run's config.json records it
    assert f"| hstu_large_s0 | paper recipe | best valid epoch | {rule} | 0.2000 |" in table
    assert "tabulated at git" in table


# ---- results tables: what produced a number is read off the run directories ------------------------------

ML1M_HSTU = "configs/pretrain/ml1m_hstu.yaml"


def fake_run(root, name, recipe=ML1M_HSTU, train=None, metrics=None, eval_rule="full", epoch_seconds=(10.0, 12.0),
             test=None, per_slice=None, item_repr="id", sha="abcdef0123456789"):
    """A finished run directory (config.json, metrics.json, meta.json, log.jsonl) without training."""
    from bench.seqrec import recipe_config
    cfg = recipe_config(recipe)
    cfg["train"].update(train or {})
    cfg["model"]["item_repr"] = item_repr
    cfg["eval"]["exclude_history"] = True if eval_rule is None else eval_rule  # None: a run from before the field
    d = root / name
    d.mkdir(parents=True)
    cfg["run_dir"] = str(d)
    (d / "config.json").write_text(json.dumps(cfg))
    test = dict(test or {k: 0.1 for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200",
                                           "ndcg@200", "mrr")}, count=1000)
    if per_slice is not None:
        test["per_slice"] = per_slice
    if eval_rule is not None:
        test["exclude_history"] = eval_rule
    m = dict(best_epoch=3, epochs_run=14, valid={"hr@10": 0.2, "count": 900}, selected="best_valid",
             train_through_valid=False, test=test, train_seconds_this_run=999.0, git_sha=sha)
    m.update(metrics or {})
    (d / "metrics.json").write_text(json.dumps(m))
    epochs = [dict(kind="epoch", epoch=i, seconds=s, tokens=1000, eval_seconds=5.0, wall_seconds=s + 6)
              for i, s in enumerate(epoch_seconds)]
    (d / "meta.json").write_text(json.dumps(dict(epochs=epochs)))
    (d / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    return d


def test_run_flags_capped_and_still_improving(tmp_path):
    from bench.seqrec import load_run
    complete = load_run(fake_run(tmp_path, "a"), ML1M_HSTU)
    capped = load_run(fake_run(tmp_path, "b", train={"epochs": 20}, metrics=dict(best_epoch=19, epochs_run=20)),
                      ML1M_HSTU)
    improving = load_run(fake_run(tmp_path, "c", metrics=dict(best_epoch=99, epochs_run=100)), ML1M_HSTU)
    refit = load_run(fake_run(tmp_path, "d", train={"epochs": 20, "select": "last"},
                              metrics=dict(selected="last", best_epoch=19, epochs_run=20)), ML1M_HSTU)
    assert complete["flags"] == [] and refit["flags"] == []  # select=last fixes its epochs by protocol
    assert capped["flags"] == ["capped", "still improving"]
    assert improving["flags"] == ["still improving"]
    assert capped["changes"] == ["train.epochs=20"]
    assert complete["train_sha"] == "abcdef0" and complete["train_seconds"] == 22.0  # epochs' training time only


def test_exclusion_rule_read_off_the_run():
    from bench.seqrec import exclusion_rule
    assert exclusion_rule({"exclude_history": "full"}) == "full"
    assert exclusion_rule({"test": {"exclude_history": "window"}}) == "window"
    assert exclusion_rule({}, {"eval": {"exclude_history": True}}) == "window"  # before the field: the old rule
    assert exclusion_rule({}, {"eval": {"exclude_history": False}}) == "none"
    assert exclusion_rule({}) == "window"


def test_flagged_runs_are_never_averaged_with_complete_ones(tmp_path):
    from bench.seqrec import load_run, summarize, write_results
    runs = {"hstu": [load_run(fake_run(tmp_path, "hstu_s0", test={"hr@10": 0.30, "ndcg@10": 0.2}, sha="1111111aa"),
                              ML1M_HSTU),
                     load_run(fake_run(tmp_path, "hstu_s1", test={"hr@10": 0.20, "ndcg@10": 0.1}, sha="2222222bb"),
                              ML1M_HSTU),
                     load_run(fake_run(tmp_path, "hstu_s2", test={"hr@10": 0.10, "ndcg@10": 0.05}, sha="3333333cc",
                                       train={"epochs": 12}, metrics=dict(best_epoch=5, epochs_run=12)), ML1M_HSTU)]}
    summary = summarize(runs)
    assert set(summary) == {"hstu", "hstu [capped]"}
    assert summary["hstu"]["seeds"] == 2 and abs(summary["hstu"]["hr@10"]["mean"] - 0.25) < 1e-9
    assert summary["hstu [capped]"]["seeds"] == 1 and summary["hstu [capped]"]["hr@10"]["mean"] == 0.10
    assert summary["hstu"]["ndcg@50"] is None  # missing in the runs: n/a, not a mean over fewer seeds
    write_results("t", "T", summary, [], [], "cmd", {"popularity": {"hr@10": 0.01, "exclude_history": "full"}},
                  out=tmp_path / "out")
    md = (tmp_path / "out" / "t.md").read_text()
    assert "tabulated at git" in md
    assert "| 1111111, 2222222 |" in md and "| 3333333 |" in md  # each row's training sha
    assert "[capped] capped by hand" in md and "1 run (hstu [capped])" in md
    assert "| full |" in md and "n/a" in md


def test_ml1m_notes_follow_the_protocol_of_the_runs(tmp_path):
    from bench import ml1m
    from bench.seqrec import load_run
    valid = {"hstu": [load_run(fake_run(tmp_path, "v", eval_rule=None), ML1M_HSTU)]}
    paper = {"hstu": [load_run(fake_run(tmp_path, "p", train={"select": "best_test"},
                                        metrics=dict(selected="best_test", train_through_valid=True, valid=None)),
                               ML1M_HSTU)]}
    manifest = {"has_timestamps": False}
    nv, np_ = " ".join(ml1m.notes(valid, manifest)), " ".join(ml1m.notes(paper, manifest))
    assert "not optimistic" in nv and "History exclusion 'window'" in nv  # an old run: the window rule
    assert "not optimistic" not in np_ and "best TEST epoch (optimistic), trained through valid" in np_
    assert "History exclusion 'full'" in np_ and "train.select=best_test" in np_  # its change from the YAML
    assert "no timestamps" in nv and "no timestamps" not in " ".join(ml1m.notes(valid, {"has_timestamps": True}))
    assert "patience 10" in nv and "128 uniform negatives" in nv  # read off the YAML


def test_ml1m_compare_rows_are_labelled_with_their_file_commit_and_date(tmp_path):
    from bench import ml1m
    from bench.seqrec import load_run, summarize, write_results
    other = {"git_sha": "9c19c26", "date": "2026-11-22", "command": "python bench/ml1m.py X",
             "results": summarize({"hstu": [load_run(fake_run(tmp_path, "hstu_s0", test={"hr@10": 0.28,
                                                                                   "ndcg@10": 0.158}), ML1M_HSTU)]})}
    (tmp_path / "ml1m.json").write_text(json.dumps(other))
    mine = summarize({"hstu_content": [load_run(fake_run(tmp_path, "c_s0", test={"hr@10": 0.29, "ndcg@10": 0.16}),
                                                ML1M_HSTU)]})
    summary, notes = ml1m.compared(mine, tmp_path / "ml1m.json")
    assert list(summary) == ["hstu_content", "hstu [ml1m.json, git 9c19c26, 2026-11-22]"]
    assert "not trained by this command" in notes[0] and "python bench/ml1m.py X" in notes[0]
    write_results("t", "T", summary, [], notes, "cmd", {}, out=tmp_path / "out")
    md = (tmp_path / "out" / "t.md").read_text()
    assert "| hstu [ml1m.json, git 9c19c26, 2026-11-22] | 1 |" in md and "0.2800" in md


def _beauty_manifest(shards):
    shards.mkdir(parents=True)
    stats = dict(fitted_on_items=90, assigned_after_fit=10, usage=[1.0, 0.5], collision_rate=0.01, max_group=2,
                 recon_rel_error={"text": 0.3})
    (shards / "manifest.json").write_text(json.dumps(dict(
        dataset="amazon-sports", vocab=dict(num_items=100), split_rule=dict(cold_items=list(range(91, 101))),
        semantic_ids=dict(method="rqvae", level_sizes=[8, 8, 2], stats=stats))))


def test_beauty_takes_the_dataset_and_compares_warm_among_warm(tmp_path):
    from bench import beauty
    shards, runs = tmp_path / "shards", tmp_path / "runs"
    _beauty_manifest(shards)
    sl = lambda hr: {"hr@5": hr / 2, "ndcg@5": hr / 4, "hr@10": hr, "ndcg@10": hr / 3, "count": 10}  # noqa: E731
    fake_run(runs, beauty.run_name("hstu id", 0), recipe=beauty.HSTU, item_repr="id",
             per_slice={"warm": sl(0.11), "cold": sl(0.0), "warm_among_warm": sl(0.1234)})
    gen = fake_run(runs, beauty.run_name("hstu id+sid+content +gen", 0), recipe=beauty.HSTU,
                   item_repr="id+sid+content", per_slice={"warm": sl(0.08), "cold": sl(0.0567)})  # an older run
    m = json.loads((gen / "metrics.json").read_text())
    m["test_generative"] = dict(m["test"], per_slice={"warm": sl(0.09), "cold": sl(0.0),
                                                      "warm_among_warm": sl(0.0911)})
    m["test"]["cold_share@10"] = 0.2345  # issue 17: cold items' share of the top-10 slots
    (gen / "metrics.json").write_text(json.dumps(m))
    beauty.main(["amazon-sports", str(tmp_path / "raw"), "--shards", str(shards), "--runs", str(runs),
                 "--out", str(tmp_path / "out"), "--no-train", "--rows", "hstu id,hstu id+sid+content +gen,sasrec id"])
    assert not (tmp_path / "out" / "beauty.md").exists() and (tmp_path / "out" / "amazon-sports.json").exists()
    md = (tmp_path / "out" / "amazon-sports.md").read_text()
    assert md.startswith("# amazon-sports:")
    assert "0.0648" not in md and "0.0400" in md  # Sports' published TIGER row, not Beauty's
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| hstu")}
    assert "0.1234" in rows["hstu id"] and "| - | - | - | - | not ranked |" in rows["hstu id"]
    assert "n/a" in rows["hstu id+sid+content +gen"]  # no warm_among_warm key: n/a, no crash
    assert "0.0567" in rows["hstu id+sid+content +gen"]  # it ranks cold items: all-items and cold columns kept
    assert "0.0911" in rows["hstu id+sid+content +gen: generative head (beam)"]
    assert "| 0.2345 ± 0.0000 |" in rows["hstu id+sid+content +gen"] and "| 0 (not ranked) |" in rows["hstu id"]
    # train s: epochs' training time, validation excluded (not train_seconds_this_run=999); rows only: the
    # header's tabulation git sha may contain "999" (it did: 3999873)
    assert "| 22 |" in rows["hstu id"] and not any("999" in line for line in rows.values())
    assert "| abcdef0 |" in rows["hstu id"]
    assert "10 of the 100 items (10.0%)" in md and "1,000 (10 cold, 1.0%)" in md  # computed, not typed in
    assert "605" not in md and "12,101" not in md


def test_beauty_refuses_a_non_amazon_dataset(tmp_path, capsys):
    from bench import beauty
    with pytest.raises(SystemExit):
        beauty.main(["ml-1m", str(tmp_path)])
    assert "amazon-<category>" in capsys.readouterr().err


def test_shared_cores_from_the_recorded_load():
    from bench.seqrec import load_cell, shared_cores
    alone = dict(bench_sessions=[dict(load_1min_mean=2.3, nproc=1, threads_per_proc=2, cpus=2)])
    shared = dict(bench_sessions=[dict(load_1min_mean=2.2, nproc=1, threads_per_proc=1, cpus=2)])
    assert shared_cores(alone) is False and shared_cores(shared) is True and shared_cores({}) is None
    assert load_cell([shared]) == "2.2 (1 thr, shared)" and load_cell([{}]) == "-"


def test_one_metadata_block_for_every_record():
    from bench.record import header, metadata
    meta = metadata("python x.py", threads=2, load_before=[1.0, 1.0, 1.0])
    assert {"date", "git_sha", "command", "machine", "load"} <= set(meta)
    assert meta["machine"]["cpus"] >= 1 and meta["machine"]["cpu"]
    lines = header("Title", meta)
    assert lines[0] == "# Title" and "tabulated at git" in lines[2] and "2 threads" in lines[2]


# ---- throughput: whole epochs through the real loader and engine ---------------------------------------

def test_epoch_summary_reads_the_log_and_falls_back_clearly():
    new = [dict(seconds=10.0, tokens=5000, eval_seconds=0, wall_seconds=11.0),
           dict(seconds=10.0, tokens=5000, eval_seconds=4.0, wall_seconds=15.0)]
    s = throughput.summarize_epochs(new)
    assert s["e2e_tokens_per_s"] == 500 and not s["tokens_estimated"] and s["missing"] == []
    assert s["epoch_wall_validated"] == 15.0 and s["epoch_wall_not_validated"] == 11.0 and s["eval_seconds"] == 4.0
    old = throughput.summarize_epochs([dict(seconds=10.0, tokens_per_s=300)])
    assert old["e2e_tokens_per_s"] == 300 and old["tokens_estimated"]
    assert old["missing"] == ["eval_seconds", "tokens", "wall_seconds"] and "epoch_wall_validated" not in old


def test_throughput_reference_side_by_side(shard_dir, tmp_path):
    res = throughput.main(["--shards", str(shard_dir), "--batches", "1", "--warmup", "0", "--models", "hstu",
                           "--out", str(tmp_path)])
    ref = res["reference"]
    assert ref["model"] == "HSTU" and ref["mid"] == 9200
    step = ref["ratios"]["step rate (hstu)"]
    assert step["ratio"] == round(res["results"]["hstu"]["tokens_per_s"] / 9200, 2)
    md = (tmp_path / "throughput_l2_h1.md").read_text()
    assert "measured 2026-12-01 on this machine kind by the issue author, not by this script" in md
    assert "load avg" in md and res["load"]["before"] is not None


def test_throughput_e2e_runs_whole_epochs_through_pretrain(shard_dir, tmp_path):
    res = throughput.main(["--shards", str(shard_dir), "--batches", "1", "--warmup", "0", "--dim", "16",
                           "--negatives", "16", "--models", "hstu,hstu_naive", "--e2e", "--epochs", "2",
                           "--e2e-set", "data.num_workers=0", "--e2e-set", "eval.batch_size=64",
                           "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path)])
    every, last = res["e2e"]["validate every epoch"], res["e2e"]["validate after the last epoch only"]
    for r in (every, last):
        assert r["epochs"] == 2 and r["train_tokens"] > 0 and r["e2e_tokens_per_s"] > 0
        assert r["process_wall_seconds"] >= r["train_seconds"]
    if "eval_seconds" not in every["missing"]:
        assert every["epoch_wall_not_validated"] is None and last["epoch_wall_not_validated"] is not None
    md = (tmp_path / "throughput_l2_h1.md").read_text()
    assert "End to end" in md and "padded stand-in" in md and "NOT the reference implementation" in md


def test_throughput_side_by_side_uses_the_reference_measured_in_the_run(shard_dir, tmp_path, monkeypatch):
    """--reference PATH: the ratio divides by the reference's rate from this run, and the table says so."""
    seen = {}

    def fake_reference(args):
        seen["gr"] = args.reference
        return dict(tokens_per_s=100, gr_commit="abc123", shims=[], model="HSTU")

    monkeypatch.setattr(throughput, "measured_reference", fake_reference)
    res = throughput.main(["--shards", str(shard_dir), "--batches", "1", "--warmup", "0", "--dim", "16",
                           "--models", "hstu", "--peak-size", "128", "--reference", "/some/gr",
                           "--out", str(tmp_path)])
    ref = res["reference"]
    assert seen["gr"] == "/some/gr" and ref["measured"] is True
    ours = res["results"]["hstu"]["tokens_per_s"]
    assert ref["ratios"]["step rate (hstu)"] == dict(tokens_per_s=ours, ratio=round(ours / 100, 2))
    md = (tmp_path / "throughput_l2_h1.md").read_text()
    assert "measured in this run" in md and "abc123" in md and "quoted" not in md


def test_beauty_probes_tabulate_changes_and_the_traced_cold_peak(tmp_path):
    """Issue 17's probe table: each run's config changes against its row's recipe, read off the run folder,
    and the epoch of the best traced test cold R@10 (eval.trace_test runs only)."""
    from bench import beauty, beauty_probes
    sl = lambda hr: {"hr@10": hr, "ndcg@10": hr / 3, "count": 10}  # noqa: E731
    runs = tmp_path / "runs"
    fake_run(runs, beauty.run_name("hstu id", 0), recipe=beauty.HSTU, item_repr="id",
             per_slice={"warm": sl(0.11), "cold": sl(0.0), "warm_among_warm": sl(0.1234)})
    d = fake_run(runs, beauty.run_name("hstu id+sid+content", 0, "_iddrop30"), recipe=beauty.HSTU,
                 item_repr="id+sid+content", train={"patience": 4},
                 per_slice={"warm": sl(0.08), "cold": sl(0.0567), "warm_among_warm": sl(0.09)})
    m = json.loads((d / "metrics.json").read_text())
    m["test"]["cold_share@10"], m["valid"]["cold_share@10"] = 0.0811, 0.0722
    (d / "metrics.json").write_text(json.dumps(m))
    parts = {"id": {"warm": 1.5, "cold": 0.1}, "all": {"warm": 2.0, "cold": 1.0}}
    trace = [dict(kind="epoch", epoch=i, seconds=1.0, test_trace={"per_slice": {"cold": sl(hr)}}, item_parts=parts)
             for i, hr in enumerate((0.01, 0.0654, 0.03))]
    (d / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in trace))
    (runs / "not_a_row_s0").mkdir()  # a folder of no row: skipped
    beauty_probes.main(["amazon-beauty", "--runs", str(runs), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "amazon-beauty_probes.md").read_text()
    rows = {}
    for line in md.splitlines():  # the probe table comes first, then the norms table
        if line.startswith("| hstu"):
            rows.setdefault(line.split(" | ")[0][2:], line)
    assert set(rows) == {"hstu_id_s0", "hstu_idpsidpcontent_iddrop30_s0"}
    probe = rows["hstu_idpsidpcontent_iddrop30_s0"]
    assert "model.item_repr=id+sid+content, train.patience=4" in probe  # changes from the recipe YAML
    assert "| 0.0722 |" in probe and "| 0.0811 |" in probe and "| 0.0654 at 1 |" in probe
    assert "| 0.1234 |" in rows["hstu_id_s0"] and rows["hstu_id_s0"].split(" | ")[13] == "-"  # no trace
    assert "| hstu_idpsidpcontent_iddrop30_s0 | 1.500 / 0.1000 | - | - | 2.000 / 1.0000 |" in md


def test_ml1m_content_models_are_the_recipes_with_content_items(tmp_path, capsys):
    """Issue 17 item 3: bench/ml1m.py's *_content models train their ID-only recipe with
    model.item_repr=id+sid+content; an unknown model is refused before any data is touched."""
    from bench import ml1m
    for name, base in (("hstu_content", "hstu"), ("hstu_large_content", "hstu_large")):
        assert ml1m.CONFIGS[name] == ml1m.CONFIGS[base] and ml1m.OVERRIDES[name] == ["model.item_repr=id+sid+content"]
    assert "hstu" not in ml1m.OVERRIDES
    with pytest.raises(SystemExit):
        ml1m.main([str(tmp_path / "no-such-raw"), "--models", "hstu,hstu_cotent", "--shards", str(tmp_path / "s")])
    assert "hstu_cotent" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_beauty_calibrated_row_notes_its_offsets_and_the_uncalibrated_test(tmp_path, capsys):
    """The '+cal' row: its note lists each seed's validation-chosen offset and the same runs' test at offset 0
    (metrics.json cold_calibration), read off the runs; --only-seeds outside range(--seeds) is refused."""
    from bench import beauty
    shards, runs = tmp_path / "shards", tmp_path / "runs"
    _beauty_manifest(shards)
    row = "hstu id+sid+content +iddrop +cal"
    for seed, (offset, cold_hr) in enumerate([(0.015, 0.0263), (0.02, 0.0463)]):
        d = fake_run(runs, beauty.run_name(row, seed), recipe=beauty.HSTU, item_repr="id+sid+content")
        m = json.loads((d / "metrics.json").read_text())
        m["cold_offset"] = offset
        m["cold_calibration"] = dict(offset=offset, target_share=0.1, test_uncalibrated=dict(
            m["test"], per_slice={"cold": {"hr@10": cold_hr}}, **{"cold_share@10": 0.03}))
        (d / "metrics.json").write_text(json.dumps(m))
    beauty.main(["amazon-sports", str(tmp_path / "raw"), "--shards", str(shards), "--runs", str(runs),
                 "--out", str(tmp_path / "out"), "--no-train", "--rows", row, "--seeds", "2"])
    md = (tmp_path / "out" / "amazon-sports.md").read_text()
    note = next(line for line in md.splitlines() if line.startswith(f"- {row}: cold items' score offset"))
    assert "[0.015, 0.02]" in note and "10.0%" in note and "cold R@10 0.0363 ± 0.0141" in note
    assert "cold share@10 0.0300 ± 0.0000" in note
    with pytest.raises(SystemExit):
        beauty.main(["amazon-sports", str(tmp_path / "raw"), "--shards", str(shards), "--runs", str(runs),
                     "--seeds", "2", "--only-seeds", "2"])
    assert "outside range" in capsys.readouterr().err
