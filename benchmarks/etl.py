"""ETL benchmark: wall time per phase, rows/s and peak memory at growing sizes, beside its peer.

Generates ml-20m-shaped synthetic logs (users and items scaled from ml-20m's 138,493 x 26,744)
once into --data-dir, runs `workflows/etl.py` on each as a user would (a fresh process) and,
on the same file, the plain-pandas script doing the same job (benchmarks/etl_pandas_reference.py),
samples the resident memory of each process tree, and prints one table with the ratio.

    python benchmarks/etl.py                      # 1M, 5M, 20M interactions
    python benchmarks/etl.py --sizes 1M 5M --workers 2 --plot etl-benchmark.png
    python benchmarks/etl.py --sizes 2M 20M 50M --tile 2M --peer-max-rows 20M --data-dir /tmp/etl
    python benchmarks/etl.py --sizes 20M --jobs test test+validation
    python benchmarks/etl.py --sizes 20M --etl-args='--partition-size 64MB'

Each --jobs entry is one job done by both, interleaved: "test" (test lists only: ours with
--no-validation, the peer as written) and "test+validation" (ours by default, the peer with
--validation), so that every ratio compares the same job.

The "load avg" column is the machine's 1-minute load average during the run: on a shared
machine other jobs inflate the times, so compare rows with similar load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

from device import add_device_argument, require_device  # noqa: E402 - benchmarks/device.py
from merlin_ncf.errors import DefaultsHelpFormatter, OneLineArgumentParser, run_cli  # noqa: E402

ML20M_ROWS, ML20M_USERS, ML20M_ITEMS = 20_000_263, 138_493, 26_744
PHASES = ("read", "filter", "encode", "split", "negatives", "write")


def parse_size(text: str) -> int:
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1].upper(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500K, 5M, 20000000)") from None


def shape(rows: int) -> tuple[int, int]:
    """ml-20m's users per row, and items growing with the square root of the size."""
    fraction = rows / ML20M_ROWS
    return max(100, round(ML20M_USERS * fraction)), max(1_000, round(ML20M_ITEMS * math.sqrt(fraction)))


class PeakMemory:
    """Peak resident set size of a process tree, and the machine's load average meanwhile
    (other jobs on a shared machine inflate the times), sampled in a background thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for proc in procs:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self.peak = max(self.peak, total)
                self.loads.append(os.getloadavg()[0])
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def ensure_data(rows: int, data_dir: Path, seed: int, tile: int = 0) -> Path:
    """The synthetic log of `rows` interactions, generated once into data_dir. Above `tile` rows
    (when given), copies of the `tile`-row log with disjoint user ids, written in chunks: the
    generator's planted structure costs minutes per 20M rows, tiling seconds."""
    if tile and rows > tile:
        return tiled(rows, ensure_data(tile, data_dir, seed), data_dir / f"tiled-{rows}-from-{tile}-s{seed}")
    users, items = shape(rows)
    target = data_dir / f"synthetic-{rows}-{users}x{items}-s{seed}"
    if not (target / "ratings.csv").is_file():
        print(f"generating {rows:,} interactions ({users:,} users, {items:,} items) in {target}", flush=True)
        subprocess.run([sys.executable, str(REPO / "workflows/synthetic.py"), "--output", str(target),
                        "--interactions", str(rows), "--users", str(users), "--items", str(items),
                        "--format", "ml-20m", "--seed", str(seed), "--quiet"], check=True)
    return target


def tiled(rows: int, source: Path, target: Path) -> Path:
    """`rows` interactions: `source`'s ratings.csv repeated, each copy's user ids shifted past the
    previous copy's (so users grow with rows, items stay), timestamps unchanged."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    if (target / "ratings.csv").is_file():
        return target
    print(f"tiling {source.name} to {rows:,} interactions in {target}", flush=True)
    table = pacsv.read_csv(source / "ratings.csv")
    shift = pc.max(table["userId"]).as_py()
    target.mkdir(parents=True, exist_ok=True)
    partial = target / "ratings.csv.partial"
    with pa.OSFile(str(partial), "wb") as sink:
        sink.write(b"userId,movieId,rating,timestamp\n")
        written, copy = 0, 0
        while written < rows:
            piece = table.slice(0, rows - written)
            piece = piece.set_column(0, "userId", pc.add(piece["userId"], copy * shift))
            pacsv.write_csv(piece, sink, write_options=pacsv.WriteOptions(include_header=False))
            written, copy = written + len(piece), copy + 1
    partial.rename(target / "ratings.csv")
    return target


def measured(command: list[str], what: str) -> tuple[str, float, int, float]:
    """Run a command; its stdout, wall seconds, peak RSS of its process tree and the mean load."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(process.pid)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    peak = memory.stop()
    if process.returncode != 0:
        raise SystemExit(f"{what} failed: {stderr.strip().splitlines()[-1] if stderr.strip() else process.returncode}")
    return stdout, wall, peak, sum(memory.loads) / max(1, len(memory.loads))


JOBS = ("test", "test+validation")


def run_etl(raw: Path, output: Path, extra: list[str], job: str) -> dict:
    extra = [*extra, *(["--no-validation"] if job == "test" else [])]
    _, wall, peak, load = measured([sys.executable, str(REPO / "workflows/etl.py"), "--input", str(raw),
                                    "--output", str(output), "--quiet", *extra], f"etl on {raw}")
    stats = json.loads((output / "stats.json").read_text())
    return {"name": "merlin-ncf ETL", "job": job, "rows": stats["interactions"], "users": stats["users"],
            "items": stats["items"], "seconds": stats["seconds"], "wall": wall, "peak_rss": peak, "load": load}


def run_reference(raw: Path, output: Path, job: str) -> dict:
    """The plain-pandas peer on the same ratings.csv, doing `job`."""
    stdout, wall, peak, load = measured([sys.executable, str(REPO / "benchmarks/etl_pandas_reference.py"),
                                         "--input", str(raw / "ratings.csv"), "--output", str(output),
                                         *(["--validation"] if job == "test+validation" else [])],
                                        f"pandas reference on {raw}")
    stats = json.loads(stdout.strip().splitlines()[-1])
    return {"name": "pandas reference", "job": job, "rows": stats["rows"], "seconds": stats["seconds"], "wall": wall,
            "peak_rss": peak, "load": load}


def table(results: list[dict]) -> str:
    """One row per run; the peer's row carries our time and memory as multiples of its own."""
    header = ["rows", "job", *PHASES, "total", "process wall", "rows/s", "peak RSS", "ours / peer (time, memory)",
              "load avg"]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|" + "---:|" * (len(header) - 2)]
    for ours, peer in results:
        for r in (ours, peer) if peer else (ours,):
            ratio = (f"{ours['wall'] / r['wall']:.2f}x, {ours['peak_rss'] / max(r['peak_rss'], 1):.2f}x"
                     if r is peer else "")
            cells = [f"{r['rows']:,}", f"{r['name']}: {r['job']}", *(f"{r['seconds'].get(p, 0):.1f} s" for p in PHASES),
                     f"{r['seconds']['total']:.1f} s", f"{r['wall']:.1f} s", f"{r['rows'] / r['wall']:,.0f}",
                     f"{r['peak_rss'] / 2**30:.2f} GiB", ratio, f"{r['load']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for pair in results for run in pair if run]
    labels = [f"{r['rows'] / 1e6:g}M {'+val' if r['job'] != 'test' else ''}\n"
              f"{'ours' if r['name'].startswith('merlin') else 'pandas'}" for r in runs]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4))
    bottom = [0.0] * len(runs)
    for phase in PHASES:
        values = [r["seconds"].get(phase, 0) for r in runs]
        left.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set(ylabel="seconds", title="ETL time per phase: ours beside plain pandas")
    left.legend()
    ours_runs = [ours for ours, _ in results]
    peer_runs = [peer for _, peer in results if peer]
    for axis, key, scale, title in ((middle, "wall", 1, "process wall time (s)"),
                                    (right, "peak_rss", 2**30, "peak RSS, process tree (GiB)")):
        for job in dict.fromkeys(r["job"] for r in ours_runs):
            for runs_, marker, who in ((ours_runs, "o", "ours"), (peer_runs, "s", "pandas reference")):
                these = [r for r in runs_ if r["job"] == job]
                if these:
                    axis.plot([r["rows"] / 1e6 for r in these], [r[key] / scale for r in these], marker=marker,
                              label=f"{who}: {job}")
        axis.legend()
        axis.set(xlabel="million interactions", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[1_000_000, 5_000_000, 20_000_000],
                        help="interaction counts to run (suffixes K and M allowed)")
    parser.add_argument("--data-dir", type=Path,
                        help="where the synthetic inputs are generated once and reused (default: a new private "
                             "temporary directory, removed at the end)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    add_device_argument(parser, help="device of etl.py: cpu, or cuda (cuDF on a CUDA GPU)")
    parser.add_argument("--workers", type=int, default=0, help="passed to etl.py --workers (0 = in-process)")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=["test+validation"],
                        help="jobs done by both: test lists only (ours --no-validation), or test and validation "
                             "lists (the peer --validation)")
    parser.add_argument("--etl-args",
                        help="extra etl.py options, one string (e.g. '--partition-size 64MB')")
    parser.add_argument("--peer-max-rows", type=parse_size, default=20_000_000,
                        help="run the pandas peer only up to this size (above it: ours alone, the growth check)")
    parser.add_argument("--tile", type=parse_size, default=20_000_000,
                        help="sizes above this are tiled from the log of this size (0: generate every size)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per size; the fastest is reported (the others only absorb noise)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="also plot time per phase and peak memory to this PNG")
    args = parser.parse_args(argv)
    args.device = require_device(args.device, "etl")  # the ETL stage calls cuda "gpu"

    scratch = None if args.data_dir else Path(tempfile.mkdtemp(prefix="merlin-ncf-bench-"))  # private, 0700
    data_dir = args.data_dir or scratch
    results = []
    try:
        for rows in args.sizes:
            raw = ensure_data(rows, data_dir, args.seed, args.tile)
            output = Path(tempfile.mkdtemp(prefix="etl-", dir=data_dir))
            with_peer = rows <= args.peer_max_rows
            for job in args.jobs:
                print(f"ETL{' and its pandas peer' if with_peer else ''} on {rows:,} interactions, {job} ...",
                      flush=True)
                ours, peer = [], []
                for _ in range(max(1, args.repeat)):
                    shutil.rmtree(output, ignore_errors=True)
                    ours.append(run_etl(raw, output, ["--device", args.device, "--workers", str(args.workers),
                                                      *(args.etl_args or "").split()], job))
                    if with_peer:
                        shutil.rmtree(output, ignore_errors=True)
                        peer.append(run_reference(raw, output, job))
                shutil.rmtree(output, ignore_errors=True)
                results.append((min(ours, key=lambda r: r["wall"]),
                                min(peer, key=lambda r: r["wall"]) if peer else None))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nETL benchmark ({args.device}, workers={args.workers}{', ' + args.etl_args if args.etl_args else ''}, "
          f"{psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM)\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    run_cli(main)
