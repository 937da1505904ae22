"""Small helpers every benchmark's result record uses."""
from __future__ import annotations

from configs.provenance import git_sha as _git_sha


def git_sha() -> str:
    """Short sha of the checkout the benchmark ran from ("unknown" outside git)."""
    return _git_sha(short=True)
