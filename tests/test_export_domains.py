"""Domain-aware export and serving: a model with per-domain parameters (MLoRA adapters + a domain embedding)
exports a program that takes each sequence's domain and equals the eager model on mixed domains;
--merge-domain writes one domain's model that equals the unmerged one on that domain; the server takes a
`domain` per request (required, checked by name), mixes domains in one micro-batch without changing any
answer, and with within_domain never returns another domain's item."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("httpx")  # FastAPI's TestClient
from fastapi.testclient import TestClient  # noqa: E402

from configs.provenance import file_sha256  # noqa: E402
from configs.schema import ServeConfig  # noqa: E402
from serve import ExportLoadError, load_export  # noqa: E402
from serve.app import make_app  # noqa: E402
from serve.engine import Recommender, RequestError  # noqa: E402
from serve.search import Searcher  # noqa: E402
from tests.conftest import _export, _tiny_pretrain  # noqa: E402
from train.export import ExportError, item_rows, random_histories, verify_program  # noqa: E402

DOMAIN_RUN = ["model.adapters=mlora", "model.domain_embedding=true", "eval.within_domain=true"]
NAMES = ["beauty", "books", "movies"]  # the synthetic world's domains
T0 = 1_600_000_000


# ---- fixtures: a 3-domain world with searches (id-only queries), an adapted run with random B, its exports --
@pytest.fixture(scope="module")
def dom_shards(tmp_path_factory):
    from configs.schema import ShardConfig, SyntheticConfig
    from data_pipeline.synthetic import generate
    from data_pipeline.write_shards import write_shards
    out = tmp_path_factory.mktemp("dom") / "shards"
    ds = generate(SyntheticConfig(num_users=120, items_per_domain=30, mean_events=14, search_prob=0.3)).dataset
    write_shards(ds, out, ShardConfig(samples_per_shard=30, cold_item_frac=0.1), progress=False)
    return out


@pytest.fixture(scope="module")
def dom_run(dom_shards, tmp_path_factory):
    """2 epochs of MLoRA + domain-embedding pretraining; then ckpt/best's adapters B and domain embedding
    are set at random (2 tiny epochs leave them near zero), so every domain's model differs."""
    run = _tiny_pretrain(dom_shards, tmp_path_factory.mktemp("dom_run"), DOMAIN_RUN)
    path = run / "ckpt" / "best" / "mp_rank_00_model_states.pt"  # ZeRO-0: the module state as saved
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    gen = torch.Generator().manual_seed(0)
    for k, v in ckpt["module"].items():
        if k.endswith(".B") or k == "domain_emb.weight":
            ckpt["module"][k] = torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.3
    torch.save(ckpt, path)
    return run


@pytest.fixture(scope="module")
def dom_export(dom_run, tmp_path_factory):
    return _export(dom_run, tmp_path_factory.mktemp("dom_export"))


@pytest.fixture(scope="module")
def merged_export(dom_run, tmp_path_factory):
    """`python -m train export --merge-domain books` (the CLI, in process)."""
    from train.__main__ import main as cli
    out = tmp_path_factory.mktemp("merged") / "export"
    assert cli(["export", "--run", str(dom_run), "--out", str(out), "--merge-domain", "books"]) == 0
    return out


@pytest.fixture(scope="module")
def exp(dom_export):
    return load_export(dom_export)


@pytest.fixture(scope="module")
def rec(exp):
    return Recommender(exp, encoder="program")


@pytest.fixture(scope="module")
def eager(exp):
    return Recommender(exp, encoder="eager")


def servable_ids(exp, domain: str | None = None) -> list[str]:
    return [r["item_id"] for r in exp.items if r["servable"] and domain in (None, r["domain"])]


def body(rng, exp, n: int, k: int = 10, **kw) -> dict:
    history = [str(x) for x in rng.choice(servable_ids(exp), size=n, replace=False)]
    ts = (T0 + np.cumsum(rng.integers(1, 100_000, size=n))).tolist()
    return dict(history=history, timestamps=ts, now=ts[-1] + 60, k=k, **kw)


def hits(answer) -> tuple[list[int], np.ndarray]:
    return [i for i, _ in answer.hits], np.array([s for _, s in answer.hits])


def same(a, b) -> bool:
    (ia, sa), (ib, sb) = hits(a), hits(b)
    return ia == ib and np.allclose(sa, sb, rtol=1e-5, atol=1e-6)


# ---- export ------------------------------------------------------------------------------------------
def test_item_rows_read_the_top_level_item_domain(tmp_path):
    """Without a catalogue, an item's domain comes from manifest["item_domain"] (-1: none)."""
    manifest = dict(id_maps=dict(items=["", "a", "b", "c"], domains=["x", "y"]), item_domain=[-1, 1, 0, -1],
                    vocab=dict(num_items=3), split_rule=dict(cold_items=[]), catalog="none.jsonl.gz")
    rows = item_rows(tmp_path, manifest, np.ones(4, dtype=bool), np.zeros(4, dtype=np.int64))
    assert [r["domain"] for r in rows] == ["y", "x", None]


def test_config_names_the_domains_and_the_program_takes_them(exp, dom_export, tiny_export):
    cfg, card = exp.config, (dom_export / "README.md").read_text()
    assert cfg["domains"] == NAMES and cfg["num_domains"] == 3 and cfg["within_domain"] is True
    assert cfg["program_inputs"][-1] == "domains" and exp.program_takes_domains
    assert '"domain"' in card and str(NAMES) in card and "domain ids (B,)" in card
    assert exp.record["merged_domain"] is None and exp.record["program_max_abs_diff"] <= 1e-5
    assert all(r["domain"] in NAMES for r in exp.items)
    plain = json.loads((tiny_export / "config.json").read_text())  # a model without per-domain parameters
    assert plain["program_inputs"] == ["item_ids", "actions", "timestamps", "next_timestamps", "lengths"]
    assert plain["num_domains"] == 1 and plain["within_domain"] is False
    assert '"domain"' not in (tiny_export / "README.md").read_text()


def test_program_equals_eager_on_mixed_domains(exp):
    assert any(float(layer.B.detach().abs().max()) > 0.1 for layer in exp.model.modules() if hasattr(layer, "B"))
    program = exp.load_program()
    assert verify_program(program, exp.model, exp.num_items, exp.max_len, seed=7) <= 1e-5
    h = random_histories(exp.num_items, exp.max_len, [4, 9, 1, 24, 6, 2], torch.Generator().manual_seed(2), 3)
    assert len(set(h["padded"]["domains"].tolist())) == 3  # mixed
    with torch.no_grad():
        got = program(*h["padded"].values())
        torch.testing.assert_close(got, exp.model(h["batch"], last_only=True), rtol=0, atol=1e-5)
        off = program(*list(h["padded"].values())[:-1], (h["padded"]["domains"] + 1) % 3)
    assert float((off - got).abs().max()) > 1e-3  # the domain ids matter


def test_merged_export_equals_the_unmerged_model_on_its_domain(exp, merged_export):
    m = load_export(merged_export)
    d = NAMES.index("books")
    assert m.config["domains"] == ["books"] and m.config["num_domains"] == 1
    assert m.config["model"]["adapters"] == "none" and m.record["merged_domain"] == "books"
    assert m.record["merge_max_abs_diff"] <= 1e-5 and m.record["program_max_abs_diff"] <= 1e-5
    state = m.model.state_dict()
    assert not any(k.endswith((".A", ".B")) for k in state) and state["domain_emb.weight"].shape == (1, 16)
    assert "books" in (merged_export / "README.md").read_text()
    program, gen = m.load_program(), torch.Generator().manual_seed(3)
    for lengths in ([1, 24, 5, 9], [3], [24, 24, 2]):
        h = random_histories(exp.num_items, exp.max_len, lengths, gen)
        B = len(lengths)
        with torch.no_grad():
            want = exp.model(dataclasses.replace(h["batch"], domain=torch.full((B,), d)), last_only=True)
            eager = m.model(dataclasses.replace(h["batch"], domain=torch.zeros(B, dtype=torch.long)), last_only=True)
            got = program(*h["padded"].values(), torch.zeros(B, dtype=torch.long))
            other = exp.model(dataclasses.replace(h["batch"], domain=torch.full((B,), 0)), last_only=True)
        assert float((eager - want).abs().max()) <= 1e-5 and float((got - want).abs().max()) <= 1e-5
        assert float((other - want).abs().max()) > 1e-3  # another domain's model is another model


def test_merge_refuses_an_unknown_domain_and_a_model_without_domains(dom_run, tiny_run, tmp_path, capsys):
    from train.__main__ import main as cli
    from train.export import main as export
    with pytest.raises(ExportError, match=r"'toys'.*\['beauty', 'books', 'movies'\]"):
        export(dom_run, tmp_path / "a", merge_domain_name="toys")
    with pytest.raises(ExportError, match="no per-domain parameters"):
        export(tiny_run, tmp_path / "b", merge_domain_name="books")
    assert cli(["export", "--run", str(dom_run), "--out", str(tmp_path / "c"), "--merge-domain", "toys"]) == 2
    assert "beauty" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written, no .partial left


def _rehashed(src: Path, dst: Path, edit) -> Path:
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    rec = json.loads((dst / "export.json").read_text())
    rec["files"]["config.json"] = file_sha256(dst / "config.json")
    (dst / "export.json").write_text(json.dumps(rec))
    return dst


def test_load_refuses_domain_facts_that_do_not_fit(dom_export, tmp_path):
    with pytest.raises(ExportLoadError, match="num_domains"):
        load_export(_rehashed(dom_export, tmp_path / "a", lambda c: c.update(num_domains=2)))
    with pytest.raises(ExportLoadError, match="model.safetensors"):  # 1 domain: the adapters' shapes differ
        load_export(_rehashed(dom_export, tmp_path / "b", lambda c: c.update(num_domains=1)))
    with pytest.raises(ExportLoadError, match="program_inputs"):
        load_export(_rehashed(dom_export, tmp_path / "c", lambda c: c["program_inputs"].remove("domains")))


# ---- serving -----------------------------------------------------------------------------------------
def test_a_mixed_domain_batch_answers_as_one_by_one(rec, eager, exp):
    rng = np.random.default_rng(0)
    bodies = [body(rng, exp, int(n), k=int(k), domain=NAMES[int(d)])
              for n, k, d in zip(rng.integers(1, 30, 12), rng.integers(1, 20, 12), rng.integers(0, 3, 12))]
    assert len({b["domain"] for b in bodies}) == 3
    for r in (rec, eager):
        batched = r.run([r.prepare(**b) for b in bodies])
        for b, a in zip(bodies, batched):
            assert same(a, r.run([r.prepare(**b)])[0]), (r.encoder, b["domain"])
    for a, b in zip(rec.run([rec.prepare(**b) for b in bodies]), eager.run([eager.prepare(**b) for b in bodies])):
        assert same(a, b)  # program == eager on the mixed batch


def test_each_domain_gets_its_own_state(rec, eager, exp):
    b = body(np.random.default_rng(1), exp, 8)
    for r in (rec, eager):
        states = r.encode([r.prepare(**b, domain=name) for name in NAMES])  # (3, D)
        for i in range(3):
            for j in range(i):
                assert float((states[i] - states[j]).abs().max()) > 1e-3, (r.encoder, i, j)


def test_the_domain_is_required_and_checked_by_name(rec, exp):
    b = body(np.random.default_rng(2), exp, 5)
    with pytest.raises(RequestError, match=r"send \"domain\".*\['beauty', 'books', 'movies'\]") as e:
        rec.prepare(**b)
    assert e.value.field_name == "domain"
    with pytest.raises(RequestError, match=r"unknown domain 'toys'.*\['beauty', 'books', 'movies'\]"):
        rec.prepare(**b, domain="toys")
    with TestClient(make_app(rec, ServeConfig())) as c:
        for extra, want in (({}, "send"), ({"domain": "toys"}, "unknown domain 'toys'")):
            for path, req in (("/recommend", b), ("/search", dict(b, query=exp.queries[1]))):
                r = c.post(path, json=dict(req, **extra))
                assert r.status_code == 422, (path, r.text)
                detail = r.json()["detail"][0]
                assert detail["loc"] == ["body", "domain"] and want in detail["msg"] and str(NAMES) in detail["msg"]
        r = c.post("/recommend", json=dict(b, domain="books"))
        assert r.status_code == 200 and r.json()["domain"] == "books"
        r = c.post("/search", json=dict(b, domain="movies", query=exp.queries[1]))
        assert r.status_code == 200 and r.json()["domain"] == "movies"
        assert c.post("/recommend", json=dict(b, domain=1)).status_code == 422  # a name, not an id


def test_within_domain_never_returns_another_domains_item(rec, exp):
    domain_of = {r["id"]: r["domain"] for r in exp.items}
    rng = np.random.default_rng(3)
    searcher = Searcher(rec, None)
    for name in NAMES:
        k = sum(1 for r in exp.items if r["servable"] and r["domain"] == name)
        b = body(rng, exp, 10, k=k, exclude_history=False)  # a history from every domain
        p = rec.prepare(**b, domain=name)
        assert {domain_of[i] for i in p.exclude} == set(NAMES) - {name}
        (answer,) = rec.run([p])
        assert len(answer.hits) == k and {domain_of[i] for i, _ in answer.hits} == {name}
        (popular,) = rec.run([rec.prepare([], k=5, domain=name)])  # the empty-history fallback too
        assert popular.fallback == "popularity" and {domain_of[i] for i, _ in popular.hits} == {name}
        (found,) = searcher.run([searcher.prepare(exp.queries[1], b["history"], k=k, domain=name)])
        assert {domain_of[i] for i, _ in found.hits} == {name}


def test_search_reads_the_domain_and_mixes_domains_in_a_batch(rec, exp):
    searcher = Searcher(rec, None)
    b = body(np.random.default_rng(4), exp, 6)
    del b["k"]
    reqs = [searcher.prepare(exp.queries[q], **b, k=5, domain=name) for q, name in ((1, "beauty"), (2, "books"),
                                                                                    (1, "movies"), (1, "books"))]
    states = searcher.encode(reqs)
    assert float((states[0] - states[2]).abs().max()) > 1e-3  # same query and history, another domain
    for r, a in zip(reqs, searcher.run(reqs)):
        assert same(a, searcher.run([r])[0])


def test_a_merged_export_serves_its_one_domain(merged_export, rec, exp):
    m = load_export(merged_export)
    program, eager = Recommender(m, "program"), Recommender(m, "eager")
    b = body(np.random.default_rng(5), exp, 7, k=20)
    a = program.run([program.prepare(**b)])[0]
    assert same(a, program.run([program.prepare(**b, domain="books")])[0])
    assert same(a, eager.run([eager.prepare(**b)])[0])
    assert {m.items[i - 1]["domain"] for i, _ in a.hits} == {"books"}  # within_domain kept
    assert same(a, rec.run([rec.prepare(**b, domain="books")])[0])  # the unmerged model on books
    with pytest.raises(RequestError, match=r"unknown domain 'beauty'.*\['books'\]"):
        program.prepare(**b, domain="beauty")
