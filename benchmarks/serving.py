"""Serving latency and throughput: the Triton ensemble against in-process scoring.

Exports the run (python flavour) to a temporary repository, starts a real tritonserver on
127.0.0.1, and sends a bounded number of requests with 1, 8 and 32 concurrent clients
(threads, one connection each), over HTTP and gRPC: 101 candidates per request (the test
lists of the evaluation protocol, as raw ids) and top-K over all items. The same requests
are scored in-process (workflow encoding + TorchScript: model.pt's pairs, the catalogue
scorer, NVTabular's pandas path), interleaved with the served ones cell by cell. Prints
p50/p95/p99 latency, requests/s and errors, each server step's cost per request (Triton's
statistics) and the load average; clients and server share this machine's cores."""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


import numpy as np
import pandas as pd

from device import add_device_argument, require_device  # benchmarks/device.py
from merlin_ncf.errors import run_cli
from merlin_ncf.serving.errors import ServingError
from merlin_ncf.workflows.cluster import quiet_merlin
from merlin_ncf.feature_spec import FeatureSpec

WORKLOADS = (("candidates", "test lists"), ("all-items", "top-K of every item"))
TARGETS = ("triton", "in-process", "in-process-catalogue", "in-process-pandas")
Request = tuple[int, "np.ndarray | None"]  # (raw user, raw candidates or None for every item)


@dataclass
class Measurement:
    target: str
    workload: str
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    wall_s: float = 0.0
    steps: dict[str, "StepCost"] = field(default_factory=dict)  # Triton targets: per model of the repository

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s else float("nan")


@dataclass
class StepCost:
    """One model's share of a run, from Triton's statistics: microseconds per request."""
    requests: int
    total_us: float  # request in to response out: queue + compute for a step, end to end for an ensemble
    queue_us: float


def step_statistics(url: str, protocol: str) -> dict[str, dict[str, int]]:
    """Triton's cumulative per-model counters: successful requests and nanoseconds per phase."""
    if protocol == "http":
        import tritonclient.http as api

        options = {}
    else:
        import tritonclient.grpc as api

        options = {"as_json": True}
    client = api.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(**options)
    finally:
        client.close()
    counters = {}
    for model in stats["model_stats"]:
        phases = model["inference_stats"]
        counters[model["name"]] = {"requests": int(phases["success"].get("count", 0)),
                                   **{phase: int(phases[phase].get("ns", 0)) for phase in STEP_PHASES}}
    return counters


STEP_PHASES = ("success", "queue")


def step_costs(before: dict, after: dict) -> dict[str, StepCost]:
    costs = {}
    for name, end in after.items():
        start = before.get(name, dict.fromkeys(end, 0))
        requests = end["requests"] - start["requests"]
        if requests > 0:
            costs[name] = StepCost(requests, *((end[phase] - start[phase]) / requests / 1e3 for phase in STEP_PHASES))
    return costs


def run_load(target: str, workload: str, connect: Callable[[], Callable[[Request], object]],
             requests: list[Request], concurrency: int, warmup: int) -> Measurement:
    """Send `requests` from `concurrency` threads, each with its own connection from `connect`."""
    from merlin_ncf.progress import progress_bar

    result = Measurement(target, workload, concurrency)
    progress = progress_bar(total=len(requests), desc=f"{target}, {workload}, {concurrency} clients", unit="req",
                            leave=False, mininterval=0.5)
    lock = threading.Lock()
    shares = [requests[i::concurrency] for i in range(concurrency)]
    start_line = threading.Barrier(concurrency + 1)

    def worker(share: list[Request]) -> None:
        call = connect()
        for request in share[:warmup]:
            _attempt(call, request)
        start_line.wait()
        for request in share:
            began = time.perf_counter()
            error = _attempt(call, request)
            elapsed = (time.perf_counter() - began) * 1e3
            with lock:
                if error is None:
                    result.latencies_ms.append(elapsed)
                else:
                    result.errors += 1
                    result.first_error = result.first_error or error
                progress.update()
        close = getattr(call, "close", None)
        if close:
            close()

    threads = [threading.Thread(target=worker, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - began
    progress.close()
    return result


def _attempt(call, request: Request) -> str | None:
    try:
        call(request)
        return None
    except Exception as exc:  # counted, not fatal: the benchmark reports failed requests
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --- workloads -------------------------------------------------------------------------------------


def candidate_lists(spec: FeatureSpec, count: int, seed: int) -> list[Request]:
    """The test split's candidate lists (positive + sampled negatives), decoded to raw ids."""
    test = pd.concat(pd.read_parquet(f) for f in spec.files("test"))
    per_user = spec.test_samples_per_series
    items = pd.read_parquet(spec.path("item_table"))
    raw_item = pd.Series(items.raw_item_id.to_numpy(), index=items.item_id.to_numpy())
    workflow_dir = spec.path("workflow")
    users = pd.read_parquet(workflow_dir / "categories" / f"unique.{spec.user_feature}.parquet")
    raw_user = pd.Series(users[spec.user_feature].to_numpy(), index=users.index.to_numpy())
    lists = len(test) // per_user
    rng = np.random.default_rng(seed)
    chosen = rng.choice(lists, size=count, replace=lists < count)
    requests = []
    for index in chosen:
        rows = test.iloc[index * per_user:(index + 1) * per_user]
        requests.append((int(raw_user[rows[spec.user_feature].iloc[0]]), raw_item[rows[spec.item_feature].to_numpy()].to_numpy()))
    return requests


def all_items_requests(candidates: list[Request]) -> list[Request]:
    return [(user, None) for user, _ in candidates]


# --- targets -----------------------------------------------------------------------------------------


def served(url: str, protocol: str, top_k: int) -> Callable[[], Callable[[Request], object]]:
    from merlin_ncf.serving.client import RecommenderClient

    def connect():
        client = RecommenderClient(url, protocol)

        def call(request: Request):
            user, items = request
            if items is None:
                return client.recommend(user, top_k=top_k)
            return client.scores([user], items)

        call.close = client.close
        return call

    return connect


def in_process(repository: Path, compiled: bool, top_k: int, catalogue: bool = False) -> Callable[[], Callable[[Request], object]]:
    """The exported workflow step's encoding and the TorchScript, called directly: model.pt
    scoring (user, item) pairs, or with `catalogue` the model step's catalogue.pt ranking every
    item in one pass (serving/catalogue.py), as the server's model step does."""
    import torch

    from merlin_ncf.serving.checks import load_request_encoder
    from merlin_ncf.serving.names import CATALOGUE_FILE, MODEL_STEP
    from merlin_ncf.serving.repository import VERSION
    from merlin_ncf.serving.triton_models.ranking import best_first

    encoder = load_request_encoder(repository, compiled=compiled)
    step = repository / MODEL_STEP / VERSION
    model = torch.jit.load(str(step / "model.pt"), map_location="cpu").eval()
    every_item = torch.jit.load(str(step / CATALOGUE_FILE), map_location="cpu").eval() if catalogue else None
    torch.set_num_threads(1)  # as the server's model step: concurrency comes from the clients

    def connect():
        def call(request: Request):
            user, items = request
            users, encoded_items, raw_items = encoder.encode(np.array([user]), items)
            with torch.inference_mode():
                if every_item is not None and items is None:
                    scores = every_item(torch.from_numpy(users[:1]))[torch.from_numpy(encoded_items)].numpy()
                else:
                    scores = model(torch.from_numpy(users), torch.from_numpy(encoded_items)).numpy()
            if items is None:
                if every_item is not None:
                    return raw_items[best_first(raw_items, scores, top_k)]
                return raw_items[np.argsort(-scores, kind="stable")[:top_k]]
            return scores

        return call

    return connect


# --- report ------------------------------------------------------------------------------------------


def print_table(results: list[Measurement]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="serving latency (ms) and throughput")
    for column in ("target", "workload", "clients", "requests", "p50", "p95", "p99", "req/s", "errors"):
        table.add_column(column, justify="left" if column in ("target", "workload") else "right")
    for r in results:
        table.add_row(r.target, r.workload, str(r.concurrency), str(len(r.latencies_ms) + r.errors),
                      f"{r.percentile(50):.2f}", f"{r.percentile(95):.2f}", f"{r.percentile(99):.2f}",
                      f"{r.requests_per_s:.0f}", str(r.errors))
    Console(width=120).print(table)
    for r in results:
        if r.errors:
            print(f"{r.target} {r.workload} x{r.concurrency}: first error: {r.first_error}")


def print_step_table(results: list[Measurement]) -> None:
    """Where a served request's time goes: each step's queue and compute time per request."""
    from rich.console import Console
    from rich.table import Table

    rows = [r for r in results if r.steps]
    if not rows:
        return
    names = list(dict.fromkeys(name for r in rows for name in r.steps))
    table = Table(title="per-step cost on the server: us per request, in queue (us) for steps; ensembles end to end")
    for column in ("target", "workload", "clients", *names):
        table.add_column(column, justify="left" if column in ("target", "workload") else "right")
    for r in rows:
        cells = [f"{r.steps[n].total_us:.0f} ({r.steps[n].queue_us:.0f})" if n in r.steps else "" for n in names]
        table.add_row(r.target, r.workload, str(r.concurrency), *cells)
    Console(width=160).print(table)


def plot(results: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (target, workload) in dict.fromkeys((r.target, r.workload) for r in results):
        rows = [r for r in results if r.target == target and r.workload == workload]
        clients = [r.concurrency for r in rows]
        axes[0].plot(clients, [r.percentile(99) for r in rows], marker="o", label=f"{target}, {workload}")
        axes[1].plot(clients, [r.requests_per_s for r in rows], marker="o", label=f"{target}, {workload}")
    concurrency = sorted({r.concurrency for r in results})
    for axis, label in zip(axes, ("p99 latency (ms)", "requests/s")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrency, [str(c) for c in concurrency])
        axis.set_yscale("log")
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- command line ------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="ETL output directory")
    parser.add_argument("--run", type=Path, help="training run directory (holds model.ts), exported to a temporary repository")
    parser.add_argument("--repository", type=Path, help="an existing export of --data to serve instead of --run")
    parser.add_argument("--http-url", help="with --repository: benchmark this running server's HTTP endpoint instead of starting one")
    parser.add_argument("--grpc-url", help="with --repository: benchmark this running server's gRPC endpoint instead of starting one")
    parser.add_argument("--requests", type=int, default=1000, help="requests per (target, workload, concurrency) (default 1000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (default 1 8 32)")
    parser.add_argument("--protocols", nargs="+", choices=("http", "grpc"), default=["http", "grpc"], help="protocols (default both)")
    parser.add_argument("--top-k", type=int, default=10, help="K for the top-K-over-all-items workload (default 10)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests per client first (default 10)")
    parser.add_argument("--instances", type=int, default=1, help="instances of the workflow and model steps when exporting (default 1)")
    parser.add_argument("--plot", type=Path, help="write p99 latency and requests/s against clients to this PNG")
    parser.add_argument("--seed", type=int, default=0, help="which test lists to send (default 0)")
    add_device_argument(parser, help="cpu (the Triton steps are CPU instance groups; cuda is refused with one line)")
    parser.add_argument("--workloads", nargs="+", choices=[kind for kind, _ in WORKLOADS], default=[kind for kind, _ in WORKLOADS],
                        help="candidates: the test lists (101 raw ids each); all-items: top-K over every item (default both)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                        help="triton: the served ensemble; in-process: workflow encoding + model.pt pairs; "
                        "in-process-catalogue: + catalogue.pt for all items (NeuMF family); in-process-pandas: "
                        "NVTabular's pandas Workflow path for the encoding (default all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    require_device(args.device, "serving")
    quiet_merlin()
    from merlin_ncf.serving.export import export
    from merlin_ncf.serving.serve import TritonServer
    from merlin_ncf.feature_spec import FeatureSpecError

    if (args.run is None) == (args.repository is None):
        raise ServingError("pass either --run (exported here) or --repository (an existing export)")
    if (args.http_url or args.grpc_url) and args.repository is None:
        raise ServingError("--http-url/--grpc-url need the --repository that server serves")
    try:
        spec = FeatureSpec.load(args.data)
        candidates = candidate_lists(spec, args.requests, args.seed)
    except FeatureSpecError as exc:
        raise ServingError(str(exc)) from None
    workloads = {f"{spec.test_samples_per_series} candidates": candidates,
                 f"top-{args.top_k} of all items": all_items_requests(candidates)}
    workloads = {name: requests for (kind, _), (name, requests) in zip(WORKLOADS, workloads.items()) if kind in args.workloads}
    results: list[Measurement] = []
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    def measure(targets: dict) -> None:
        # Interleaved: every target runs each (workload, clients) cell before the next cell.
        for workload, requests in workloads.items():
            for clients in args.concurrency:
                for target, (connect, statistics) in targets.items():
                    before = statistics() if statistics else {}
                    results.append(run_load(target, workload, connect, requests, clients, args.warmup))
                    if statistics:
                        results[-1].steps = step_costs(before, statistics())

    def in_process_targets() -> dict:
        targets = {}
        if "in-process" in args.targets:
            targets["in-process, compiled ops"] = (in_process(repository, compiled=True, top_k=args.top_k), None)
        if "in-process-catalogue" in args.targets and (repository / "model" / "1" / "catalogue.pt").is_file():
            targets["in-process, catalogue"] = (in_process(repository, True, args.top_k, catalogue=True), None)
        if "in-process-pandas" in args.targets:
            targets["in-process, Workflow pandas"] = (in_process(repository, compiled=False, top_k=args.top_k), None)
        return targets

    def triton_targets(urls: dict[str, str]) -> dict:
        if "triton" not in args.targets:
            return {}
        return {f"triton {protocol}": (served(url, protocol, args.top_k), lambda u=url, p=protocol: step_statistics(u, p))
                for protocol, url in urls.items() if url and protocol in args.protocols}

    with tempfile.TemporaryDirectory() as scratch:
        repository = args.repository
        if repository is None:
            repository = Path(scratch) / "repo"
            export(args.data, args.run, repository, flavour="python", top_k=args.top_k, instances=args.instances,
                   log=lambda *_: None)
        if args.http_url or args.grpc_url or "triton" not in args.targets:  # a server already serving this repository
            measure({**triton_targets({"http": args.http_url, "grpc": args.grpc_url}), **in_process_targets()})
        else:
            with TritonServer(repository) as server:
                measure({**triton_targets({"http": server.http_url, "grpc": server.grpc_url}), **in_process_targets()})
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table(results)
    print_step_table(results)
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    run_cli(main)
