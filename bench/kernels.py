"""HSTU attention kernels on CUDA: the Triton kernels vs the PyTorch reference vs softmax attention of the
same shape (torch SDPA on the padded batch; flash-attn's varlen kernel on the jagged one, if installed).

    python bench/kernels.py                               # N = 256 .. 8192, bf16, H 4, d 64, both biases
    python bench/kernels.py --sizes 512 2048 --dqk 50 --dv 50 --heads 2

For each max length N a jagged batch is drawn with Zipf (power-law) lengths in [16, N] (one sequence of
exactly N) until it holds --tokens tokens. Each implementation is timed forward, and forward + backward
(gradients of q, k, v and the bias tables), as the median of triton.testing.do_bench; peak memory is the
CUDA allocator's peak during one forward + backward above what was allocated before it.

TFLOP/s use one count for every row, the useful work of causal jagged attention: 2 (dqk + dv) flops per
allowed (query, key) pair per head forward, and 3.5x that forward + backward (FlashAttention's convention:
backward = 2.5x forward). Padding (SDPA) and recomputation (the Triton backward recomputes S twice for its
lock-free dQ) are not counted as work, so the number compares wall time on equal useful work.

Writes bench/results/kernels.{json,md}. Needs CUDA: elsewhere it says so and exits 0 (interpreter timings
mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_sha  # noqa: E402


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
    if args.targets:
        pairs = 0
        for n in lengths:
            t = min(args.targets, n)
            h = n - t
            pairs += h * (h + 1) // 2 + t * (h + 1)
    else:
        pairs = sum(n * (n + 1) // 2 for n in lengths)
    return 2.0 * (args.dqk + args.dv) * pairs * args.heads


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
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON + Markdown")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/kernels.py needs CUDA: the Triton interpreter on CPU gives meaningless timings. Nothing run.")
        return 0
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
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

    result = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), machine=platform.machine(),
                  torch=torch.__version__, triton=triton.__version__, git_sha=git_sha(),
                  command=" ".join(["python bench/kernels.py", *sys.argv[1:]]), config=vars(args), sizes=sizes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "kernels.md").write_text(markdown(result))
    print(f"wrote {out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
