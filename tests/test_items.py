"""Content tokens end to end on the synthetic world: catalog -> MiniLM vectors -> semantic IDs (fitted on
warm items only) -> every item_repr mode and the generative head train; cold items get vectors and codes."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from configs.load import load_config
from configs.schema import (
    ContentConfig,
    ContentStageConfig,
    LoaderConfig,
    LossConfig,
    ModelConfig,
    PretrainConfig,
    SemanticIdConfig,
    ShardConfig,
    SyntheticConfig,
)
from data_pipeline import content_stage
from data_pipeline.collate import make_loader
from data_pipeline.read_shards import cold_items, load_manifest
from data_pipeline.semantic_ids import load_semantic_ids
from data_pipeline.synthetic import generate
from data_pipeline.write_shards import write_shards
from model.items import ITEM_REPRS, load_item_features
from model.seqrec import build_model
from train import losses


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("items")
    out = root / "shards"
    ds = generate(SyntheticConfig(num_users=300, items_per_domain=60, mean_events=20)).dataset
    write_shards(ds, out, ShardConfig(samples_per_shard=100, cold_item_frac=0.1), progress=False)
    cfg = ContentStageConfig(shards=str(out), content=ContentConfig(cache_dir=str(root / "cache")),
                             semantic_ids=SemanticIdConfig(levels=2, codebook_size=8, kmeans_iters=10))
    content_stage.run(cfg, progress=False)
    return out


def tiny(**kw) -> ModelConfig:
    return ModelConfig(num_layers=2, dim=16, num_heads=2, input_dropout=0.0, linear_dropout=0.0,
                       attention_backend="ref", **kw)


def test_content_stage_fits_on_warm_items_and_codes_every_item(world):
    manifest = load_manifest(world)
    sid = load_semantic_ids(world / "semantic_ids")
    n, cold = manifest["vocab"]["num_items"], cold_items(manifest)
    assert sid.codes.shape == (n + 1, 3) and (sid.codes[0] == 0).all()
    assert len({tuple(r) for r in sid.codes[1:].tolist()}) == n  # unique after the collision level
    assert (sid.codes.max(0) < np.array(sid.level_sizes)).all()
    st = manifest["semantic_ids"]["stats"]
    assert st["fitted_on_items"] == n - len(cold) and st["assigned_after_fit"] == len(cold) > 0
    assert 0 < st["usage"][0] <= 1 and 0 <= st["collision_rate"] <= 1


@pytest.mark.parametrize("item_repr", ITEM_REPRS)
def test_padding_embeds_to_zero_and_cold_items_get_content_vectors(world, item_repr):
    manifest = load_manifest(world)
    cfg = tiny(item_repr=item_repr)
    m = build_model(cfg, manifest, 40, load_item_features(world, cfg))
    cold = torch.from_numpy(cold_items(manifest))
    with torch.no_grad():
        assert m.embed.item(torch.tensor([0])).abs().max() == 0
        if item_repr != "id":  # same codes => same code part; the cold rows are built from content, not ids
            vec = m.embed.item(cold)
            assert vec.norm(dim=-1).min() > 0


@pytest.mark.parametrize("kw", [dict(item_repr=r) for r in ITEM_REPRS] + [dict(item_repr="id+sid",
                                                                               generative_head=True)],
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_every_item_repr_trains(world, kw):
    torch.manual_seed(0)
    manifest = load_manifest(world)
    cfg = tiny(**kw)
    m = build_model(cfg, manifest, 40, load_item_features(world, cfg))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    batches = list(make_loader(world, "train", LoaderConfig(batch_size=64, max_len=40, num_workers=0)))
    totals = []
    for _ in range(5):
        total = 0.0
        for b in batches:
            loss, _ = losses.compute_loss(m, b, LossConfig(num_negatives=32), manifest["vocab"]["num_items"], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        totals.append(total)
    assert totals[-1] < 0.85 * totals[0], totals


def test_pretrain_reports_generative_head_and_cold_slices(world, tmp_path):
    from train.pretrain import main
    sets = [f"shards={world}", f"run_dir={tmp_path}", "train.epochs=2", "model.num_layers=1", "model.dim=16",
            "model.item_repr=id+sid+content", "model.generative_head=true", "data.num_workers=0",
            "data.max_len=40", "loss.num_negatives=16", "eval.ks=[5,10]", "eval.beam=10", "train.lr=5e-3",
            "eval.trace_test=true"]
    metrics = main(load_config(PretrainConfig, None, sets))
    gen, dot, pop = metrics["test_generative"], metrics["test"], metrics["test_popularity"]
    assert gen["count"] == dot["count"] == pop["count"] > 0
    # measured (train.seed 0, 1, 2): the dot-product head's NDCG@10 .21-.26 and HR@10 .36-.41 against
    # popularity's .136 and .263 (margins: half the smallest gaps); the generative head, 2 epochs in, trails
    # popularity but not chance: HR@10 .21-.26 against <= .071 for a random ranking of the 180 items with up
    # to 40 history items excluded (bound: twice that)
    assert dot["ndcg@10"] > pop["ndcg@10"] + 0.03 and dot["hr@10"] > pop["hr@10"] + 0.04, (dot, pop)
    num_items = load_manifest(world)["vocab"]["num_items"]
    assert gen["hr@10"] > 2 * 10 / (num_items - 40), gen
    # the world has searches: the query slices come with the cold ones
    # (and eval.trace_test adds the head / tail target slices)
    assert set(dot["per_slice"]) == {"warm", "cold", "warm_among_warm", "seen_query", "unseen_query",
                                     "head_target", "tail_target"}
    assert dot["per_slice"]["cold"]["count"] > 0
    # the generative head decodes from the query token's state on the search targets too
    tasks = metrics["test_tasks"]
    assert set(tasks) == {"rec", "search", "query_only", "search_generative"}
    assert tasks["search_generative"]["count"] == tasks["search"]["count"] > 0
    assert dot["per_slice"]["cold"]["count"] == load_manifest(world)["counts"]["cold"]["test_targets"]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["item_repr"] == "id+sid+content"
    # issue 17: the share of top-10 slots cold items take, for both heads, against the cold targets' share
    n_cold = load_manifest(world)["counts"]["cold"]["test_targets"]
    for m in (dot, gen):
        assert 0 <= m["cold_share@10"] <= 1 and m["cold_target_share"] == pytest.approx(n_cold / dot["count"])
    # eval.trace_test: every validated epoch also logs the test slices and the item parts' norms
    epochs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e.get("kind") == "epoch"]
    assert len(epochs) == 2 and all(e["test_trace"]["per_slice"]["cold"]["count"] == n_cold for e in epochs)
    # ... and head / tail target slices, on validation and the traced test alike (cold targets are tail)
    for e in epochs:
        v, t = e["valid"]["per_slice"], e["test_trace"]["per_slice"]
        assert v["head_target"]["count"] + v["tail_target"]["count"] == e["valid"]["count"]
        assert t["head_target"]["count"] + t["tail_target"]["count"] == t["warm"]["count"] + t["cold"]["count"]
        assert t["tail_target"]["count"] >= n_cold and v["head_target"]["count"] > 0
    parts = epochs[-1]["item_parts"]
    assert set(parts) == {"id", "code", "content", "all"} and all(v["warm"] > 0 and v["cold"] > 0
                                                                  for v in parts.values())
    assert dataclasses.is_dataclass(load_config(PretrainConfig, tmp_path / "config.json"))


def test_image_modality_end_to_end_with_per_modality_codes(tmp_path):
    """Generated images -> random ViT vectors (.npy + ids) -> content stage with text + image, one code
    tuple per modality -> a model reading both content vectors and all codes trains a step."""
    from data_pipeline.content import make_image_features
    out = tmp_path / "shards"
    ds = generate(SyntheticConfig(num_users=120, items_per_domain=30, mean_events=12)).dataset
    write_shards(ds, out, ShardConfig(samples_per_shard=60, cold_item_frac=0.1), progress=False)
    image = make_image_features(out, tmp_path / "feats" / "image.npy")
    cfg = load_config(ContentStageConfig, None, [
        f"shards={out}", f"content.cache_dir={tmp_path / 'cache'}", f"content.extra_modalities=[image={image}]",
        "semantic_ids.modalities=[text,image]", "semantic_ids.fusion=per_modality", "semantic_ids.levels=2",
        "semantic_ids.codebook_size=4", "semantic_ids.kmeans_iters=5"])
    summary = content_stage.run(cfg, progress=False)
    assert summary["content_modalities"] == {"text": 384, "image": 64}
    assert len(summary["level_sizes"]) == 2 + 2 + 1  # text levels, image levels, collision level
    manifest = load_manifest(out)
    mcfg = tiny(item_repr="id+sid+content", generative_head=True)
    feats = load_item_features(out, mcfg)
    assert feats.content.shape == (manifest["vocab"]["num_items"] + 1, 384 + 64)
    m = build_model(mcfg, manifest, 40, feats)
    b = next(iter(make_loader(out, "train", LoaderConfig(batch_size=32, max_len=40, num_workers=0))))
    loss, _ = losses.compute_loss(m, b, LossConfig(num_negatives=8), manifest["vocab"]["num_items"])
    loss.backward()
    assert m.embed.item.content_proj.weight.grad.abs().sum() > 0


def test_generative_loss_trains_against_the_warm_items_trie_only(world):
    """Issue 11 item 5: the training trie held cold items too, so the trie-masked cross-entropy pushed
    their branches down (the Beauty generative head's cold R@10 was exactly 0). Training now builds the
    trie from the items training may touch; decoding still uses every item."""
    manifest = load_manifest(world)
    n, cold = manifest["vocab"]["num_items"], torch.from_numpy(cold_items(manifest))
    warm = torch.from_numpy(np.setdiff1d(np.arange(1, n + 1), cold.numpy()))
    cfg = tiny(item_repr="sid", generative_head=True)
    m = build_model(cfg, manifest, 40, load_item_features(world, cfg))
    codes = m.embed.item.codes
    assert (m.code_trie(warm).walk(codes[cold])[:, -1] == -1).all()  # no cold leaf in the training trie
    assert (m.code_trie(warm).walk(codes[warm])[:, -1] >= 0).all()
    assert (m.code_trie().walk(codes[1:])[:, -1] >= 0).all()  # decoding: every item
    asked = []
    full_trie = m.code_trie

    def recording_trie(items=None):
        asked.append(items)
        return full_trie(items)

    m.code_trie = recording_trie
    batch = next(iter(make_loader(world, "train", LoaderConfig(batch_size=32, max_len=40, num_workers=0))))
    losses.compute_loss(m, batch, LossConfig(num_negatives=8), n, torch.Generator().manual_seed(0), warm)
    assert len(asked) == 1 and torch.equal(asked[0], warm)


def test_id_dropout_drops_the_id_part_at_its_rate_in_training_only(world):
    """Issue 17: model.id_dropout embeds a share of the occurrences from codes + content alone (as a cold
    item is), at the configured rate, never in eval; the default 0 leaves the encoder unchanged."""
    manifest = load_manifest(world)
    cfg = tiny(item_repr="id+sid+content", id_dropout=0.3)
    enc = build_model(cfg, manifest, 40, load_item_features(world, cfg)).embed.item
    with torch.no_grad():
        enc.id.weight.add_(1.0)  # every id row clearly non-zero, so a dropped one is visible
        ids = torch.randint(1, manifest["vocab"]["num_items"] + 1, (20000,))
        enc.eval()
        no_id = enc(ids) - enc.id(ids)  # the codes + content part, what a dropped occurrence embeds to
        torch.manual_seed(0)
        enc.train()
        out = enc(ids)
        dropped = torch.isclose(out, no_id, atol=1e-6).all(-1)
        kept = torch.isclose(out, no_id + enc.id(ids), atol=1e-6).all(-1)
        assert (dropped | kept).all() and 0.28 < dropped.float().mean() < 0.32
        enc.eval()
        assert torch.equal(enc(ids), no_id + enc.id(ids))  # eval never drops
        assert enc(torch.tensor([0])).abs().max() == 0  # padding still embeds to zero
    with pytest.raises(ValueError, match="id_dropout"):
        build_model(tiny(item_repr="id", id_dropout=0.3), manifest, 40, None)


def test_content_weight_decay_and_lr_mult_reach_the_code_and_content_parts_only(world):
    """Issue 17: train.content_weight_decay / content_lr_mult form their own AdamW group holding exactly the
    code embeddings and the content projection; set_lr (resume with a new train.lr) keeps the multiplier;
    the defaults leave every group at train.lr and train.weight_decay."""
    from configs.schema import TrainConfig
    from model.items import content_parameters
    from train import engine as E
    E.setup_distributed()
    manifest = load_manifest(world)
    cfg = tiny(item_repr="id+sid+content")
    m = build_model(cfg, manifest, 40, load_item_features(world, cfg))
    names = {id(p): n for n, p in m.named_parameters()}
    eng = E.build_engine(m, TrainConfig(lr=1e-3, weight_decay=0.01, content_weight_decay=0.5, content_lr_mult=0.1),
                         8, content_parameters(m))
    base, content = eng.optimizer.param_groups
    assert sorted(names[id(p)] for p in content["params"]) == ["embed.item.code_emb.weight",
                                                               "embed.item.content_proj.weight"]
    assert len(base["params"]) + 2 == len(names) and "embed.item.id.weight" in {names[id(p)] for p in base["params"]}
    assert (content["weight_decay"], base["weight_decay"]) == (0.5, 0.01)
    assert content["lr"] == pytest.approx(1e-4) and base["lr"] == 1e-3
    assert E.set_lr(eng, 2e-3) == pytest.approx(1e-3) and content["lr"] == pytest.approx(2e-4)
    default = E.build_engine(m, TrainConfig(weight_decay=0.01), 8, content_parameters(m)).optimizer.param_groups
    assert all(g["weight_decay"] == 0.01 and g["lr"] == 1e-3 for g in default)


@pytest.mark.parametrize("how", ["center", "whiten"])
def test_content_norm_centres_or_whitens_the_content_buffer(world, how):
    """Issue 17: model.content_norm removes the content vectors' shared direction (mean 0 over the catalogue;
    'whiten': also an identity covariance up to scale, mean norm 1); padding stays zero; 'none' is the raw
    buffer."""
    manifest = load_manifest(world)
    raw = load_item_features(world, tiny(item_repr="id+sid+content")).content
    m = build_model(tiny(item_repr="id+sid+content", content_norm=how), manifest, 40,
                    load_item_features(world, tiny(item_repr="id+sid+content")))
    x = m.embed.item.content
    assert x[0].abs().max() == 0 and x[1:].mean(0).abs().max() < 1e-5
    if how == "whiten":
        cov = (x[1:].T @ x[1:]).double() / (len(x) - 1)
        big = torch.linalg.eigvalsh(cov)[-min(20, len(x) - 2):]  # the well-determined directions
        assert big.max() / big.min() < 1.01 and abs(x[1:].norm(dim=1).mean() - 1) < 1e-4
    else:
        assert torch.allclose(x[1:], raw[1:] - raw[1:].mean(0), atol=1e-6)
    feats = load_item_features(world, tiny(item_repr="id+sid+content"))
    assert torch.equal(build_model(tiny(item_repr="id+sid+content"), manifest, 40, feats).embed.item.content,
                       raw.float())


def test_cold_item_id_zero_keeps_cold_rows_at_zero_and_changes_nothing_else(world, tmp_path):
    """Issue 17: model.cold_item_id='zero' zeroes the held-out items' id rows at build time and they stay
    zero through real training (AdamW weight decay included); the warm items train exactly as with the
    default 'random' rows (same per-epoch warm-among-warm test ranks), so only cold items' scores change."""
    from train.pretrain import main
    manifest = load_manifest(world)
    cold = torch.from_numpy(cold_items(manifest))
    assert len(cold) > 0
    cfgs = {how: tiny(item_repr="id+sid+content", id_dropout=0.2, cold_item_id=how) for how in ("random", "zero")}
    torch.manual_seed(0)
    rnd = build_model(cfgs["random"], manifest, 40, load_item_features(world, cfgs["random"])).embed.item.id.weight
    torch.manual_seed(0)
    zero = build_model(cfgs["zero"], manifest, 40, load_item_features(world, cfgs["zero"])).embed.item.id.weight
    warm = torch.ones(len(rnd), dtype=torch.bool)
    warm[cold] = False
    assert zero[cold].abs().max() == 0 and rnd[cold].abs().min() > 0 and torch.equal(zero[warm], rnd[warm])
    traces = {}
    for how in ("random", "zero"):
        run = tmp_path / how
        sets = [f"shards={world}", f"run_dir={run}", "train.epochs=2", "model.num_layers=1", "model.dim=16",
                "model.item_repr=id+sid+content", "model.id_dropout=0.2", f"model.cold_item_id={how}",
                "data.num_workers=0", "data.max_len=40", "loss.num_negatives=16", "eval.ks=[10]",
                "train.lr=5e-3", "train.weight_decay=0.1", "eval.trace_test=true"]
        main(load_config(PretrainConfig, None, sets))
        epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        traces[how] = [e for e in epochs if e.get("kind") == "epoch"]
    for r, z in zip(traces["random"], traces["zero"], strict=True):
        assert z["item_parts"]["id"]["cold"] == 0.0 < z["item_parts"]["id"]["warm"]
        assert r["item_parts"]["id"]["cold"] > 0
        assert r["item_parts"]["id"]["warm"] == z["item_parts"]["id"]["warm"]
        assert r["test_trace"]["per_slice"]["warm_among_warm"] == z["test_trace"]["per_slice"]["warm_among_warm"]
    with pytest.raises(ValueError, match="cold_item_id"):
        build_model(tiny(item_repr="id", cold_item_id="zero"), manifest, 40, None)


def test_cold_calibration_offsets_move_only_cold_scores_and_b0_is_the_runs_own_evaluation(world, tmp_path):
    """train/calibrate.py through bench/cold_calibration.py: at offset 0 its ranking equals the run's own test
    evaluation (same rules); a large positive offset puts cold items on top of every list, a large negative
    one removes them; the offset it chooses comes from the validation share alone."""
    from bench.cold_calibration import analyse, write
    from train.pretrain import main
    run = tmp_path / "run"
    main(load_config(PretrainConfig, None, [
        f"shards={world}", f"run_dir={run}", "train.epochs=1", "model.num_layers=1", "model.dim=16",
        "model.item_repr=id+sid+content", "data.num_workers=0", "data.max_len=40", "loss.num_negatives=16",
        "eval.ks=[10]"]))
    test = json.loads((run / "metrics.json").read_text())["test"]
    r = analyse(run, [-3.0, 0.0, 0.1, 3.0])
    own = r["test"]["0.0"]
    for got, want in ((own["all"]["hr@10"], test["hr@10"]), (own["all"]["ndcg@10"], test["ndcg@10"]),
                      (own["cold"]["hr@10"], test["per_slice"]["cold"]["hr@10"]),
                      (own["warm"]["ndcg@10"], test["per_slice"]["warm"]["ndcg@10"]),
                      (own["cold_share"], test["cold_share@10"])):
        assert got == pytest.approx(want, abs=1e-12)
    top, none = r["test"]["3.0"], r["test"]["-3.0"]
    n_cold = len(cold_items(load_manifest(world)))
    assert none["cold_share"] == 0.0 and none["cold"]["hr@10"] == 0.0
    assert top["cold_share"] > 0.9 * min(1.0, n_cold / 10) and top["cold"]["hr@10"] >= own["cold"]["hr@10"]
    assert top["warm"]["hr@10"] <= own["warm"]["hr@10"] <= none["warm"]["hr@10"]  # cold items only push warm down
    share = r["catalogue_cold_share"]
    gap = lambda b: (abs(r["valid"][str(b)]["cold_share"] - share), abs(b))
    assert r["chosen_offset"] == min(r["offsets"], key=gap)
    md = write([r], tmp_path / "out", "synthetic", "python bench/cold_calibration.py run").read_text()
    assert "chosen on valid" in md and "test sweep (diagnostic)" in md


def test_calibrate_cold_chooses_on_validation_tests_with_it_and_the_export_serves_it(world, tmp_path):
    """eval.calibrate_cold: pretrain picks the offset by the validation rule, tests with it (metrics.json
    equals an evaluation at that fixed eval.cold_offset), and the export's item index carries it on the
    cold rows, so the served scores are the evaluated ones; bad settings stop before training."""
    from configs.load import ConfigError
    from serve.engine import Recommender
    from serve.load import load_export
    from train.calibrate import OFFSETS, choose_offset
    from train.export import main as export
    from train.pretrain import main
    base = [f"shards={world}", "train.epochs=1", "model.num_layers=1", "model.dim=16", "data.num_workers=0",
            "model.item_repr=id+sid+content", "data.max_len=40", "loss.num_negatives=16", "eval.ks=[10]"]
    m = main(load_config(PretrainConfig, None, base + [f"run_dir={tmp_path / 'cal'}", "eval.calibrate_cold=true"]))
    cal = m["cold_calibration"]
    shares = {float(b): v for b, v in cal["valid_cold_share"].items()}
    assert cal["offset"] != 0  # the synthetic world picks +0.005: the bias checks below see a real offset
    assert sorted(shares) == OFFSETS and m["cold_offset"] == cal["offset"] == choose_offset(shares, cal["target_share"])
    assert cal["target_share"] == len(cold_items(load_manifest(world))) / load_manifest(world)["vocab"]["num_items"]
    fixed = main(load_config(PretrainConfig, None, base + [f"run_dir={tmp_path / 'fixed'}",
                                                           f"eval.cold_offset={cal['offset']}"]))
    assert fixed["test"] == m["test"] and fixed["cold_calibration"] is None
    plain = main(load_config(PretrainConfig, None, base + [f"run_dir={tmp_path / 'plain'}"]))
    assert cal["test_uncalibrated"] == plain["test"] != m["test"]
    export(tmp_path / "cal", tmp_path / "export")
    exp = load_export(tmp_path / "export")
    cold = torch.from_numpy(cold_items(load_manifest(world)))
    want = torch.zeros(len(exp.bias))
    want[cold] = cal["offset"]
    assert torch.equal(exp.bias, want) and exp.record["cold_offset"] == cal["offset"]
    rec = Recommender(exp, encoder="eager")
    states = torch.nn.functional.normalize(torch.randn(3, exp.table.shape[1]), dim=-1)
    ids, scores = rec.index.search(states, 5)
    want_scores = states @ exp.table.T + want
    assert torch.allclose(torch.from_numpy(scores), want_scores.gather(1, torch.from_numpy(ids)), atol=1e-6)
    for bad in (["model.item_repr=id", "eval.cold_offset=0.1"], ["eval.calibrate_cold=true", "train.select=best_test"]):
        with pytest.raises(ConfigError, match="calibrate_cold"):
            main(load_config(PretrainConfig, None, base + [f"run_dir={tmp_path / 'bad'}"] + bad))
