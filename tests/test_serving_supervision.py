"""serve.py keeps the service up and is honest about it: a request that aborts tritonserver
is survived by a supervised restart (with its /dev/shm regions cleaned), a killed serve.py
takes its server with it, and another listener on the port is never mistaken for ours.
Real tritonserver processes on 127.0.0.1 (the numpy-only `double` model: seconds to start)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from merlin_ncf.serving.serve import remove_orphaned_shm_regions

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
pytestmark = pytest.mark.slow

# One HTTP request that makes tritonserver 2.51 abort with std::bad_alloc (issue 10, item 3).
CRASH_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1_000_000_000_000], "datatype": "INT64", "data": [1, 2, 3]}]})


def _start_serve(repository: Path, ready: Path, *extra: str, port: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "serving/serve.py", "--repository", str(repository), "--http-port", str(port), "--grpc-port", "0",
         "--metrics-port", "0", "--ready-file", str(ready), *extra],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_ready(process: subprocess.Popen, ready: Path, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "serve.py never became ready"
        time.sleep(0.2)
    return json.loads(ready.read_text())


def _double(url: str, retry_for_s: float = 0.0) -> list[int]:
    """The `double` model on [1, 2, 3], retried (bounded) while the server restarts."""
    import tritonclient.http as http

    deadline = time.monotonic() + retry_for_s
    while True:
        try:
            with http.InferenceServerClient(url, network_timeout=10) as client:
                x = http.InferInput("x", [3], "INT64")
                x.set_data_from_numpy(np.array([1, 2, 3], np.int64))
                return client.infer("double", [x]).as_numpy("y").tolist()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _post(url: str, body: str) -> None:
    request = urllib.request.Request(f"http://{url}/v2/models/double/infer", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def _children(pid: int) -> list[int]:
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            children.append(int(status.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def _stop(process: subprocess.Popen) -> tuple[str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_request_that_aborts_the_server_is_survived_by_a_supervised_restart(tiny_repository, tmp_path):
    ready = tmp_path / "ready.json"
    process = _start_serve(tiny_repository, ready)
    try:
        urls = _wait_ready(process, ready)
        assert _double(urls["http"]) == [2, 4, 6]
        regions = list(Path("/dev/shm").glob(f"merlin-ncf-{process.pid}-*"))
        assert regions, "the python backend's shm regions carry serve.py's prefix"
        with pytest.raises(Exception):
            _post(urls["http"], CRASH_BODY)  # the server aborts: the connection closes unanswered
        # The dying server may still answer for a few seconds while it writes its stack trace:
        # wait for the supervisor to record the restart, then a good request must succeed.
        deadline = time.monotonic() + 180
        while json.loads(ready.read_text())["restarts"] < 1:
            assert process.poll() is None and time.monotonic() < deadline, "no supervised restart"
            time.sleep(0.2)
        assert json.loads(ready.read_text())["restarts"] == 1
        assert _double(urls["http"], retry_for_s=90) == [2, 4, 6]
        assert not [r for r in regions if r.exists()], "the crashed server's shm regions were removed"
        assert process.poll() is None
    finally:
        out, err = _stop(process)
    assert process.returncode == 0, err
    assert "std::bad_alloc" in out or "exited with code -6" in out
    assert "restart 1 in" in out and "ready again (restarts: 1)" in out
    assert not list(Path("/dev/shm").glob(f"merlin-ncf-{process.pid}-*"))


def test_a_killed_serve_takes_its_tritonserver_with_it(tiny_repository, tmp_path):
    ready = tmp_path / "ready.json"
    process = _start_serve(tiny_repository, ready, "--quiet")
    try:
        _wait_ready(process, ready)
        servers = [pid for pid in _children(process.pid) if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(servers) == 1
        process.kill()  # SIGKILL: serve.py cannot clean up
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (_alive(servers[0]) or _group_alive(servers[0])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(servers[0]), "tritonserver outlived the serve.py that started it"
        assert not _group_alive(servers[0]), "python backend stubs outlived their server"
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


class _AlwaysReady(http.server.BaseHTTPRequestHandler):
    """Another server on the port, answering every health check with 200."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_serve_is_not_ready_when_another_server_owns_the_port(tiny_repository, tmp_path):
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AlwaysReady)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    ready = tmp_path / "ready.json"
    try:
        process = _start_serve(tiny_repository, ready, "--quiet", port=other.server_address[1])
        try:
            out, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    finally:
        other.shutdown()
        other.server_close()
    assert process.returncode == 2, (out, err)
    assert err.count("\n") == 1 and "already in use" in err, err
    assert "ready" not in out and not ready.exists()


def test_shm_regions_of_a_dead_starter_are_removed_and_no_others():
    """What a serve.py killed with SIGKILL may leave (its stubs usually clean up, a crashed
    server's do not always): regions with our prefix and a dead pid go, the rest stay."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    shm = Path("/dev/shm")
    orphan, live, foreign = (shm / f"merlin-ncf-{dead.pid}-0-test", shm / f"merlin-ncf-{os.getpid()}-999-test",
                             shm / f"triton_python_backend_shm_region_test-{os.getpid()}")
    try:
        for region in (orphan, live, foreign):
            region.write_bytes(b"")
        assert orphan.name in remove_orphaned_shm_regions()
        assert not orphan.exists() and live.exists() and foreign.exists()
    finally:
        for region in (orphan, live, foreign):
            region.unlink(missing_ok=True)
