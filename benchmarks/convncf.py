"""ConvNCF: our training epoch against RecBole 1.2.1's at the same settings, side by side, plus
the full-catalogue ranking of every user and the test metrics of both after equal epochs.

    flock /work/bench.lock .venv/bin/python benchmarks/convncf.py --data ETL_DIR [--epochs 1] [--out DIR]

Settings are RecBole's ConvNCF defaults on both sides: embeddings 64, four convolutions of 32
channels with kernels = strides 4, 4, 2, 2, dropout 0.2, L2 weights 0.1 / 0.1, BPR with one
uniform negative redrawn when it is one of the user's training items (RecBole's sampler; ours:
--negative-sampling exclude-seen), the whole train set shuffled each epoch, Adam lr 1e-3, 2,048
triples per step. RecBole (benchmarks/recbole_baseline.py in .venv-recbole), then ours
(train_ncf.py, fp32; --amp: in bf16 autocast), each training --epochs epochs on our exact train
positives; an epoch's seconds are its training pass only (negative sampling
included, evaluation not). Both are scored by models/ranking.py on our test lists (sampled
HR@K / NDCG@K); ours also ranks every test user against the whole catalogue (full Recall@K /
NDCG@K) in train_ncf.py's final evaluation, timed here. RecBole's full ranking (its forward
builds every pair's 64 x 64 map) would take hours and is skipped.
Writes convncf.json and convncf.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from device import add_device_argument, require_device  # benchmarks/device.py

REPO = Path(__file__).resolve().parents[1]
STACK = ["--embedding-size", "64", "--cnn-channels", "32", "32", "32", "32", "--cnn-kernels", "4", "4", "2", "2",
         "--cnn-strides", "4", "4", "2", "2", "--dropout", "0.2", "--reg-weights", "0.1", "0.1"]
TRIPLES = 2048  # RecBole's train_batch_size: (user, positive, negative) triples per step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="ETL output directory (ml-latest-small's)")
    p.add_argument("--epochs", type=int, default=1, help="epochs each side trains (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides (default 2)")
    p.add_argument("--seed", type=int, default=2020, help="seed, both sides (default 2020)")
    p.add_argument("--amp", action="store_true", help="ours in bf16 autocast (default fp32: with 2 threads the "
                   "chunked bf16 GEMMs were slower)")
    p.add_argument("--out", type=Path, default=Path("/tmp/merlin-ncf-convncf-bench"),
                   help="runs, convncf.json and convncf.png go here")
    p.add_argument("--recbole-python", type=Path, default=REPO / ".venv-recbole" / "bin" / "python",
                   help="RecBole's interpreter (make recbole-venv)")
    add_device_argument(p, help="where both sides train: cpu, or cuda (needs a CUDA GPU)")
    args = p.parse_args(argv)
    require_device(args.device)
    if not args.recbole_python.exists():
        print(f"convncf.py: error: {args.recbole_python} not found: run `make recbole-venv`", file=sys.stderr)
        raise SystemExit(2)
    return args


def train_ours(args, name: str, *extra: str) -> dict:
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
               "--patience", "0", "--threads", str(args.threads), "--seed", str(args.seed), "--no-progress",
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


def train_recbole(args) -> dict:
    out = args.out / "recbole.json"
    subprocess.run([str(args.recbole_python), str(REPO / "benchmarks" / "recbole_baseline.py"), "--data", str(args.data),
                    "--model", "ConvNCF", "--epochs", str(args.epochs), "--no-validation", "--no-full",
                    "--batch-size", str(TRIPLES), "--lr", "0.001", "--threads", str(args.threads),
                    "--seed", str(args.seed), "--device", args.device, "--json", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def plot(rows: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([name for name, _ in rows], [seconds for _, seconds in rows], color=["C1", "C0"])
    ax.set_xlabel("seconds per training epoch (ml-latest-small, lower is better)")
    ax.set_title("ConvNCF, RecBole's settings, one run on one machine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from merlin_ncf.atomic import atomic_file

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    recbole = train_recbole(args)
    precision = "bf16 autocast" if args.amp else "fp32"
    ours = train_ours(args, "ours", *(["--amp"] if args.amp else []))
    load_end = os.getloadavg()

    mean = lambda values: sum(values) / len(values)  # noqa: E731
    recbole_s, ours_s = mean(recbole["epoch_seconds"]), mean(ours["epoch_seconds"])
    rows = [("RecBole 1.2.1 (fp32)", recbole_s), (f"ours ({precision})", ours_s)]
    results = {"recbole": recbole["test"], "ours": ours["test"]}
    users = int(recbole["test"].get("users", 610))
    print(f"ConvNCF on {args.data}, {args.epochs} epoch(s) each, {args.threads} threads, "
          f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end")
    print(f"{'':22} {'s/epoch':>8} {'speed-up':>8} {'HR@10':>7} {'NDCG@10':>8} {'fullR@10':>9} {'fullN@10':>9}")
    for (name, seconds), test in zip(rows, results.values()):
        full = (f"{test['full_recall@10']:9.4f} {test['full_ndcg@10']:9.4f}" if "full_recall@10" in test
                else f"{'-':>9} {'-':>9}")
        print(f"{name:22} {seconds:8.1f} {recbole_s / seconds:7.1f}x {test['hr@10']:7.4f} {test['ndcg@10']:8.4f} {full}")
    print(f"ours, final evaluation (sampled test lists + full ranking of {users} users over the catalogue "
          f"+ export): {ours['final_evaluation_s']:.0f} s")
    summary = {"data": str(args.data), "epochs": args.epochs, "threads": args.threads,
               "load_average": {"start": load_start, "end": load_end},
               "epoch_seconds": dict(rows), "speedup": recbole_s / ours_s,
               "final_evaluation_s": ours["final_evaluation_s"], "test": results, "recbole": recbole}
    with atomic_file(args.out / "convncf.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, args.out / "convncf.png")
    print(f"wrote {args.out / 'convncf.json'} and {args.out / 'convncf.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
