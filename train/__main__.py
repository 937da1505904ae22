"""`python -m train pretrain --config FILE --set key=value ...` (also under deepspeed / torchrun)."""
from __future__ import annotations

import argparse
import sys

from configs.load import ConfigError, help_text, load_config
from configs.schema import PretrainConfig


def input_error(e: Exception) -> int:
    """A bad config, shard set or input file is the user's to fix: its one-line message, exit code 2."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("pretrain", help="pretrain the sequence model on shards",
                       description="Pretrain: shards -> model -> DeepSpeed -> eval -> checkpoints.",
                       epilog=help_text(PretrainConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", help="YAML with PretrainConfig keys, e.g. configs/pretrain/ml1m_hstu.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    s.add_argument("--resume", action="store_true",
                   help="continue from run_dir/ckpt/last (the end of the last finished epoch)")
    s.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.command == "pretrain":
        from data_pipeline.read_shards import ShardError
        from data_pipeline.schema import DataError
        from train.loop import NonFiniteError
        from train.pretrain import main as pretrain
        try:
            cfg = load_config(PretrainConfig, args.config, args.set)
            if args.resume:
                cfg.resume = True
            pretrain(cfg)
        except (ConfigError, DataError, ShardError, FileNotFoundError) as e:
            return input_error(e)
        except NonFiniteError as e:  # diverged: the message names the step, the loss term, the checkpoint
            print(f"error: {e}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
