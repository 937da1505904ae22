"""bench/reference_gr.py: its fbgemm shims against per-sequence loops, and the batch -> reference row mapping.
(The reference checkout itself is not needed: the full run is a benchmark, not a test.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import reference_gr as R
from data_pipeline.collate import JaggedBatch

ROOT = Path(__file__).resolve().parents[1]


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def test_jagged_to_padded_dense_matches_loop_and_truncates():
    lengths, n = [3, 0, 5, 1], 4  # a too-long row (5 > n) is cut, as fbgemm does
    off = _offsets(lengths)
    v = torch.randn(int(off[-1]), 2, requires_grad=True)
    got = R.shim_jagged_to_padded_dense(v, [off], [n], padding_value=-1.0)
    want = torch.full((4, n, 2), -1.0)
    for b, k in enumerate(lengths):
        want[b, :min(k, n)] = v[off[b]:off[b] + min(k, n)].detach()
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    got.backward(g)
    want_grad = torch.zeros_like(v)
    for b, k in enumerate(lengths):
        want_grad[off[b]:off[b] + min(k, n)] = g[b, :min(k, n)]
    assert torch.equal(v.grad, want_grad)


def test_dense_to_jagged_matches_loop():
    lengths = [2, 4, 0, 1]
    off = _offsets(lengths)
    d = torch.randn(4, 5, 3, requires_grad=True)
    got, got_off = R.shim_dense_to_jagged(d, [off])
    assert torch.equal(got, torch.cat([d[b, :k] for b, k in enumerate(lengths)]).detach())
    assert got_off[0] is off
    g = torch.randn_like(got)
    got.backward(g)
    want = torch.zeros_like(d)
    for b, k in enumerate(lengths):
        want[b, :k] = g[off[b]:off[b] + k]
    assert torch.equal(d.grad, want)
    assert torch.equal(R.shim_complete_cumsum(torch.tensor(lengths)), off)


def test_to_row_is_the_reference_dataset_layout():
    # two sequences: items [5, 6, 7] at times [10, 11, 12] (next 11, 12, 12) and item [9] at 3 (next 3)
    ids, ts, nts = torch.tensor([5, 6, 7, 9]), torch.tensor([10, 11, 12, 3]), torch.tensor([11, 12, 12, 3])
    z = torch.zeros(4, dtype=torch.int64)
    b = JaggedBatch(item_ids=ids, query_ids=z, timestamps=ts, next_timestamps=nts, actions=z + 4, token_types=z,
                    domains=z, targets=torch.tensor([6, 7, 0, 0]), offsets=torch.tensor([0, 3, 4]),
                    domain=torch.zeros(2, dtype=torch.int64), user=torch.arange(2))
    row = R.to_row(b)
    assert row["historical_ids"].shape == (2, R.MAX_SEQ_LEN)
    assert row["historical_ids"][0, :4].tolist() == [5, 6, 7, 0] and row["historical_ids"][1, :2].tolist() == [9, 0]
    assert row["historical_timestamps"][0, :3].tolist() == [10, 11, 12]
    assert row["history_lengths"].tolist() == [3, 1]
    assert row["target_ids"].tolist() == [0, 0]  # whole sequence encoded; the last token has no target
    assert row["target_timestamps"].tolist() == [12, 3]


def test_registered_shims_are_torch_ops():
    try:
        import fbgemm_gpu  # noqa: F401
        pytest.skip("fbgemm_gpu is installed: the script uses its real ops, not the shims")
    except Exception:  # noqa: BLE001
        pass
    # in a child process: the registration is process-wide and must not leak into the test session
    code = ("import torch; from bench import reference_gr as R; names = R.register_fbgemm_shims(); "
            "off = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([2, 1])); "
            "v = torch.randn(3, 4, requires_grad=True); "
            "p = torch.ops.fbgemm.jagged_to_padded_dense(v, [off], [3], 0.0); "
            "j = torch.ops.fbgemm.dense_to_jagged(p * 2, [off])[0]; j.sum().backward(); "
            "assert torch.equal(j, 2 * v.detach()) and torch.equal(v.grad, torch.full((3, 4), 2.0)); "
            "print(len(names))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "3"
