"""Run a real tritonserver on a model repository: start, wait until ready, stop cleanly.

`TritonServer` is a context manager (used by the tests and the benchmark); the CLI runs one
in the foreground, forwarding its log, until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO


from merlin_ncf.serving.errors import ServingError
from merlin_ncf.errors import run_cli
from merlin_ncf.serving.server_runtime import (
    TritonInstallation,
    die_with_parent_preexec,
    find_tritonserver,
    free_port,
    owns_listening_port,
    server_environment,
)
from merlin_ncf.atomic import atomic_file
from merlin_ncf.errors import OneLineArgumentParser

STOP_GRACE_S = 45.0
RESTART_FIRST_DELAY_S, RESTART_MAX_DELAY_S = 0.5, 30.0
STABLE_AFTER_S = 60.0  # a server up this long resets the backoff and the restarts-in-a-row count
_LOG_TAIL_LINES = 400
_ERROR_REPORT_LINES = 12
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "merlin-ncf-"  # + the starting process's pid + "-" + its start count + "-"
_starts = itertools.count()
_HARMLESS_ON_CPU = ("CudaDriverHelper", "NVML", "DCGM", "unable to create stream", "CUDA driver version")


class TritonServer:
    """One tritonserver process serving `repository` on `host`; ports of 0 are picked free."""

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        startup_timeout_s: float = 180.0,
        log_sink: IO[str] | None = None,
        installation: TritonInstallation | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.repository = Path(repository).resolve()
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.log_sink = log_sink
        self.installation = installation or find_tritonserver()
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self._log_tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._log_thread: threading.Thread | None = None
        self.shm_prefix = ""

    # --- addresses -----------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        return [
            str(self.installation.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.installation.backend_dir}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=30",  # python stubs unload slowly on a busy CPU
            # Our own name for the python backend's shared-memory regions: what a crashed
            # server leaves in /dev/shm is then recognisably ours to delete (stop()).
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> "TritonServer":
        if not self.repository.is_dir():
            raise ServingError(f"model repository {self.repository} does not exist (run serving/export.py)")
        remove_orphaned_shm_regions()
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}-{next(_starts)}-"
        self._log_tail.clear()
        self.process = subprocess.Popen(
            self.command(),
            env=server_environment(self.installation),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # our Ctrl-C reaches us, and we stop the whole group
            preexec_fn=die_with_parent_preexec(),  # and if we are killed, the server goes too
        )
        self._log_thread = threading.Thread(target=self._pump_log, daemon=True)
        self._log_thread.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _pump_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._log_tail.append(line.rstrip())
            if self.log_sink is not None:
                self.log_sink.write(line)
                self.log_sink.flush()

    def first_error(self) -> str:
        """Triton's first real error line (not the CPU-only noise), without its log prefix."""
        for line in self._log_tail:
            if line.startswith("terminate called"):  # an abort (e.g. std::bad_alloc) logs no E line
                return line
            if line.startswith("E") and not any(noise in line for noise in _HARMLESS_ON_CPU):
                message = line.split("] ", 1)[-1].strip().strip('"')
                return message if len(message) <= 300 else message[:300] + " ..."
        return "no error line in its log"

    def log_tail(self) -> str:
        """The log's error lines (Triton prefixes them with E) and its last lines, for reports."""
        lines = list(self._log_tail)
        errors = [line for line in lines if line.startswith("E") or "failed to load" in line]
        keep = errors[-_ERROR_REPORT_LINES:] + [line for line in lines[-_ERROR_REPORT_LINES:] if line not in errors]
        return "\n".join(line if len(line) < 2000 else line[:2000] + " ..." for line in keep)

    def wait_ready(self) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + self.startup_timeout_s
        with httpclient.InferenceServerClient(self.http_url) as client:
            while True:
                if self.process.poll() is not None:
                    if self._log_thread is not None:
                        self._log_thread.join(timeout=2)
                    raise ServingError(
                        f"tritonserver exited with code {self.process.returncode} before it was ready: "
                        f"{self.first_error()}\n{self.log_tail()}"
                    )
                try:
                    if client.is_server_ready() and self.owns_its_ports():
                        return
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    raise ServingError(
                        f"tritonserver not ready after {self.startup_timeout_s:.0f} s: "
                        f"{self.first_error()}\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def owns_its_ports(self) -> bool:
        """Whether our process holds the listening sockets of all three ports: a server that
        answers there may otherwise be another one that had a port first (ours then exits)."""
        return all(owns_listening_port(self.process.pid, port) for port in (self.http_port, self.grpc_port, self.metrics_port))

    def remove_shm_regions(self) -> list[str]:
        """Delete the python backend's /dev/shm regions of our last start (only ours: they
        carry its prefix); a server that crashed or was killed leaves them behind."""
        removed = []
        if self.shm_prefix and SHM_DIR.is_dir():
            for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)
                removed.append(region.name)
        return removed

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL the process group after a grace period; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait()
        else:
            # The server is gone, but python backend stubs of its group may linger.
            _signal_group(self.process, signal.SIGKILL)
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)
        self.remove_shm_regions()
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def remove_orphaned_shm_regions() -> list[str]:
    """Delete the shm regions of servers whose starting process is dead (e.g. a serve.py
    killed with SIGKILL, which could not clean up): the pid in our prefix tells."""
    removed = []
    for region in SHM_DIR.glob(f"{SHM_PREFIX}*") if SHM_DIR.is_dir() else ():
        pid = region.name[len(SHM_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            region.unlink(missing_ok=True)
            removed.append(region.name)
    return removed


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


# --- command line ----------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        description="Serve a model repository written by serving/export.py with a real tritonserver "
        "(the one on PATH, else the one bundled in the nvidia-pytriton wheel) until Ctrl-C/SIGTERM."
    )
    parser.add_argument("--repository", required=True, type=Path, help="model repository directory (export.py --output)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="metrics port (default 8002; 0 picks a free one)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for readiness (default 180)")
    parser.add_argument("--ready-file", type=Path, help="write the server's URLs as JSON here once it is ready (removed on exit)")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="restart a crashed server at most this many times in a row (default 5; 0: never)")
    parser.add_argument("--quiet", action="store_true", help="do not forward the server's log to stdout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    for port in (args.http_port, args.grpc_port, args.metrics_port):
        if not 0 <= port < 65536:
            raise ServingError(f"port {port} is not between 0 and 65535")
    if args.max_restarts < 0:
        raise ServingError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    server = TritonServer(
        args.repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        startup_timeout_s=args.startup_timeout,
        log_sink=None if args.quiet else sys.stdout,
    )

    def request_stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        try:
            server.start()
        except ServingError as exc:
            # The log went to stdout already (unless --quiet): its summary line is the error.
            raise ServingError(str(exc).splitlines()[0]) from None
        urls = {"http": server.http_url, "grpc": server.grpc_url, "metrics": f"{args.host}:{server.metrics_port}"}
        print(f"tritonserver ready: HTTP {urls['http']}, gRPC {urls['grpc']} (Ctrl-C stops it)", flush=True)
        if args.ready_file:
            _write_atomically(args.ready_file, json.dumps({**urls, "pid": os.getpid(), "restarts": 0}))
        supervise(server, args.max_restarts,
                  on_restart=lambda count: args.ready_file and _write_atomically(
                      args.ready_file, json.dumps({**urls, "pid": os.getpid(), "restarts": count})))
    except KeyboardInterrupt:
        print("stopping tritonserver", flush=True)
        server.stop()
        return 0
    finally:
        server.stop()
        if args.ready_file:
            args.ready_file.unlink(missing_ok=True)


def restart_delay(consecutive: int) -> float:
    """Exponential backoff between restarts: 0.5 s, 1 s, 2 s, ... at most RESTART_MAX_DELAY_S."""
    return min(RESTART_FIRST_DELAY_S * 2 ** consecutive, RESTART_MAX_DELAY_S)


def supervise(server: TritonServer, max_restarts: int, on_restart=lambda count: None) -> None:
    """Keep `server` up: when it exits on its own (a crash: one request can abort it), clean up
    after it and start it again on the same ports, with backoff. Gives up (ServingError) after
    `max_restarts` restarts in a row that did not stay up for STABLE_AFTER_S. Returns never."""
    restarts = consecutive = 0
    while True:
        ready_at = time.monotonic()
        code = server.process.wait()
        reason = server.first_error()
        server.stop()  # the rest of its process group, and its /dev/shm regions
        if time.monotonic() - ready_at >= STABLE_AFTER_S:
            consecutive = 0
        if consecutive >= max_restarts:
            raise ServingError(f"tritonserver exited with code {code} ({reason}) after {consecutive} restarts in a row: "
                               "giving up")
        delay = restart_delay(consecutive)
        restarts += 1
        consecutive += 1
        print(f"serve.py: tritonserver exited with code {code} ({reason}); restart {restarts} in {delay:.1f} s",
              flush=True)
        time.sleep(delay)
        try:
            server.start()
        except ServingError as exc:
            print(f"serve.py: restart {restarts} failed: {str(exc).splitlines()[0]}", flush=True)
            continue  # its process has exited: the next wait() returns at once
        print(f"serve.py: tritonserver ready again (restarts: {restarts})", flush=True)
        on_restart(restarts)


def _write_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    run_cli(main)
