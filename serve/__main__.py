"""`python -m serve --export exports/<name> --port 8000`: verify the export, then serve it over HTTP.

    curl -s localhost:8000/recommend -H 'content-type: application/json' -d '{"history": ["1193", "661"], "k": 5}'

Refuses to start (exit status 2, the file named) when the export is incomplete, corrupt or tampered with,
or when its model reads query text and the installed text encoder is not the one it was trained with
(`--no-search` then serves /recommend only; /search answers 503).
"""
from __future__ import annotations

import argparse
import sys

from configs.load import ConfigError, help_text, load_config
from configs.schema import ServeConfig

SHORTCUTS = (("export", str), ("host", str), ("port", int), ("threads", int), ("encoder", str), ("index", str),
             ("max_batch", int), ("max_wait_ms", float))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__, epilog=help_text(ServeConfig),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with ServeConfig keys (optional)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    for name, typ in SHORTCUTS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"shortcut for --set {name}=VALUE")
    p.add_argument("--no-search", action="store_true", help="shortcut for --set search=false (/recommend only)")
    args = p.parse_args(argv)
    overrides = list(args.set) + [f"{n}={getattr(args, n)}" for n, _ in SHORTCUTS if getattr(args, n) is not None]
    overrides += ["search=false"] if args.no_search else []
    try:
        cfg = load_config(ServeConfig, args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.export:
        p.error("--export DIR is required")
    import torch
    import uvicorn

    from serve.app import make_app
    from serve.engine import Recommender
    from serve.load import ExportLoadError, load_export
    from serve.search import SearchSetupError, make_searcher
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        exp = load_export(cfg.export)
        kw = dict(nprobe=cfg.nprobe) if cfg.index == "faiss" else {}
        rec = Recommender(exp, cfg.encoder, cfg.index, **kw)
        searcher = make_searcher(rec, cfg)  # loads and checks the query text encoder once, here
    except (ExportLoadError, ImportError, SearchSetupError) as e:
        print(f"error: refusing to start: {e}", file=sys.stderr)
        return 2
    search = "eager, query text encoder checked" if searcher and searcher.encoder else \
        "eager" if searcher else "off" if exp.has_queries else "none (no query tokens)"
    print(f"serving {cfg.export} (model {exp.model_id}, {exp.num_items:,} items, encoder {rec.encoder}, index "
          f"{cfg.index}, search {search}, {torch.get_num_threads()} threads) on http://{cfg.host}:{cfg.port}",
          flush=True)
    # keep-alive 30 s (uvicorn: 5): a client reusing a connection the server has just closed sees a read error
    uvicorn.run(make_app(rec, cfg, searcher), host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                timeout_keep_alive=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
