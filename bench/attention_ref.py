"""The reference HSTU attention's CPU layout options, on a real length mix (fwd + bwd of the attention
alone, position and time bias on): one padded (B, N, N) block, length buckets (the default), and a loop
over sequences. This is the measurement quoted in kernels/hstu_attention_ref.py.

    python bench/attention_ref.py --shards shards/ml-1m
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.schema import LoaderConfig  # noqa: E402
from data_pipeline.read_shards import read_shards  # noqa: E402
from kernels.hstu_attention_ref import hstu_attention_ref  # noqa: E402


def per_sequence(q, k, v, offsets, **kw):
    outs = []
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        one = torch.tensor([0, e - s])
        outs.append(hstu_attention_ref(q[s:e], k[s:e], v[s:e], one, bucketed=False,
                                       **{**kw, "ts_q": kw["ts_q"][s:e], "ts_k": kw["ts_k"][s:e]}))
    return torch.cat(outs)


def time_one(fn, lengths, H, d, reps, rng) -> float:
    times = []
    for _ in range(reps + 1):
        lens = rng.choice(lengths, 128)
        offsets = torch.zeros(129, dtype=torch.int64)
        offsets[1:] = torch.tensor(np.cumsum(lens))
        L = int(offsets[-1])
        q, k, v = (torch.randn(L, H, d, requires_grad=True) for _ in range(3))
        kw = dict(norm_const=200.0, pos_bias=torch.randn(200, requires_grad=True),
                  time_bias=torch.randn(129, requires_grad=True), ts_q=torch.arange(L) + 1, ts_k=torch.arange(L))
        t0 = time.perf_counter()
        fn(q, k, v, offsets, **kw).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms the allocator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard folder whose train lengths are sampled")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--reps", type=int, default=4)
    args = p.parse_args(argv)
    lengths = np.array([min(ex["history"].shape[1], args.max_len) for ex in
                        read_shards(args.shards, "train", LoaderConfig(num_workers=0), shuffle=False)])
    print(f"{len(lengths)} sequences, mean length {lengths.mean():.0f}, batch 128, median of {args.reps}")
    options = {"one padded block": lambda *a, **kw: hstu_attention_ref(*a, bucketed=False, **kw),
               "length-bucketed": lambda *a, **kw: hstu_attention_ref(*a, bucketed=True, **kw),
               "loop over sequences": per_sequence}
    for name, fn in options.items():
        r = [time_one(fn, lengths, H, d, args.reps, np.random.default_rng(0)) for H, d in ((1, 50), (2, 25))]
        print(f"{name:22s} H1 d50 {r[0] * 1000:6.0f} ms   H2 d25 {r[1] * 1000:6.0f} ms")


if __name__ == "__main__":
    main()
