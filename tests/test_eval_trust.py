"""Evaluation that cannot lie: NaN states are misses, history exclusion covers the whole history,
warm targets rank among one candidate set for every model (issue 11, items 1, 6, 7)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.schema import EvalConfig, LoaderConfig
from data_pipeline.collate import make_loader
from data_pipeline.read_shards import read_shards
from tests.test_evaluate import ANGLES, FixedModel, make_batch
from train.evaluate import MISS, evaluate, score_batch


class NaNModel(FixedModel):
    """A diverged model: every state is NaN."""

    def forward(self, batch, last_only=False):
        return torch.full((batch.num_sequences if last_only else batch.item_ids.numel(), 2), float("nan"))


def with_seen(batch, seen: list[list[int]]):
    batch.seen = torch.tensor([i for s in seen for i in s], dtype=torch.int64)
    batch.seen_offsets = torch.tensor(np.cumsum([0] + [len(s) for s in seen]), dtype=torch.int64)
    return batch


def test_nan_states_are_misses_and_counted():
    # before: NaN compares False, so nothing "beat" the target and a diverged model scored HR@10 = 1.0
    batch = make_batch([[4], [1, 5]], [2, 3])
    out = evaluate(NaNModel(ANGLES), [(batch, True)], EvalConfig(ks=[1, 10], exclude_history="none"), 5, ["d"])
    assert out["hr@10"] == 0.0 and out["ndcg@10"] == 0.0 and out["mrr"] == 0.0
    assert out["nonfinite_states"] == 2


def test_a_nan_candidate_score_ranks_above_the_target():
    model = FixedModel(ANGLES)
    batch = make_batch([[4]], [5])  # item 5 is the best-scoring item: rank 1
    cfg = EvalConfig(exclude_history="none")
    assert score_batch(model, batch, cfg, 5).ranks.tolist() == [1]
    model.embed.item.weight.data[2] = float("nan")  # item 2 now scores NaN
    r = score_batch(model, batch, cfg, 5)
    assert r.ranks.tolist() == [2] and not r.nonfinite.any()
    model.embed.item.weight.data[5] = float("nan")  # the target's own score is NaN: a miss
    r = score_batch(model, batch, cfg, 5)
    assert r.ranks.tolist() == [MISS] and r.nonfinite.tolist() == [True]


def test_full_history_exclusion_covers_items_older_than_the_window():
    # the input window holds item 4 only; the user saw item 1 (scores above target 2) before it
    model = FixedModel(ANGLES)
    batch = with_seen(make_batch([[4]], [2]), [[1, 4]])
    window = score_batch(model, batch, EvalConfig(exclude_history="window"), 5).ranks
    full = score_batch(model, batch, EvalConfig(exclude_history="full"), 5).ranks
    # scores: 5 (.985) > 1 (.906) > 2 = 3 (.5, tie: pessimistic) -> window: 5, 1, 3 above = 4
    assert window.tolist() == [4] and full.tolist() == [3]
    none = score_batch(model, batch, EvalConfig(exclude_history="none"), 5).ranks
    assert none.tolist() == [4]  # item 4 scores below the target: excluding it changes nothing


def test_loader_batches_carry_the_uncut_history(shard_dir):
    cfg = LoaderConfig(batch_size=7, max_len=3, num_workers=0)
    expected = {ex["user"]: ex["history"][0].tolist() for ex in read_shards(shard_dir, "test", cfg)}
    seen = {}
    for b in make_loader(shard_dir, "test", cfg):
        for i, u in enumerate(b.user.tolist()):
            seen[u] = b.seen[b.seen_offsets[i]:b.seen_offsets[i + 1]].tolist()
        assert int(b.lengths.max()) <= 3
    assert seen == expected and max(len(v) for v in seen.values()) > 3  # longer than the window
    assert all(b.seen is None for b in make_loader(shard_dir, "train", cfg))  # training does not pay for it


def test_warm_targets_rank_among_warm_items_for_every_model():
    # item 1 is cold and scores above target 2: among all items rank 4, among warm items rank 3
    model = FixedModel(ANGLES)
    batch = make_batch([[4], [4]], [2, 1])
    cold = torch.tensor([1])
    cfg = EvalConfig(ks=[1, 3, 10], exclude_history="none")
    content = evaluate(model, [(batch, True)], cfg, 5, ["d"], cold=cold)
    id_only = evaluate(model, [(batch, True)], cfg, 5, ["d"], cold=cold, unrankable=cold)
    assert content["per_slice"]["warm"]["mrr"] == 1 / 4 and id_only["per_slice"]["warm"]["mrr"] == 1 / 3
    for out in (content, id_only):  # the same candidate set: the same number
        ww = out["per_slice"]["warm_among_warm"]
        assert ww["count"] == 1 and ww["mrr"] == 1 / 3 and ww["hr@3"] == 1.0


def test_cold_share_of_the_top10_lists_by_hand():
    # issue 17: 12 items, item i at angle 5 * (i - 1) degrees, so the ranking is 1, 2, ..., 12; cold: 1, 11, 12.
    # 'window' exclusion drops each user's history: top-10 lists are {1-3, 5-11} (2 cold), {2-11} (1 cold),
    # {1-4, 6-11} (2 cold) -> 5 of 30 slots; 1 of the 3 targets (12) is cold
    model = FixedModel([5 * i for i in range(12)])
    batch = make_batch([[4], [1], [5]], [2, 3, 12])
    cold = torch.tensor([1, 11, 12])
    for chunk in (1, 3, 5, 16):  # the running top-10 across catalogue chunks
        cfg = EvalConfig(ks=[10], exclude_history="window", item_chunk=chunk)
        out = evaluate(model, [(batch, True)], cfg, 12, ["d"], cold=cold)
        assert out["cold_share@10"] == pytest.approx(5 / 30) and out["cold_target_share"] == pytest.approx(1 / 3)
    # a model that cannot rank cold items (ID-only) never lists one
    id_only = evaluate(model, [(batch, True)], cfg, 12, ["d"], cold=cold, unrankable=cold)
    assert id_only["cold_share@10"] == 0.0
    # a NaN score takes no slot: with cold = {1, 11} and item 11 NaN, warm item 12 fills its slots
    cold = torch.tensor([1, 11])
    assert evaluate(model, [(batch, True)], cfg, 12, ["d"], cold=cold)["cold_share@10"] == pytest.approx(5 / 30)
    model.embed.item.weight.data[11] = float("nan")
    assert evaluate(model, [(batch, True)], cfg, 12, ["d"], cold=cold)["cold_share@10"] == pytest.approx(2 / 30)


def test_popularity_slices_split_targets_at_half_the_training_occurrences():
    from train.evaluate import PopularitySlices
    counts = np.array([0, 50, 5, 30, 10, 5])  # 100 occurrences: items 1 (50) alone hold half -> head = {1}
    sl = PopularitySlices(counts)
    assert sl.head.tolist() == [1] and sl.head_items == 1
    assert PopularitySlices(counts, head_share=0.6).head.tolist() == [1, 3]  # 50 + 30 >= 60
    batch = make_batch([[4], [4], [2]], [1, 3, 5])
    out = sl(batch)
    assert out["head_target"].tolist() == [True, False, False] and out["tail_target"].tolist() == [False, True, True]
