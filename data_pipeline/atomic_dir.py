"""Put a finished folder in place of another without a moment where neither exists.

`os.replace` cannot replace a non-empty directory, and the usual two renames (dest -> old, new -> dest)
leave `dest` missing if the process dies between them: a shard set or the only resume checkpoint would
then be gone. Linux's renameat2(RENAME_EXCHANGE) swaps two paths in one atomic step, so `dest` always
names a complete folder (the old one before the call, the new one after it). Where the call is missing
(non-Linux, old kernels, some network filesystems) the two-rename fallback runs, and `recover` undoes its
crash window on the next write or read.

Used by `write_shards` (the shard folder) and `train.engine.save_checkpoint` (ckpt/<tag>).
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths a and b; False when this system cannot (then nothing was changed)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _old_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def swap_into_place(new: str | Path, dest: str | Path) -> None:
    """Make the complete folder `new` appear at `dest`; the previous `dest` (if any) is deleted only
    after `dest` names the new folder."""
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        new.rename(dest)
        return
    if _exchange(new, dest):  # `new` now holds the previous folder
        shutil.rmtree(new)
        return
    old = _old_path(dest)
    shutil.rmtree(old, ignore_errors=True)
    dest.rename(old)
    new.rename(dest)  # a crash before this line leaves `old`: `recover(dest)` puts it back
    shutil.rmtree(old)


def recover(dest: str | Path) -> None:
    """After a crash inside the two-rename fallback: `dest` missing but its previous copy present -> restore."""
    dest = Path(dest)
    old = _old_path(dest)
    if not dest.exists() and old.exists():
        old.rename(dest)
