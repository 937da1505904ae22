"""Semantic-ID head: the trie, the constrained loss, and beam search against brute force on small catalogues."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.generative import CodeTrie, GenerativeHead, beam_search, generative_loss


def random_codes(level_sizes: list[int], num_items: int, g: torch.Generator) -> torch.Tensor:
    """num_items distinct tuples drawn from the full product -> codes (I+1, Lc), row 0 zeros."""
    total = math.prod(level_sizes)
    flat = torch.randperm(total, generator=g)[:num_items]
    cols = []
    for k in reversed(level_sizes):  # mixed-radix digits, last level fastest
        cols.append(flat % k)
        flat = flat // k
    codes = torch.stack(cols[::-1], dim=1)
    return torch.cat([torch.zeros(1, len(level_sizes), dtype=torch.long), codes])


def random_head(dim: int, level_sizes: list[int], seed: int) -> GenerativeHead:
    torch.manual_seed(seed)
    head = GenerativeHead(dim, level_sizes, hidden=16)
    with torch.no_grad():  # larger than init so the log-probs spread out and ties are rare
        for p in head.parameters():
            p.normal_(0.0, 0.7)
    return head.double()


def brute_scores(head: GenerativeHead, codes: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(B, I+1) summed log-probs of every item's tuple, each level renormalised over the children of the
    true prefix; children come from a Python set of prefixes, not from the trie. Column 0 = -inf."""
    real = [tuple(r) for r in codes[1:].tolist()]
    Lc = codes.shape[1]
    children = {}
    for t in real:
        for lvl in range(Lc):
            children.setdefault(t[:lvl], set()).add(t[lvl])
    B, out = states.shape[0], torch.full((states.shape[0], len(real) + 1), float("-inf"), dtype=torch.float64)
    for i, t in enumerate(real, start=1):
        logits = head(states, torch.tensor(t).expand(B, Lc))
        total = torch.zeros(B, dtype=torch.float64)
        for lvl in range(Lc):
            valid = sorted(children[t[:lvl]])
            sub = torch.log_softmax(logits[lvl][:, valid].double(), dim=1)
            total = total + sub[:, valid.index(t[lvl])]
        out[:, i] = total
    return out


def check_against_brute(items, scores, brute, topk, tol=1e-5):
    """Same scores (within tol) and the same items except among near-ties at the top-k boundary."""
    B, n_valid = brute.shape[0], int(torch.isfinite(brute[0]).sum())
    ref_scores, ref_items = torch.sort(brute, dim=1, descending=True, stable=True)
    for b in range(B):
        n = min(topk, int(torch.isfinite(brute[b]).sum()))
        assert torch.allclose(scores[b, :n], ref_scores[b, :n].to(scores.dtype), atol=tol), (scores[b], ref_scores[b])
        assert (items[b, n:] == 0).all() and torch.isinf(scores[b, n:]).all()
        if n == 0:
            continue
        boundary = ref_scores[b, n] if n < brute.shape[1] else float("-inf")
        sure = {int(i) for i, s in zip(ref_items[b, :n], ref_scores[b, :n]) if s > boundary + tol}
        assert sure <= set(items[b, :n].tolist())
    return n_valid


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    level_sizes=st.lists(st.integers(2, 6), min_size=1, max_size=4),
    item_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    beam=st.integers(1, 12),
    topk_frac=st.floats(0.0, 1.0),
    exclude_p=st.sampled_from([0.0, 0.3]),
)
def test_beam_search_properties(level_sizes, item_frac, seed, beam, topk_frac, exclude_p):
    g = torch.Generator().manual_seed(seed)
    num_items = 1 + int(item_frac * (min(40, math.prod(level_sizes)) - 1))
    topk = 1 + int(topk_frac * (beam - 1))
    codes = random_codes(level_sizes, num_items, g)
    trie = CodeTrie(codes, level_sizes)
    head = random_head(8, level_sizes, seed)
    B = 5
    states = F.normalize(torch.randn(B, 8, generator=g, dtype=torch.float64), dim=1)
    exclude = torch.rand(B, num_items + 1, generator=g) < exclude_p if exclude_p else None

    items, scores = beam_search(head, trie, states, beam=beam, topk=topk, exclude=exclude)
    assert items.shape == scores.shape == (B, topk) and items.dtype == torch.int64
    brute = brute_scores(head, codes, states)
    real = items > 0
    assert ((items >= 0) & (items <= num_items)).all()
    assert (torch.isfinite(scores) == real).all(), "padding exactly where the score is -inf"
    assert trie.contains(codes[items[real]]).all()
    for b in range(B):
        got = items[b][real[b]].tolist()
        assert len(got) == len(set(got)), "items within a row are distinct"
        assert (scores[b][real[b]] == scores[b][: len(got)]).all(), "real items come first"
        if exclude is not None:
            assert not exclude[b, got].any()
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "scores sorted non-increasing"
    idx = items.clamp(min=0)
    torch.testing.assert_close(scores[real], brute.gather(1, idx)[real], atol=1e-9, rtol=0)

    if beam >= num_items:  # every prefix fits in the beam: beam search is exhaustive
        if exclude is not None:
            brute = brute.masked_fill(exclude, float("-inf"))
        check_against_brute(items, scores, brute, topk)


def test_exhaustive_float32_and_ties_deterministic():
    """fp32 head (the training dtype) against brute force, and identical output when run twice."""
    level_sizes = [3, 4, 2]
    g = torch.Generator().manual_seed(7)
    codes = random_codes(level_sizes, 17, g)
    trie = CodeTrie(codes, level_sizes)
    head = random_head(8, level_sizes, 3).float()
    states = F.normalize(torch.randn(9, 8, generator=g), dim=1)
    items, scores = beam_search(head, trie, states, beam=17, topk=17)
    assert scores.dtype == torch.float32
    check_against_brute(items, scores, brute_scores(head.double(), codes, states.double()), topk=17)
    items2, scores2 = beam_search(head.float(), trie, states, beam=17, topk=17)
    assert torch.equal(items, items2) and torch.equal(scores, scores2)


def test_tiny_catalogue_pads():
    codes = torch.tensor([[0, 0], [1, 0], [0, 1]])
    trie = CodeTrie(codes, [2, 2])
    head = random_head(4, [2, 2], 0)
    items, scores = beam_search(head, trie, F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1), 5, 4)
    assert (items[:, :2] > 0).all() and (items[:, 2:] == 0).all()
    assert torch.isinf(scores[:, 2:]).all() and torch.isfinite(scores[:, :2]).all()
    assert torch.allclose(scores[:, :2].exp().sum(1), torch.ones(3, dtype=torch.float64))  # the only two items
    ex = torch.zeros(3, 3, dtype=torch.bool)
    ex[:, 1] = True
    items, _ = beam_search(head, trie, F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1), 2, 2, ex)
    assert (items[:, 0] == 2).all() and (items[:, 1] == 0).all()


def test_beam_search_argument_errors():
    codes = torch.tensor([[0, 0], [1, 0], [0, 1]])
    trie, head = CodeTrie(codes, [2, 2]), GenerativeHead(4, [2, 2], hidden=8)
    states = torch.randn(2, 4)
    with pytest.raises(ValueError, match="topk <= beam"):
        beam_search(head, trie, states, beam=2, topk=3)
    with pytest.raises(ValueError, match="exclude"):
        beam_search(head, trie, states, beam=2, topk=1, exclude=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="levels"):
        beam_search(GenerativeHead(4, [2, 3], hidden=8), trie, states, beam=2, topk=1)


@settings(max_examples=40, deadline=None)
@given(level_sizes=st.lists(st.integers(2, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_trie_contains_and_lookup(level_sizes, seed):
    g = torch.Generator().manual_seed(seed)
    num_items = min(40, math.prod(level_sizes))
    num_items = 1 + int(torch.randint(num_items, (1,), generator=g))
    codes = random_codes(level_sizes, num_items, g)
    trie = CodeTrie(codes, level_sizes)
    assert trie.contains(codes[1:]).all()
    assert torch.equal(trie.lookup(codes[1:]), torch.arange(1, num_items + 1))
    present = {tuple(r) for r in codes[1:].tolist()}
    every = torch.tensor(list(itertools.product(*[range(k) for k in level_sizes])))
    expect = torch.tensor([tuple(r) in present for r in every.tolist()])
    assert torch.equal(trie.contains(every), expect)
    # perturbed tuples: out-of-range codes at any level are never items
    bad = codes[1:].clone()
    lvl = int(torch.randint(len(level_sizes), (1,), generator=g))
    bad[:, lvl] = torch.where(torch.rand(num_items, generator=g) < 0.5, -1, level_sizes[lvl])
    assert not trie.contains(bad).any() and (trie.lookup(bad) == 0).all()
    # allowed() at the root lists exactly the first codes in use; a dead node allows nothing
    first = torch.zeros(level_sizes[0], dtype=torch.bool)
    first[codes[1:, 0]] = True
    assert torch.equal(trie.allowed(0, torch.tensor([0, -1])), torch.stack([first, torch.zeros_like(first)]))


def test_trie_rejects_bad_codes():
    with pytest.raises(ValueError, match="not unique"):
        CodeTrie(torch.tensor([[0, 0], [1, 1], [1, 1]]), [2, 2])
    with pytest.raises(ValueError, match="outside"):
        CodeTrie(torch.tensor([[0, 0], [1, 2]]), [2, 2])
    with pytest.raises(ValueError, match="no items"):
        CodeTrie(torch.zeros(1, 2, dtype=torch.long), [2, 2])


def test_constrained_loss_not_above_unconstrained():
    level_sizes = [5, 4, 3]
    g = torch.Generator().manual_seed(1)
    codes = random_codes(level_sizes, 20, g)
    trie = CodeTrie(codes, level_sizes)
    head = random_head(8, level_sizes, 1)
    states = F.normalize(torch.randn(64, 8, generator=g, dtype=torch.float64), dim=1)
    targets = codes[torch.randint(1, 21, (64,), generator=g)]
    plain = generative_loss(head, states, targets)
    masked = generative_loss(head, states, targets, trie)
    assert masked <= plain and torch.isfinite(masked)
    assert torch.equal(generative_loss(head, states, targets, trie, constrained=False), plain)
    # constrained loss = -mean of the same scores beam_search returns
    brute = brute_scores(head, codes, states)
    item = trie.lookup(targets)
    torch.testing.assert_close(masked, -brute[torch.arange(64), item].mean())
    empty = generative_loss(head, states[:0], targets[:0], trie)
    empty.backward()
    assert empty.item() == 0.0
    every = torch.tensor(list(itertools.product(*[range(k) for k in level_sizes])))
    absent = every[~trie.contains(every)][:2]  # 20 of 60 tuples are items, so 40 are not
    with pytest.raises(ValueError, match="not in the trie"):
        generative_loss(head, states[:2], absent, trie)


def test_head_learns_toy_mapping():
    """head + loss + decode together: states = fixed random direction per item + noise -> its codes."""
    torch.manual_seed(0)
    level_sizes, num_items, D = [8, 8, 3], 60, 32
    codes = random_codes(level_sizes, num_items, torch.Generator().manual_seed(0))
    trie = CodeTrie(codes, level_sizes)
    anchors = F.normalize(torch.randn(num_items + 1, D), dim=1)

    def sample(n):
        items = torch.randint(1, num_items + 1, (n,))
        return F.normalize(anchors[items] + 0.1 * torch.randn(n, D), dim=1), items

    head = GenerativeHead(D, level_sizes, hidden=64)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(200):  # ~0.99 top-1 by step 200 (0.85 at 50)
        states, items = sample(128)
        loss = generative_loss(head, states, codes[items], trie)
        opt.zero_grad()
        loss.backward()
        opt.step()
    states, items = sample(512)
    pred, _ = beam_search(head, trie, states, beam=8, topk=4)
    acc = (pred[:, 0] == items).float().mean().item()
    assert acc > 0.95, (acc, loss.item())


def test_select_matches_stable_sort():
    """The topk-based selection equals a stable descending sort, ties (and -inf) included."""
    from model.generative import _select

    g = torch.Generator().manual_seed(0)
    cand = torch.randint(-3, 3, (50, 40), generator=g).float()  # only 6 distinct values: ties everywhere
    cand[torch.rand(50, 40, generator=g) < 0.3] = float("-inf")
    for width in (1, 5, 17, 40):
        ref_s, ref_i = torch.sort(cand, dim=1, descending=True, stable=True)
        s, i = _select(cand, width)
        assert torch.equal(s, ref_s[:, :width]) and torch.equal(i, ref_i[:, :width])


def test_trie_device_mismatch_is_loud():
    trie = CodeTrie(torch.tensor([[0, 0], [1, 0], [0, 1]]), [2, 2])
    moved = trie.to("meta")
    assert moved.device.type == "meta" and trie.device.type == "cpu"
    with pytest.raises(ValueError, match="trie.to"):
        beam_search(GenerativeHead(4, [2, 2], hidden=8), moved, torch.randn(2, 4), beam=2, topk=1)
