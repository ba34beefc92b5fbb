"""ETL: an interaction log in, a relocatable directory for training and serving out.

Reads MovieLens (or any CSV/parquet user-item log), filters, categorifies users and items
with NVTabular, holds out each user's latest interaction for test (and the one before for
validation), samples K test negatives per user, and writes train/test parquet, the fitted
workflow, items.parquet, feature_spec.yaml and stats.json (layout: docs/pipeline.md).

    python workflows/etl.py --input ml-1m/ --output data/ml-1m
    python workflows/etl.py --download ml-1m --output data/ml-1m --device gpu --workers 1
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path


from merlin_ncf import atomic  # noqa: E402
from merlin_ncf.workflows.cluster import DEFAULT_DASHBOARD, DEVICES, Backend, dask_client, resolve_device  # noqa: E402
from merlin_ncf.errors import DefaultsHelpFormatter, EtlError, OneLineArgumentParser, UserError, exit_with, run_cli  # noqa: E402
from merlin_ncf.workflows.readers import FORMATS, LAYOUTS, ColumnNames  # noqa: E402
from merlin_ncf.workflows.options import EtlOptions, parse_cutoff  # noqa: E402


KIND = "etl"
# ETL outputs from before the marker file (merlin_ncf.atomic.MARKER) hold both of these.
LEGACY_MARKERS = ("stats.json", "feature_spec.yaml")


def run(opts: EtlOptions) -> dict:
    """Run the whole ETL; returns the stats written to stats.json. Raises EtlError on bad input."""
    if opts.negatives < 1:
        raise EtlError("--negatives must be at least 1")
    if opts.workers < 0:
        raise EtlError("--workers must be 0 (in-process) or more")
    if opts.cutoff is not None:
        parse_cutoff(opts.cutoff)  # a bad date fails before any work
    source, dataset_name = _source(opts)
    atomic.check_replaceable(opts.output, KIND, inputs=[source], overwrite=opts.overwrite,
                             legacy_markers=LEGACY_MARKERS)
    backend = Backend(resolve_device(opts.device))
    from merlin_ncf.workflows.pipeline import PhaseClock, execute  # NVTabular: only once the options are sound

    clock = PhaseClock(opts.progress)
    try:
        with dask_client(backend.device, opts.workers, opts.scheduler_address, dashboard=opts.dashboard), \
                atomic.atomic_directory(opts.output, kind=KIND) as out:
            stats = execute(opts, source, dataset_name, backend, out, clock)
    finally:
        clock.close()
    return stats


def _source(opts: EtlOptions) -> tuple[Path, str]:
    if opts.download:
        from merlin_ncf.workflows.datasets import download

        return download(opts.download, progress=opts.progress), opts.download
    if opts.input is None:
        raise EtlError("give --input PATH or --download NAME")
    path = opts.input
    if not path.exists():
        raise EtlError(f"input {path} does not exist")
    # ml-1m/ratings.dat is named after its release folder; a generic log after itself.
    named_by_folder = path.is_dir() or path.name in {layout.ratings for layout in LAYOUTS.values()}
    return path, (path.absolute().name if path.is_dir() else path.parent.absolute().name if named_by_folder
                  else path.stem)


# --- command line -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
                                   formatter_class=DefaultsHelpFormatter)
    src = parser.add_argument_group("input")
    src.add_argument("--input", type=Path, help="a MovieLens release directory, its ratings file, or a CSV/parquet log")
    src.add_argument("--download", metavar="NAME",
                     help="fetch, verify and cache a MovieLens release (ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, "
                          "ml-latest-small, ml-latest) instead of --input")
    src.add_argument("--format", default="auto", choices=FORMATS, help="layout of the input; auto guesses from the files")
    src.add_argument("--user-col", default="user_id", help="user column of a generic CSV/parquet log")
    src.add_argument("--item-col", default="item_id", help="item column of a generic CSV/parquet log")
    src.add_argument("--time-col", default="timestamp", help="timestamp column of a generic log (numbers or datetimes)")
    src.add_argument("--rating-col", default="rating", help="optional rating column of a generic log")
    src.add_argument("--item-table", type=Path, metavar="PATH",
                     help="CSV or parquet item table of a generic log: the --item-col column plus optional title, "
                          "genres (copied into items.parquet)")
    wf = parser.add_argument_group("workflow")
    wf.add_argument("--min-rating", type=float, help="implicit feedback: keep only interactions rated at least this")
    wf.add_argument("--min-user-interactions", type=_at_least(0), default=1,
                    help="drop users with fewer interactions (after --min-rating); users left with a single "
                         "interaction keep it in train and get no test row (two: no validation row)")
    wf.add_argument("--freq-threshold", type=_at_least(0), default=0,
                    help="ids seen fewer times map to Categorify's out-of-vocabulary index 2")
    wf.add_argument("--no-validation", action="store_true",
                    help="write no validation lists (by default each user's second-latest interaction is held "
                         "out as a validation candidate list, for early stopping)")
    wf.add_argument("--validation", action="store_true",
                    help="accepted for compatibility: validation lists are written by default")
    wf.add_argument("--split", default="leave-one-out", choices=("leave-one-out", "time"),
                    help="leave-one-out: each user's latest interaction is the test positive; time: train is "
                         "everything before --cutoff, test each user's first interaction after it")
    wf.add_argument("--cutoff", metavar="TIME",
                    help="with --split time: a timestamp in the log's unit, or a date such as 2015-01-01 (UTC, "
                         "for logs in seconds)")
    wf.add_argument("--cutoff-quantile", type=float, metavar="Q",
                    help="with --split time: the cutoff is this quantile of the kept interactions' timestamps")
    wf.add_argument("--negatives", type=_at_least(1), default=100,
                    help="sampled negatives per test/validation user (K)")
    wf.add_argument("--seed", type=int, default=0, help="seed of the negative sampler; same seed, same bytes")
    run_ = parser.add_argument_group("execution")
    run_.add_argument("--output", type=Path, required=True,
                      help="output directory; built beside it and swapped in only when complete")
    run_.add_argument("--overwrite", action="store_true",
                      help="replace --output even if it is a non-empty directory this command did not write "
                           "(an output overlapping the input is always refused)")
    run_.add_argument("--device", default="auto", choices=DEVICES,
                      help="gpu: cuDF + dask-cuda; cpu: pandas + dask.distributed; auto: gpu when present")
    run_.add_argument("--workers", type=_at_least(0), default=0,
                      help="local Dask cluster workers (GPU: one per GPU), listening on 127.0.0.1 only; "
                           "0 runs in this process")
    run_.add_argument("--dashboard", nargs="?", const=DEFAULT_DASHBOARD, metavar="ADDRESS",
                      help=f"with --workers: serve the Dask dashboard (off by default) at ADDRESS "
                           f"(default {DEFAULT_DASHBOARD})")
    run_.add_argument("--scheduler-address",
                      help="run on an existing Dask cluster (e.g. tcp://10.0.0.1:8786); its workers must see "
                           "the --output directory's filesystem")
    run_.add_argument("--partition-size", default="32MB",
                      help="bytes of input per partition: bounds memory for out-of-core data; smaller partitions "
                           "also make NVTabular's dtype sampling at each fit cheaper")
    run_.add_argument("--train-files", type=int, default=0,
                      help="number of train parquet files; 0 = one per ~2M rows, at least 2")
    run_.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def options_from_args(args: argparse.Namespace) -> EtlOptions:
    return EtlOptions(
        output=args.output, input=args.input, download=args.download, format=args.format,
        columns=ColumnNames(args.user_col, args.item_col, args.time_col, args.rating_col), item_table=args.item_table,
        split=args.split, cutoff=args.cutoff, cutoff_quantile=args.cutoff_quantile,
        min_rating=args.min_rating, min_user_interactions=args.min_user_interactions,
        freq_threshold=args.freq_threshold, validation=not args.no_validation, negatives=args.negatives,
        seed=args.seed, device=args.device, workers=args.workers, scheduler_address=args.scheduler_address,
        dashboard=args.dashboard, partition_size=args.partition_size, train_files=args.train_files,
        progress=not args.quiet, overwrite=args.overwrite)


def _at_least(minimum: int):
    """argparse type: an integer no smaller than `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def _exit_on_interrupt(prog: str, output: Path, grace_seconds: float = 10.0) -> None:
    """Ctrl-C / SIGTERM: raise KeyboardInterrupt so the temporary output is cleaned up; should
    Dask's threads swallow or outlive it, delete the temporary output and exit hard after a grace."""
    def hard_exit():
        atomic.abandon_all()
        print(f"{prog}: interrupted; {output} left as it was", file=sys.stderr, flush=True)
        os._exit(130)

    def on_signal(signum, frame):
        logging.disable(logging.CRITICAL)  # tasks still running fail noisily once their files go
        watchdog = threading.Timer(grace_seconds, hard_exit)
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _exit_on_interrupt(parser.prog, args.output)
    if args.input and args.download:
        parser.error("give either --input or --download, not both")
    if args.validation and args.no_validation:
        parser.error("give either --validation or --no-validation, not both")
    if args.split == "time" and (args.cutoff is None) == (args.cutoff_quantile is None):
        parser.error("--split time needs exactly one of --cutoff and --cutoff-quantile")
    if args.split != "time" and (args.cutoff is not None or args.cutoff_quantile is not None):
        parser.error("--cutoff and --cutoff-quantile go with --split time")
    try:
        stats = run(options_from_args(args))
    except UserError as exc:
        exit_with(exc, parser.prog)
    except KeyboardInterrupt:
        atomic.abandon_all()
        print(f"{parser.prog}: interrupted; {args.output} left as it was", file=sys.stderr, flush=True)
        os._exit(130)  # without waiting for Dask's threads to finish their partitions
    if not args.quiet:
        print(f"wrote {args.output}: {stats['users']:,} users, {stats['items']:,} items, "
              f"{stats['interactions']:,} interactions, {stats['test_users']:,} test users "
              f"in {stats['seconds']['total']:.1f} s")
        if stats.get("split") == "time":
            print(f"time split at {stats['cutoff']} ({stats['cutoff_given']}): {stats['cold_start_users']:,} "
                  f"cold-start users (first seen after the cutoff) get no test list")
    return 0


if __name__ == "__main__":
    from merlin_ncf.merlin_warnings import without_torch

    without_torch()  # this process only: the ETL never uses torch
    run_cli(main)
