"""--download's release registry: checksum verification and the offline failure."""

import hashlib
import json
import zipfile

import pytest

from merlin_ncf.workflows import datasets
from merlin_ncf.errors import EtlError


def _archive(tmp_path, content=b"1::2::5::978300760\n"):
    path = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", content)
    return path


def test_pinned_md5s_are_grouplens_published_ones():
    assert datasets.RELEASES["ml-100k"].md5 == "0e33842e24a9c977be4e0107933c0723"
    assert datasets.RELEASES["ml-1m"].md5 == "c4d9eecfca2ab87c1945afe126590906"
    assert datasets.RELEASES["ml-20m"].md5 == "cd245b17a1ae2cc31bb14903e1204af3"
    assert datasets.RELEASES["ml-1m"].url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"


def test_md5_mismatch_is_refused(tmp_path):
    archive = _archive(tmp_path)
    release = datasets.RELEASES["ml-1m"]
    with pytest.raises(EtlError, match="corrupt download"):
        datasets.verify(archive, release, release.md5, tmp_path / "ledger.json")
    datasets.verify(archive, release, hashlib.md5(archive.read_bytes()).hexdigest(), tmp_path / "ledger.json")


def test_without_md5_first_sha256_is_recorded_and_enforced(tmp_path):
    release = datasets.RELEASES["ml-25m"]
    ledger = tmp_path / "ledger.json"
    first = _archive(tmp_path)
    datasets.verify(first, release, None, ledger)
    assert json.loads(ledger.read_text())["ml-25m"] == hashlib.sha256(first.read_bytes()).hexdigest()
    datasets.verify(first, release, None, ledger)
    changed = _archive(tmp_path, b"tampered\n")
    with pytest.raises(EtlError, match="first download had"):
        datasets.verify(changed, release, None, ledger)


def test_offline_download_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "BASE_URL", "http://127.0.0.1:9/movielens")  # nothing listens there
    with pytest.raises(EtlError, match="cannot download .*offline"):
        datasets.download("ml-100k", cache=tmp_path, timeout=5, progress=False)
    assert not list(tmp_path.iterdir())


def test_cached_release_is_reused_without_network(tmp_path, monkeypatch):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / ".verified").touch()
    monkeypatch.setattr(datasets, "BASE_URL", "http://127.0.0.1:9/movielens")
    assert datasets.download("ml-1m", cache=tmp_path, progress=False) == folder


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 standing in for files.grouplens.org."""
    import functools
    import http.server
    import threading

    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(datasets, "BASE_URL", f"http://127.0.0.1:{server.server_port}")
    yield root
    server.shutdown()


def _publish(root, md5_text):
    with zipfile.ZipFile(root / "ml-latest-small.zip", "w") as zf:
        zf.writestr("ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp\n1,2,4.0,9\n")
    (root / "ml-latest-small.zip.md5").write_text(md5_text)


def test_download_fetches_verifies_against_published_md5_and_unpacks(mirror, tmp_path):
    _publish(mirror, "")
    digest = hashlib.md5((mirror / "ml-latest-small.zip").read_bytes()).hexdigest()
    (mirror / "ml-latest-small.zip.md5").write_text(f"{digest}  ml-latest-small.zip\n")
    unpacked = datasets.download("ml-latest-small", cache=tmp_path / "cache", progress=False)
    assert (unpacked / "ratings.csv").read_text().startswith("userId,movieId")
    (mirror / "ml-latest-small.zip").unlink()  # second call: served from the cache
    assert datasets.download("ml-latest-small", cache=tmp_path / "cache", progress=False) == unpacked


def test_download_with_wrong_published_md5_leaves_nothing(mirror, tmp_path):
    _publish(mirror, "0" * 32 + "  ml-latest-small.zip\n")
    with pytest.raises(EtlError, match="corrupt download"):
        datasets.download("ml-latest-small", cache=tmp_path / "cache", progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_etl_download_ml_latest_small_end_to_end(mirror, tmp_path):
    """`etl.py --download ml-latest-small` from a mirror (MERLIN_NCF_MOVIELENS_URL) publishing
    no .md5, as GroupLens may not: verified by first-download sha256, read, named ml-latest-small."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures" / "ml-latest-small"
    with zipfile.ZipFile(mirror / "ml-latest-small.zip", "w") as zf:
        for name in ("ratings.csv", "movies.csv"):
            zf.write(fixtures / name, f"ml-latest-small/{name}")
    out = tmp_path / "etl"
    env = dict(os.environ, MERLIN_NCF_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore",
               MERLIN_NCF_MOVIELENS_URL=datasets.BASE_URL)  # the mirror fixture's address
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "workflows/etl.py"), "--download",
                             "ml-latest-small", "--output", str(out), "--negatives", "1", "--quiet"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["dataset"], stats["format"], stats["raw_interactions"]) == ("ml-latest-small", "ml-latest-small", 13)
    assert "ml-latest-small" in json.loads((tmp_path / "cache" / "sha256.json").read_text())
