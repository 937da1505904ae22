"""Where a result came from: the git commit of the checkout that produced it.

Lives in `configs` (no torch, no DeepSpeed) so every stage can stamp its outputs with it: train's
metrics.json and meta.json, bench's results tables, and later the export and the server that loads it.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_sha(short: bool = False) -> str:
    """The commit of this checkout (abbreviated with `short`), or "unknown" outside git."""
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks: train export writes it, serve.load_export checks it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
