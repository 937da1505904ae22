"""Triton HSTU attention (kernels/hstu_attention_triton.py) against the reference, on CPU via the Triton
interpreter.

TRITON_INTERPRET=1 must be in the environment before triton is first imported (triton.language builds
some of its own helpers with triton.jit at import; a kernel decorated later still fails with "Cannot call
@triton.jit'd outside of the scope of a kernel" if triton came first, measured). Other test modules may
import triton (deepspeed can), and an interpreter-mode triton must not leak into the rest of the session.
So every kernel call runs in ONE child process, started once by a module-scoped fixture: this file run as
a script with the variable set. The child computes each check's numbers and writes them as JSON; the
tests here compare the numbers with the tolerances below. Nothing in this process imports triton.

By hand (prints the JSON):  TRITON_INTERPRET=1 python tests/test_hstu_attention_triton.py [CHECK ...]

The `gpu`-marked tests at the end run the compiled kernels on CUDA in this process (skipped without CUDA,
which is only asked for inside the tests): parity on the awkward shapes above, and bitwise-repeatable
backward, within a process and, in deterministic mode, across processes. `pytest -m gpu` on a GPU machine
is, with `python bench/kernels.py --parity-only`, the proof kernels/hstu_attention.py's "auto" waits for.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# fp32 kernel vs the reference run in fp64 on the same inputs: |err| <= ATOL + RTOL * |ref| elementwise
# (assert_close's rule). Measured: worst |err| / (ATOL + RTOL |ref|) = 0.044 (a pos_bias gradient, a sum over
# thousands of pairs); worst max |err| / max |ref| 3.4e-6 (pos_bias), <= 5e-7 for out, dq, dk, dv, d_time_bias.
RTOL, ATOL = 1e-4, 1e-5
# bf16: the kernel's max-abs error vs fp64 may be at most this multiple of the bf16 reference's own error
BF16_FWD_FACTOR, BF16_BWD_FACTOR = 2.0, 5.0
# fp32 on CUDA (not measured yet: no GPU run), per tensor: max |err| <= GPU_ATOL + GPU_RTOL * max |ref|, the
# rule of bench/kernels.py's parity table. fp32 matmuls run as 3xTF32 there (~2^-21 relative a product, 8x
# fp32's; TF32 is switched off for these tests); 5e-4 is 150x the interpreter's worst max|err| / max|ref|
# (3.4e-6) and still ~100x below what a wrong mask, bias bucket or block boundary gives (>= 5e-2).
GPU_RTOL, GPU_ATOL = 5e-4, 1e-5

# Cases: jagged lengths include empty and length-1 sequences and lengths that are not multiples of the
# block; blocks = the interpreter's (BLOCK_M, BLOCK_N, BLOCK_BIN), small so short sequences still cross
# several block boundaries (BLOCK_M != BLOCK_N too). bias: none / pos / time / both; targets: None,
# "few" (0..5 candidates) or "many" (half to all of the sequence, so whole key blocks hold only
# candidates); nbl = norm_by_length. Every head dim (25, 32, 50, 64) meets targets and both norm modes.
LENS_A = [37, 0, 1, 64, 5, 100]
LENS_B = [70, 1, 0, 33, 16]
FP32_CASES = {
    "d25_both_few_len": dict(lengths=LENS_A, H=2, dqk=25, dv=25, bias="both", targets="few", nbl=True,
                             blocks=(32, 32, 16)),
    "d50_pos_causal_const": dict(lengths=LENS_A, H=1, dqk=50, dv=50, bias="pos", targets=None, nbl=False,
                                 blocks=(16, 32, 8)),
    "d32x50_time_few_const": dict(lengths=LENS_B, H=1, dqk=32, dv=50, bias="time", targets="few", nbl=False,
                                  blocks=(32, 16, 32)),
    "d64x32_none_causal_len": dict(lengths=[130, 0, 1, 17], H=2, dqk=64, dv=32, bias="none", targets=None,
                                   nbl=True, blocks=(64, 64, 32)),
    "d25x50_both_causal_const": dict(lengths=LENS_B, H=1, dqk=25, dv=50, bias="both", targets=None, nbl=False,
                                     blocks=(64, 32, 32)),
    "d50x25_both_many_len": dict(lengths=LENS_B, H=1, dqk=50, dv=25, bias="both", targets="many", nbl=True,
                                 blocks=(16, 16, 16)),
    "d64_pos_many_const": dict(lengths=LENS_B, H=1, dqk=64, dv=64, bias="pos", targets="many", nbl=False,
                               blocks=(32, 32, 32)),
    "d32_time_few_len": dict(lengths=LENS_A, H=1, dqk=32, dv=32, bias="time", targets="few", nbl=True,
                             blocks=(64, 64, 32)),
    "d32_none_many_len": dict(lengths=LENS_B, H=2, dqk=32, dv=32, bias="none", targets="many", nbl=True,
                              blocks=(32, 32, 32)),
    # q, k, v as strided views of one fused projection, a max_len above the longest sequence, frozen biases
    "d50_views_frozen_bias": dict(lengths=LENS_B, H=2, dqk=50, dv=50, bias="both", targets="few", nbl=False,
                                  blocks=(32, 32, 32), views=True, max_len_extra=40, frozen_bias=True),
}


def _random_cases(n: int, seed: int) -> dict:
    """Seeded random combinations on top of the hand-picked ones (the parent and the child build the same)."""
    rng = random.Random(seed)
    cases = {}
    for i in range(n):
        lengths = [rng.choice([0, 1, rng.randint(2, 40), rng.randint(41, 120)]) for _ in range(rng.randint(1, 5))]
        bm, bn = rng.choice([(16, 16), (16, 32), (32, 16), (32, 32), (64, 32), (32, 64), (64, 64)])
        dims = [16, 25, 32, 50, 64]
        cases[f"random{i}"] = dict(lengths=lengths, H=rng.randint(1, 2), dqk=rng.choice(dims), dv=rng.choice(dims),
                                   bias=rng.choice(["none", "pos", "time", "both"]),
                                   targets=rng.choice([None, "few", "many"]), nbl=rng.random() < 0.5,
                                   blocks=(bm, bn, rng.choice([8, 16, 32, 64])))
    return cases


FP32_CASES.update(_random_cases(8, seed=0))
BF16_CASES = {
    "bf16_tables_few": dict(lengths=LENS_B, H=2, dqk=50, dv=25, bias="both", targets="few", nbl=True,
                            blocks=(32, 32, 32), table_dtype="bf16"),
    "fp32_tables_causal": dict(lengths=LENS_A, H=1, dqk=64, dv=64, bias="both", targets=None, nbl=False,
                               blocks=(64, 64, 32), table_dtype="fp32"),
}
GRAD_NAMES = ("q", "k", "v", "pos_bias", "time_bias")


# --------------------------------------------------------------------------------------------------------
# Inputs and the reference (plain torch: used by the child process)
# --------------------------------------------------------------------------------------------------------

def make_inputs(case: dict, seed: int) -> dict:
    """Random jagged batch for a case. Timestamps are int64 unix seconds (~1.6e9) with log-uniform gaps from
    1 s to ~4 months, so the time buckets span most of the 60-entry table and clamp at its end."""
    g = torch.Generator().manual_seed(seed)
    lengths, H, dqk, dv = case["lengths"], case["H"], case["dqk"], case["dv"]
    L = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    if case.get("views"):
        fused = torch.randn(L, H, 2 * dqk + dv + 3, generator=g) * 0.5  # + 3: strides not a power of two
        q, k, v = fused[..., :dqk], fused[..., dqk:2 * dqk], fused[..., 2 * dqk:2 * dqk + dv]
    else:
        q, k, v = (torch.randn(L, H, d, generator=g) * 0.5 for d in (dqk, dqk, dv))
    gaps = torch.exp(torch.rand(L, generator=g) * math.log(1e7)).to(torch.int64)
    ts = 1_600_000_000 + gaps.cumsum(0)
    ts_q = ts + torch.randint(0, 3600, (L,), generator=g)  # query time after the event time
    nt = None
    if case["targets"] == "few":
        nt = torch.tensor([int(torch.randint(0, min(n, 5) + 1, (1,), generator=g)) for n in lengths])
    elif case["targets"] == "many":
        nt = torch.tensor([int(torch.randint(n // 2, n + 1, (1,), generator=g)) for n in lengths])
        if lengths:
            nt[0] = lengths[0]  # one sequence of candidates only
    return dict(q=q, k=k, v=v, offsets=offsets, ts_q=ts_q, ts_k=ts, num_targets=nt,
                pos_bias=torch.randn(40, generator=g) * 0.5 if case["bias"] in ("pos", "both") else None,
                time_bias=torch.randn(60, generator=g) * 0.5 if case["bias"] in ("time", "both") else None,
                grad_out=torch.randn(L, H, dv, generator=g))


def attention_kwargs(case: dict, x: dict) -> dict:
    return dict(alpha=0.7, norm_const=13.0, norm_by_length=case["nbl"], pos_bias=x["pos_bias"],
                time_bias=x["time_bias"], ts_q=x["ts_q"], ts_k=x["ts_k"], time_bucket_div=0.301,
                num_targets=x["num_targets"])


def forward_backward(fn, x: dict, case: dict, dtype, table_dtype, **extra) -> dict:
    """Run fn on x cast to dtype (bias tables to table_dtype) -> {"out": ..., "q": dq, ...} in fp64; bias
    gradients absent where there is no bias or it is frozen."""
    q, k, v = (x[n].to(dtype).requires_grad_() for n in ("q", "k", "v"))
    tables = {n: x[n].to(table_dtype).requires_grad_(not case.get("frozen_bias")) if x[n] is not None else None
              for n in ("pos_bias", "time_bias")}
    out = fn(q, k, v, x["offsets"], **{**attention_kwargs(case, x), **tables}, **extra)
    named = {"q": q, "k": k, "v": v, **{n: t for n, t in tables.items() if t is not None and t.requires_grad}}
    grads = torch.autograd.grad(out, list(named.values()), x["grad_out"].to(dtype))
    return {"out": out.detach().double(), **{n: g.double() for n, g in zip(named, grads)}}


def tolerance_ratio(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / (ATOL + RTOL |want|): <= 1 passes assert_close(rtol=RTOL, atol=ATOL)."""
    if got.numel() == 0:
        return 0.0
    return float(((got - want).abs() / (ATOL + RTOL * want.abs())).max())


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) if got.numel() else 0.0


def empty_batches(tri, device: str = "cpu") -> list:
    """L == 0 (no sequences, or only empty ones): (0, H, dv) output and empty gradients -> per batch
    [out shape, dq shape, dv shape, sum |bias gradients|]."""
    shapes = []
    for offsets in ([0], [0, 0, 0]):
        q = torch.zeros(0, 2, 25, device=device, requires_grad=True)
        v = torch.zeros(0, 2, 50, device=device, requires_grad=True)
        pb = torch.zeros(8, device=device, requires_grad=True)
        tb = torch.zeros(16, device=device, requires_grad=True)
        ts = torch.zeros(0, dtype=torch.int64, device=device)
        out = tri.hstu_attention_triton(q, q, v, torch.tensor(offsets, device=device), max_len=0, pos_bias=pb,
                                        time_bias=tb, ts_q=ts, ts_k=ts)
        gq, gv, gpb, gtb = torch.autograd.grad(out.sum(), [q, v, pb, tb])
        shapes.append([list(out.shape), list(gq.shape), list(gv.shape), float(gpb.abs().sum() + gtb.abs().sum())])
    return shapes


# --------------------------------------------------------------------------------------------------------
# The child process: every kernel call happens here
# --------------------------------------------------------------------------------------------------------

def _child_checks() -> dict:
    """name -> (function(tri) -> JSON-able result). Imported lazily: `tri` is the interpreted kernel module."""
    from kernels.hstu_attention_ref import hstu_attention_ref

    def blocks(tri, case):
        tri.INTERPRET_CONFIG.update(zip(("BLOCK_M", "BLOCK_N", "BLOCK_BIN"), case["blocks"]))

    def fp32(name, case):
        def run(tri):
            blocks(tri, case)
            x = make_inputs(case, seed=len(name))
            max_len = max(case["lengths"]) + case.get("max_len_extra", 0)
            got = forward_backward(tri.hstu_attention_triton, x, case, torch.float32, torch.float32,
                                   max_len=max_len)
            want = forward_backward(hstu_attention_ref, x, case, torch.float64, torch.float64)
            assert got.keys() == want.keys(), (got.keys(), want.keys())
            return {n: {"ratio": tolerance_ratio(got[n], want[n]), "max_err": max_err(got[n], want[n]),
                        "max_ref": float(want[n].abs().max()) if want[n].numel() else 0.0} for n in want}
        return run

    def bf16(name, case):
        def run(tri):
            blocks(tri, case)
            x = make_inputs(case, seed=len(name))
            tdt = torch.bfloat16 if case["table_dtype"] == "bf16" else torch.float32
            exact = forward_backward(hstu_attention_ref, x, case, torch.float64, torch.float64)
            # the bf16 reference takes bf16 tables only (an fp32 bias would promote S and break its bf16 einsum)
            ref16 = forward_backward(hstu_attention_ref, x, case, torch.bfloat16, torch.bfloat16)
            tri16 = forward_backward(tri.hstu_attention_triton, x, case, torch.bfloat16, tdt,
                                     max_len=max(case["lengths"]))
            return {n: {"kernel": max_err(tri16[n], exact[n]), "ref_bf16": max_err(ref16[n], exact[n])}
                    for n in exact}
        return run

    def deterministic(tri):
        """Backward twice, bf16 and fp32, both bias gradients: bitwise equal."""
        equal = {}
        for dtype, case in ((torch.bfloat16, FP32_CASES["d25_both_few_len"]),
                            (torch.float32, FP32_CASES["d50x25_both_many_len"])):
            blocks(tri, case)
            x = make_inputs(case, seed=7)
            a, b = (forward_backward(tri.hstu_attention_triton, x, case, dtype, dtype, max_len=max(case["lengths"]))
                    for _ in range(2))
            equal.update({f"{dtype}/{n}": bool(torch.equal(a[n], b[n])) for n in a})
        return equal

    def pinned(tri):
        """Deterministic mode: the configs launched are the pinned ones (32x32x8 dkdv with bias gradients,
        64x64 with frozen biases, 32-row fwd / dq blocks for max_len <= 32), each one of the spill-checked
        candidates, and the results match the reference, bitwise equal over two runs. (Deterministic mode
        fills torch.empty with NaN, so this also shows every output element is written.)"""
        rows = {"fwd": tri._FWD_ROWS, "dq": tri._DQ_ROWS, "dkdv": tri._DKDV_ROWS}
        keys = [{"AUTOTUNE_MAX_LEN": m, "GRAD_POS": g, "GRAD_TIME": t}
                for m in (1, 16, 32, 64, 8192) for g in (False, True) for t in (False, True)]
        out = {"candidates": all(tri._pinned_row(n, c) in rows[n] for n in rows for c in keys)}
        launched, fixed = [], tri._fixed_config

        def recording(name, const):  # _launch's callers look _fixed_config up in the module at each call
            launched.append((name, fixed(name, const)))
            return launched[-1][1]

        tri._fixed_config = recording
        short = dict(lengths=[17, 0, 1, 32, 5], H=2, dqk=25, dv=50, bias="both", targets="few", nbl=True)
        torch.use_deterministic_algorithms(True)
        try:
            for label, case in (("bias_grads", FP32_CASES["d25_both_few_len"]),
                                ("frozen", FP32_CASES["d50_views_frozen_bias"]), ("short", short)):
                launched.clear()
                x = make_inputs(case, seed=11)
                max_len = max(case["lengths"]) + case.get("max_len_extra", 0)
                a, b = (forward_backward(tri.hstu_attention_triton, x, case, torch.float32, torch.float32,
                                         max_len=max_len) for _ in range(2))
                want = forward_backward(hstu_attention_ref, x, case, torch.float64, torch.float64)
                out[label] = {"ratio": max(tolerance_ratio(a[n], want[n]) for n in want),
                              "equal": all(torch.equal(a[n], b[n]) for n in a),
                              "launched": sorted({(n, tuple(c.values())) for n, c in launched})}
        finally:
            torch.use_deterministic_algorithms(False)
            tri._fixed_config = fixed
        return out

    def public_entry(tri):
        """hstu_attention(backend="triton") routes here (max_len computed from offsets) and matches the ref."""
        from kernels.hstu_attention import hstu_attention
        case = FP32_CASES["d25_both_few_len"]
        blocks(tri, case)
        x = make_inputs(case, seed=3)
        kw = attention_kwargs(case, x)
        got = hstu_attention(x["q"], x["k"], x["v"], x["offsets"], backend="triton", **kw)
        want = hstu_attention_ref(x["q"].double(), x["k"].double(), x["v"].double(), x["offsets"],
                                  **{**kw, "pos_bias": kw["pos_bias"].double(), "time_bias": kw["time_bias"].double()})
        return tolerance_ratio(got.double(), want)

    def split_ts(tri):
        """The kernel's time difference, assembled from (hi, lo) fp32 parts as in _time_bins, equals
        fp32(int64 difference), the reference's rounding, over a batch spanning ~2^35 s."""
        g = torch.Generator().manual_seed(0)
        tk = torch.randint(0, 2**35 - 200, (2000,), generator=g) + 1_000_000_000
        tq = torch.cat([tk[:1000] + torch.randint(-100, 100, (1000,), generator=g), tk[1000:].flip(0)])
        sq, sk = tri._split_ts(tq, tk)
        dt = (sq[:, None, 0] - sk[None, :, 0]) * 4096.0 + (sq[:, None, 1] - sk[None, :, 1])
        return bool(torch.equal(dt, (tq[:, None] - tk[None, :]).to(torch.float32)))

    def time_boundaries(tri):
        """Time differences on and next to every bucket boundary (round(e^(0.301 b)) + {-1, 0, 1} s), one per
        length-2 sequence with q = k = 0 and v = 1, so row 1's output is SiLU(time_bias[bucket]): read the
        kernel's bucket back from it. -> [(dt, kernel bucket, reference bucket, ln(dt)/div in fp64)]."""
        from kernels.hstu_attention_ref import time_buckets
        tri.INTERPRET_CONFIG.update(BLOCK_M=64, BLOCK_N=64, BLOCK_BIN=32)
        dts = sorted({max(round(math.exp(0.301 * b)) + e, 0) for b in range(64) for e in (-1, 0, 1)})
        L = 2 * len(dts)
        ts_k = torch.full((L,), 1_600_000_000, dtype=torch.int64)
        ts_q = ts_k.clone()
        ts_q[1::2] += torch.tensor(dts)
        table = torch.arange(60, dtype=torch.float32) * 0.1  # SiLU is increasing on [0, 6): bucket readable
        out = tri.hstu_attention_triton(torch.zeros(L, 1, 16), torch.zeros(L, 1, 16), torch.ones(L, 1, 16),
                                        torch.arange(0, L + 1, 2), max_len=2, time_bias=table, ts_q=ts_q,
                                        ts_k=ts_k, norm_by_length=True)
        got = (out[1::2, 0, :1] - torch.nn.functional.silu(table)[None, :]).abs().argmin(1)
        want = time_buckets(torch.tensor(dts), 0.301, 60)
        return [(d, int(g), int(w), math.log(max(d, 1)) / 0.301) for d, g, w in zip(dts, got, want)]

    def model_step(tri):
        """A whole HSTU model step (2 layers, D 50 = 2 heads x 25, both biases, per-position sampled softmax)
        with backend='triton' vs 'ref', same weights and negatives -> (loss rel. diff, worst per-parameter
        max|grad diff| / max|grad|)."""
        from configs.schema import LossConfig, ModelConfig
        from data_pipeline.collate import collate, tokenize
        from data_pipeline.schema import SEQ_ROWS
        from model.seqrec import SeqRecModel
        from train.losses import compute_loss
        g = torch.Generator().manual_seed(0)
        seqs = []
        for n in (37, 1, 64, 2, 90):
            ts = torch.cumsum(torch.randint(1, 90_000, (n,), generator=g), 0) + 1_600_000_000
            hist = torch.stack([torch.randint(1, 300, (n,), generator=g), ts, torch.randint(2, 9, (n,), generator=g),
                                torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)]).numpy()
            assert hist.shape[0] == len(SEQ_ROWS)
            seqs.append({**tokenize(hist, None, True, 200), "domain": 0, "user": len(seqs)})
        batch = collate(seqs)
        grads, losses = {}, {}
        for backend in ("ref", "triton"):
            torch.manual_seed(0)
            cfg = ModelConfig(num_layers=2, dim=50, num_heads=2, input_dropout=0.0, linear_dropout=0.0,
                              attention_backend=backend, use_actions=True)
            model = SeqRecModel(cfg, num_items=300, num_queries=0, max_len=200)
            loss, _ = compute_loss(model, batch, LossConfig(num_negatives=64), 300, torch.Generator().manual_seed(1))
            loss.backward()
            losses[backend] = loss.item()
            grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert grads["ref"].keys() == grads["triton"].keys()
        rel = lambda n: ((grads["triton"][n] - grads["ref"][n]).abs().max()
                         / grads["ref"][n].abs().max().clamp(min=1e-12))
        worst = max(float(rel(n)) for n in grads["ref"])
        return abs(losses["triton"] - losses["ref"]) / abs(losses["ref"]), worst, len(grads["ref"])

    checks = {f"fp32/{n}": fp32(n, c) for n, c in FP32_CASES.items()}
    checks.update({f"bf16/{n}": bf16(n, c) for n, c in BF16_CASES.items()})
    checks.update(deterministic=deterministic, pinned=pinned, empty=empty_batches, public_entry=public_entry,
                  split_ts=split_ts, time_boundaries=time_boundaries, model_step=model_step)
    return checks


def _child_main(names: list[str]) -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    sys.path.insert(0, str(ROOT))
    from kernels import hstu_attention_triton as tri  # imports triton, in interpreter mode
    assert tri.INTERPRET
    checks = _child_checks()
    results = {}
    for name in names or list(checks):
        try:
            results[name] = {"ok": checks[name](tri)}
        except Exception as e:  # noqa: BLE001 - reported by the test that asked for this check
            import traceback
            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    return results


# --------------------------------------------------------------------------------------------------------
# Tests (this process: no triton)
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Run every check in one interpreter child process (~25 s on 2 cores) and load its JSON."""
    if importlib.util.find_spec("triton") is None:  # find_spec imports nothing (importorskip would)
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, __file__, "--out", str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def _get(results: dict, name: str):
    r = results[name]
    if "error" in r:
        pytest.fail(f"{name} raised in the interpreter child:\n{r['error']}")
    return r["ok"]


@pytest.mark.parametrize("name", list(FP32_CASES))
def test_fp32_forward_and_gradients_match_reference(results, name):
    r = _get(results, f"fp32/{name}")
    case = FP32_CASES[name]
    biases = {"none": [], "pos": ["pos_bias"], "time": ["time_bias"], "both": ["pos_bias", "time_bias"]}[case["bias"]]
    assert set(r) == {"out", "q", "k", "v", *([] if case.get("frozen_bias") else biases)}, f"compared {sorted(r)}"
    bad = {n: v for n, v in r.items() if not v["ratio"] <= 1.0}
    assert not bad, f"beyond rtol={RTOL}, atol={ATOL} (ratio > 1): {bad}"


@pytest.mark.parametrize("name", list(BF16_CASES))
def test_bf16_error_within_reference_error(results, name):
    r = _get(results, f"bf16/{name}")
    assert set(r) == {"out", *GRAD_NAMES}
    for n, e in r.items():
        factor = BF16_FWD_FACTOR if n == "out" else BF16_BWD_FACTOR
        assert e["kernel"] <= factor * e["ref_bf16"], f"{n}: kernel {e['kernel']:.3g} vs bf16 ref {e['ref_bf16']:.3g}"


def test_backward_is_bitwise_deterministic(results):
    equal = _get(results, "deterministic")
    assert len(equal) == 12 and all(equal.values()), equal


def test_deterministic_mode_runs_pinned_configs(results):
    r = _get(results, "pinned")
    assert r["candidates"] is True, "a pinned config is not among the spill-checked autotune candidates"
    # (kernel, (BLOCK_M, BLOCK_N[, BLOCK_BIN], warps, stages)) as launched
    want = {"bias_grads": [["dkdv", [32, 32, 8, 8, 2]], ["dq", [64, 64, 8, 2]], ["fwd", [64, 64, 8, 2]]],
            "frozen": [["dkdv", [64, 64, 4, 8, 2]], ["dq", [64, 64, 8, 2]], ["fwd", [64, 64, 8, 2]]],
            "short": [["dkdv", [32, 32, 8, 8, 2]], ["dq", [32, 64, 4, 2]], ["fwd", [32, 64, 4, 2]]]}
    for label, launched in want.items():
        assert r[label]["launched"] == launched, (label, r[label]["launched"])
        assert r[label]["ratio"] <= 1.0 and r[label]["equal"], (label, r[label])


def test_kernels_use_no_atomics():
    """Determinism on GPU rests on this: no tl.atomic_* anywhere (the interpreter would run them in order)."""
    src = (ROOT / "kernels" / "hstu_attention_triton.py").read_text()
    assert not re.search(r"tl\.atomic_\w+\(", src)


def test_empty_batches(results):
    for out_shape, gq_shape, gv_shape, bias_grad_sum in _get(results, "empty"):
        assert out_shape == [0, 2, 50] and gq_shape == [0, 2, 25] and gv_shape == [0, 2, 50]
        assert bias_grad_sum == 0.0


def test_public_entry_triton_backend(results):
    assert _get(results, "public_entry") <= 1.0


def test_whole_model_step_triton_matches_ref(results):
    """Loss and every parameter gradient of a 2-layer HSTU step agree between backends (fp32)."""
    loss_rel, grad_rel, n_params = _get(results, "model_step")
    assert n_params >= 10  # embeddings, uvqk, out, both bias tables of both layers
    assert loss_rel < 1e-6 and grad_rel < 1e-4, (loss_rel, grad_rel)


def test_time_difference_is_exact_for_unix_seconds(results):
    assert _get(results, "split_ts") is True


def test_time_buckets_match_reference_at_boundaries(results):
    """floor(ln(dt) / 0.301) on fp32 is ill-conditioned where ln(dt) / 0.301 is within fp32 rounding of an
    integer: logf implementations that differ by 1 ulp (torch's CPU log vs numpy's, measured: 5 of 178
    values here) then disagree by one bucket, and so would torch on CPU vs CUDA. Everywhere else the
    kernel's bucket must be the reference's; at such points it may be off by one."""
    rows = _get(results, "time_boundaries")
    assert len(rows) > 150
    for dt, got, want, exact in rows:
        near = abs(exact - round(exact)) < 1e-5 * max(exact, 1.0)  # fp32 log + division: ~1e-7 relative
        assert got == want or (near and abs(got - want) == 1), (dt, got, want, exact)
    assert sum(g != w for _, g, w, _ in rows) <= len(rows) // 20


# --------------------------------------------------------------------------------------------------------
# Dispatch (this process, no triton, no GPU: only a device's type is read)
# --------------------------------------------------------------------------------------------------------

def test_auto_resolves_to_ref_on_cuda_unless_triton_is_explicit(monkeypatch, capsys):
    from kernels import hstu_attention as entry
    monkeypatch.setattr(entry, "triton_available", lambda: True)  # a CUDA machine with Triton, faked
    entry._warn_auto_ref_on_cuda.cache_clear()
    entry._warn_ref_on_cuda.cache_clear()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing touches CUDA
    assert [entry.resolve_backend("auto", cuda) for _ in range(3)] == ["ref"] * 3
    assert entry.resolve_backend("triton", cuda) == "triton"
    assert entry.resolve_backend("auto", cpu) == "ref" and entry.resolve_backend("triton", cpu) == "triton"
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1, err  # once per process, however many calls
    for why in ("never run on a GPU", "model.attention_backend=triton", "python bench/kernels.py --parity-only"):
        assert why in err, (why, err)
    # the switch for after a GPU run proves the kernels: auto = triton where usable, else ref (said once)
    monkeypatch.setattr(entry, "AUTO_PICKS_TRITON", True)
    assert entry.resolve_backend("auto", cuda) == "triton" and entry.resolve_backend("auto", cpu) == "ref"
    monkeypatch.setattr(entry, "triton_available", lambda: False)
    assert entry.resolve_backend("auto", cuda) == "ref"
    assert "Triton unavailable" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# On CUDA (compiled kernels, this process; `pytest -m gpu`)
# --------------------------------------------------------------------------------------------------------

# awkward jagged shapes: empty and length-1 sequences, head dims 25 / 50 (padded to 32 / 64), targets, both
# norms, strided views, frozen biases; "long" crosses several blocks of every autotune candidate
GPU_CASES = {n: FP32_CASES[n] for n in ("d25_both_few_len", "d50x25_both_many_len", "d64x32_none_causal_len",
                                        "d32x50_time_few_const", "d50_views_frozen_bias")}
GPU_CASES["long_d50_both_few"] = dict(lengths=[300, 0, 1, 129, 64, 1, 257, 2], H=2, dqk=50, dv=50, bias="both",
                                      targets="few", nbl=True)


@pytest.fixture(scope="module")
def cuda_tri():
    """The compiled kernel module on CUDA with TF32 off (fp32 matmuls as 3xTF32); skips without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton, compiled (TRITON_INTERPRET unset)")
    from kernels import hstu_attention_triton as tri
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield tri
    torch.backends.cuda.matmul.allow_tf32 = tf32


def _on(x: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}


def gpu_inputs(case: dict, seed: int) -> dict:
    """make_inputs with query times re-drawn clear of time-bucket boundaries (ill-conditioned pairs, where the
    interpreter's, CUDA's and torch's fp32 logs may pick neighbouring buckets: one at ln(dt)/0.301 =
    58.9999994 in "long_d50_both_few" at seed 17 put two rows 8e-3 off), on CUDA."""
    from bench.kernels import clear_time_boundaries
    x = make_inputs(case, seed=seed)
    x["ts_q"] = clear_time_boundaries(x["ts_q"], x["ts_k"], case["lengths"], 60, torch.Generator().manual_seed(seed))
    return _on(x, "cuda")


def _gpu_run(tri, case: dict, dtype, seed: int) -> dict:
    x = gpu_inputs(case, seed)
    return forward_backward(tri.hstu_attention_triton, x, case, dtype, dtype,
                            max_len=max(case["lengths"]) + case.get("max_len_extra", 0))


def _gpu_fp32_failures(got: dict, want: dict) -> dict:
    """name -> (max |err|, tolerance) of each tensor beyond GPU_ATOL + GPU_RTOL * max |ref|."""
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    rows = {n: (max_err(got[n], want[n]), GPU_ATOL + GPU_RTOL * (float(want[n].abs().max()) if want[n].numel() else 0))
            for n in want}
    return {n: r for n, r in rows.items() if not r[0] <= r[1]}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_fp32_matches_reference(cuda_tri, name):
    from kernels.hstu_attention_ref import hstu_attention_ref
    case = GPU_CASES[name]
    got = _gpu_run(cuda_tri, case, torch.float32, seed=len(name))
    want = forward_backward(hstu_attention_ref, gpu_inputs(case, len(name)), case, torch.float64, torch.float64)
    bad = _gpu_fp32_failures(got, want)
    assert not bad, f"(max |err|, tolerance) beyond {GPU_ATOL} + {GPU_RTOL} max|ref|: {bad}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BF16_CASES))
def test_gpu_bf16_error_within_reference_error(cuda_tri, name):
    from kernels.hstu_attention_ref import hstu_attention_ref
    case = BF16_CASES[name]
    x = gpu_inputs(case, len(name))
    exact = forward_backward(hstu_attention_ref, x, case, torch.float64, torch.float64)
    ref16 = forward_backward(hstu_attention_ref, x, case, torch.bfloat16, torch.bfloat16)
    tdt = torch.bfloat16 if case["table_dtype"] == "bf16" else torch.float32
    tri16 = forward_backward(cuda_tri.hstu_attention_triton, x, case, torch.bfloat16, tdt, max_len=max(case["lengths"]))
    for n in exact:
        factor = BF16_FWD_FACTOR if n == "out" else BF16_BWD_FACTOR
        k, r = max_err(tri16[n], exact[n]), max_err(ref16[n], exact[n])
        assert k <= factor * r, f"{n}: kernel {k:.3g} vs bf16 ref {r:.3g} (x{factor})"


@pytest.mark.gpu
def test_gpu_empty_batches(cuda_tri):
    for out_shape, gq_shape, gv_shape, bias_grad_sum in empty_batches(cuda_tri, "cuda"):
        assert out_shape == [0, 2, 50] and gq_shape == [0, 2, 25] and gv_shape == [0, 2, 50]
        assert bias_grad_sum == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_backward_bitwise_repeatable(cuda_tri, dtype):
    """Backward twice autotuned (the config cached in this process), then twice in deterministic mode
    (pinned configs): each pair equal bit for bit; the pinned path also within tolerance of the ref.
    (Autotuned vs pinned need not agree bitwise: autotune may pick another block order.)"""
    from kernels.hstu_attention_ref import hstu_attention_ref
    case = FP32_CASES["d25_both_few_len"]
    a, b = (_gpu_run(cuda_tri, case, dtype, seed=7) for _ in range(2))
    torch.use_deterministic_algorithms(True)
    try:
        c, d = (_gpu_run(cuda_tri, case, dtype, seed=7) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert [n for n in a if not torch.equal(a[n], b[n])] == [], "autotuned backward not repeatable"
    assert [n for n in c if not torch.equal(c[n], d[n])] == [], "deterministic-mode backward not repeatable"
    if dtype == torch.float32:
        want = forward_backward(hstu_attention_ref, gpu_inputs(case, 7), case, torch.float64, torch.float64)
        assert not _gpu_fp32_failures(c, want)


@pytest.mark.gpu
def test_gpu_deterministic_mode_same_bits_across_processes(cuda_tri, tmp_path):
    """What pinning is for: two fresh processes (as two ranks or a rerun) in deterministic mode give the
    same gradient bits, Triton (fp32, bf16) and reference (fp32) backends. Each child: this file with
    --cuda-grads (see _cuda_grads_main)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    runs = []
    for i in range(2):
        path = tmp_path / f"grads{i}.pt"
        proc = subprocess.run([sys.executable, __file__, "--cuda-grads", str(path)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-5000:]
        runs.append(torch.load(path))
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 18  # 3 runs x (out, q, k, v, 2 bias tables)
    assert [n for n in runs[0] if not torch.equal(runs[0][n], runs[1][n])] == []


def _cuda_grads_main(path: str) -> None:
    """Child of the cross-process test: in deterministic mode, forward + gradients of the kernels (fp32,
    bf16) and of the reference (fp32) on CUDA -> torch.save(path)."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS
    from kernels import hstu_attention_triton as tri
    from kernels.hstu_attention_ref import hstu_attention_ref
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    case = FP32_CASES["d25_both_few_len"]
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        res.update({f"{dtype}/{n}": t.cpu() for n, t in _gpu_run(tri, case, dtype, seed=5).items()})
    # the reference too: backend="auto" runs it on CUDA, and its bias-gradient binning must not raise here
    ref = forward_backward(hstu_attention_ref, gpu_inputs(case, 5), case, torch.float32, torch.float32)
    res.update({f"ref/{n}": t.cpu() for n, t in ref.items()})
    torch.save(res, path)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--cuda-grads"]:
        _cuda_grads_main(args[1])
        sys.exit(0)
    out_path = None
    if args[:1] == ["--out"]:
        out_path, args = args[1], args[2:]
    res = _child_main(args)
    text = json.dumps(res, indent=1)
    if out_path:
        Path(out_path).write_text(text)
    else:
        print(text)
