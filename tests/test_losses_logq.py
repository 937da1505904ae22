"""The logQ correction of in-batch negatives (train/losses.py): its sign and size where it enters the loss.

In-batch negatives are the batch's other targets, so an item is drawn as a negative in proportion to its
share Q of the targets: popular items are over-sampled and, uncorrected, pushed down too hard. The
correction (Yi et al. 2019) scores a sampled negative as logit - log Q: the more popular the item, the
smaller its boost (log Q <= 0), so of two items with the same raw logit the popular one ends lower.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from configs.schema import LossConfig
from tests.helpers import FixedTableModel
from train import losses

# items 1 and 2 share one vector (the same raw logit for every state); item 3 points elsewhere
TABLE = torch.tensor([[0.0, 0.0], [0.6, 0.8], [0.6, 0.8], [1.0, 0.0]])  # (I+1, D), row 0 = padding
TARGETS = torch.tensor([1, 1, 1, 1, 2, 3])  # Q = 4/6, 1/6, 1/6 for in-batch items 1, 2, 3


def in_batch_columns(states, cfg):
    """The in-batch part of the sampled-softmax logits, in the units cross_entropy sees (/ temperature)."""
    model = FixedTableModel(table=TABLE)
    logits = losses.sampled_softmax_logits(states, TARGETS, model, cfg, 3, torch.Generator().manual_seed(0))
    assert logits.shape == (6, 1 + cfg.num_negatives + 3)  # positive, uniform negatives, items 1..3
    return logits[:, -3:] / cfg.temperature  # (P, U)


def test_logq_puts_a_popular_in_batch_negative_below_an_equally_similar_rare_one():
    cfg = LossConfig(num_negatives=4, in_batch_negatives=True, temperature=0.05)
    states = F.normalize(torch.randn(6, 2, generator=torch.Generator().manual_seed(1)), dim=-1)
    ib = in_batch_columns(states, cfg)
    # position 5 (target item 3) sees items 1 and 2 as negatives with the same raw logit: after the
    # correction the popular one (Q = 4/6) is log(4) below the rare one (Q = 1/6), so it takes a quarter
    # of the rare one's softmax weight; +log Q (the wrong sign) would put it log(4) above instead
    assert ib[5, 0] < ib[5, 1]
    assert (ib[5, 1] - ib[5, 0]).item() == pytest.approx(math.log(4), rel=1e-5)
    # every unmasked entry is raw / temperature - log Q; an item is masked where it is the row's own target
    raw = states @ F.normalize(TABLE[1:], dim=-1).T / cfg.temperature  # (P, U)
    q = torch.tensor([4, 1, 1]) / 6
    own = TARGETS[:, None] == torch.tensor([1, 2, 3])[None, :]
    torch.testing.assert_close(ib[~own], (raw - torch.log(q))[~own])
    assert (ib[own] == losses.MASKED / cfg.temperature).all()

