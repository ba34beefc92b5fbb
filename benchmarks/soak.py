"""Soak: good and bad clients mixed for N seconds against serving/serve.py, with a crash injected.

Starts `serving/serve.py` (the supervised server) on a repository on 127.0.0.1, then runs
`--clients` threads for `--duration` seconds: most send good requests (a test list of
candidates, or top-K over all items), the rest send requests the server must reject
(unknown ids, empty or mismatched lists, top_k 0, float ids). At `--crash-at` seconds one
request with `"shape":[1000000000000]` aborts tritonserver 2.51 (std::bad_alloc), or with
`--inject kill` its process gets SIGKILL; serve.py restarts it. Good clients retry a
request that found the server unreachable (bounded by `--retry-for`). Prints the good
requests' success rate, the bad requests' rejection rate, restarts, and latency
percentiles; the plot shows each good request's latency over time. Exit 1 unless every
good request succeeded and every bad one was rejected.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


import numpy as np

from device import add_device_argument, require_device  # benchmarks/device.py
from serving import candidate_lists  # benchmarks/serving.py: a script's folder is sys.path[0]
from merlin_ncf.serving.errors import ServerUnavailable, ServingError
from merlin_ncf.errors import run_cli
from merlin_ncf.errors import OneLineArgumentParser

REPO_ROOT = Path(__file__).resolve().parent.parent
BAD_KINDS = ("unknown user", "unknown item", "empty items", "mismatched lengths", "top_k zero", "float ids")


@dataclass
class Tally:
    good_ok: int = 0
    good_failed: int = 0
    bad_rejected: int = 0
    bad_accepted: int = 0
    bad_unanswered: int = 0  # the server was unreachable for the whole retry window
    retries: int = 0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, latency ms) of good requests
    first_failure: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def latency(self, q: float) -> float:
        return float(np.percentile([ms for _, ms in self.samples], q)) if self.samples else float("nan")


def good_client(url: str, protocol: str, requests, top_k: int, stop_at: float, retry_for: float, tally: Tally,
                started: float, seed: int) -> None:
    from merlin_ncf.serving.client import RecommenderClient

    rng = np.random.default_rng(seed)
    with RecommenderClient(url, protocol, retry_for_s=retry_for, timeout_s=30) as client:
        while time.monotonic() < stop_at:
            user, items = requests[rng.integers(len(requests))]
            began = time.monotonic()
            try:
                if rng.random() < 0.5:
                    client.scores([user], items)
                else:
                    client.recommend(user, top_k=top_k)
            except ServingError as exc:
                with tally.lock:
                    tally.good_failed += 1
                    tally.first_failure = tally.first_failure or f"good request: {exc}"
                continue
            with tally.lock:
                tally.good_ok += 1
                tally.samples.append((began - started, (time.monotonic() - began) * 1e3))
        with tally.lock:
            tally.retries += client.retries


def bad_client(url: str, protocol: str, requests, stop_at: float, retry_for: float, tally: Tally, seed: int) -> None:
    from merlin_ncf.serving.client import RecommenderClient

    rng = np.random.default_rng(seed)
    with RecommenderClient(url, protocol, retry_for_s=retry_for, timeout_s=30) as client:
        while time.monotonic() < stop_at:
            user, items = requests[rng.integers(len(requests))]
            kind = BAD_KINDS[rng.integers(len(BAD_KINDS))]
            try:
                send_bad(client, kind, user, items)
            except ServerUnavailable:
                with tally.lock:
                    tally.bad_unanswered += 1
                continue
            except ServingError:
                with tally.lock:
                    tally.bad_rejected += 1
                continue
            with tally.lock:
                tally.bad_accepted += 1
                tally.first_failure = tally.first_failure or f"bad request accepted: {kind}"
        with tally.lock:
            tally.retries += client.retries


def send_bad(client, kind: str, user: int, items: np.ndarray) -> None:
    """One request the server must answer with an error (not a crash)."""
    if kind == "unknown user":
        client.scores([999_999_999], items)
    elif kind == "unknown item":
        client.scores([user], np.r_[items[:5], 999_999_999])
    elif kind == "empty items":
        client.scores([user], np.zeros(0, np.int64))
    elif kind == "mismatched lengths":
        client.scores([user, user], items[:3])
    elif kind == "top_k zero":
        tensors = {client.user_column: np.array([user], np.int64), "top_k": np.array([0], np.int32)}
        client._infer("recommend", tensors, ["top_item_id"])
    else:  # float ids: the typed client refuses to build them, so send them as FP32 tensors
        api = client._api
        tensors = []
        for name, array in ((client.user_column, np.array([user], np.int64)), (client.item_column, items.astype(np.float32))):
            tensor = api.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        try:
            client._client.infer("scores", tensors)
        except Exception as exc:
            raise client._describe(exc) from None


def crash_request(http_url: str) -> str:
    """The request that aborts tritonserver 2.51 over HTTP/JSON (issue 10, item 3)."""
    body = json.dumps({"inputs": [
        {"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]},
        {"name": "item_id", "shape": [1_000_000_000_000], "datatype": "INT64", "data": [1, 2, 3]},
    ]}).encode()
    request = urllib.request.Request(f"http://{http_url}/v2/models/scores/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return f"answered {response.status} (no crash)"
    except Exception as exc:
        return f"connection dropped ({type(exc).__name__})"


def server_pid(serve_pid: int) -> int | None:
    """The tritonserver child of serve.py (found in /proc)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{serve_pid}\n" in text and b"tritonserver" in cmdline:
            return int(status.parent.name)
    return None


def wait_ready(process: subprocess.Popen, ready: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if process.poll() is not None:
            raise ServingError(f"serve.py exited with code {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise ServingError(f"serve.py not ready after {timeout_s:.0f} s")
        time.sleep(0.2)
    return json.loads(ready.read_text())


def plot(tally: Tally, crash_s: float | None, restart_s: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(9, 4))
    if tally.samples:
        t, ms = np.array(tally.samples).T
        axis.scatter(t, ms, s=2, alpha=0.4, label="good request (incl. retries)")
    if crash_s is not None:
        axis.axvline(crash_s, color="red", linestyle="--", label="crash injected")
    for i, s in enumerate(restart_s):
        axis.axvline(s, color="green", linestyle=":", label="server ready again" if i == 0 else None)
    axis.set_yscale("log")
    axis.set_xlabel("seconds")
    axis.set_ylabel("latency (ms)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="soak")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console(width=100, force_terminal=False).print(table)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="ETL output directory (requests come from its test lists)")
    parser.add_argument("--repository", required=True, type=Path, help="a model repository of --data (serving/export.py)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--bad-clients", type=int, default=8, help="how many of them send bad requests (default 8)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="protocol of the clients (default http)")
    parser.add_argument("--inject", choices=("crash-request", "kill", "none"), default="crash-request",
                        help="the fault: the request that aborts the server (default), SIGKILL of tritonserver, or none")
    parser.add_argument("--crash-at", type=float, default=20.0, help="seconds into the load to inject it (default 20)")
    parser.add_argument("--retry-for", type=float, default=60.0,
                        help="seconds a client keeps retrying a request while the server is unreachable (default 60)")
    parser.add_argument("--top-k", type=int, default=10, help="K of the top-K requests (default 10)")
    add_device_argument(parser, help="cpu (the Triton steps are CPU instance groups; cuda is refused with one line)")
    parser.add_argument("--plot", type=Path, help="write the good requests' latency over time to this PNG")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    require_device(args.device, "serving")
    if not 0 <= args.bad_clients < args.clients:
        raise ServingError("--bad-clients must be >= 0 and leave at least one good client")
    if args.duration <= 0 or args.retry_for < 0:
        raise ServingError("--duration must be > 0 and --retry-for >= 0")
    from merlin_ncf.feature_spec import FeatureSpec, FeatureSpecError

    try:
        requests = candidate_lists(FeatureSpec.load(args.data), 500, args.seed)
    except FeatureSpecError as exc:
        raise ServingError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="merlin-ncf-soak-") as scratch:
        ready = Path(scratch) / "ready.json"
        log = open(Path(scratch) / "serve.log", "w+")
        serve = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "serving" / "serve.py"), "--repository", str(args.repository),
             "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        try:
            print("starting serving/serve.py ...", file=sys.stderr, flush=True)
            urls = wait_ready(serve, ready, 300)
            tally, crash_s, restart_s = run(args, urls, requests, serve, ready)
            restarts = json.loads(ready.read_text())["restarts"] if ready.exists() else -1
        finally:
            if serve.poll() is None:
                serve.send_signal(signal.SIGTERM)
                try:
                    serve.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    serve.kill()
                    serve.wait()
            log.seek(0)
            events = [line.strip() for line in log if line.startswith("serve.py:")]
            log.close()
    good = tally.good_ok + tally.good_failed
    bad = tally.bad_rejected + tally.bad_accepted
    rows = [
        ("clients (good + bad)", f"{args.clients - args.bad_clients} + {args.bad_clients} ({args.protocol})"),
        ("duration", f"{args.duration:.0f} s"),
        ("fault injected", f"{args.inject} at {crash_s:.1f} s" if crash_s is not None else "none"),
        ("good requests", f"{good}"),
        ("good success rate", f"{100 * tally.good_ok / good:.3f} %" if good else "n/a"),
        ("bad requests answered", f"{bad} (+{tally.bad_unanswered} unanswered)"),
        ("bad rejection rate", f"{100 * tally.bad_rejected / bad:.3f} %" if bad else "n/a"),
        ("server restarts", f"{restarts}"),
        ("fault to ready again", f"{restart_s[0] - crash_s:.1f} s" if crash_s is not None and restart_s else "n/a"),
        ("requests retried", f"{tally.retries}"),
        ("good p50 / p99 / max latency", f"{tally.latency(50):.1f} / {tally.latency(99):.1f} / {tally.latency(100):.0f} ms"),
        ("good requests/s", f"{tally.good_ok / args.duration:.0f}"),
    ]
    print_table(rows)
    for line in events:
        print(line)
    if tally.first_failure:
        print(f"first failure: {tally.first_failure}")
    if args.plot:
        plot(tally, crash_s, restart_s, args.plot)
        print(f"plot: {args.plot}")
    return 0 if good and tally.good_failed == 0 and tally.bad_accepted == 0 else 1


def run(args, urls: dict, requests, serve: subprocess.Popen, ready: Path):
    """The load itself; returns the tally, when the fault was injected, and when the server was back."""
    tally = Tally()
    started = time.monotonic()
    stop_at = started + args.duration
    url = urls[args.protocol]
    threads = []
    for i in range(args.clients):
        if i < args.bad_clients:
            target, extra = bad_client, (url, args.protocol, requests, stop_at, args.retry_for, tally, 1000 + i)
        else:
            target, extra = good_client, (url, args.protocol, requests, args.top_k, stop_at, args.retry_for, tally,
                                          started, i)
        threads.append(threading.Thread(target=target, args=extra, daemon=True))
    for thread in threads:
        thread.start()
    crash_s, restart_s, seen_restarts = None, [], 0
    # Past the load's end, keep watching while clients finish requests still waiting on a
    # restart (bounded: each gives up after --retry-for).
    give_up_at = stop_at + args.retry_for + 60
    while time.monotonic() < give_up_at and (time.monotonic() < stop_at or any(t.is_alive() for t in threads)):
        now = time.monotonic() - started
        if crash_s is None and args.inject != "none" and args.crash_at <= now < args.duration:
            crash_s = now
            if args.inject == "crash-request":
                outcome = crash_request(urls["http"])
            else:
                pid = server_pid(serve.pid)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                outcome = f"SIGKILL to tritonserver pid {pid}"
            print(f"{now:.1f} s: injected {args.inject}: {outcome}", file=sys.stderr, flush=True)
        try:
            restarts = json.loads(ready.read_text())["restarts"]
        except (OSError, ValueError, KeyError):
            restarts = seen_restarts
        if restarts > seen_restarts:
            restart_s.append(now)
            seen_restarts = restarts
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=1)
    return tally, crash_s, restart_s


if __name__ == "__main__":
    run_cli(main)
