"""Loader throughput: shards -> DataLoader (N workers) -> JaggedBatch, against the same training
sequences iterated from an in-memory list in the main process (tokenize + collate, no I/O).

    python bench/data_pipeline.py --raw ../shared/data/ml-1m            # prepares shards first
    python bench/data_pipeline.py --shards shards/ml-1m --workers 2

Writes bench/results/data_pipeline.{json,md}. A ratio >= 1 means the shard loader keeps up with (or beats)
a pure in-memory iterator, i.e. the data path will not be what a training step waits on.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import header, loadavg, metadata  # noqa: E402
from configs.schema import LoaderConfig, ShardConfig  # noqa: E402
from data_pipeline.collate import collate, example_to_tokens, make_loader  # noqa: E402
from data_pipeline.read_shards import load_manifest, read_shards  # noqa: E402


def time_loader(shards: Path, cfg: LoaderConfig, epochs: int) -> tuple[float, int, int]:
    batches = tokens = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for b in make_loader(shards, "train", cfg, epoch=epoch):
            batches += 1
            tokens += b.item_ids.numel()
    return time.perf_counter() - t0, batches, tokens


def time_in_memory(shards: Path, cfg: LoaderConfig, epochs: int) -> tuple[float, int, int]:
    one = LoaderConfig(**{**cfg.__dict__, "num_workers": 0})
    examples = list(read_shards(shards, "train", one, shuffle=False))  # decoded once, outside the clock
    rng = random.Random(cfg.seed)
    batches = tokens = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        rng.shuffle(examples)
        toks = (example_to_tokens(ex, cfg.query_tokens, cfg.max_len) for ex in examples)
        toks = [t for t in toks if t is not None]
        for i in range(0, len(toks), cfg.batch_size):
            b = collate(toks[i:i + cfg.batch_size])
            batches += 1
            tokens += b.item_ids.numel()
    return time.perf_counter() - t0, batches, tokens


def prepare(raw: str, dataset: str) -> Path:
    from data_pipeline.readers import read_dataset
    from data_pipeline.write_shards import write_shards
    out = Path(tempfile.mkdtemp(prefix="bench-shards-")) / dataset
    write_shards(read_dataset(dataset, raw), out, ShardConfig())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="an existing shard folder")
    src.add_argument("--raw", help="raw dataset folder; shards are prepared into a temp folder first")
    p.add_argument("--dataset", default="ml-1m", help="reader for --raw (default ml-1m)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3, help="epochs timed for each method (default 3)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON + Markdown")
    args = p.parse_args(argv)

    shards = Path(args.shards) if args.shards else prepare(args.raw, args.dataset)
    cfg = LoaderConfig(batch_size=args.batch_size, max_len=args.max_len, num_workers=args.workers)
    manifest = load_manifest(shards)
    rows, load_before = {}, loadavg()
    for name, fn in (("shard loader", time_loader), ("in-memory list", time_in_memory)):
        secs, batches, tokens = fn(shards, cfg, args.epochs)
        rows[name] = dict(seconds=round(secs, 3), batches=batches, tokens=tokens,
                          batches_per_s=round(batches / secs, 2), tokens_per_s=round(tokens / secs))
        print(f"{name:15s} {batches} batches in {secs:.2f}s: {batches / secs:.1f} batches/s, "
              f"{tokens / secs:,.0f} tokens/s")
    ratio = rows["shard loader"]["batches_per_s"] / rows["in-memory list"]["batches_per_s"]
    cmd = " ".join(["python bench/data_pipeline.py", *sys.argv[1:]])
    result = dict(**metadata(cmd, load_before=load_before), dataset=manifest["dataset"],
                  content_hash=manifest["content_hash"], config=cfg.__dict__, epochs=args.epochs,
                  results=rows, ratio_loader_over_memory=round(ratio, 3))
    print(f"ratio (loader / in-memory) = {ratio:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "data_pipeline.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    lines = header(f"Loader throughput ({r['dataset']})", r) + [
        f"batch {r['config']['batch_size']}, max_len {r['config']['max_len']}, "
        f"{r['config']['num_workers']} workers, {r['epochs']} epochs of the train split", "",
        "| method | batches/s | tokens/s | seconds |", "|---|---|---|---|"]
    for name, row in r["results"].items():
        lines.append(f"| {name} | {row['batches_per_s']} | {row['tokens_per_s']:,} | {row['seconds']} |")
    lines += ["", f"Ratio shard loader / in-memory: **{r['ratio_loader_over_memory']}**", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
