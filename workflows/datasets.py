"""The MovieLens releases `--download` knows: where GroupLens serves them and how to verify them.

Archives are verified against the md5 GroupLens publishes beside each archive (<url>.md5):
pinned here where known, otherwise fetched with the archive. Where neither is available the
sha256 of the first download is recorded in the cache and later downloads must match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from merlin_ncf.errors import EtlError, one_line

BASE_URL = "https://files.grouplens.org/datasets/movielens"
CACHE_ENV = "MERLIN_NCF_CACHE"
# A mirror of GroupLens' folder (same archive names, optional .md5 files beside them).
URL_ENV = "MERLIN_NCF_MOVIELENS_URL"


@dataclass(frozen=True)
class Release:
    name: str
    folder: str  # the directory the archive unpacks to
    md5: str | None  # GroupLens' published md5 of the archive, where we have it pinned

    @property
    def url(self) -> str:
        return f"{os.environ.get(URL_ENV) or BASE_URL}/{self.name}.zip"


RELEASES = {r.name: r for r in [
    Release("ml-100k", "ml-100k", "0e33842e24a9c977be4e0107933c0723"),
    Release("ml-1m", "ml-1m", "c4d9eecfca2ab87c1945afe126590906"),
    Release("ml-10m", "ml-10M100K", None),
    Release("ml-20m", "ml-20m", "cd245b17a1ae2cc31bb14903e1204af3"),
    Release("ml-25m", "ml-25m", None),
    # ml-latest is re-issued from time to time, so no checksum can be pinned.
    Release("ml-latest-small", "ml-latest-small", None),
    Release("ml-latest", "ml-latest", None),
]}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "merlin-ncf")


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, target: Path, timeout: float, progress: bool) -> None:
    from merlin_ncf.progress import progress_bar

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], enabled=progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EtlError(f"cannot download {url} ({reason}); are you offline? "
                       f"Unpack the archive yourself and pass --input") from None


def _published_md5(release: Release, timeout: float) -> str | None:
    if release.md5:
        return release.md5
    try:
        with urllib.request.urlopen(release.url + ".md5", timeout=timeout) as response:
            return response.read().decode().split()[0].strip().lower() or None
    except (urllib.error.URLError, socket.timeout, OSError, IndexError, UnicodeDecodeError):
        return None


def verify(archive: Path, release: Release, md5: str | None, ledger: Path) -> None:
    """Check the archive's md5 (or, without one, its sha256 against the first download's)."""
    if md5:
        actual = file_digest(archive, "md5")
        if actual != md5:
            raise EtlError(f"{release.name}.zip has md5 {actual}, GroupLens publishes {md5}: corrupt download")
        return
    known = json.loads(ledger.read_text()) if ledger.is_file() else {}
    actual = file_digest(archive, "sha256")
    if release.name in known and known[release.name] != actual:
        raise EtlError(f"{release.name}.zip has sha256 {actual}, the first download had {known[release.name]}")
    known[release.name] = actual
    ledger.write_text(json.dumps(known, indent=1, sort_keys=True))


def download(name: str, cache: Path | None = None, timeout: float = 30.0, progress: bool = True) -> Path:
    """The unpacked release directory, downloading and verifying it on first use."""
    if name not in RELEASES:
        raise EtlError(f"unknown MovieLens release {name!r}; known: {', '.join(RELEASES)}")
    release = RELEASES[name]
    cache = cache or cache_dir()
    unpacked = cache / release.folder
    if (unpacked / ".verified").is_file():
        return unpacked
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}.") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        _fetch(release.url, archive, timeout, progress)
        verify(archive, release, _published_md5(release, timeout), cache / "sha256.json")
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise EtlError(f"{release.name}.zip is not a zip archive: {one_line(exc)}") from None
        (Path(tmp) / release.folder / ".verified").touch()
        if unpacked.exists():
            shutil.rmtree(unpacked)
        os.replace(Path(tmp) / release.folder, unpacked)
    return unpacked
