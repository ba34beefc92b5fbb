"""Training throughput: samples/s (positives + negatives), evaluation samples/s, epoch time and
peak memory for batch sizes 2^14..2^20 and 1 vs 2 processes, then a quality run (HR@10).

    python benchmarks/train.py                       # ml-20m-sized synthetic data (slow ETL once)
    python benchmarks/train.py --interactions 2000000 --samples 1000000
    python benchmarks/train.py --data ETL_DIR        # an existing ETL directory

Versus RecBole (issue 11), one run, ours and RecBole interleaved, at RecBole's NeuMF settings on
both sides, then dense vs sparse Adam and NVIDIA's configuration at ml-20m's cardinalities:

    flock /work/bench.lock python benchmarks/train.py --versus-recbole --data ETL_DIR \
        --large-data ML20M_SIZED_ETL_DIR --plot docs/figures/train-vs-recbole.png

The model is RecBole's NeuMF configuration, the CPU reference (embedding 64, MLP [128, 64],
dropout 0.1, 4 negatives): --factors 64 --mlp-layers 128 128 64 in train_ncf.py's notation;
both negative sampling modes (uniform, exclude-seen) are swept.
Each sweep point trains --samples samples (>= 3 batches) after a 2-batch warm-up, in a fresh
process (under torchrun for 2 processes); epoch time is measured in the quality run and
projected (samples per epoch / samples/s) for the sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from device import add_device_argument, require_device  # benchmarks/device.py


REPO = Path(__file__).resolve().parents[1]
MODEL = dict(mf_dim=64, mlp_layers=[128, 128, 64], dropout=0.1)
# RecBole 1.2.1's NeuMF defaults (benchmarks/recbole_baseline.py) in train_ncf.py's options:
# embeddings 64 (GMF) and 64 + 64 (MLP input 128), MLP [128, 64], dropout 0.1, Adam lr 0.001 with
# torch's betas, 2048 samples per step (RecBole's train_batch_size counts the negatives too),
# 4 uniform negatives per positive.
RECBOLE = ["--factors", "64", "--mlp-layers", "128", "128", "64", "--dropout", "0.1", "--lr", "0.001",
           "--beta1", "0.9", "--beta2", "0.999", "--batch-size", "2048", "--negatives", "4",
           "--negative-sampling", "uniform"]
# DeepLearningExamples' NCF (PyTorch) defaults: factors 64, MLP 256-256-128-64, dropout 0.5,
# batch 2^20, lr 0.0045, betas (0.25, 0.5), 4 negatives.
NVIDIA = dict(model=dict(mf_dim=64, mlp_layers=[256, 256, 128, 64], dropout=0.5),
              options=dict(batch_size=2**20, lr=0.0045, beta1=0.25, beta2=0.5, negatives=4))
RECBOLE_SWEEP = dict(model=MODEL, options=dict(batch_size=2048, lr=0.001, beta1=0.9, beta2=0.999, negatives=4))
ML20M = dict(users=138_493, items=26_744)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="existing ETL directory (default: generate synthetic data)")
    p.add_argument("--interactions", type=int, default=20_000_263, help="synthetic interactions (ml-20m: 20,000,263)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/merlin-ncf-train-bench"),
                   help="where synthetic data and runs are written (reused when present)")
    p.add_argument("--batch-exponents", type=int, nargs="+", default=list(range(14, 21)),
                   help="batch sizes 2^E (samples per optimizer step) to sweep")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to sweep")
    p.add_argument("--negative-sampling", nargs="+", choices=("uniform", "exclude-seen"),
                   default=["uniform", "exclude-seen"], help="negative sampling modes to sweep")
    p.add_argument("--samples", type=int, default=2**22,
                   help="samples measured per sweep point (at least 3 batches)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision: bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    add_device_argument(p, help="where to train: cpu, or cuda (needs a CUDA GPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process, ours and RecBole's (0: cores / processes; on a shared "
                        "machine 1 avoids oversubscribed thread pools)")
    p.add_argument("--quality-batch", type=int, default=2**18, help="batch size of the quality run (0: skip it)")
    p.add_argument("--quality-epochs", type=int, default=2, help="epochs of the quality run")
    p.add_argument("--quality-processes", type=int, default=2, help="processes of the quality run (torchrun)")
    versus = p.add_argument_group("versus RecBole (issue 11)")
    versus.add_argument("--versus-recbole", action="store_true",
                        help="instead of the sweep: RecBole's NeuMF and ours at its settings on --data, 1 and 2 "
                             "processes, dense and sparse Adam, then --large-data rows")
    versus.add_argument("--epochs", type=int, default=3, help="epochs of each side (HR@10 at equal epochs)")
    versus.add_argument("--large-data", type=Path,
                        help="ETL directory at ml-20m's cardinalities: dense vs sparse Adam at RecBole's and "
                             "NVIDIA's settings (--samples per point)")
    versus.add_argument("--recbole-python", type=Path, default=REPO / ".venv-recbole" / "bin" / "python",
                        help="RecBole's interpreter (make recbole-venv)")
    versus.add_argument("--plot", type=Path, help="write the bar chart here (default: WORKDIR/train-vs-recbole.png)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--optimizer", default="adam", help=argparse.SUPPRESS)
    p.add_argument("--config", choices=("recbole", "nvidia"), help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def synthetic_etl(args) -> Path:
    """workflows/synthetic.py + workflows/etl.py at ml-20m's users/items, scaled to --interactions."""
    scale = min(1.0, args.interactions / 20_000_263)
    users, items = max(100, int(ML20M["users"] * scale)), max(100, int(ML20M["items"] * scale ** 0.5))
    etl = args.workdir / f"etl-{args.interactions}"
    if (etl / "feature_spec.yaml").exists():
        return etl
    raw = args.workdir / f"raw-{args.interactions}"
    py = sys.executable
    if not raw.exists():
        subprocess.run([py, str(REPO / "workflows" / "synthetic.py"), "--interactions", str(args.interactions),
                        "--users", str(users), "--items", str(items), "--format", "ml-20m", "--output", str(raw)],
                       check=True)
    subprocess.run([py, str(REPO / "workflows" / "etl.py"), "--input", str(raw), "--output", str(etl),
                    "--device", "cpu", "--quiet"], check=True)
    return etl


def worker(args) -> None:
    """One sweep point, in this process (rank 0 prints a JSON line)."""
    import torch

    from merlin_ncf.models.data import load_candidates, open_etl
    from merlin_ncf.models.ddp import from_environment
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.defaults import parts_per_chunk
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    from merlin_ncf.models.train_ncf import choose_device

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local))
    device = choose_device(args.device)
    context = from_environment(device)
    data = open_etl(args.data)
    torch.manual_seed(0)
    config = {"recbole": RECBOLE_SWEEP, "nvidia": NVIDIA}.get(args.config, dict(model=MODEL, options={}))
    model = NeuMF(data.num_users, data.num_items, **config["model"])
    options = TrainOptions(**{"batch_size": args.batch_size, **config["options"]}, amp=args.amp, progress=False,
                           max_steps=2, negative_sampling=args.negative_sampling[0], optimizer=args.optimizer,
                           parts_per_chunk=parts_per_chunk(data.train_rows, len(data.train_files)))
    trainer = Trainer(model, data, options, device, context)
    if args.config == "nvidia":
        options.max_steps = 1  # a 2^20-sample step warms up as much as two
    trainer.train_epoch(0, check_input=False)  # warm-up: threads, allocator, first parquet reads
    options.max_steps = args.steps
    _, samples, seconds = trainer.train_epoch(1, check_input=False)
    eval_rate = math.nan
    if args.config is None:  # the versus-RecBole rows measure training only
        _, _, eval_rate = trainer.evaluate(load_candidates(data, "test"))
    if device.type == "cuda":
        peak_mb = context.max([torch.cuda.max_memory_allocated(device) / 2**20])[0]
    else:
        peak_mb = context.max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])[0]
    if context.is_main:
        print(json.dumps({"processes": context.world, "batch_size": args.batch_size,
                          "negative_sampling": options.negative_sampling, "optimizer": options.optimizer,
                          "train_samples_per_s": samples / seconds, "eval_samples_per_s": eval_rate,
                          "peak_mb_per_process": peak_mb}), flush=True)
    context.close()


def train_rows(data: Path) -> int:
    import pyarrow.parquet as pq

    from merlin_ncf.feature_spec import FeatureSpec

    return sum(pq.ParquetFile(f).metadata.num_rows for f in FeatureSpec.load(data).files("train"))


def sweep_point(args, data: Path, processes: int, batch_size: int, sampling: str, optimizer: str = "adam",
                config: str | None = None, steps: int | None = None) -> dict | None:
    script = [str(Path(__file__).resolve()), "--worker", "--data", str(data), "--batch-size", str(batch_size),
              "--negative-sampling", sampling, "--optimizer", optimizer, *(["--config", config] if config else []),
              "--steps", str(steps or max(3, args.samples // batch_size)), "--threads", str(args.threads),
              "--amp" if args.amp else "--no-amp", "--device", args.device]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(29400 + batch_size % 500), *script]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        print(f"  {processes} x 2^{batch_size.bit_length() - 1}: failed: {result.stderr.strip()[-300:]}")
        return None
    return json.loads(lines[-1])


def quality_run(args, data: Path) -> dict:
    """The product itself: models/train_ncf.py, full epochs, RecBole's configuration."""
    run_dir = args.workdir / f"run-{data.name}-{args.quality_batch}"
    launcher = [sys.executable]
    if args.quality_processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(args.quality_processes),
                     "--master_addr", "127.0.0.1", "--master_port", "29399"]
    command = [*launcher, str(REPO / "models" / "train_ncf.py"), "--data", str(data), "--output", str(run_dir),
               "--force", "--factors", "64", "--mlp-layers", "128", "128", "64", "--dropout", "0.1",
               "--batch-size", str(args.quality_batch), "--epochs", str(args.quality_epochs), "--no-progress",
               "--device", args.device]
    if args.amp:
        command.append("--amp")
    start = time.perf_counter()
    subprocess.run(command, check=True)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {"wall_s": time.perf_counter() - start, "log": log,
            "config": json.loads((run_dir / "config.json").read_text())}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ours_versus(args, processes: int, optimizer: str) -> dict | None:
    """train_ncf.py at RecBole's settings for --epochs epochs: steady samples/s (epochs 2..),
    test HR@10 of the best validation epoch (RecBole's protocol in recbole_baseline.py)."""
    run_dir = args.workdir / f"versus-{processes}-{optimizer}"
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                     "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command = [*launcher, str(REPO / "models" / "train_ncf.py"), "--data", str(args.data), "--output", str(run_dir),
               "--force", *RECBOLE, "--optimizer", optimizer, "--epochs", str(args.epochs), "--patience", "0",
               "--no-progress", "--device", args.device, "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:  # e.g. the intermittent Gloo abort (README, Known issues): a failed row, not a failed table
        print(f"  {processes} x {optimizer}: failed: {result.stderr.strip()[-300:]}", flush=True)
        return None
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steady = log[1:] or log
    metrics = json.loads((run_dir / "config.json").read_text())["metrics"]
    return {"samples_per_s": sum(r["train_samples_per_s"] for r in steady) / len(steady), "hr": metrics["hr@10"],
            "ndcg": metrics["ndcg@10"]}


def recbole_versus(args) -> dict:
    command = [str(args.recbole_python), str(REPO / "benchmarks" / "recbole_baseline.py"), "--data", str(args.data),
               "--epochs", str(args.epochs), "--patience", str(args.epochs),
               *(["--threads", str(args.threads)] if args.threads else [])]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {"samples_per_s": summary["train_samples_per_s"], "hr": summary["test"]["hr@10"],
            "ndcg": summary["test"]["ndcg@10"]}


def versus_recbole(args) -> int:
    """One table: RecBole and ours interleaved at RecBole's settings, then the ml-20m-sized rows."""
    if not args.recbole_python.exists():
        print(f"train.py: error: {args.recbole_python} not found: run `make recbole-venv`", file=sys.stderr)
        return 2
    settings = ("RecBole's NeuMF: embeddings 64, MLP 128-128-64, dropout 0.1, Adam lr 0.001 betas (0.9, 0.999), "
                "batch 2048 samples, 4 uniform negatives")
    print(f"data: {args.data} ({train_rows(args.data):,} train positives); {settings}; {args.epochs} epochs each; "
          f"{os.cpu_count()} CPUs, torch threads {args.threads or 'cores / processes'}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    header = f"{'row':<44} {'data':<10} {'train samples/s':>16} {'x RecBole':>10} {'test HR@10':>11} {'load':>5}"
    print(header, flush=True)
    rows = []

    def show(name: str, data: str, result: dict | None, base: float | None) -> None:
        if result is None:
            print(f"{name:<44} {data:<10} {'failed':>16}", flush=True)
            return
        ratio = f"{result['samples_per_s'] / base:.1f}x" if base else "-"
        hr = f"{result['hr']:.4f}" if result.get("hr") is not None else "-"
        rows.append({"row": name, "data": data, **result, "ratio": result["samples_per_s"] / base if base else None,
                     "load": os.getloadavg()[0]})
        print(f"{name:<44} {data:<10} {result['samples_per_s']:>16,.0f} {ratio:>10} {hr:>11} {os.getloadavg()[0]:>5.1f}",
              flush=True)

    small = args.data.name
    # Interleaved: ours, RecBole, ours, ... so that a change of machine load hits both sides.
    first = ours_versus(args, 1, "adam")
    recbole = recbole_versus(args)
    if first is None:
        return 1
    base = recbole["samples_per_s"]
    show("RecBole 1.2.1 NeuMF, 1 process", small, recbole, base)
    show("ours, 1 process, adam", small, first, base)
    for processes, optimizer in ((1, "sparse-adam"), (2, "adam"), (2, "sparse-adam")):
        name = f"ours, {processes} process{'es' if processes > 1 else ''}, {optimizer}"
        show(name, small, ours_versus(args, processes, optimizer), base)
    if args.large_data:
        large = args.large_data.name
        points = [("recbole", 2048, "adam"), ("recbole", 2048, "sparse-adam"), ("nvidia", 2**20, "adam")]
        for config, batch, optimizer in points:
            label = "RecBole settings" if config == "recbole" else "NVIDIA's NCF config, batch 2^20"
            point = sweep_point(args, args.large_data, 1, batch, "uniform", optimizer, config,
                                steps=1 if batch == 2**20 else 150)
            show(f"ours, 1 process, {optimizer}, {label}", large,
                 point and {"samples_per_s": point["train_samples_per_s"], "hr": None}, base)
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the CPU is shared: figures are lower bounds)")
    plot_versus(rows, args.plot or args.workdir / "train-vs-recbole.png")
    (args.workdir / "train-vs-recbole.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def plot_versus(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from merlin_ncf.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    labels = [f"{r['row']} [{r['data']}]" for r in rows]
    colors = ["tab:gray" if r["row"].startswith("RecBole") else "tab:green" if "sparse" in r["row"] else "tab:blue"
              for r in rows]
    bars = ax.barh(labels[::-1], [r["samples_per_s"] for r in rows][::-1], color=colors[::-1])
    for bar, row in zip(bars, rows[::-1]):
        note = f" {row['ratio']:.1f}x" + (f", HR@10 {row['hr']:.3f}" if row.get("hr") is not None else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    ax.set_xlabel("training samples/s (positives + negatives), 2 shared CPU cores")
    ax.set_title("NeuMF training vs RecBole 1.2.1 (ratio to RecBole's samples/s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    require_device(args.device)
    if args.worker:
        worker(args)
        return 0
    if args.versus_recbole:
        if args.data is None:
            print("train.py: error: --versus-recbole needs --data (an ETL directory)", file=sys.stderr)
            return 2
        args.workdir.mkdir(parents=True, exist_ok=True)
        return versus_recbole(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.data or synthetic_etl(args)
    rows = train_rows(data)
    per_epoch = rows * 5
    print(f"data: {data} ({rows:,} train positives -> {per_epoch:,} samples per epoch with 4 negatives); "
          f"model: NeuMF {MODEL}, amp={'bf16' if args.amp else 'off'}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'procs':>5} {'batch':>9} {'negatives':>12} {'train samples/s':>16} {'eval samples/s':>15} {'epoch s (proj.)':>16} "
          f"{'peak MB/proc':>17}")  # CPU: max RSS; CUDA: max allocated
    for processes in args.processes:
        for exponent, sampling in ((e, m) for e in args.batch_exponents for m in args.negative_sampling):
            point = sweep_point(args, data, processes, 2**exponent, sampling)
            if point:
                print(f"{processes:>5} {'2^' + str(exponent):>9} {sampling:>12} {point['train_samples_per_s']:>16,.0f} "
                      f"{point['eval_samples_per_s']:>15,.0f} {per_epoch / point['train_samples_per_s']:>16,.1f} "
                      f"{point['peak_mb_per_process']:>17,.0f}", flush=True)
    if args.quality_batch:
        quality = quality_run(args, data)
        for row in quality["log"]:
            print(f"quality run, epoch {row['epoch']}: HR@10 {row['hr']:.4f} NDCG@10 {row['ndcg']:.4f} "
                  f"train {row['train_samples_per_s']:,.0f} samples/s, eval {row['eval_samples_per_s']:,.0f} "
                  f"samples/s, epoch {row['epoch_time_s']:.1f} s")
        metrics = quality["config"]["metrics"]
        print(f"quality run: final HR@10 {metrics['hr@10']:.4f}, NDCG@10 {metrics['ndcg@10']:.4f} "
              f"({quality['wall_s']:.0f} s wall, batch {args.quality_batch}, {args.quality_processes} processes)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the CPU is shared: figures are lower bounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
