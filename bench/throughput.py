"""Training throughput (tokens/s) on ML-1M's real length distribution, two ways.

Step mode (always): fwd + bwd + optimizer step of a bare model on pre-loaded batches (no loader, no
DeepSpeed): HSTU with the reference attention (length-bucketed, fused-bias backward) vs a padded stand-in
(`hstu_naive`: our HSTU with every batch padded to max_len and dense [B, N, N] bias tensors built by plain
indexing, the way the public research code pads; it is NOT the reference implementation, whose measured
rate is quoted separately) vs SASRec (torch SDPA) of equal size. Same data, same loss.

End-to-end mode (--e2e): whole epochs of `python -m train pretrain` (the real shard loader and the
DeepSpeed engine) on the same shards and model shape, in a fresh run directory, twice: validating every
epoch, and validating only after the last epoch (pretrain always validates the final epoch). From each
run's log.jsonl epoch lines: end-to-end training tokens/s (training tokens / training seconds, validation
excluded) and epoch wall time with and without validation; the process wall time adds start-up, the
final test and checkpoints.

    python bench/throughput.py --shards shards/ml-1m                     # HSTU 2 layers, D 50, 1 head
    python bench/throughput.py --shards shards/ml-1m --layers 8 --heads 2
    python bench/throughput.py --shards shards/ml-1m --e2e --epochs 2    # + whole epochs

Writes bench/results/throughput_l{layers}_h{heads}.{json,md} with the machine's load average before and
after, the CPU model and the thread count. Numbers are only comparable within one run (one machine, same
load); the first `--warmup` steps of each model are not timed (allocator and oneDNN warm-up: the very
first CPU step is ~10x slower than steady state, measured here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import add_step_args, step_batches  # noqa: E402
from bench.flops import measure_peak, train_flops  # noqa: E402
from bench.record import header, loadavg, metadata  # noqa: E402
from configs.hardware import cpu_has_native_bf16  # noqa: E402
from configs.schema import LossConfig, ModelConfig  # noqa: E402
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
    """Our HSTU layer with the naive padded attention (same weights and math): a padded stand-in for the
    research code's cost structure, not the reference implementation itself."""

    def forward(self, x, offsets, ts, next_ts, max_len, plan=None, last_only=False, domains=None):
        assert not last_only, "the padded stand-in only trains"
        assert domains is None, "the padded stand-in has no per-domain adapters"
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
    """Timed fwd + bwd + AdamW step per batch after `warmup` untimed ones; FLOPs of the timed batches
    from the model's config (bench/flops.py), so the row also says how far from the hardware it runs."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    tokens, secs, flops = 0, 0.0, 0.0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss, m = compute_loss(model, b, loss_cfg, num_items, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            secs += time.perf_counter() - t0
            tokens += m["tokens"]
            flops += train_flops(model.cfg, b.lengths.tolist(), m["positions"], loss_cfg.num_negatives)["total"]
    return dict(tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs),
                flops_per_token=round(flops / tokens), gflops_per_s=round(flops / secs / 1e9, 2))


# Measured side by side on this machine kind (2026-12-01, 2 threads, fp32, ML-1M lengths, batch 128, 128
# negatives, 40 steps each) by the issue author (issue 11), with Meta's generative-recommenders code: the
# reference implementation's training tokens/s, (low, high). Not measured by this script.
REFERENCE = {(2, 50, 1): ("HSTU", 9000, 9400), (8, 50, 2): ("HSTU-large", 4100, 4500)}
REFERENCE_LABEL = ("measured 2026-12-01 on this machine kind by the issue author, not by this script "
                   "(Meta generative-recommenders, 2 threads, fp32, ML-1M lengths, batch 128, 128 negatives)")
LABELS = {"hstu": "hstu (ours, reference attention)",
          "hstu_naive": "hstu_naive (padded stand-in: our HSTU with dense padded attention, NOT the reference "
                        "implementation)",
          "sasrec": "sasrec (ours, SDPA)"}


def read_epochs(run_dir: Path) -> list[dict]:
    """The kind="epoch" lines of a run's log.jsonl."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "epoch"]


def summarize_epochs(epochs: list[dict]) -> dict:
    """End-to-end figures from log.jsonl epoch lines: `seconds` (training only), `tokens` (training tokens),
    `eval_seconds` (validation, 0 when not evaluated), `wall_seconds` (epoch incl. validation and
    checkpoint). A log without `tokens` falls back to tokens_per_s x seconds (marked estimated); without
    `eval_seconds` / `wall_seconds` those figures are None and `missing` names the fields."""
    missing = sorted({k for k in ("tokens", "eval_seconds", "wall_seconds") for e in epochs if k not in e})
    tokens = [e["tokens"] if "tokens" in e else e.get("tokens_per_s", 0) * e["seconds"] for e in epochs]
    train_s = sum(e["seconds"] for e in epochs)
    out = dict(epochs=len(epochs), train_tokens=round(sum(tokens)), train_seconds=round(train_s, 2),
               e2e_tokens_per_s=round(sum(tokens) / train_s) if train_s else None,
               tokens_estimated="tokens" in missing, missing=missing,
               per_epoch=[dict(epoch=e.get("epoch"), seconds=e["seconds"], tokens=round(t),
                               eval_seconds=e.get("eval_seconds"), wall_seconds=e.get("wall_seconds"))
                          for e, t in zip(epochs, tokens)])
    if "wall_seconds" not in missing and "eval_seconds" not in missing:
        # validated = the epoch line carries its validation metrics (pretrain logs them under the split's
        # name); eval_seconds > 0 is not a test of it: rounded to 0.01 s, a tiny validation reads 0.0
        validated = [bool(e.get("valid") or e.get("test")) or e["eval_seconds"] > 0 for e in epochs]
        val = [e["wall_seconds"] for e, v in zip(epochs, validated) if v]
        noval = [e["wall_seconds"] for e, v in zip(epochs, validated) if not v]
        out.update(eval_seconds=round(sum(e["eval_seconds"] for e in epochs), 2),
                   wall_seconds=round(sum(e["wall_seconds"] for e in epochs), 2),
                   epoch_wall_validated=round(sum(val) / len(val), 2) if val else None,
                   epoch_wall_not_validated=round(sum(noval) / len(noval), 2) if noval else None)
    return out


def e2e_run(config: str, shards: str, run_dir: Path, overrides: list[str], threads: int) -> dict:
    """One `python -m train pretrain` in `run_dir` (fresh), timed from the outside; its epoch lines
    summarised. Output goes to run_dir/train.out (its tail is shown if the run fails)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "train", "pretrain", "--config", config, "--set", f"run_dir={run_dir}",
           "--set", f"shards={shards}", *sum((["--set", o] for o in overrides), [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)  # a fresh one-process group (train/engine.py sets it up)
    load_before, t0 = loadavg(), time.perf_counter()
    with open(run_dir / "train.out", "w") as out:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = (run_dir / "train.out").read_text()[-3000:]
        raise RuntimeError(f"e2e run failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")
    row = summarize_epochs(read_epochs(run_dir))
    row.update(process_wall_seconds=round(wall, 2), load_before=load_before, load_after=loadavg(),
               overrides=overrides)
    if row.get("wall_seconds") is not None:
        row["outside_epochs_seconds"] = round(wall - row["wall_seconds"], 2)  # start-up, final test, exit
    return row


def e2e(args, threads: int) -> dict:
    """Both e2e runs (validating every epoch / only after the last) on the step mode's model shape."""
    shape = [f"model.num_layers={args.layers}", f"model.dim={args.dim}", f"model.num_heads={args.heads}",
             "model.attention_backend=ref", f"loss.num_negatives={args.negatives}", "data.batch_size=128",
             "data.max_len=200", f"train.epochs={args.epochs}", "train.patience=0", "train.eval_from=0"]
    base = Path(args.runs_dir).resolve() if args.runs_dir else Path(tempfile.mkdtemp(prefix="throughput_e2e_"))
    rows = {}
    try:
        for name, every in (("validate every epoch", 1), ("validate after the last epoch only", args.epochs + 1)):
            rows[name] = e2e_run(args.config, str(Path(args.shards).resolve()), base / f"eval_every_{every}",
                                 shape + [f"train.eval_every={every}"] + args.e2e_set, threads)
            r = rows[name]
            print(f"e2e {name}: {r['e2e_tokens_per_s']:,} training tokens/s over {r['epochs']} epochs, "
                  f"process wall {r['process_wall_seconds']}s", flush=True)
    finally:
        if not args.runs_dir:
            shutil.rmtree(base, ignore_errors=True)
    return rows


def measured_reference(args) -> dict:
    """The reference implementation's step rate on the same batches, measured now by bench/reference_gr.py
    in its own process (it may need a Python with fbgemm-gpu-cpu: --reference-python)."""
    cmd = [args.reference_python, str(ROOT / "bench" / "reference_gr.py"), "--gr", args.reference,
           "--shards", args.shards, "--layers", str(args.layers), "--dim", str(args.dim), "--heads", str(args.heads),
           "--batches", str(args.batches), "--warmup", str(args.warmup), "--negatives", str(args.negatives)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"reference run failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"reference    {out['tokens_per_s']:>10,} tokens/s (generative-recommenders {out.get('gr_commit')})",
          flush=True)
    return dict(out, model="HSTU" if args.layers == 2 else f"HSTU {args.layers} layers", command=" ".join(cmd))


def _s(x) -> str:
    return "n/a" if x is None else f"{x:g}"


def markdown(result: dict) -> str:
    c = result["config"]
    lines = header(f"Training throughput, ML-1M lengths ({c['layers']} layers, D {c['dim']}, {c['heads']} heads)",
                   result, extra=f"torch {result['torch']}")
    lines += [f"Batch {c['batch']}, max length {c['max_len']}, {c['negatives']} negatives, fp32.", "",
              "## Step rate (fwd + bwd + optimizer step on pre-loaded batches; no loader, no DeepSpeed)", "",
              f"{c['timed_batches']} timed batches per model after {c['warmup']} untimed.", ""]
    peak = result.get("peak")
    if peak:
        lines += [f"Measured peak of this machine in this run (square matmul, {result['machine']['threads']} threads): "
                  f"**fp32 {peak['fp32']:g} GFLOP/s** (n = {peak['fp32_size']}), bf16 {peak['bf16']:g} GFLOP/s "
                  f"(n = {peak['bf16_size']})"
                  + ("" if peak.get("native_bf16") else " (no native bf16 on this CPU: emulated)") + ". "
                  "FLOPs/token = useful training FLOPs (3 x forward: linears, causal attention pairs, the loss's "
                  "1 + negatives dots; bench/flops.py) per token of the timed batches.", ""]
    lines += ["| model | tokens/s | our HSTU is x faster | MFLOP/token | GFLOP/s | % of fp32 peak |",
              "|---|---|---|---|---|---|"]
    for k, v in result["results"].items():
        pct = f"{100 * v['gflops_per_s'] / peak['fp32']:.1f}" if peak and v.get("gflops_per_s") else "n/a"
        mft = f"{v['flops_per_token'] / 1e6:.2f}" if v.get("flops_per_token") else "n/a"
        lines.append(f"| {LABELS.get(k, k)} | {v['tokens_per_s']:,} | {result['ratios_vs_hstu'].get(k, '')} | "
                     f"{mft} | {_s(v.get('gflops_per_s'))} | {pct} |")
    e2e_rows = result.get("e2e") or {}
    if e2e_rows:
        lines += ["", "## End to end (`python -m train pretrain`: shard loader + DeepSpeed engine, whole epochs)", "",
                  f"`{result['e2e_config']}` with the shape above; {c['e2e_epochs']} epochs per run, fresh run "
                  "directory. Training tokens/s = training tokens / training seconds summed over the epochs "
                  "(validation excluded); epoch wall = one epoch including validation (when it ran) and the "
                  "checkpoint; process wall = the whole command (start-up, epochs, final test, exit). GFLOP/s "
                  "= training tokens/s x the step rows' FLOPs/token (the same ML-1M length mix).", "",
                  "| run | epochs | training tokens/s | GFLOP/s | train s | validation s | epoch wall, validated | "
                  "epoch wall, not validated | process wall s | load avg before / after |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        fpt = (result["results"].get("hstu") or {}).get("flops_per_token")
        for name, r in e2e_rows.items():
            tok = f"{r['e2e_tokens_per_s']:,}" if r["e2e_tokens_per_s"] else "n/a"
            if r.get("tokens_estimated"):
                tok += " (estimated)"
            load = f"{_s((r['load_before'] or [None])[0])} / {_s((r['load_after'] or [None])[0])}"
            gf = f"{r['e2e_tokens_per_s'] * fpt / 1e9:.2f}" if fpt and r["e2e_tokens_per_s"] else "n/a"
            lines.append(f"| {name} | {r['epochs']} | {tok} | {gf} | {r['train_seconds']} | "
                         f"{_s(r.get('eval_seconds'))} | "
                         f"{_s(r.get('epoch_wall_validated'))} | {_s(r.get('epoch_wall_not_validated'))} | "
                         f"{r['process_wall_seconds']} | {load} |")
        missing = sorted({k for r in e2e_rows.values() for k in r.get("missing", [])})
        if missing:
            lines += ["", f"The runs' log.jsonl epoch lines lack {', '.join(missing)}: "
                      + ("training tokens were estimated as tokens_per_s x seconds; " if "tokens" in missing else "")
                      + "figures that need the missing fields are n/a."]
    ref = result.get("reference")
    if ref and ref.get("measured"):
        shims = ", ".join(ref.get("shims") or []) or "none"
        lines += ["", f"## Side by side with the reference implementation ({ref['model']}), measured in this run", "",
                  f"Meta generative-recommenders at {ref.get('gr_commit')}, its own research HSTU, loss and AdamW "
                  f"on the same {c['timed_batches']} ML-1M batches after {c['warmup']} untimed "
                  f"(bench/reference_gr.py; shims: {shims}): **{ref['tokens_per_s']:,} training tokens/s**.", "",
                  "| ours | tokens/s | ours / reference |", "|---|---|---|"]
        for name, v in ref["ratios"].items():
            lines.append(f"| {name} | {v['tokens_per_s']:,} | {v['ratio']} |")
    elif ref:
        lines += ["", f"## Side by side with the reference implementation ({ref['model']}), quoted", "",
                  f"Reference: {ref['low']:,}-{ref['high']:,} training tokens/s, {REFERENCE_LABEL}. Ratio = our "
                  f"measured number / the midpoint of that range ({ref['mid']:,}); the two were not measured in "
                  "the same run, so the ratio also carries any difference in machine and load (run with "
                  "--reference PATH to measure it side by side).", "",
                  "| ours | tokens/s | ours / reference |", "|---|---|---|"]
        for name, v in ref["ratios"].items():
            lines.append(f"| {name} | {v['tokens_per_s']:,} | {v['ratio']} |")
    lines += ["", "`hstu_naive` is a padded stand-in for the research code's cost structure (our HSTU with dense "
              "padded attention), not the reference implementation; the reference's own rate is the side-by-side "
              "figure above.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, batches=12)
    p.add_argument("--models", default="hstu,hstu_naive,sasrec")
    p.add_argument("--e2e", action="store_true", help="also time whole epochs through python -m train pretrain")
    p.add_argument("--config", default="configs/pretrain/ml1m_hstu.yaml",
                   help="recipe of the e2e runs (shape, negatives, batch and length overridden to the step mode's)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per e2e run (default 2)")
    p.add_argument("--e2e-set", action="append", default=[], help="extra override for the e2e runs (repeatable)")
    p.add_argument("--runs-dir", help="keep the e2e run directories here (default: a temporary folder, removed)")
    p.add_argument("--reference", metavar="PATH",
                   help="work tree of facebookresearch/generative-recommenders: measure its HSTU on the same batches "
                        "in this run (bench/reference_gr.py); without it the issue's quoted figures are shown")
    p.add_argument("--reference-python", default=sys.executable,
                   help="Python for the reference run (one with fbgemm-gpu-cpu; see bench/reference_gr.py)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmuls that measure the peak")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    load_before = loadavg()
    torch.manual_seed(0)
    manifest = load_manifest(args.shards)
    batches = step_batches(p, args)
    cfg = ModelConfig(num_layers=args.layers, dim=args.dim, num_heads=args.heads, attention_backend="ref")
    loss_cfg = LossConfig(num_negatives=args.negatives)
    rows = {}
    for kind in args.models.split(","):
        rows[kind] = measure(build(kind, cfg, manifest, 200), batches, loss_cfg, manifest["vocab"]["num_items"],
                             args.warmup)
        print(f"{kind:12s} {rows[kind]['tokens_per_s']:>10,} tokens/s")
    threads = torch.get_num_threads()
    ref_now = measured_reference(args) if args.reference else None  # right after ours: same batches, same load
    peak = dict(measure_peak(args.peak_size, native_bf16=cpu_has_native_bf16()), native_bf16=cpu_has_native_bf16())
    print(f"peak: fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16']} GFLOP/s", flush=True)
    e2e_rows = e2e(args, threads) if args.e2e else {}
    base = rows.get("hstu", {}).get("tokens_per_s")
    command = "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = dict(**metadata(command, threads=threads, load_before=load_before), torch=torch.__version__,
                  config=dict(layers=args.layers, dim=args.dim, heads=args.heads, batch=128, max_len=200,
                              negatives=args.negatives, timed_batches=args.batches, warmup=args.warmup,
                              e2e_epochs=args.epochs if args.e2e else None),
                  results=rows, peak=peak,
                  ratios_vs_hstu={k: round(base / v["tokens_per_s"], 2) for k, v in rows.items()} if base else {},
                  e2e=e2e_rows, e2e_config=args.config if args.e2e else None)
    ours = ({"step rate (hstu)": base} if base else {}) | {
        f"end to end, {name}": r["e2e_tokens_per_s"] for name, r in e2e_rows.items() if r.get("e2e_tokens_per_s")}
    if ref_now:
        ref, tps = ref_now, ref_now["tokens_per_s"]
        ref.update(measured=True, ratios={k: dict(tokens_per_s=v, ratio=round(v / tps, 2)) for k, v in ours.items()})
        result["reference"] = ref
    elif (quoted := REFERENCE.get((args.layers, args.dim, args.heads))) and args.negatives == 128:
        mid = (quoted[1] + quoted[2]) // 2
        result["reference"] = dict(measured=False, model=quoted[0], low=quoted[1], high=quoted[2], mid=mid,
                                   label=REFERENCE_LABEL,
                                   ratios={k: dict(tokens_per_s=v, ratio=round(v / mid, 2)) for k, v in ours.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"throughput_l{args.layers}_h{args.heads}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
