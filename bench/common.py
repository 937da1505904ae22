"""Small helpers every benchmark's result record uses."""
from __future__ import annotations

from configs.provenance import git_sha as _git_sha


def git_sha() -> str:
    """Short sha of the checkout the benchmark ran from ("unknown" outside git)."""
    return _git_sha(short=True)


STEP_BATCH, STEP_MAX_LEN = 128, 200  # the step-rate rows' batches: ML-1M's paper recipe


def add_step_args(p, batches: int) -> None:
    """The arguments bench/throughput.py and bench/reference_gr.py share: one shard set, model shape and
    batch count, so that their step rates compare (the reference's run is launched with the same values)."""
    p.add_argument("--shards", required=True, help="ML-1M shard folder (python -m data_pipeline prepare ...)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--batches", type=int, default=batches, help=f"timed batches (default {batches})")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    p.add_argument("--negatives", type=int, default=128)


def step_batches(p, args) -> list:
    """The first warmup + batches training batches (STEP_BATCH sequences cut to STEP_MAX_LEN, loader order):
    every step-rate row, ours and the reference's, times exactly these. Too few is a usage error on `p`."""
    from configs.schema import LoaderConfig
    from data_pipeline.collate import make_loader
    n = args.warmup + args.batches
    loader = LoaderConfig(batch_size=STEP_BATCH, max_len=STEP_MAX_LEN, num_workers=0)
    batches = [b for _, b in zip(range(n), make_loader(args.shards, "train", loader))]
    if len(batches) < n:
        p.error(f"{args.shards} has {len(batches)} train batches of {STEP_BATCH}; --warmup + --batches needs {n}")
    return batches
