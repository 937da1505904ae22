"""Cold-start split: held-out items never reach training or validation, test keeps their targets, and
evaluation reports cold and warm targets separately."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.schema import EvalConfig, LoaderConfig, ShardConfig
from data_pipeline.read_shards import cold_items, cut_for_split, load_manifest, read_shards
from data_pipeline.schema import ROW_ITEM
from data_pipeline.write_shards import write_shards
from tests.conftest import make_dataset
from tests.helpers import FixedTableModel
from train.evaluate import evaluate


@pytest.fixture(scope="module")
def cold_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("cold") / "shards"
    write_shards(make_dataset(num_users=80, seed=3), out, ShardConfig(samples_per_shard=20, cold_item_frac=0.2),
                 progress=False)
    return out


def test_cold_items_never_reach_training_or_validation(cold_shards):
    manifest = load_manifest(cold_shards)
    cold = cold_items(manifest)
    assert len(cold) == round(0.2 * manifest["vocab"]["num_items"]) and (np.diff(cold) > 0).all()
    for split in ("train", "valid"):
        for ex in read_shards(cold_shards, split, LoaderConfig(num_workers=0), shuffle=False):
            assert not np.isin(ex["history"][ROW_ITEM], cold).any()
            if ex["target"] is not None:
                assert ex["target"][ROW_ITEM] not in cold
    test = list(read_shards(cold_shards, "test", LoaderConfig(num_workers=0), shuffle=False))
    assert all(not np.isin(ex["history"][ROW_ITEM], cold).any() for ex in test)
    n_cold_targets = sum(int(ex["target"][ROW_ITEM] in cold) for ex in test)
    assert n_cold_targets == manifest["counts"]["cold"]["test_targets"] > 0


def test_manifest_split_counts_are_what_the_loader_uses(cold_shards):
    # before: valid targets and train events were counted before the cold drop (numbers never used)
    split = load_manifest(cold_shards)["counts"]["split"]
    read = lambda name: list(read_shards(cold_shards, name, LoaderConfig(num_workers=0), shuffle=False))
    assert split["valid_targets"] == len(read("valid"))
    assert split["test_targets"] == len(read("test"))
    assert split["train_events"] == sum(ex["history"].shape[1] for ex in read("train"))


def test_cut_for_split_removes_cold_events_after_cutting():
    seq = np.array([[5, 7, 5, 9, 7, 3]] + [[0] * 6] * 4)  # items; other rows unused here
    cold = np.array([7])
    hist, target = cut_for_split(seq, "test", cold)
    assert hist[ROW_ITEM].tolist() == [5, 5, 9] and target[ROW_ITEM] == 3  # the cut is on the full sequence
    assert cut_for_split(seq, "valid", cold) is None  # its validation target (7) is cold
    assert cut_for_split(seq, "train", cold)[0][ROW_ITEM].tolist() == [5, 5, 9]
    assert cut_for_split(seq, "valid", None)[1][ROW_ITEM] == 7
    # refit runs train through the validation event, never the test one; cold events still removed
    assert cut_for_split(seq, "train", None, through_valid=True)[0][ROW_ITEM].tolist() == [5, 7, 5, 9, 7]
    assert cut_for_split(seq, "train", cold, through_valid=True)[0][ROW_ITEM].tolist() == [5, 5, 9]
    assert cut_for_split(seq, "test", None, through_valid=True)[1][ROW_ITEM] == 3


def test_without_cold_fraction_nothing_changes(tmp_path):
    a = write_shards(make_dataset(num_users=30), tmp_path / "a", ShardConfig(samples_per_shard=10), progress=False)
    assert a["split_rule"]["cold_items"] == [] and a["counts"]["cold"]["items"] == 0


def test_evaluate_reports_cold_and_warm_slices():
    from data_pipeline.collate import collate
    z = np.zeros(1, dtype=np.int64)
    toks = [dict(item_ids=z + 1, query_ids=z, timestamps=z, next_timestamps=z, actions=z, token_types=z,
                 domains=z, targets=z + t, domain=0, user=0) for t in (1, 2, 3, 4)]
    batch = collate(toks)
    model = FixedTableModel([0.9, 0.8, 0.7, 0.6])  # item 1 ranks 1st, 2 -> 2nd, ...
    cfg = EvalConfig(ks=[1, 2], exclude_history="none")
    out = evaluate(model, [(batch, True)], cfg, 4, ["d"], cold=torch.tensor([2, 4]))
    assert out["per_slice"]["warm"]["count"] == 2 and out["per_slice"]["cold"]["count"] == 2
    assert out["per_slice"]["warm"]["hr@1"] == 0.5  # targets 1 (rank 1) and 3 (rank 3)
    assert out["per_slice"]["cold"]["hr@2"] == 0.5  # targets 2 (rank 2) and 4 (rank 4)
    assert out["hr@2"] == 0.5 and "per_slice" not in evaluate(model, [(batch, True)], cfg, 4, ["d"])


def test_negatives_never_touch_held_out_items():
    from configs.schema import LossConfig
    from train import losses
    torch.manual_seed(0)
    model = FixedTableModel(torch.rand(10) * 0.9)
    states = torch.nn.functional.normalize(torch.randn(40, 2), dim=-1)
    targets = torch.randint(1, 9, (40,))
    warm = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])  # items 9 and 10 are cold
    gen = torch.Generator().manual_seed(0)
    drawn = losses.draw_items((5000,), 10, gen, "cpu", warm)
    assert set(drawn.tolist()) == set(warm.tolist())
    full = losses.full_softmax_logits(states, model, 10, warm)
    assert (full[:, 9:] == losses.MASKED).all() and (full[:, 1:9] > losses.MASKED).all()
    for shared in (False, True):
        cfg = LossConfig(num_negatives=64, shared_negatives=shared)
        ref_gen, gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        logits = losses.sampled_softmax_logits(states, targets, model, cfg, 10, gen, warm)
        neg = losses.draw_items((64,) if shared else (40, 64), 10, ref_gen, "cpu", warm)  # the same draws
        emb = torch.nn.functional.normalize(model.embed.item.weight, dim=-1)
        want = (states @ emb[neg].T) if shared else torch.einsum("pd,prd->pr", states, emb[neg])
        hit = (neg[None, :] if shared else neg) == targets[:, None]
        torch.testing.assert_close(logits[:, 1:], want.masked_fill(hit, losses.MASKED))


def test_unrankable_items_are_never_ranked_and_count_as_misses():
    from data_pipeline.collate import collate
    z = np.zeros(1, dtype=np.int64)
    toks = [dict(item_ids=z + 1, query_ids=z, timestamps=z, next_timestamps=z, actions=z, token_types=z,
                 domains=z, targets=z + t, domain=0, user=0) for t in (3, 2)]
    model = FixedTableModel([0.9, 0.8, 0.7, 0.6])  # items rank 1, 2, 3, 4 by id
    cfg = EvalConfig(ks=[1, 2], exclude_history="none")
    out = evaluate(model, [(collate(toks), True)], cfg, 4, ["d"], unrankable=torch.tensor([2]))
    # target 3 moves up from rank 3 to 2 (item 2 is not ranked); target 2 is a miss at every K
    assert out["hr@2"] == 0.5 and out["hr@1"] == 0.0 and out["mrr"] == pytest.approx((1 / 2 + 0) / 2)  # a miss: MRR 0
