"""Public entry for HSTU attention: shape checks, then an explicit backend.

    out = hstu_attention(q, k, v, offsets, backend="ref", ...)   # see hstu_attention_ref for the math

backend: "ref" (PyTorch, any device; the spec), "triton" (CUDA kernels with fused bias, deterministic
backward), or "auto". "auto" is "ref" everywhere for now, CUDA included: the Triton kernels pass their
parity tests only in Triton's CPU interpreter and have never run on a GPU in this repo's CI, so they run
only when asked for by name (model.attention_backend=triton). On CUDA "auto" says so once, with the
command that proves the kernels (bench/kernels.py's parity table); AUTO_PICKS_TRITON flips it back to
"triton when CUDA and Triton are usable" once that table has passed on a GPU. A run on CUDA that ends up
on "ref" for any reason says so once, loudly. Nothing is swapped at import time: the model passes its
configured backend on every call.
"""
from __future__ import annotations

import functools
import sys

import torch

from kernels.hstu_attention_ref import (
    AttentionPlan,
    hstu_attention_last_ref,
    hstu_attention_padded_ref,
    hstu_attention_ref,
    plan_attention,
)

BACKENDS = ("auto", "ref", "triton")


@functools.cache
def triton_available() -> bool:
    """CUDA device present and Triton importable (or the Triton CPU interpreter explicitly enabled)."""
    import os
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# False until bench/kernels.py's parity table passes on a GPU (issue 11): the kernels are checked only by
# the CPU interpreter (tests/test_hstu_attention_triton.py), which cannot see GPU codegen, tensor-core
# rounding or scheduling. Then True: "auto" = "triton" when CUDA and Triton are usable.
AUTO_PICKS_TRITON = False

PROVE_COMMAND = "python bench/kernels.py --parity-only"


@functools.cache
def _warn_auto_ref_on_cuda() -> None:
    print("WARNING: HSTU attention backend 'auto' runs the PyTorch reference on CUDA, not the Triton kernels: "
          "those have passed parity tests only in Triton's CPU interpreter and have never run on a GPU in this "
          "repo's CI. Opt in with model.attention_backend=triton (backend='triton'). Prove them on this GPU "
          f"first with `{PROVE_COMMAND}` (forward and every gradient vs the reference, PASS/FAIL per row, "
          "exit status 1 on any failure; without --parity-only it goes on to the timings) and "
          "`pytest -m gpu tests/test_hstu_attention_triton.py`.", file=sys.stderr)


@functools.cache
def _warn_ref_on_cuda() -> None:
    print("WARNING: HSTU attention runs the PyTorch reference on CUDA (Triton unavailable or "
          "backend='ref'): expect several times lower throughput than the Triton kernels.", file=sys.stderr)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call on `device` runs: "ref" or "triton". While AUTO_PICKS_TRITON is off only the
    device's type is read (a torch.device("cuda") made by hand touches no GPU): testable on CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "ref"
        if not AUTO_PICKS_TRITON:
            _warn_auto_ref_on_cuda()
            return "ref"
        backend = "triton" if triton_available() else "ref"
    if backend == "ref" and device.type == "cuda":
        _warn_ref_on_cuda()
    return backend


def _check(q, k, v, offsets, pos_bias, time_bias, ts_q, ts_k, num_targets):
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k (L, H, dqk) and v (L, H, dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be (B+1,) int32/int64, got {tuple(offsets.shape)} {offsets.dtype}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != q.shape[0]:
        raise ValueError(f"offsets must start at 0 and end at L={q.shape[0]}, got {int(offsets[0])}.."
                         f"{int(offsets[-1])}")
    for name, bias in (("pos_bias", pos_bias), ("time_bias", time_bias)):
        if bias is not None and bias.dim() != 1:
            raise ValueError(f"{name} must be a 1-D table, got {tuple(bias.shape)}")
    if time_bias is not None and (ts_q is None or ts_k is None or ts_q.shape != (q.shape[0],)
                                  or ts_k.shape != (q.shape[0],)):
        raise ValueError("time_bias needs ts_q and ts_k of shape (L,)")
    if num_targets is not None and num_targets.shape != (offsets.numel() - 1,):
        raise ValueError(f"num_targets must be (B,), got {tuple(num_targets.shape)}")


def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                   backend: str = "auto", max_len: int | None = None, alpha: float = 1.0,
                   norm_const: float = 1.0, norm_by_length: bool = False,
                   pos_bias: torch.Tensor | None = None, time_bias: torch.Tensor | None = None,
                   ts_q: torch.Tensor | None = None, ts_k: torch.Tensor | None = None,
                   time_bucket_div: float = 0.301, num_targets: torch.Tensor | None = None,
                   plan: AttentionPlan | None = None) -> torch.Tensor:
    """Jagged HSTU attention: q, k (L, H, dqk), v (L, H, dv), offsets (B+1,) -> (L, H, dv).

    max_len: an upper bound on sequence length (the Triton launch grid and autotune key use it; computed
    from offsets when None). plan: from `attention_plan` for this batch (ref backend; None otherwise)."""
    _check(q, k, v, offsets, pos_bias, time_bias, ts_q, ts_k, num_targets)
    kw = dict(alpha=alpha, norm_const=norm_const, norm_by_length=norm_by_length, pos_bias=pos_bias,
              time_bias=time_bias, ts_q=ts_q, ts_k=ts_k, time_bucket_div=time_bucket_div,
              num_targets=num_targets)
    if resolve_backend(backend, q.device) == "triton":
        from kernels.hstu_attention_triton import hstu_attention_triton
        if max_len is None:
            max_len = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
        return hstu_attention_triton(q, k, v, offsets, max_len=max_len, **kw)
    return hstu_attention_ref(q, k, v, offsets, plan=plan, **kw)


def attention_plan(offsets: torch.Tensor, *, backend: str, pos_len: int, time_len: int,
                   ts_q: torch.Tensor | None, ts_k: torch.Tensor | None, time_bucket_div: float = 0.301,
                   num_targets: torch.Tensor | None = None, norm_by_length: bool = False) -> AttentionPlan | None:
    """The layer-independent index work of the ref backend (buckets, masks, bias indices), built once per
    batch and passed to every layer's `hstu_attention(..., plan=)`. None on the Triton backend, whose
    kernels derive masks and buckets in registers. pos_len / time_len: bias table sizes (0 = off)."""
    if resolve_backend(backend, offsets.device) != "ref":
        return None
    return plan_attention(offsets, num_pos=pos_len, num_time=time_len, ts_q=ts_q, ts_k=ts_k,
                          time_bucket_div=time_bucket_div, num_targets=num_targets, norm_by_length=norm_by_length)


def hstu_attention_last(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                        backend: str = "auto", max_len: int | None = None, alpha: float = 1.0,
                        norm_const: float = 1.0, norm_by_length: bool = False,
                        pos_bias: torch.Tensor | None = None, time_bias: torch.Tensor | None = None,
                        ts_q: torch.Tensor | None = None, ts_k: torch.Tensor | None = None,
                        time_bucket_div: float = 0.301) -> torch.Tensor:
    """`hstu_attention(...)[offsets[1:] - 1]` reshaped (B, H, dv): the last token's output row of every
    sequence (each non-empty). The ref backend computes only those rows; the Triton backend computes
    every row and selects (its kernels have no single-row mode)."""
    _check(q, k, v, offsets, pos_bias, time_bias, ts_q, ts_k, None)
    if offsets.numel() > 1 and int((offsets[1:] - offsets[:-1]).min()) < 1:
        raise ValueError("hstu_attention_last needs every sequence to have at least one token")
    kw = dict(alpha=alpha, norm_const=norm_const, norm_by_length=norm_by_length, pos_bias=pos_bias,
              time_bias=time_bias, ts_q=ts_q, ts_k=ts_k, time_bucket_div=time_bucket_div)
    if resolve_backend(backend, q.device) == "triton":
        return hstu_attention(q, k, v, offsets, backend="triton", max_len=max_len, **kw)[offsets[1:] - 1]
    return hstu_attention_last_ref(q, k, v, offsets, **kw)


def hstu_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *,
                          alpha: float = 1.0, norm_const: float = 1.0, norm_by_length: bool = False,
                          pos_bias: torch.Tensor | None = None, time_bias: torch.Tensor | None = None,
                          ts_q: torch.Tensor | None = None, ts_k: torch.Tensor | None = None,
                          time_bucket_div: float = 0.301, last_only: bool = False) -> torch.Tensor:
    """HSTU attention on right-padded (B, N, H, d) input with `lengths` (B,): the exportable formulation
    (serving's torch.export program), always the PyTorch reference (no Triton kernel takes this layout).
    Equal to `hstu_attention` on the jagged form of the same rows (tests/test_export.py). Checks are on
    shapes only: a value check would be a data-dependent guard that torch.export cannot trace."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, N, H, dqk) and v (B, N, H, dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if lengths.shape != q.shape[:1]:
        raise ValueError(f"lengths must be (B,) = ({q.shape[0]},), got {tuple(lengths.shape)}")
    if time_bias is not None and (ts_q is None or ts_k is None or ts_q.shape != q.shape[:2]
                                  or ts_k.shape != q.shape[:2]):
        raise ValueError("time_bias needs ts_q and ts_k of shape (B, N)")
    return hstu_attention_padded_ref(q, k, v, lengths, alpha=alpha, norm_const=norm_const,
                                     norm_by_length=norm_by_length, pos_bias=pos_bias, time_bias=time_bias,
                                     ts_q=ts_q, ts_k=ts_k, time_bucket_div=time_bucket_div, last_only=last_only)
