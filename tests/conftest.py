"""Shared fixtures: small hand-made datasets and shard sets in tmp_path. Nothing here reads ../shared."""
from __future__ import annotations

import numpy as np
import pytest

from configs.schema import ShardConfig
from data_pipeline import schema
from data_pipeline.schema import Dataset, Events, Item


def make_dataset(num_users: int = 23, seed: int = 0, short_users: int = 2) -> Dataset:
    """Users with distinct items per user (so an item identifies its event), two domains, searches,
    same-timestamp ties, and `short_users` users with fewer than 3 events. Rows come in a shuffled
    file order so the writer's sort matters."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        n = int(rng.integers(1, 3)) if u < short_users else int(rng.integers(3, 40))
        items = rng.choice(500, size=n, replace=False) + 1
        ts = np.sort(rng.integers(0, 10, size=n)) * 100 + 1_000_000  # many ties within a user
        for k in range(n):
            dom = "books" if items[k] % 3 == 0 else "movies"
            is_search = rng.random() < 0.25
            action = schema.ACTION_SEARCH_CLICK if is_search else schema.rating_action(int(rng.integers(1, 6)))
            query = f"query {items[k] % 7} words" if is_search else ""
            rows.append((f"user{u}", f"it{items[k]}", int(ts[k]), action, dom, query, k))
    # file order interleaves users (k-th events of all users, users shuffled) but keeps each user's
    # events in k order, so within-user ties must come out in k order, not item-id order
    tiebreak = rng.random(len(rows))
    rows = [r for _, r in sorted(zip(tiebreak, rows), key=lambda p: (p[1][6], p[0]))]
    cols = list(zip(*rows))
    events = Events.from_columns(cols[0], cols[1], cols[2], cols[3], list(cols[4]), list(cols[5]))
    catalog = {f"it{i}": Item(item_id=f"it{i}", domain="books" if i % 3 == 0 else "movies", title=f"title {i}")
               for i in range(1, 501)}
    return Dataset(name="handmade", events=events, catalog=catalog)


def expected_sequences(ds: Dataset) -> dict[str, list[tuple]]:
    """user -> [(item, ts, action, domain, query)] in chronological order, ties in file order."""
    ev = ds.events
    out: dict[str, list[tuple]] = {}
    order = sorted(range(len(ev)), key=lambda i: (ev.user_id[i], ev.timestamp[i]))  # sorted() is stable
    for i in order:
        out.setdefault(ev.user_id[i], []).append(
            (ev.item_id[i], int(ev.timestamp[i]), int(ev.action[i]), ev.domain[i], ev.query[i]))
    return out


@pytest.fixture
def handmade() -> Dataset:
    return make_dataset()


@pytest.fixture
def shard_dir(tmp_path, handmade):
    from data_pipeline.write_shards import write_shards
    out = tmp_path / "shards"
    write_shards(handmade, out, ShardConfig(samples_per_shard=4), progress=False)
    return out


# ---- a tiny trained run and its export, shared by tests/test_export.py and tests/test_serve.py --------
TINY_RUN = ["data.batch_size=16", "data.max_len=24", "data.num_workers=0", "model.dim=16", "model.num_heads=2",
            "loss.num_negatives=16", "eval.batch_size=64", "train.patience=0", "train.lr=5e-3",
            "model.attention_backend=ref"]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A synthetic world without searches (every history is items only, as /recommend takes it), timestamps
    in seconds (the time bias is exercised) and 10% cold items (an ID-only model cannot serve them)."""
    from configs.schema import SyntheticConfig
    from data_pipeline.synthetic import generate
    from data_pipeline.write_shards import write_shards
    out = tmp_path_factory.mktemp("tiny") / "shards"
    ds = generate(SyntheticConfig(num_users=120, items_per_domain=30, mean_events=14, search_prob=0.0)).dataset
    write_shards(ds, out, ShardConfig(samples_per_shard=30, cold_item_frac=0.1), progress=False)
    return out


def _tiny_pretrain(shards, folder, extra: list[str] = ()):
    """2 epochs of single-process ZeRO-0 pretraining of TINY_RUN on `shards` (in this process) -> run dir."""
    from configs.load import load_config
    from configs.schema import PretrainConfig
    from train.pretrain import main
    run = folder / "run"
    main(load_config(PretrainConfig, None, TINY_RUN + [f"shards={shards}", f"run_dir={run}", "train.epochs=2",
                                                       *extra]))
    return run


def _export(run, folder):
    """`python -m train export` of `run` (in process) -> folder/export."""
    from train.export import main as export
    export(run, folder / "export", command="test fixture")
    return folder / "export"


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tmp_path_factory):
    """2 epochs of single-process ZeRO-0 pretraining (in this process, ~10 s)."""
    return _tiny_pretrain(tiny_shards, tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory):
    """`python -m train export` of tiny_run (in process); tests must not modify it (copy it first)."""
    return _export(tiny_run, tmp_path_factory.mktemp("tiny_export"))


# ---- the same tiny world with searches, a query_repr=text run and its export (tests/test_serve_search.py) --
@pytest.fixture(scope="session")
def tiny_search_shards(tmp_path_factory):
    """tiny_shards' world with searches (30% of events; the query is words of the clicked item), so test
    targets include search targets, plus content/queries.{npy,json}: every query string encoded by MiniLM,
    the step of `python -m data_pipeline content` a query_repr=text model needs (item content and semantic
    IDs are not: the model is ID-only on the item side). ~5 s."""
    from configs.schema import ContentConfig, SyntheticConfig
    from data_pipeline.queries import embed_queries
    from data_pipeline.synthetic import generate
    from data_pipeline.write_shards import write_shards
    out = tmp_path_factory.mktemp("tiny_search") / "shards"
    ds = generate(SyntheticConfig(num_users=120, items_per_domain=30, mean_events=14, search_prob=0.3)).dataset
    write_shards(ds, out, ShardConfig(samples_per_shard=30), progress=False)
    embed_queries(out, ContentConfig(cache_dir=""), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_search_run(tiny_search_shards, tmp_path_factory):
    """2 epochs of pretraining with query tokens embedded from their text (model.query_repr=text)."""
    return _tiny_pretrain(tiny_search_shards, tmp_path_factory.mktemp("tiny_search_run"), ["model.query_repr=text"])


@pytest.fixture(scope="session")
def tiny_search_export(tiny_search_run, tmp_path_factory):
    """`python -m train export` of tiny_search_run; tests must not modify it (copy it first)."""
    return _export(tiny_search_run, tmp_path_factory.mktemp("tiny_search_export"))
