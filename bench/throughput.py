"""Training throughput (tokens/s, fwd + bwd + optimizer step) on ML-1M's real length distribution:
HSTU with the reference attention (length-bucketed, fused-bias backward) vs the same HSTU with a naive
padded attention (every batch padded to max_len with dense [B, N, N] bias tensors built by plain
indexing, as the public research code does) vs SASRec (torch SDPA) of equal size. Same data, same loss.

    python bench/throughput.py --shards shards/ml-1m            # HSTU 2 layers, D 50, 1 head
    python bench/throughput.py --shards shards/ml-1m --layers 8 --heads 2

Writes bench/results/throughput.{json,md}. Numbers are only comparable within one run (one machine,
same load); the first `--warmup` steps of each model are not timed (allocator and oneDNN warm-up: the
very first CPU step is ~10x slower than steady state, measured here).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_sha  # noqa: E402
from configs.schema import LoaderConfig, LossConfig, ModelConfig  # noqa: E402
from data_pipeline.collate import make_loader  # noqa: E402
from data_pipeline.read_shards import load_manifest  # noqa: E402
from kernels.hstu_attention_ref import time_buckets  # noqa: E402
from model.embeddings import jagged_positions  # noqa: E402
from model.hstu import HSTUBlock  # noqa: E402
from model.seqrec import SeqRecModel  # noqa: E402
from train.losses import compute_loss  # noqa: E402


def naive_padded_attention(q, k, v, offsets, max_len, pos_bias, time_bias, ts_q, ts_k, div, norm):
    """The research code's way: pad every sequence to max_len, dense (B, N, N) rab by plain indexing."""
    L, H, d = q.shape
    B, N = offsets.numel() - 1, max_len
    seq, pos = jagged_positions(offsets, L)
    pad = lambda x: x.new_zeros((B, N) + x.shape[1:]).index_put((seq, pos), x)  # noqa: E731
    qp, kp, vp, tq, tk = pad(q), pad(k), pad(v), pad(ts_q), pad(ts_k)
    i = torch.arange(N)
    rab = pos_bias[(i[:, None] - i[None, :]).clamp(0, pos_bias.numel() - 1)][None]  # (1, N, N)
    rab = rab + time_bias[time_buckets(tq[:, :, None] - tk[:, None, :], div, time_bias.numel())]  # (B, N, N)
    s = torch.einsum("bihd,bjhd->bhij", qp, kp) + rab[:, None]
    valid = torch.zeros(B, N, dtype=torch.bool).index_put((seq, pos), torch.ones(L, dtype=torch.bool))
    mask = (i[:, None] >= i[None, :])[None] & valid[:, None, :] & valid[:, :, None]
    a = F.silu(s) * mask[:, None] / norm
    return torch.einsum("bhij,bjhd->bihd", a, vp)[seq, pos]  # (L, H, d)


class NaiveHSTUBlock(HSTUBlock):
    """The research HSTU layer with the naive padded attention (same weights and math)."""

    def forward(self, x, offsets, ts, next_ts, max_len, plan=None):
        # `plan` (the shared per-batch masks/bias indices) is ignored on purpose: the research code
        # rebuilds the dense (B, N, N) bias in every layer, and that cost is what this row measures.
        L, D = x.shape
        u, v, q, k = F.silu(self.uvqk(F.layer_norm(x, (D,), eps=1e-6))).split(D, dim=-1)
        shape = (L, self.H, self.d)
        attn = naive_padded_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), offsets,
                                      self.pos_bias.numel(), self.pos_bias, self.time_bias, next_ts, ts,
                                      self.cfg.time_bucket_div, self.norm_const).reshape(L, D)
        return x + self.out(self.dropout(u * F.layer_norm(attn, (D,), eps=1e-6)))


def build(kind: str, cfg: ModelConfig, manifest: dict, max_len: int) -> SeqRecModel:
    v = manifest["vocab"]
    model = SeqRecModel(replace(cfg, arch="sasrec" if kind == "sasrec" else "hstu"), v["num_items"],
                        v["num_queries"], max_len)
    if kind == "hstu_naive":
        model.blocks = torch.nn.ModuleList(NaiveHSTUBlock(cfg, max_len) for _ in range(cfg.num_layers))
    return model


def measure(model, batches, loss_cfg, num_items, warmup: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    tokens, secs = 0, 0.0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss, m = compute_loss(model, b, loss_cfg, num_items, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            secs += time.perf_counter() - t0
            tokens += m["tokens"]
    return dict(tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="ML-1M shard folder (python -m data_pipeline prepare ...)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--batches", type=int, default=12, help="timed batches per model (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    p.add_argument("--negatives", type=int, default=128)
    p.add_argument("--models", default="hstu,hstu_naive,sasrec")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    manifest = load_manifest(args.shards)
    loader = LoaderConfig(batch_size=128, max_len=200, num_workers=0)
    batches = [b for _, b in zip(range(args.batches + args.warmup), make_loader(args.shards, "train", loader))]
    if len(batches) < args.batches + args.warmup:
        p.error(f"{args.shards} has {len(batches)} train batches of 128; --warmup + --batches needs "
                f"{args.batches + args.warmup}")
    cfg = ModelConfig(num_layers=args.layers, dim=args.dim, num_heads=args.heads, attention_backend="ref")
    loss_cfg = LossConfig(num_negatives=args.negatives)
    rows = {}
    for kind in args.models.split(","):
        rows[kind] = measure(build(kind, cfg, manifest, 200), batches, loss_cfg, manifest["vocab"]["num_items"],
                             args.warmup)
        print(f"{kind:12s} {rows[kind]['tokens_per_s']:>10,} tokens/s")
    base = rows.get("hstu", {}).get("tokens_per_s")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    result = dict(date=datetime.date.today().isoformat(), machine=machine, git_sha=git_sha(),
                  torch=torch.__version__, command="python bench/throughput.py " + " ".join(sys.argv[1:]),
                  config=dict(layers=args.layers, dim=args.dim, heads=args.heads, batch=128, max_len=200,
                              negatives=args.negatives, timed_batches=args.batches),
                  results=rows, ratios_vs_hstu={k: round(base / v["tokens_per_s"], 2) for k, v in rows.items()}
                  if base else {})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"throughput_l{args.layers}_h{args.heads}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Training throughput, ML-1M lengths ({args.layers} layers, D {args.dim}, {args.heads} heads)", "",
             f"{result['date']}, {result['machine']}, git {result['git_sha']}, torch {result['torch']}, "
             f"`{result['command']}`", "",
             "| model | tokens/s | HSTU-ref is x faster |", "|---|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {v['tokens_per_s']:,} | {result['ratios_vs_hstu'].get(k, '')} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
