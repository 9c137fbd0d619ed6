"""Atomic file writing: a reader never sees a half-written file under its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block finishes without error.

    Works for files and directories. The temporary name starts with `.tmp-` so globs for final names skip it.
    An existing directory at `path` is replaced (moved aside first, then removed).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}.{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
                os.fsync(f.fileno())
        if final.is_dir() and tmp.is_dir():
            old = final.with_name(f".old-{final.name}.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        _remove(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def check_replaceable(out: str | os.PathLike, marker: str, what: str) -> None:
    """Refuse an output folder unless it is new, empty, or an earlier result (it holds `marker`).

    Exports and fine-tuning replace only their own earlier output, never a folder of something else that a user
    mistyped as OUT. Raises ValueError with the fix; callers re-raise it as their own error type.
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is a file; choose a folder name")
    if p.is_dir() and any(p.iterdir()) and not (p / marker).is_file():
        raise ValueError(f"{what} {p} exists and is not an earlier result; choose a new folder or remove it")
