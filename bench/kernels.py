"""HSTU attention kernels on CUDA: first a parity table (the proof that the Triton kernels are right on
this GPU), then timings of the Triton kernels vs the PyTorch reference vs softmax attention of the same
shape (torch SDPA on the padded batch; flash-attn's varlen kernel on the jagged one, if installed).

    python bench/kernels.py --parity-only                 # the proof alone: PASS/FAIL per row, a few minutes
    python bench/kernels.py                               # parity, then N = 256 .. 8192, bf16, H 4, d 64
    python bench/kernels.py --sizes 512 2048 --dqk 50 --dv 50 --heads 2

Parity, printed before anything else: the Triton kernels (through kernels/hstu_attention.py with
backend="triton") against the reference run in fp64 on the same inputs, forward and every gradient (q, k,
v, pos_bias, time_bias), one row each with its max error, its tolerance and PASS/FAIL. Batches are awkward
on purpose: empty and length-1 sequences, lengths that are no multiple of any block, head dims 25 and 50
(padded to 32 and 64 in-kernel), candidates (targets), both biases, plus the config about to be timed
(--dtype, --heads, --dqk, --dv, --targets, bias flags). Tolerances (those of tests/test_hstu_attention_triton.py):
  fp32:       max |err| <= 1e-5 + 5e-4 * max |ref|  (3xTF32 matmuls, TF32 switched off for the table)
  bf16, fp16: max |err| <= 2x (forward) or 5x (gradients) the error of the reference run in that dtype
Mode "tuned": autotuned configs ("fixed" in the interpreter, which never autotunes); the "det" rows rerun
a case in deterministic mode (torch.use_deterministic_algorithms(True), which pins one
kernel config per shape bucket instead of autotuning), and their "repeat" row runs its backward twice:
max |diff| must be exactly 0. Query timestamps are re-drawn away from time-bucket boundaries (see
clear_time_boundaries), where two correct log implementations can pick neighbouring buckets. Any FAIL:
exit status 1 and no timings. All PASS on a GPU is what kernels/hstu_attention.py waits for before
backend="auto" may pick the kernels there (AUTO_PICKS_TRITON).

Timings: for each max length N a jagged batch is drawn with Zipf (power-law) lengths in [16, N] (one
sequence of exactly N) until it holds --tokens tokens. Each implementation is timed forward, and forward +
backward (gradients of q, k, v and the bias tables), as the median of triton.testing.do_bench; peak memory
is the CUDA allocator's peak during one forward + backward above what was allocated before it. After the
timings it lists the config autotune picked per kernel and key next to the one deterministic mode pins.

TFLOP/s use one count for every row, the useful work of causal jagged attention: 2 (dqk + dv) flops per
allowed (query, key) pair per head forward, and 3.5x that forward + backward (FlashAttention's convention:
backward = 2.5x forward). Padding (SDPA) and recomputation (the Triton backward recomputes S twice for its
lock-free dQ) are not counted as work, so the number compares wall time on equal useful work.

Writes bench/results/kernels_parity.{json,md} (every CUDA run) and kernels.{json,md} (with timings).
Without CUDA the parity table runs in Triton's CPU interpreter on smaller batches (TRITON_INTERPRET=1 is
set before triton is imported; a few minutes on 2 cores), nothing is written, and timing is skipped:
interpreter timings mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_sha  # noqa: E402
from bench.flops import attention_pairs  # noqa: E402


def zipf_lengths(max_len: int, tokens: int, exponent: float, gen: torch.Generator) -> list[int]:
    """Power-law lengths in [16, max_len] (P(len >= l) ~ l^(1 - exponent)), one of exactly max_len, until
    the batch holds >= tokens tokens."""
    lengths = [max_len]
    lo = min(16, max_len)
    while sum(lengths) < tokens:
        u = float(torch.rand((), generator=gen))
        lengths.append(min(max_len, int(lo * (1.0 - u) ** (-1.0 / (exponent - 1.0)))))
    return lengths


def make_batch(lengths: list[int], args, dtype, device) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    L, H = sum(lengths), args.heads
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.5).to(device=device, dtype=dtype)  # noqa: E731
    gaps = torch.exp(torch.rand(L, generator=gen) * math.log(1e6)).to(torch.int64)
    ts = (1_600_000_000 + gaps.cumsum(0)).to(device)
    nt = None
    if args.targets:
        nt = torch.tensor([min(args.targets, n) for n in lengths], device=device)
    return dict(q=r(L, H, args.dqk), k=r(L, H, args.dqk), v=r(L, H, args.dv), offsets=offsets.to(device),
                pos_bias=None if args.no_pos else r(max(lengths) + 1).float(),
                time_bias=None if args.no_time else r(129).float(), ts_q=ts, ts_k=ts, num_targets=nt,
                grad_out=r(L, H, args.dv), lengths=lengths)


def useful_flops(lengths: list[int], args) -> float:
    """Forward flops of causal jagged attention: 2 (dqk + dv) per allowed pair per head."""
    pairs = attention_pairs(lengths, args.targets or 0)
    return 2.0 * (args.dqk + args.dv) * pairs * args.heads


# --------------------------------------------------------------------------------------------------------
# Parity: the kernels vs the fp64 reference, one PASS/FAIL row per tensor
# --------------------------------------------------------------------------------------------------------

FP32_RTOL, FP32_ATOL = 5e-4, 1e-5  # tests/test_hstu_attention_triton.py's GPU_RTOL, GPU_ATOL (why: there)
LOWP_FWD_FACTOR, LOWP_BWD_FACTOR = 2.0, 5.0  # its BF16_FWD_FACTOR, BF16_BWD_FACTOR


def clear_time_boundaries(ts_q: torch.Tensor, ts_k: torch.Tensor, lengths: list[int], num_buckets: int,
                          gen: torch.Generator, div: float = 0.301, margin: float = 1e-4,
                          spread: int = 86_400) -> torch.Tensor:
    """ts_q (L,) int64 (CPU) with the query time of every row that needs it re-drawn as ts_k + U[0, spread)
    seconds until no key j <= i of its sequence has x = ln(|ts_q[i] - ts_k[j]|) / div within `margin` of a
    bucket boundary 1 .. num_buckets - 1. There floor(x) is ill-conditioned: at x = 58.9999994 (dt = 51598328
    s, measured on a 753-token batch) the interpreter's fp32 log put the pair in bucket 59 and the reference
    in 58. Logs 1 ulp apart move x by ~1e-5 at x ~ 60, so 1e-4 clears every implementation; ~2e-4 of pairs
    fall inside, so a few re-draws clear a row. A spread of a day moves x by >= 1e-3 for dt up to ~3e8 s."""
    ts_q, start = ts_q.clone(), 0
    for n in lengths:
        rows = torch.arange(n)  # positions in this sequence still to check
        for _ in range(100):
            dt = (ts_q[start + rows, None] - ts_k[None, start:start + n]).abs().double().clamp(min=1)  # (r, n)
            x = dt.log() / div
            b = x.round()
            near = ((x - b).abs() < margin) & (b >= 1) & (b <= num_buckets - 1)
            near &= torch.arange(n)[None, :] <= rows[:, None]  # causal: keys j <= i
            rows = rows[near.any(1)]
            if rows.numel() == 0:
                break
            ts_q[start + rows] = ts_k[start + rows] + torch.randint(0, spread, (rows.numel(),), generator=gen)
        else:
            raise RuntimeError(f"could not clear {rows.numel()} rows of time-bucket boundaries")
        start += n
    return ts_q


def parity_cases(args, interpret: bool) -> list[dict]:
    """Jagged batches for the parity table: small under the interpreter (its cost is programs x loop steps)."""
    ragged = [70, 0, 1, 33, 5, 1] if interpret else [300, 0, 1, 129, 64, 1, 257, 2, 37]
    plain = [40, 0, 1, 17] if interpret else [130, 0, 1, 17, 200]
    d25 = dict(lengths=ragged, heads=2, dqk=25, dv=25, targets=3, no_pos=False, no_time=False, nbl=True)
    timed_len = 64 if interpret else 512
    timed = dict(lengths=zipf_lengths(timed_len, 4 * timed_len, args.zipf, torch.Generator().manual_seed(args.seed)),
                 heads=args.heads, dqk=args.dqk, dv=args.dv, targets=args.targets, no_pos=args.no_pos,
                 no_time=args.no_time, nbl=True)
    return [
        dict(name="ragged d25, targets", dtype="fp32", det=False, **d25),
        dict(name="ragged d25, targets", dtype="bf16", det=False, **d25),
        dict(name="ragged d25, targets", dtype="fp32", det=True, **d25),
        dict(name="ragged d25, targets", dtype="bf16", det=True, **d25),
        dict(name="d50x32 causal, no bias", dtype="fp32", det=False, lengths=plain, heads=1, dqk=50, dv=32,
             targets=0, no_pos=True, no_time=True, nbl=False),
        dict(name=f"timed config, N {timed_len}", dtype=args.dtype, det=False, **timed),
    ]


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _fwd_bwd(backend: str, b: dict, dtype, table_dtype, nbl: bool) -> dict:
    """Forward + gradients through the public entry -> {"out", "dq", "dk", "dv", "dpos_bias", ...} fp64."""
    from kernels.hstu_attention import hstu_attention
    leaves = {n: b[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v")}
    tables = {n: b[n].detach().to(table_dtype).requires_grad_() if b[n] is not None else None
              for n in ("pos_bias", "time_bias")}
    out = hstu_attention(*leaves.values(), b["offsets"], backend=backend, max_len=max(b["lengths"]),
                         alpha=1.0 / math.sqrt(b["q"].shape[-1]), norm_const=13.0, norm_by_length=nbl,
                         ts_q=b["ts_q"], ts_k=b["ts_k"], num_targets=b["num_targets"], **tables)
    named = {**{f"d{n}": t for n, t in leaves.items()}, **{f"d{n}": t for n, t in tables.items() if t is not None}}
    grads = torch.autograd.grad(out, list(named.values()), b["grad_out"].to(dtype))
    return {"out": out.detach().double(), **{n: g.double() for n, g in zip(named, grads)}}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def parity_rows(case: dict, device: str, seed: int) -> list[dict]:
    """One row per tensor {case, dtype, mode, tensor, err, tol, ok}, plus a "repeat" row in det mode."""
    shape = argparse.Namespace(seed=seed, **{k: case[k] for k in ("heads", "dqk", "dv", "targets", "no_pos",
                                                                  "no_time")})
    b = make_batch(case["lengths"], shape, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed)
    b["ts_q"] = clear_time_boundaries(b["ts_q"], b["ts_k"], case["lengths"], 129, gen)
    b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    dtype = _DTYPES[case["dtype"]]
    exact = _fwd_bwd("ref", b, torch.float64, torch.float64, case["nbl"])
    if dtype != torch.float32:  # the low-precision reference takes tables of its dtype (a fp32 table promotes S)
        lowp = _fwd_bwd("ref", b, dtype, dtype, case["nbl"])
    torch.use_deterministic_algorithms(case["det"])
    try:
        got = _fwd_bwd("triton", b, dtype, torch.float32, case["nbl"])  # fp32 tables, as in training
        again = _fwd_bwd("triton", b, dtype, torch.float32, case["nbl"]) if case["det"] else None
    finally:
        torch.use_deterministic_algorithms(False)
    rows = []
    for n, want in exact.items():
        err = _max_err(got[n], want)
        if dtype == torch.float32:
            tol = FP32_ATOL + FP32_RTOL * (float(want.abs().max()) if want.numel() else 0.0)
        else:
            tol = (LOWP_FWD_FACTOR if n == "out" else LOWP_BWD_FACTOR) * _max_err(lowp[n], want)
        rows.append(dict(tensor=n, err=err, tol=tol, ok=err <= tol))
    if again is not None:
        diff = max(_max_err(got[n], again[n]) for n in got)
        rows.append(dict(tensor="repeat", err=diff, tol=0.0, ok=diff == 0.0))
    mode = "det" if case["det"] else ("fixed" if device == "cpu" else "tuned")  # the interpreter never autotunes
    return [dict(case=case["name"], dtype=case["dtype"], mode=mode, **r) for r in rows]


def parity_table(args, device: str, interpret: bool) -> list[dict]:
    """Print the table as it fills (a header first) -> its rows."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 kernels then use 3xTF32 (see _shared_args)
    where = "Triton CPU interpreter" if interpret else torch.cuda.get_device_name()
    print(f"parity: Triton kernels vs the fp64 reference ({where}); tolerances in bench/kernels.py --help")
    print(f"{'case':28s} {'dtype':5s} {'mode':5s} {'tensor':11s} {'max |err|':>10s} {'tolerance':>10s}  result")
    rows = []
    try:
        for i, case in enumerate(parity_cases(args, interpret)):
            for r in parity_rows(case, device, seed=args.seed + i):
                print(f"{r['case']:28s} {r['dtype']:5s} {r['mode']:5s} {r['tensor']:11s} {r['err']:10.3g} "
                      f"{r['tol']:10.3g}  {'PASS' if r['ok'] else 'FAIL'}", flush=True)
                rows.append(r)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    failed = sum(not r["ok"] for r in rows)
    print(f"parity: {len(rows) - failed} of {len(rows)} rows PASS" + (f", {failed} FAIL" if failed else ""))
    return rows


def parity_markdown(r: dict) -> str:
    lines = [f"# HSTU attention kernels: parity ({r['gpu']})", "",
             f"{r['date']}, torch {r['torch']}, triton {r['triton']}, git {r['git_sha']}, `{r['command']}`", "",
             "Triton kernels vs the reference in fp64; tolerances in `python bench/kernels.py --help`.", "",
             "| case | dtype | mode | tensor | max abs err | tolerance | result |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['case']} | {x['dtype']} | {x['mode']} | {x['tensor']} | {x['err']:.3g} | {x['tol']:.3g} | "
              f"{'PASS' if x['ok'] else 'FAIL'} |" for x in r["rows"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Implementations: each returns (forward closure, list of tensors to differentiate)
# --------------------------------------------------------------------------------------------------------

def hstu_impl(kind: str, b: dict):
    from kernels.hstu_attention_ref import hstu_attention_ref
    from kernels.hstu_attention_triton import hstu_attention_triton
    leaves = [t.detach().requires_grad_() for t in (b["q"], b["k"], b["v"])]
    tables = {n: b[n].detach().requires_grad_() if b[n] is not None else None for n in ("pos_bias", "time_bias")}
    kw = dict(alpha=1.0 / math.sqrt(b["q"].shape[-1]), norm_by_length=True, ts_q=b["ts_q"], ts_k=b["ts_k"],
              num_targets=b["num_targets"], **tables)
    max_len = max(b["lengths"])
    if kind == "triton":
        fwd = lambda: hstu_attention_triton(*leaves, b["offsets"], max_len=max_len, **kw)  # noqa: E731
    else:
        fwd = lambda: hstu_attention_ref(*leaves, b["offsets"], **kw)  # noqa: E731
    return fwd, leaves + [t for t in tables.values() if t is not None]


def sdpa_impl(b: dict):
    """Softmax attention on the zero-padded (B, H, N, d) batch, causal (SDPA picks its fastest backend)."""
    lengths, N = b["lengths"], max(b["lengths"])
    B, H = len(lengths), b["q"].shape[1]
    idx = torch.cat([torch.arange(n) + i * N for i, n in enumerate(lengths)]).to(b["q"].device)

    def pad(x):  # (L, H, d) -> (B, H, N, d)
        out = x.new_zeros(B * N, H, x.shape[-1])
        out[idx] = x
        return out.view(B, N, H, -1).transpose(1, 2)

    leaves = [t.detach().requires_grad_() for t in (b["q"], b["k"], b["v"])]

    def fwd():
        o = F.scaled_dot_product_attention(*(pad(t) for t in leaves), is_causal=True)  # (B, H, N, dv)
        return o.transpose(1, 2).reshape(B * N, H, -1)[idx]
    return fwd, leaves


def flash_impl(b: dict):
    from flash_attn import flash_attn_varlen_func
    leaves = [t.detach().requires_grad_() for t in (b["q"], b["k"], b["v"])]
    cu = b["offsets"].to(torch.int32)
    N = max(b["lengths"])
    return (lambda: flash_attn_varlen_func(*leaves, cu, cu, N, N, causal=True)), leaves


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------

def measure(fwd, leaves, grad_out, reps_ms: int) -> dict:
    from triton.testing import do_bench

    def fwd_bwd():
        torch.autograd.grad(fwd(), leaves, grad_out)

    fwd_bwd()  # compile + autotune outside the clock
    torch.cuda.synchronize()
    with torch.no_grad():
        t_fwd = do_bench(fwd, warmup=25, rep=reps_ms, return_mode="median")
    t_all = do_bench(fwd_bwd, warmup=25, rep=reps_ms, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return dict(fwd_ms=t_fwd, fwd_bwd_ms=t_all, peak_mib=peak)


def run_one(name: str, make, b: dict, flops: float, args) -> dict:
    row = dict(impl=name)
    try:
        fwd, leaves = make(b)
        row.update(measure(fwd, leaves, b["grad_out"], args.rep_ms))
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # noqa: BLE001 - one failing implementation must not end the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    torch.cuda.empty_cache()
    return row


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"# HSTU attention kernels ({r['gpu']})", "",
             f"{r['date']}, torch {r['torch']}, triton {r['triton']}, git {r['git_sha']}, `{r['command']}`", "",
             (f"{c['dtype']}, H {c['heads']}, dqk {c['dqk']}, dv {c['dv']}, pos bias {not c['no_pos']}, "
              f"time bias {not c['no_time']}, targets {c['targets']}, Zipf exponent {c['zipf']}, ~{c['tokens']} "
              "tokens a batch. TFLOP/s count useful causal jagged work only (see bench/kernels.py)."),
             "", "| N | B | mean len | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in r["sizes"]:
        for row in size["rows"]:
            head = f"| {size['N']} | {size['B']} | {size['mean_len']:.0f} | {row['impl']} |"
            if "error" in row:
                lines.append(f"{head} {row['error']} | | | | |")
            else:
                lines.append(f"{head} {row['fwd_ms']:.3f} | {row['fwd_tflops']:.1f} | {row['fwd_bwd_ms']:.3f} | "
                             f"{row['fwd_bwd_tflops']:.1f} | {row['peak_mib']:.0f} |")
    lines += ["", "The parity table (kernels_parity.md) passed first. Autotune's picks, (BLOCK_M, BLOCK_N[, "
              "BLOCK_BIN], warps, stages), next to what deterministic mode pins (hstu_attention_triton._pinned_row):",
              "",
              "| kernel | key | autotuned | pinned |", "|---|---|---|---|"]
    lines += [f"| {x['kernel']} | {x['key']} | {tuple(x['autotuned'])} | {tuple(x['pinned'])} |"
              for x in r["autotune_picks"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192],
                   help="max sequence lengths N (default 256 .. 8192)")
    p.add_argument("--tokens", type=int, default=32768, help="tokens a batch, at least N (default 32768)")
    p.add_argument("--zipf", type=float, default=1.5, help="length power-law exponent, > 1 (default 1.5)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dqk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--no-pos", action="store_true", help="no position bias")
    p.add_argument("--no-time", action="store_true", help="no time bias")
    p.add_argument("--targets", type=int, default=0, help="candidates at the end of each sequence (default 0)")
    p.add_argument("--ref-max-len", type=int, default=4096,
                   help="skip the PyTorch reference above this N (its dense blocks grow as N^2; default 4096)")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench time budget per measurement (ms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parity-only", action="store_true",
                   help="print the parity table and stop: exit status 0 if every row passes, else 1")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON + Markdown")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        # the interpreter is chosen when triton is imported (kernels/hstu_attention_triton.py's docstring)
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("bench/kernels.py without CUDA needs TRITON_INTERPRET=1 before triton is imported; "
                     "run it as its own process")
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS in deterministic mode requires it
    import triton

    checks = parity_table(args, "cuda" if cuda else "cpu", interpret=not cuda)
    ok = all(r["ok"] for r in checks)
    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name() if cuda else "CPU interpreter",
                machine=platform.machine(), torch=torch.__version__, triton=triton.__version__, git_sha=git_sha(),
                command=" ".join(["python bench/kernels.py", *sys.argv[1:]]))
    out = Path(args.out)
    if cuda:
        out.mkdir(parents=True, exist_ok=True)
        parity = dict(**meta, passed=ok, rows=checks)
        (out / "kernels_parity.json").write_text(json.dumps(parity, indent=2) + "\n")
        (out / "kernels_parity.md").write_text(parity_markdown(parity))
        print(f"wrote {out / 'kernels_parity.md'}")
    if not ok:
        print("parity FAILED: the Triton kernels disagree with the reference here; no timings.", file=sys.stderr)
        return 1
    if not cuda:
        print("timings need CUDA (Triton interpreter timings on CPU mean nothing): skipped.")
        return 0
    if args.parity_only:
        return 0

    dtype = _DTYPES[args.dtype]
    impls = [("triton", lambda b: hstu_impl("triton", b)), ("ref", lambda b: hstu_impl("ref", b)),
             ("sdpa softmax (padded)", sdpa_impl)]
    if flash_available():
        impls.append(("flash-attn varlen softmax", flash_impl))
    sizes = []
    for N in args.sizes:
        lengths = zipf_lengths(N, max(args.tokens, N), args.zipf, torch.Generator().manual_seed(args.seed + N))
        b = make_batch(lengths, args, dtype, "cuda")
        flops = useful_flops(lengths, args)
        rows = []
        for name, make in impls:
            if name == "ref" and N > args.ref_max_len:
                rows.append(dict(impl=name, error=f"skipped (N > --ref-max-len {args.ref_max_len})"))
                continue
            rows.append(run_one(name, make, b, flops, args))
            r = rows[-1]
            print(f"N {N:5d} B {len(lengths):4d} {name:26s} " + (r["error"] if "error" in r else
                  f"fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:6.1f} TFLOP/s | fwd+bwd {r['fwd_bwd_ms']:8.3f} ms "
                  f"{r['fwd_bwd_tflops']:6.1f} TFLOP/s | peak {r['peak_mib']:8.0f} MiB"), flush=True)
        sizes.append(dict(N=N, B=len(lengths), tokens=sum(lengths), mean_len=sum(lengths) / len(lengths),
                          gflops_fwd=flops / 1e9, rows=rows))
        del b
        torch.cuda.empty_cache()

    from kernels.hstu_attention_triton import autotune_picks
    picks = autotune_picks()
    print("autotune picks (BLOCK_M, BLOCK_N[, BLOCK_BIN], warps, stages) vs the config deterministic mode pins:")
    for x in picks:
        print(f"  {x['kernel']:4s} {x['key']}: autotuned {x['autotuned']} pinned {x['pinned']}")
    result = dict(**meta, config=vars(args), parity_passed=ok, sizes=sizes, autotune_picks=picks)
    (out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "kernels.md").write_text(markdown(result))
    print(f"wrote {out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
