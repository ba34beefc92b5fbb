"""Build an output (a directory or a file) beside its target and move it into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


# Temporary directories being built, for abandon_all() on a hard exit.
_IN_PROGRESS: set[Path] = set()


def abandon_all() -> None:
    """Delete every temporary directory still being built (a hard exit skips the cleanup below)."""
    for tmp in list(_IN_PROGRESS):
        for _ in range(3):  # a worker thread may still be writing into it
            shutil.rmtree(tmp, ignore_errors=True)
        _IN_PROGRESS.discard(tmp)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory on the target's filesystem; on a clean exit it
    replaces `target` (an older output is swapped out, then deleted). On any exception,
    KeyboardInterrupt included, the temporary directory goes and `target` is untouched."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    _IN_PROGRESS.add(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # stays registered: threads may still write to it
        raise
    _IN_PROGRESS.discard(tmp)
    old = None
    if target.exists():
        # rename(2) cannot replace a non-empty directory: swap the old one aside first.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target` (same suffix, so writers that infer the format
    from it work); on a clean exit it replaces `target`, on any exception it is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a server running as another user
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
