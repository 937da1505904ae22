"""`python -m data_pipeline prepare|synthetic|inspect`: raw data -> webdataset shards + manifest.json."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from configs.load import ConfigError, help_text, load_config, save_config
from configs.schema import ContentStageConfig, PrepareConfig
from data_pipeline.read_shards import ShardError, load_manifest

EPILOG = """examples:
  python -m data_pipeline prepare --dataset ml-1m --raw ../shared/data/ml-1m --out shards/ml-1m
  python -m data_pipeline prepare --dataset amazon-beauty --raw ../shared/data/amazon-beauty --out shards/beauty
  python -m data_pipeline prepare --dataset amazon-beauty --raw ../shared/data/amazon-beauty \\
      --also amazon-sports=../shared/data/amazon-sports --out shards/beauty-sports   # 2 domains, shared users
  python -m data_pipeline prepare --dataset ml-1m --raw ../shared/data/ml-1m --domain-by age \\
      --out shards/ml-1m-age   # 7 age-band domains from users.dat
  python -m data_pipeline synthetic --out shards/synthetic --set synthetic.num_users=500
  python -m data_pipeline inspect shards/ml-1m

datasets: synthetic, ml-1m (original ratings.dat or the ratings_notime.tsv.gz layout), ml-100k,
ml-latest-small (tags become search events), amazon-<category> (SNAP reviews_<Cat>_5.json.gz +
meta_<Cat>.json.gz, or interactions.tsv.gz + items.jsonl.gz).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("prepare", "read a raw dataset and write shards"),
                       ("synthetic", "generate the synthetic multi-domain world and write shards")):
        s = sub.add_parser(name, help=what, description=what, epilog=help_text(PrepareConfig),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "prepare":
            s.add_argument("--dataset", help="source format (see `python -m data_pipeline --help`); "
                           "overrides the config's `dataset`")
            s.add_argument("--raw", help="folder holding the raw files")
            s.add_argument("--also", action="append", default=[], metavar="DATASET=RAW",
                           help="merge one more source into the shard set, e.g. "
                           "amazon-sports=../shared/data/amazon-sports (repeatable; appends to `also`)")
            s.add_argument("--domain-by", choices=PrepareConfig.CHOICES["domain_by"],
                           help="event domains: each source's own (source), or ML-1M user groups from "
                           "users.dat (age, gender); overrides `domain_by`")
        s.add_argument("--out", help="output folder for shards + manifest.json (written atomically)")
        s.add_argument("--config", help="YAML file with PrepareConfig keys (e.g. configs/data/ml-1m.yaml)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set shards.samples_per_shard=500 (repeatable)")
        s.add_argument("--skip-bad-rows", action="store_true",
                       help="skip malformed rows and report how many, instead of stopping at the first")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
    s = sub.add_parser("content", help="embed the catalog (text + extra modalities) and build semantic IDs",
                       description="shards/catalog.jsonl.gz -> content/<modality>.npy -> semantic_ids/ (fitted on "
                       "warm items; cold items get codes from the saved codebook)",
                       epilog=help_text(ContentStageConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--shards", help="shard folder (overrides the config's `shards`)")
    s.add_argument("--config", help="YAML file with ContentStageConfig keys (e.g. configs/content/beauty.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set semantic_ids.method=rqvae (repeatable)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s = sub.add_parser("images", help="synthetic item images -> a small random ViT -> image vectors (.npy + ids)",
                       description="The image path end to end without downloadable weights: images drawn from "
                       "each item's category, embedded by a randomly initialised ViT; pass the output to "
                       "`content` with --set content.extra_modalities=[image=PATH]")
    s.add_argument("--shards", required=True, help="shard folder whose catalog gets images")
    s.add_argument("--out", required=True, help="output .npy path (a sibling .ids.txt is written too)")
    s.add_argument("--seed", type=int, default=0, help="image and ViT seed (default 0)")
    s = sub.add_parser("inspect", help="print the summary table of an existing shard set")
    s.add_argument("shards", help="folder with manifest.json")
    return p


def resolve_config(args) -> PrepareConfig:
    """Defaults < --config YAML < --set overrides < explicit flags (taken verbatim, never YAML-parsed)."""
    cfg = load_config(PrepareConfig, args.config, args.set)
    flags = {k: getattr(args, k, None) for k in ("dataset", "raw", "out")}
    if args.command == "synthetic":
        flags["dataset"] = "synthetic"
    flags["domain_by"] = getattr(args, "domain_by", None)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    cfg.also = cfg.also + getattr(args, "also", [])
    cfg.skip_bad_rows |= args.skip_bad_rows
    cfg.overwrite |= args.overwrite
    if cfg.dataset != "synthetic" and not cfg.raw:
        raise ConfigError(f"--raw is required for dataset {cfg.dataset!r}")
    sources(cfg)  # a bad `also` entry or domain_by fails here, before any reading
    return cfg


def sources(cfg: PrepareConfig) -> list[tuple[str, str]]:
    """(dataset, raw folder) of every source: the main one, then each `also` entry in order."""
    out = [(cfg.dataset, cfg.raw)]
    for entry in cfg.also:
        name, sep, raw = (s.strip() for s in entry.partition("="))
        if not (sep and name and raw):
            raise ConfigError(f"also: entry {entry!r} must look like DATASET=RAW_FOLDER "
                              "(e.g. amazon-sports=../shared/data/amazon-sports)")
        out.append((name, raw))
    names = [n for n, _ in out]
    if len(out) > 1 and ("synthetic" in names or len(set(names)) < len(names)):
        raise ConfigError(f"also: sources must be distinct real datasets, got {names}")
    if cfg.domain_by != "source" and names != ["ml-1m"]:
        raise ConfigError(f"domain_by={cfg.domain_by!r} needs ML-1M's users.dat: only valid for dataset ml-1m "
                          f"alone, got {names}")
    return out


def read_source(cfg: PrepareConfig):
    """Every source read, merged into one item and user space, then the domains domain_by asks for."""
    if cfg.dataset == "synthetic":
        from data_pipeline.synthetic import generate
        return generate(cfg.synthetic).dataset
    from data_pipeline import multidomain
    from data_pipeline.readers import read_dataset
    parts = [(name, read_dataset(name, raw, skip_bad_rows=cfg.skip_bad_rows)) for name, raw in sources(cfg)]
    ds = parts[0][1] if len(parts) == 1 else multidomain.merge_datasets(parts)
    if cfg.domain_by != "source":
        ds = multidomain.domains_by_user_group(ds, f"{cfg.raw}/users.dat", cfg.domain_by)
    return ds


def summary_table(m: dict) -> str:
    c, sp = m["counts"], m["counts"]["split"]
    rows = [("all", c["users"], m["vocab"]["num_items"], c["events"], sp["train_events"], sp["valid_targets"],
             sp["test_targets"], c["search_events"])]
    for name, d in m["per_domain"].items():
        rows.append((name, d["users"], d["items"], d["events"], "", d["valid_targets"], d["test_targets"], ""))
    head = ("domain", "users", "items", "events", "train events", "valid targets", "test targets", "searches")
    cells = [head] + [tuple(f"{v:,}" if isinstance(v, int) else str(v) for v in r) for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, width))  # noqa: E731
    lines = [fmt(head), fmt(tuple("-" * w for w in width))] + [fmt(r) for r in cells[1:]]
    lines.append(f"dataset {m['dataset']}  has_timestamps={m['has_timestamps']}  shards={len(m['shards'])}  "
                 f"short users={c['short_users']} ({c['short_users_policy']})  skipped rows={c['skipped_rows']}  "
                 f"content_hash={m['content_hash'][:16]}")
    cold = c.get("cold") or {}
    if cold.get("items"):
        lines.append(f"cold items held out of training: {cold['items']:,} ({cold['events']:,} events removed from "
                     f"inputs; {cold['test_targets']:,} cold test targets; {cold['valid_targets_dropped']:,} "
                     "validation targets dropped; the table counts what is used, after these removals)")
    lines += [f"note: {n}" for n in m["notes"]]
    return "\n".join(lines)


def content_main(args) -> int:
    from data_pipeline import content_stage
    from data_pipeline.content import make_image_features
    t0 = time.time()
    if args.command == "images":
        print(f"wrote {make_image_features(args.shards, args.out, seed=args.seed)}")
        return 0
    cfg = load_config(ContentStageConfig, args.config, args.set)
    if args.shards:
        cfg = dataclasses.replace(cfg, shards=args.shards)
    summary = content_stage.run(cfg, progress=not args.quiet)
    save_config(cfg, f"{cfg.shards}/{content_stage.SID_DIR}/content_config.json")
    st = summary["stats"]
    print(f"content: {summary['content_modalities']}  semantic IDs: {summary['method']} "
          f"levels {summary['level_sizes']}")
    print(f"codebook usage per level {[round(u, 3) for u in st['usage']]}  collision rate {st['collision_rate']:.4f}  "
          f"max group {st['max_group']}  recon rel. error {st['recon_rel_error']}")
    print(f"done in {time.time() - t0:.1f}s -> {cfg.shards}/{content_stage.SID_DIR}/")
    return 0


# A bad config, raw file or shard set: one line on stderr and exit code 2, never a traceback. ValueError
# covers ConfigError, DataError, ContentError and the stages' checks of their inputs (an unknown dataset,
# shards.cold_item_frac out of range, ...): the data pipeline raises it for nothing else.
INPUT_ERRORS = (ValueError, ShardError, FileNotFoundError, FileExistsError)


def input_error(e: Exception) -> int:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            print(summary_table(load_manifest(args.shards)))
            return 0
        if args.command in ("content", "images"):
            return content_main(args)
        return prepare_main(args)
    except INPUT_ERRORS as e:
        return input_error(e)


def prepare_main(args) -> int:
    cfg = resolve_config(args)
    from data_pipeline.write_shards import write_shards
    t0 = time.time()
    print(f"reading {cfg.dataset} {cfg.raw} {' '.join(cfg.also)}".rstrip(), file=sys.stderr)
    ds = read_source(cfg)
    from data_pipeline import search_data
    ds = search_data.apply(ds, cfg.search)
    print(f"read {len(ds.events):,} events in {time.time() - t0:.1f}s; writing shards to {cfg.out}", file=sys.stderr)
    manifest = write_shards(ds, cfg.out, cfg.shards, overwrite=cfg.overwrite, progress=not args.quiet,
                            domain_by=cfg.domain_by)
    save_config(cfg, f"{cfg.out}/prepare_config.json")
    print(summary_table(manifest))
    print(f"done in {time.time() - t0:.1f}s -> {cfg.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
