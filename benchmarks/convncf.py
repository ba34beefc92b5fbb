"""ConvNCF: our training epoch against RecBole 1.2.1's at the same settings, side by side, plus
the test metrics of both after equal epochs and our full-catalogue ranking of every test user.

    flock /work/bench.lock .venv/bin/python benchmarks/convncf.py --data ETL_DIR \
        [--epochs 2] [--threads 1] [--precisions fp32 bf16] [--repeats 3] [--out DIR]

Settings are RecBole's ConvNCF defaults on both sides: embeddings 64, four convolutions of 32
channels with kernels = strides 4, 4, 2, 2, dropout 0.2, L2 weights 0.1 / 0.1, BPR with one
uniform negative redrawn when it is one of the user's training items (RecBole's sampler; ours:
--negative-sampling exclude-seen), the whole train set shuffled each epoch, Adam lr 1e-3, 2,048
triples per step, the same torch threads. Each repeat runs RecBole (benchmarks/recbole_baseline.py
in .venv-recbole, fp32), then ours (train_ncf.py) in each --precisions (fp32; bf16: --amp's
autocast), all at seed --seed + repeat, each training --epochs epochs on our exact train
positives. RecBole is not deterministic at a fixed seed and ours is, so repeats are what give
either side's HR@10 a spread. An epoch's seconds are its training pass only (negative sampling
included, evaluation not). Both are scored by models/ranking.py on our test lists (sampled
HR@K / NDCG@K); ours also ranks every test user against the whole catalogue (full Recall@K /
NDCG@K) in train_ncf.py's final evaluation, timed here. RecBole's full ranking (its forward
builds every pair's 64 x 64 map) would take hours and is skipped.
Writes convncf.json and convncf.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from device import add_device_argument, require_device  # benchmarks/device.py

REPO = Path(__file__).resolve().parents[1]
STACK = ["--embedding-size", "64", "--cnn-channels", "32", "32", "32", "32", "--cnn-kernels", "4", "4", "2", "2",
         "--cnn-strides", "4", "4", "2", "2", "--dropout", "0.2", "--reg-weights", "0.1", "0.1"]
TRIPLES = 2048  # RecBole's train_batch_size: (user, positive, negative) triples per step


PRECISIONS = {"fp32": [], "bf16": ["--amp"]}  # ours: train_ncf.py's flags per precision
METRICS = ("hr@10", "ndcg@10", "full_recall@10", "full_ndcg@10")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="ETL output directory (ml-latest-small's)")
    p.add_argument("--epochs", type=int, default=2, help="epochs each side trains (default 2)")
    # the same count on both sides is a fair pair; RecBole gains more from a second thread than
    # ours (docs/benchmarks.md: 6.7x at 2 threads in fp32, 8.9x at 1), so quote the count
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    p.add_argument("--seed", type=int, default=2020, help="seed of the first repeat, both sides (default 2020)")
    p.add_argument("--repeats", type=int, default=1, help="runs of every row, seeds --seed, --seed + 1, ... (default 1)")
    p.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"],
                   help="ours' rows: fp32, and bf16 autocast (--amp) (default both)")
    p.add_argument("--out", type=Path, default=Path("/tmp/merlin-ncf-convncf-bench"),
                   help="runs, convncf.json and convncf.png go here")
    p.add_argument("--recbole-python", type=Path, default=REPO / ".venv-recbole" / "bin" / "python",
                   help="RecBole's interpreter (make recbole-venv)")
    add_device_argument(p, help="where both sides train: cpu, or cuda (needs a CUDA GPU)")
    args = p.parse_args(argv)
    require_device(args.device)
    args.precisions = list(dict.fromkeys(args.precisions))  # a row per precision, however often named
    if args.epochs < 1 or args.repeats < 1 or args.threads < 1:
        print("convncf.py: error: --epochs, --repeats and --threads must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    if not args.recbole_python.exists():
        print(f"convncf.py: error: {args.recbole_python} not found: run `make recbole-venv`", file=sys.stderr)
        raise SystemExit(2)
    return args


def train_ours(args, name: str, seed: int, *extra: str) -> dict:
    """train_ncf.py as users run it; its final evaluation (sampled test lists, then every test
    user ranked against the whole catalogue, then the export) is timed from the last epoch's
    line to the process' exit."""
    out = args.out / name
    command = [sys.executable, str(REPO / "models" / "train_ncf.py"), "--data", str(args.data), "--output", str(out),
               "--force", "--model", "convncf", *STACK, "--batch-size", str(2 * TRIPLES), "--lr", "0.001",
               "--beta1", "0.9", "--beta2", "0.999", "--negative-sampling", "exclude-seen",
               # all train files in one shuffled chunk, as RecBole shuffles the whole set: the ETL's
               # files hold disjoint users, so one file a chunk trains half the users, then the rest
               "--parts-per-chunk", "64", "--epochs", str(args.epochs),
               "--patience", "0", "--threads", str(args.threads), "--seed", str(seed), "--no-progress",
               "--device", args.device, *extra]
    last_epoch = None
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            if line.startswith("epoch "):
                last_epoch = time.perf_counter()
    if process.returncode != 0 or last_epoch is None:
        raise SystemExit(f"convncf.py: error: {' '.join(command)} failed")
    final_s = time.perf_counter() - last_epoch
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"run": str(out), "epoch_seconds": [row["train_samples"] / row["train_samples_per_s"] for row in log],
            "final_evaluation_s": final_s, "test": json.loads((out / "config.json").read_text())["metrics"]}


def train_recbole(args, seed: int) -> dict:
    out = args.out / f"recbole-{seed}.json"
    subprocess.run([str(args.recbole_python), str(REPO / "benchmarks" / "recbole_baseline.py"), "--data", str(args.data),
                    "--model", "ConvNCF", "--epochs", str(args.epochs), "--no-validation", "--no-full",
                    "--batch-size", str(TRIPLES), "--lr", "0.001", "--threads", str(args.threads),
                    "--seed", str(seed), "--device", args.device, "--json", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per side: mean seconds per epoch over every epoch of every repeat, the speed-up
    over RecBole's (the first side), and the test metrics' mean and standard error over repeats."""
    rows = []
    for name, side in runs.items():
        row = {"name": name, "s_per_epoch": statistics.fmean([s for run in side for s in run["epoch_seconds"]])}
        for metric in METRICS:
            if all(metric in run["test"] for run in side):  # RecBole has no full ranking
                row[metric] = mean_and_error([run["test"][metric] for run in side])
        row["hr@10_per_repeat"] = [run["test"]["hr@10"] for run in side]
        rows.append(row)
    for row in rows:
        row["speedup"] = rows[0]["s_per_epoch"] / row["s_per_epoch"]
    return rows


def plot(rows: list[dict], repeats: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in rows]
    colors = ["C1"] + ["C0"] * (len(rows) - 1)
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(10, 3))
    speed.barh(names, [row["s_per_epoch"] for row in rows], color=colors)
    speed.set_xlabel("seconds per training epoch (lower is better)")
    quality.barh(names, [row["hr@10"][0] for row in rows], xerr=[row["hr@10"][1] for row in rows], color=colors)
    quality.set_xlabel(f"test HR@10, equal epochs ({repeats} repeat(s), ± s.e.)")
    quality.set_yticks([])
    fig.suptitle("ConvNCF at RecBole's settings, one run on one machine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from merlin_ncf.atomic import atomic_file

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    runs = {"RecBole 1.2.1 (fp32)": [], **{f"ours ({precision})": [] for precision in args.precisions}}
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        runs["RecBole 1.2.1 (fp32)"].append(train_recbole(args, seed))
        for precision in args.precisions:
            runs[f"ours ({precision})"].append(train_ours(args, f"ours-{precision}-{seed}", seed,
                                                          *PRECISIONS[precision]))
    load_end = os.getloadavg()
    rows = summarise(runs)

    def cell(row, metric, width):
        if metric not in row:
            return f"{'-':>{width}}"
        mean, error = row[metric]
        return f"{mean:.4f} ± {error:.4f}".rjust(width) if args.repeats > 1 else f"{mean:{width}.4f}"

    width = 16 if args.repeats > 1 else 9
    print(f"ConvNCF on {args.data}, {args.epochs} epoch(s) each, {args.threads} thread(s), {args.repeats} repeat(s) "
          f"(seeds {args.seed}-{args.seed + args.repeats - 1}), load average {load_start[0]:.1f} at start, "
          f"{load_end[0]:.1f} at end")
    print(f"{'':22} {'s/epoch':>8} {'speed-up':>8} " + " ".join(f"{m:>{width}}" for m in METRICS))
    for row in rows:
        print(f"{row['name']:22} {row['s_per_epoch']:8.1f} {row['speedup']:7.1f}x "
              + " ".join(cell(row, m, width) for m in METRICS))
    for name, side in runs.items():
        if name.startswith("ours"):
            final = statistics.fmean(run["final_evaluation_s"] for run in side)
            print(f"{name}, final evaluation (sampled test lists + full ranking of every test user over the "
                  f"catalogue + export): {final:.0f} s")
    summary = {"data": str(args.data), "epochs": args.epochs, "threads": args.threads, "repeats": args.repeats,
               "seeds": [args.seed + r for r in range(args.repeats)],
               "load_average": {"start": load_start, "end": load_end}, "rows": rows, "runs": runs}
    with atomic_file(args.out / "convncf.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, args.repeats, args.out / "convncf.png")
    print(f"wrote {args.out / 'convncf.json'} and {args.out / 'convncf.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
