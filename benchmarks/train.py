"""Training throughput: samples/s (positives + negatives), evaluation samples/s, epoch time and
peak memory for batch sizes 2^14..2^20 and 1 vs 2 processes, then a quality run (HR@10).

    python benchmarks/train.py                       # ml-20m-sized synthetic data (slow ETL once)
    python benchmarks/train.py --interactions 2000000 --samples 1000000
    python benchmarks/train.py --data ETL_DIR        # an existing ETL directory

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
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from device import add_device_argument, require_device  # benchmarks/device.py


REPO = Path(__file__).resolve().parents[1]
MODEL = dict(mf_dim=64, mlp_layers=[128, 128, 64], dropout=0.1)
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
    p.add_argument("--quality-batch", type=int, default=2**18, help="batch size of the quality run (0: skip it)")
    p.add_argument("--quality-epochs", type=int, default=2, help="epochs of the quality run")
    p.add_argument("--quality-processes", type=int, default=2, help="processes of the quality run (torchrun)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    from merlin_ncf.models.train_ncf import choose_device

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    device = choose_device(args.device)
    context = from_environment(device)
    data = open_etl(args.data)
    torch.manual_seed(0)
    model = NeuMF(data.num_users, data.num_items, **MODEL)
    options = TrainOptions(batch_size=args.batch_size, amp=args.amp, progress=False, max_steps=2,
                           negative_sampling=args.negative_sampling[0])
    trainer = Trainer(model, data, options, device, context)
    trainer.train_epoch(0, check_input=False)  # warm-up: threads, allocator, first parquet reads
    options.max_steps = args.steps
    _, samples, seconds = trainer.train_epoch(1, check_input=False)
    test = load_candidates(data, "test")
    _, _, eval_rate = trainer.evaluate(test)
    if device.type == "cuda":
        peak_mb = context.max([torch.cuda.max_memory_allocated(device) / 2**20])[0]
    else:
        peak_mb = context.max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])[0]
    if context.is_main:
        print(json.dumps({"processes": context.world, "batch_size": args.batch_size,
                          "negative_sampling": options.negative_sampling,
                          "train_samples_per_s": samples / seconds, "eval_samples_per_s": eval_rate,
                          "peak_mb_per_process": peak_mb}), flush=True)
    context.close()


def train_rows(data: Path) -> int:
    import pyarrow.parquet as pq

    from merlin_ncf.feature_spec import FeatureSpec

    return sum(pq.ParquetFile(f).metadata.num_rows for f in FeatureSpec.load(data).files("train"))


def sweep_point(args, data: Path, processes: int, batch_size: int, sampling: str) -> dict | None:
    script = [str(Path(__file__).resolve()), "--worker", "--data", str(data), "--batch-size", str(batch_size),
              "--negative-sampling", sampling,
              "--steps", str(max(3, args.samples // batch_size)), "--amp" if args.amp else "--no-amp", "--device", args.device]
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


def main(argv=None) -> int:
    args = parse_args(argv)
    require_device(args.device)
    if args.worker:
        worker(args)
        return 0
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
