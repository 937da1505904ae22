"""The reference HSTU attention against a direct per-sequence transcription of the formula."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels.hstu_attention_ref as ref_module
from kernels.hstu_attention import hstu_attention
from kernels.hstu_attention_ref import hstu_attention_ref


def naive(q, k, v, offsets, alpha, norm_const, norm_by_length, pos_bias, time_bias, ts_q, ts_k, div, num_targets):
    """Row by row, as written in the docstring: no padding, no buckets, no custom autograd."""
    outs = []
    for b in range(offsets.numel() - 1):
        s0, e0 = int(offsets[b]), int(offsets[b + 1])
        n = e0 - s0
        h = n - (int(num_targets[b]) if num_targets is not None else 0)
        for i in range(n):
            cols = [j for j in range(n) if (j <= i and j < h) or j == i] if num_targets is not None \
                else list(range(i + 1))
            s = alpha * (q[s0 + i][None] * k[s0 + torch.tensor(cols)]).sum(-1)  # (C, H)
            if pos_bias is not None:
                p = lambda x: min(x, h) if num_targets is not None else x  # noqa: E731
                dist = torch.tensor([min(max(p(i) - p(j), 0), pos_bias.numel() - 1) for j in cols])
                s = s + pos_bias[dist][:, None]
            if time_bias is not None:
                dt = [abs(float(ts_q[s0 + i] - ts_k[s0 + j])) for j in cols]
                bk = [min(max(math.floor(math.log(max(x, 1.0)) / div), 0), time_bias.numel() - 1) for x in dt]
                s = s + time_bias[torch.tensor(bk)][:, None]
            a = F.silu(s) / (len(cols) if norm_by_length else norm_const)  # (C, H)
            outs.append((a[:, :, None] * v[s0 + torch.tensor(cols)]).sum(0))  # (H, dv)
    return torch.stack(outs) if outs else v[:0]


def make_inputs(lengths, H, dqk, dv, seed, with_targets):
    g = torch.Generator().manual_seed(seed)
    L = sum(lengths)
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int64)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    ts = torch.cumsum(torch.randint(0, 5000, (L,), generator=g), 0).to(torch.float64)
    nt = torch.tensor([min(n, int(torch.randint(0, 4, (1,), generator=g))) for n in lengths]) if with_targets \
        else None
    return dict(q=r(L, H, dqk), k=r(L, H, dqk), v=r(L, H, dv), offsets=offsets, pos_bias=r(7), time_bias=r(20),
                ts_q=ts + 60, ts_k=ts, num_targets=nt)


CASES = [([5, 0, 1, 17, 3], 1, 4, 4), ([33, 2, 40, 1, 0, 9], 2, 5, 3), ([64], 1, 8, 8), ([1, 1, 1], 3, 2, 6)]


@pytest.mark.parametrize("lengths,H,dqk,dv", CASES)
@pytest.mark.parametrize("with_targets", [False, True])
@pytest.mark.parametrize("norm_by_length", [False, True])
@pytest.mark.parametrize("bias", ["none", "pos", "time", "both"])
@pytest.mark.parametrize("row_chunk", [64, 7])  # 7: every sequence over 7 tokens is computed in causal chunks
def test_ref_matches_naive_forward_and_backward(lengths, H, dqk, dv, with_targets, norm_by_length, bias, row_chunk,
                                                monkeypatch):
    monkeypatch.setattr(ref_module, "ROW_CHUNK", row_chunk)
    x = make_inputs(lengths, H, dqk, dv, seed=len(lengths) * 7 + H, with_targets=with_targets)
    pb = x["pos_bias"] if bias in ("pos", "both") else None
    tb = x["time_bias"] if bias in ("time", "both") else None
    args = (x["q"], x["k"], x["v"], x["offsets"])
    kw = dict(alpha=0.7, norm_const=13.0, norm_by_length=norm_by_length, pos_bias=pb, time_bias=tb,
              ts_q=x["ts_q"], ts_k=x["ts_k"], time_bucket_div=0.301, num_targets=x["num_targets"])
    out = hstu_attention_ref(*args, **kw)
    want = naive(*args, 0.7, 13.0, norm_by_length, pb, tb, x["ts_q"], x["ts_k"], 0.301, x["num_targets"])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    params = [t for t in (x["q"], x["k"], x["v"], pb, tb) if t is not None]
    got = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    exp = torch.autograd.grad(want, params, grad_out, allow_unused=True)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_bucketed_equals_single_padded_block():
    x = make_inputs([50, 3, 120, 7, 1, 0, 64, 65], 2, 6, 6, seed=1, with_targets=False)
    kw = dict(pos_bias=x["pos_bias"], time_bias=x["time_bias"], ts_q=x["ts_q"], ts_k=x["ts_k"])
    a = hstu_attention_ref(x["q"], x["k"], x["v"], x["offsets"], bucketed=True, **kw)
    b = hstu_attention_ref(x["q"], x["k"], x["v"], x["offsets"], bucketed=False, **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causality_later_tokens_never_change_earlier_outputs():
    x = make_inputs([30, 12], 1, 4, 4, seed=3, with_targets=False)
    kw = dict(pos_bias=x["pos_bias"], time_bias=x["time_bias"], ts_q=x["ts_q"], ts_k=x["ts_k"])
    base = hstu_attention_ref(x["q"], x["k"], x["v"], x["offsets"], **kw)
    k2, v2 = x["k"].detach().clone(), x["v"].detach().clone()
    k2[20:30] += 5.0
    v2[20:30] -= 3.0
    moved = hstu_attention_ref(x["q"], k2, v2, x["offsets"], **kw)
    torch.testing.assert_close(moved[:20], base[:20])
    torch.testing.assert_close(moved[30:], base[30:])  # the other sequence is untouched as well
    assert not torch.allclose(moved[20:30], base[20:30])


def test_candidates_do_not_see_each_other():
    """Permuting the candidates permutes their outputs and leaves the history unchanged."""
    x = make_inputs([10], 1, 4, 4, seed=4, with_targets=False)
    nt = torch.tensor([4])
    kw = dict(pos_bias=x["pos_bias"], time_bias=x["time_bias"], num_targets=nt)
    ts = torch.arange(10.0)
    ts[6:] = 9.0  # candidates share the request time
    base = hstu_attention_ref(x["q"], x["k"], x["v"], x["offsets"], ts_q=ts, ts_k=ts, **kw)
    perm = torch.tensor([0, 1, 2, 3, 4, 5, 9, 7, 6, 8])
    out = hstu_attention_ref(x["q"][perm], x["k"][perm], x["v"][perm], x["offsets"], ts_q=ts, ts_k=ts, **kw)
    torch.testing.assert_close(out, base[perm])


def test_public_entry_checks_shapes_and_backend():
    x = make_inputs([3, 4], 1, 4, 4, seed=5, with_targets=False)
    with pytest.raises(ValueError, match="offsets must start at 0 and end at L"):
        hstu_attention(x["q"], x["k"], x["v"], torch.tensor([0, 3, 6]), backend="ref")
    with pytest.raises(ValueError, match="backend"):
        hstu_attention(x["q"], x["k"], x["v"], x["offsets"], backend="cuda")
    with pytest.raises(ValueError, match="ts_q and ts_k"):
        hstu_attention(x["q"], x["k"], x["v"], x["offsets"], backend="ref", time_bias=x["time_bias"])
    out = hstu_attention(x["q"], x["k"], x["v"], x["offsets"], backend="auto")  # CPU -> ref
    torch.testing.assert_close(out, hstu_attention_ref(x["q"], x["k"], x["v"], x["offsets"]))


@pytest.mark.parametrize("lengths", [[5, 1, 17, 3], [64], [1, 1], [40, 2, 33]])
@pytest.mark.parametrize("norm_by_length", [False, True])
def test_last_row_attention_equals_the_full_attentions_last_rows(lengths, norm_by_length):
    """hstu_attention_last (evaluation's final layer) = the full attention at each sequence's last token."""
    from kernels.hstu_attention import hstu_attention_last
    x = make_inputs(lengths, 2, 5, 3, seed=11, with_targets=False)
    kw = dict(alpha=0.7, norm_const=13.0, norm_by_length=norm_by_length, pos_bias=x["pos_bias"],
              time_bias=x["time_bias"], ts_q=x["ts_q"], ts_k=x["ts_k"], time_bucket_div=0.301)
    args = (x["q"], x["k"], x["v"], x["offsets"])
    full = hstu_attention(*args, backend="ref", **kw)[x["offsets"][1:] - 1]
    torch.testing.assert_close(hstu_attention_last(*args, backend="ref", **kw), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="at least one token"):
        hstu_attention_last(*args[:3], torch.tensor([0, 0, sum(lengths)]), backend="ref", **kw)
