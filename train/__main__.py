"""`python -m train pretrain --config FILE --set key=value ...` (also under deepspeed / torchrun)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from configs.load import ConfigError, help_text, load_config
from configs.schema import DistillConfig, PretrainConfig

EXPORT_HELP = """Export a run: consolidate its checkpoint (any ZeRO stage) into one folder that serving loads:
model.safetensors, config.json, items.jsonl.gz, item_index.safetensors, semantic_ids/ (when the model has
codes), program.pt2 (torch.export of the encoder, checked against the eager model), README.md (model
card) and export.json (provenance + sha256 of every file).

    python -m train export --run runs/ml1m_hstu --out exports/ml1m_hstu
    python -m serve --export exports/ml1m_hstu --port 8000

A model with per-domain parameters (model.adapters=mlora, model.domain_embedding) exports every domain (requests
then name theirs); --merge-domain NAME exports one domain's model instead, its adapters folded into the weights.
"""


ADAPT_HELP = """Adapt a pretrained run per domain (MLoRA): its weights, frozen, + per-domain low-rank adapters on
the blocks' dense layers, trained in mixed-domain batches; each domain keeps its best validation epoch and
its adapter alone in run_dir/adapters/<domain>.safetensors. run_dir defaults to <base>_adapt.

    python -m train adapt --base runs/beauty_sports_shared
    python -m train adapt --base runs/ml1m_age_shared --domains age18_24,age25_34 --set model.adapter_alpha=8
    python -m train export --run runs/beauty_sports_shared_adapt --out exports/beauty_sports_mlora
"""


DISTILL_HELP = """Distill a finished teacher run into a student of any model config: the student's own task loss +
T^2 KL(teacher || student) over the teacher's top-K items, the sampled negatives and the positive at every
position (search positions included) + optional hidden-state alignment. shards, data, loss and eval default
to the teacher's; run_dir to <teacher>_distill. The run folder exports like any other.

    python -m train distill --teacher runs/ml1m_hstu_large --config configs/distill/ml1m_large_to_small.yaml
    python -m train teacher-labels --teacher runs/ml1m_hstu_large --out labels/ml1m_large \\
        --config configs/distill/ml1m_large_to_small.yaml
    python -m train distill --config configs/distill/ml1m_large_to_small.yaml --set distill.labels=labels/ml1m_large
"""

LABELS_HELP = """Run a teacher once over the train split (any number of ranks; each writes its part) and save its
top-K ids, logits and states per training position with a hash of the shard manifest and of the loader
settings that decide the examples; `distill --set distill.labels=DIR` then trains without the teacher.
Pass the distillation config so the examples (data.max_len, ...) and distill.top_k are the run's.
"""


def _distill_args(p, labels: bool) -> None:
    p.add_argument("--teacher", default=None,
                   help="finished teacher run directory (config.json, metrics.json, ckpt/best)")
    p.add_argument("--config", help="YAML with DistillConfig keys, e.g. configs/distill/synthetic.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set distill.temperature=2 --set model.num_layers=1 (repeatable)")
    if labels:
        p.add_argument("--out", required=True, help="label folder to write, e.g. labels/ml1m_large")
        p.add_argument("--overwrite", action="store_true", help="replace an existing label folder")
    else:
        p.add_argument("--resume", action="store_true", help="continue from run_dir/ckpt/last")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _distill(args) -> int:
    from data_pipeline.read_shards import ShardError
    from data_pipeline.schema import DataError
    from train.distill import distill_config
    from train.loop import NonFiniteError
    try:
        cfg = distill_config(args.teacher, args.config, args.set)
        if args.command == "teacher-labels":
            from train.teacher_labels import main as write_labels
            write_labels(cfg, args.out, args.overwrite)
            return 0
        from train.distill import main as distill
        if args.resume:
            cfg.resume = True
        distill(cfg)
    except (ConfigError, DataError, ShardError, FileNotFoundError) as e:
        return input_error(e)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


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
    e = sub.add_parser("export", help="a run -> a self-describing folder that serving loads",
                       description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--run", required=True, help="run directory (config.json, metrics.json, ckpt/)")
    e.add_argument("--tag", default="best", help="checkpoint tag: best (the tested weights, default) or last")
    e.add_argument("--out", required=True, help="export folder to write, e.g. exports/ml1m_hstu")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weight dtype in model.safetensors")
    e.add_argument("--aoti", action="store_true",
                   help="also compile program.pt2 with AOTInductor (program_aoti.pt2; needs a C++ compiler, minutes)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    e.add_argument("--merge-domain", default=None, metavar="NAME",
                   help="export only domain NAME's model: its MLoRA adapters merged into W, its domain embedding row")
    a = sub.add_parser("adapt", help="freeze a pretrained run's backbone and train per-domain MLoRA adapters",
                       description=ADAPT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--base", required=True, help="pretrained run directory (config.json, metrics.json, ckpt/best)")
    a.add_argument("--domains", default="", help="comma-separated domain names to adapt (default: every domain)")
    a.add_argument("--config", help="YAML with PretrainConfig keys applied on top of the base run's config")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set model.adapter_alpha=8 --set train.lr=3e-3 (repeatable)")
    a.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    d = sub.add_parser("distill", help="a frozen teacher run -> a smaller student (KD + task loss)",
                       description=DISTILL_HELP, epilog=help_text(DistillConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _distill_args(d, labels=False)
    t = sub.add_parser("teacher-labels", help="the teacher's top-K ids, logits and states per training position, once",
                       description=LABELS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _distill_args(t, labels=True)
    args = p.parse_args(argv)
    if args.command in ("distill", "teacher-labels"):
        return _distill(args)
    if args.command == "adapt":
        from data_pipeline.read_shards import ShardError
        from train.adapt import base_config
        from train.adapt import main as adapt
        try:
            cfg = base_config(Path(args.base), args.set, args.config)
            adapt(cfg, args.base, [d for d in args.domains.split(",") if d])
        except (ConfigError, ShardError, FileNotFoundError) as e:
            return input_error(e)
        return 0
    if args.command == "export":
        from train.export import ExportError
        from train.export import main as export
        try:
            rec = export(args.run, args.out, args.tag, args.dtype, args.aoti, args.overwrite,
                         merge_domain_name=args.merge_domain)
        except (ConfigError, ExportError, FileNotFoundError) as err:
            return input_error(err)
        print(f"exported {args.run} ({args.tag}, epoch {rec['best_epoch']}) -> {args.out}: {len(rec['files'])} files, "
              f"program max |diff| vs eager {rec['program_max_abs_diff']:.2g}")
        return 0
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
    rc = main()
    if "train.engine" in sys.modules:  # a command that opened the process group closes it (engine.shutdown)
        sys.modules["train.engine"].shutdown()
    sys.exit(rc)
