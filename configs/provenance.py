"""Where a result came from: the git commit of the checkout that produced it.

Lives in `configs` (no torch, no DeepSpeed) so every stage can stamp its outputs with it: train's
metrics.json and meta.json, bench's results tables, and later the export and the server that loads it.
"""
from __future__ import annotations

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
