"""Build an output (a directory or a file) beside its target and move it into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from merlin_ncf.errors import UserError

# Every directory a stage writes holds this file, naming the stage ("etl", "run",
# "repository"): only such a directory is ever replaced without --overwrite.
MARKER = ".merlin-ncf"


# Temporary directories being built, for abandon_all() on a hard exit.
_IN_PROGRESS: set[Path] = set()


def abandon_all() -> None:
    """Delete every temporary directory still being built (a hard exit skips the cleanup below)."""
    for tmp in list(_IN_PROGRESS):
        for _ in range(3):  # a worker thread may still be writing into it
            shutil.rmtree(tmp, ignore_errors=True)
        _IN_PROGRESS.discard(tmp)


def written_by_us(path: str | os.PathLike, kind: str, legacy_markers: Iterable[str] = ()) -> bool:
    """Whether `path` is a directory this project wrote as `kind`: it holds MARKER naming
    `kind`, or (outputs from before the marker) every one of `legacy_markers`."""
    path = Path(path)
    marker = path / MARKER
    if marker.is_file():
        try:
            return marker.read_text().strip() == kind
        except (OSError, UnicodeDecodeError):
            return False
    legacy = list(legacy_markers)
    return bool(legacy) and all((path / name).exists() for name in legacy)


def mark(directory: str | os.PathLike, kind: str) -> None:
    """Claim `directory` as a `kind` output of this project (see written_by_us)."""
    (Path(directory) / MARKER).write_text(kind + "\n")


def check_replaceable(target: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False, legacy_markers: Iterable[str] = (),
                      option: str = "--overwrite") -> None:
    """Raise UserError unless writing `target` can lose nothing the user did not agree to lose.

    Always refused: a target that is, contains or lies inside one of `inputs`, or that is not
    a directory. A missing or empty directory, or one this project wrote as `kind`, may be
    replaced; any other non-empty directory only with `option` (`overwrite`).
    """
    target_abs = Path(os.path.realpath(Path(target).expanduser()))
    for source in inputs:
        source_abs = Path(os.path.realpath(Path(source).expanduser()))
        if target_abs == source_abs or target_abs in source_abs.parents or source_abs in target_abs.parents:
            raise UserError(f"output {target} overlaps the input {source}: choose an output outside it")
    if not os.path.lexists(target_abs):
        return
    if not target_abs.is_dir():
        raise UserError(f"output {target} exists and is not a directory")
    try:
        empty = not any(target_abs.iterdir())
    except OSError as exc:
        raise UserError(f"output {target} cannot be read: {exc.strerror or exc}") from None
    if empty or written_by_us(target_abs, kind, legacy_markers) or overwrite:
        return
    raise UserError(f"{target} is not empty and was not written by this command: "
                    f"pass {option} to replace it, or choose another output")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, kind: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory on the target's filesystem; on a clean exit it
    replaces `target` (an older output is swapped out, then deleted). On any exception,
    KeyboardInterrupt included, the temporary directory goes and `target` is untouched.
    With `kind`, the new directory is marked as this project's (see mark); callers check
    check_replaceable(target, ...) first."""
    target = Path(target).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    _IN_PROGRESS.add(tmp)
    try:
        if kind is not None:
            mark(tmp, kind)
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
