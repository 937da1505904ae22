"""Full-ranking metrics against hand-computed ranks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from configs.schema import EvalConfig
from data_pipeline.collate import collate
from tests.helpers import FixedTableModel
from train.evaluate import evaluate, rank_metrics, ranks_for_batch


class FixedModel(FixedTableModel):
    """Items placed by hand at angles to every state: score(item) = cos(its angle)."""

    def __init__(self, item_angles_deg):
        super().__init__(torch.cos(torch.tensor(item_angles_deg, dtype=torch.float32) * math.pi / 180))


def make_batch(histories, targets, domains=None):
    toks = []
    for i, (h, t) in enumerate(zip(histories, targets)):
        n = len(h)
        z = np.zeros(n, dtype=np.int64)
        tg = np.append(np.array(h[1:], dtype=np.int64), t)
        toks.append(dict(item_ids=np.array(h, dtype=np.int64), query_ids=z, timestamps=z, next_timestamps=z,
                         actions=z, token_types=z, domains=z, targets=tg,
                         domain=(domains[i] if domains else 0), user=i))
    return collate(toks)


# scores cos(angle): item1 cos25=.906, item2 cos60=.5, item3 cos(-60)=.5, item4 cos100=-.17, item5 cos10=.985
ANGLES = [25, 60, -60, 100, 10]


def test_ranks_by_hand():
    model = FixedModel(ANGLES)
    cfg = EvalConfig(exclude_history="none")
    batch = make_batch([[4], [4], [4], [4]], [2, 5, 4, 3])
    # target 2: above are 5, 1, and item 3 ties -> pessimistic rank 4; target 5: best -> 1;
    # target 4: worst of 5 -> 5; target 3: above 5, 1, tie with 2 -> 4
    assert ranks_for_batch(model, batch, cfg, 5).tolist() == [4, 1, 5, 4]


def test_history_exclusion():
    model = FixedModel(ANGLES)
    batch = make_batch([[5, 1], [5, 2]], [2, 2])  # second user re-consumes item 2: it stays rankable
    # user 0: 5 and 1 excluded, 3 ties -> 2; user 1: only 5 excluded, 1 above, 3 ties -> 3
    assert ranks_for_batch(model, batch, EvalConfig(exclude_history="window"), 5).tolist() == [2, 3]
    assert ranks_for_batch(model, batch, EvalConfig(exclude_history="none"), 5).tolist() == [4, 4]


def test_chunking_does_not_change_ranks():
    model = FixedModel(ANGLES)
    batch = make_batch([[4], [1, 5], [3]], [2, 3, 5])
    full = ranks_for_batch(model, batch, EvalConfig(exclude_history="window"), 5)
    for chunk in (1, 2, 3, 4):
        cfg = EvalConfig(item_chunk=chunk, exclude_history="window")
        assert ranks_for_batch(model, batch, cfg, 5).tolist() == full.tolist()


def test_metric_values():
    m = rank_metrics(torch.tensor([1, 4, 11]), [1, 10])  # columns hr@1 hr@10 ndcg@1 ndcg@10 mrr
    want = [[1, 1, 1, 1, 1], [0, 1, 0, 1 / math.log2(5), 0.25], [0, 0, 0, 0, 1 / 11]]
    torch.testing.assert_close(m, torch.tensor(want, dtype=torch.float64))


def test_evaluate_means_and_domains():
    model = FixedModel(ANGLES)
    batch = make_batch([[4], [4], [4]], [2, 5, 4], domains=[0, 1, 1])  # ranks 4, 1, 5
    out = evaluate(model, [(batch, True), (batch, False)], EvalConfig(ks=[1, 10], exclude_history="none"), 5,
                   ["a", "b"])
    assert out["count"] == 3  # the fake (lock-step) batch is not counted
    assert out["hr@1"] == pytest.approx(1 / 3) and out["mrr"] == pytest.approx((0.25 + 1 + 0.2) / 3)
    assert out["ndcg@10"] == pytest.approx((1 / math.log2(5) + 1 + 1 / math.log2(6)) / 3)
    assert out["per_domain"]["a"]["count"] == 1 and out["per_domain"]["a"]["mrr"] == pytest.approx(0.25)
    assert out["per_domain"]["b"]["hr@1"] == pytest.approx(0.5)


def test_constant_scores_rank_last():
    """All items tie: pessimistic ties put the target behind every other item."""
    model = FixedModel([0, 0, 0, 0])
    batch = make_batch([[1]], [3])
    assert ranks_for_batch(model, batch, EvalConfig(exclude_history="none"), 4).tolist() == [4]
