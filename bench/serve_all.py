"""Every serving benchmark from raw data, resuming what exists: shards -> runs -> exports -> parity ->
latency / soak / faiss.

    python bench/serve_all.py --ml1m ../shared/data/ml-1m --beauty ../shared/data/amazon-beauty

1. shards: shards/ml-1m, shards/amazon-beauty-cold (+ content and semantic IDs, as bench/beauty.py);
2. runs (skipped when metrics.json exists, resumed from ckpt/last otherwise):
   - ML-1M HSTU, the paper recipe (runs/bench_ml1m/hstu_speed_s0, as bench/ml1m.py --tag _speed);
   - Amazon Beauty HSTU, ID-only (runs/bench_amazon-beauty/hstu_id_s0, as bench/beauty.py);
   - ML-1M HSTU-large for --large-epochs epochs (runs/bench_serve/...): latency does not depend on how
     long it trained, and a full HSTU-large run takes over an hour here; its quality is not claimed;
3. exports/<run> with --aoti (skipped when export.json exists);
4. bench/serve_parity.py for the ML-1M HSTU and Beauty runs;
5. bench/serve.py on the Beauty and HSTU-large exports (eager, program, aoti; 1 and 2 cores), the soak
   and the 1M-item faiss catalogue.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import seqrec as S  # noqa: E402


def run(cmd: list[str]) -> int:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def ensure_export(run_dir: Path) -> Path:
    out = ROOT / "exports" / run_dir.name
    if not (out / "export.json").exists():
        if run([sys.executable, "-m", "train", "export", "--run", str(run_dir), "--out", str(out), "--aoti",
                "--overwrite"]):
            raise SystemExit(f"export of {run_dir} failed")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ml1m", required=True, help="raw ML-1M folder (../shared/data/ml-1m)")
    p.add_argument("--beauty", required=True, help="raw Amazon Beauty folder (../shared/data/amazon-beauty)")
    p.add_argument("--large-epochs", type=int, default=3, help="epochs of the HSTU-large run (default 3)")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--serve-args", default="", help="extra arguments for bench/serve.py, e.g. '--requests 100'")
    args = p.parse_args(argv)
    from bench.beauty import HSTU, _prepare
    ml1m_shards, beauty_shards = ROOT / "shards" / "ml-1m", ROOT / "shards" / "amazon-beauty-cold"
    S.ensure_shards("ml-1m", args.ml1m, ml1m_shards)
    _prepare("amazon-beauty", args.beauty, beauty_shards, 0.05)
    runs = dict(
        ml1m=(S.ROOT / "configs/pretrain/ml1m_hstu.yaml", ROOT / "runs/bench_ml1m/hstu_speed_s0", ml1m_shards, []),
        beauty=(S.ROOT / HSTU, ROOT / "runs/bench_amazon-beauty/hstu_id_s0", beauty_shards, ["model.item_repr=id"]),
        large=(S.ROOT / "configs/pretrain/ml1m_hstu_large.yaml",
               ROOT / f"runs/bench_serve/ml1m_hstu_large_e{args.large_epochs}_s0", ml1m_shards,
               [f"train.epochs={args.large_epochs}"]),
    )
    exports = {}
    for name, (config, run_dir, shards, overrides) in runs.items():
        if S.run_one(str(config), run_dir, shards, 0, overrides, nproc=1) is None:
            raise SystemExit(f"run {run_dir} failed")
        exports[name] = ensure_export(run_dir)
    failed = 0
    if not args.skip_parity:
        for name in ("ml1m", "beauty"):
            failed |= run([sys.executable, "bench/serve_parity.py", "--run", str(runs[name][1]), "--export",
                           str(exports[name])]) != 0
    failed |= run([sys.executable, "bench/serve.py", "--export", str(exports["beauty"]), "--export",
                   str(exports["large"]), "--encoders", "eager", "program", "aoti", *args.serve_args.split()]) != 0
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
