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
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from workflows.cluster import DEVICES, quiet_merlin

quiet_merlin()

import pandas as pd  # noqa: E402

from workflows import atomic, graph, negatives, split  # noqa: E402
from workflows.atomic import atomic_directory  # noqa: E402
from workflows.cluster import Backend, dask_client, resolve_device  # noqa: E402
from workflows.errors import EtlError, OneLineArgumentParser, exit_with, one_line  # noqa: E402
from workflows.feature_spec import FeatureSpec, LABEL_CHANNEL, ITEM_CHANNEL, USER_CHANNEL  # noqa: E402
from workflows.readers import FORMATS, ITEM, LAYOUTS, RATING, USER, ColumnNames, read_log  # noqa: E402

LABEL = "label"
PHASES = ("read", "filter", "encode", "split", "negatives", "write")
# Errors pandas/pyarrow raise while parsing a bad log, reported as one line.
PARSE_ERRORS = (ValueError, TypeError, OverflowError, UnicodeDecodeError, KeyError)


@dataclass
class EtlOptions:
    output: Path
    input: Path | None = None
    download: str | None = None
    format: str = "auto"
    columns: ColumnNames = field(default_factory=ColumnNames)
    min_rating: float | None = None
    min_user_interactions: int = 1
    freq_threshold: int = 0
    validation: bool = False
    negatives: int = 100
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    scheduler_address: str | None = None
    partition_size: str = "32MB"
    train_files: int = 0
    progress: bool = True


class PhaseClock:
    """Per-phase wall times, printed as each phase ends, with a progress bar over phases."""

    def __init__(self, progress: bool):
        from tqdm import tqdm

        self.seconds: dict[str, float] = {}
        self.bar = tqdm(total=len(PHASES), desc="etl", unit=" phase", disable=not progress, leave=False)
        self.progress = progress

    @contextmanager
    def phase(self, name: str):
        """Time a phase; the body may append what it did to the yielded list."""
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        notes: list[str] = []
        yield notes
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.bar.update(1)
        if self.progress:
            self.bar.write(f"  {name:<10} {self.seconds[name]:8.2f} s  {', '.join(notes)}")

    def close(self):
        self.bar.close()


def run(opts: EtlOptions) -> dict:
    """Run the whole ETL; returns the stats written to stats.json. Raises EtlError on bad input."""
    if opts.negatives < 1:
        raise EtlError("--negatives must be at least 1")
    if opts.workers < 0:
        raise EtlError("--workers must be 0 (in-process) or more")
    source, dataset_name = _source(opts)
    backend = Backend(resolve_device(opts.device))
    clock = PhaseClock(opts.progress)
    try:
        with dask_client(backend.device, opts.workers, opts.scheduler_address), \
                atomic_directory(opts.output) as out:
            stats = _pipeline(opts, source, dataset_name, backend, out, clock)
    finally:
        clock.close()
    return stats


def _source(opts: EtlOptions) -> tuple[Path, str]:
    if opts.download:
        from workflows.datasets import download

        return download(opts.download, progress=opts.progress), opts.download
    if opts.input is None:
        raise EtlError("give --input PATH or --download NAME")
    path = opts.input
    # ml-1m/ratings.dat is named after its release folder; a generic log after itself.
    named_by_folder = path.is_dir() or path.name in {layout.ratings for layout in LAYOUTS.values()}
    return path, (path.absolute().name if path.is_dir() else path.parent.absolute().name if named_by_folder
                  else path.stem)


def _pipeline(opts: EtlOptions, source: Path, dataset_name: str, backend: Backend, out: Path,
              clock: PhaseClock) -> dict:
    work = out / "_work"
    counts: dict[str, int] = {}

    with clock.phase("read") as notes:
        fmt = opts.format if not opts.download or opts.format != "auto" else opts.download
        try:
            log = read_log(source, fmt, backend, opts.columns, opts.partition_size)
            split.write_parquet({work / "raw": log.interactions})
        except PARSE_ERRORS as exc:
            raise EtlError(f"cannot parse {source}: {one_line(exc)}") from None
        counts["raw_interactions"] = split.count_rows(work / "raw")
        if counts["raw_interactions"] == 0:
            raise EtlError(f"{source} holds no interactions")
        has_rating = RATING in log.interactions.columns
        notes.append(f"{counts['raw_interactions']:,} interactions ({log.fmt}) from {source}")

    with clock.phase("filter") as notes:
        filtered = _filter(opts, work, has_rating, backend)
        counts["interactions"] = split.count_rows(filtered)
        if counts["interactions"] == 0:
            raise EtlError("no interactions left after --min-rating / --min-user-interactions")
        notes.append(f"{counts['interactions']:,} kept")

    with clock.phase("encode") as notes:
        etl_workflow, saved_workflow = graph.encoding(opts.freq_threshold, work / "categories")
        data = split.to_dataset(split.read_parquet(filtered, backend, graph.INTERACTION), backend)
        etl_workflow.fit(data)
        split.write_parquet({work / "encoded": etl_workflow.transform(data).to_ddf()[graph.INTERACTION]})
        saved_workflow.fit_schema(data.schema.select_by_name(graph.PAIR))
        saved_workflow.save(out / "workflow")
        schema = _id_schema(saved_workflow)
        n_users, n_items = (_cardinality(schema, c) for c in graph.PAIR)
        _check_order_key_fits(work / "encoded", n_items, backend)
        notes.append(f"Categorify: {n_users:,} user and {n_items:,} item indices (3 reserved)")

    with clock.phase("split") as notes:
        held_out = ["test", "validation"] if opts.validation else ["test"]
        positives, remaining = {}, work / "encoded"
        for name in held_out:
            positives[name], remaining = split.split_latest(remaining, n_items, work, name, backend)
        counts["test_users"] = split.count_rows(positives["test"])
        if counts["test_users"] == 0:
            raise EtlError("no user has two or more interactions: nothing to hold out for test")
        notes.append(f"held out the latest interaction of {counts['test_users']:,} users for {' and '.join(held_out)}")

    with clock.phase("negatives") as notes:
        xp = backend.xp
        pairs = split.read_parquet(work / "encoded", backend, graph.PAIR).compute()
        keys = negatives.interaction_keys(pairs[USER].values, pairs[ITEM].values, n_items, xp)
        del pairs
        rng = xp.random.default_rng(opts.seed)
        for name in held_out:
            candidates = _candidates(positives[name], keys, n_items, opts.negatives, rng, backend)
            counts[f"{name}_users"] = len(candidates) // (opts.negatives + 1)
            _write_merlin(candidates, out / name, _candidate_schema(schema), 1, backend)
        del keys
        notes.append(f"{opts.negatives} per user, seed {opts.seed}")

    with clock.phase("write") as notes:
        train = split.read_parquet(remaining, backend, graph.PAIR)
        counts["train_interactions"] = split.count_rows(remaining)
        n_files = opts.train_files or max(2, math.ceil(counts["train_interactions"] / 2_000_000))
        _write_merlin(train, out / "train", schema, n_files, backend)
        items = _item_table(saved_workflow, log.items)
        items.to_parquet(out / "items.parquet", index=False)
        shutil.rmtree(work)
        spec = _feature_spec(out, n_users, n_items, opts, dataset_name, held_out)
        spec.save(out)
        stats = _stats(counts, n_users, n_items, opts, backend, dataset_name, log.fmt)
        notes.append(f"{counts['train_interactions']:,} train rows in {n_files} files")
    stats["seconds"] = dict(clock.seconds, total=round(sum(clock.seconds.values()), 3))
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _filter(opts: EtlOptions, work: Path, has_rating: bool, backend: Backend) -> Path:
    """Apply --min-rating then --min-user-interactions; the raw log when neither is asked."""
    steps = []
    if opts.min_rating is not None:
        if not has_rating:
            raise EtlError("--min-rating given but the log has no rating column")
        steps.append(graph.rating_filter(opts.min_rating))
    if opts.min_user_interactions > 1:
        steps.append(graph.activity_filter(opts.min_user_interactions, work / "activity"))
    current = work / "raw"
    columns = graph.INTERACTION + ([RATING] if opts.min_rating is not None else [])
    for number, step in enumerate(steps):
        data = split.to_dataset(split.read_parquet(current, backend, columns), backend)
        current = work / f"filtered_{number}"
        split.write_parquet({current: step.fit_transform(data).to_ddf()[columns]})
        columns = graph.INTERACTION
    return current


def _id_schema(workflow):
    """The encoded id columns' schema (tags, domain) without the fit-time categories path."""
    from merlin.schema import Schema

    from merlin.schema import ColumnSchema

    return Schema([ColumnSchema(c.name, tags=c.tags, dtype=c.dtype, is_list=c.is_list, is_ragged=c.is_ragged,
                                properties={k: v for k, v in c.properties.items() if k != "cat_path"})
                   for c in workflow.output_schema])


def _cardinality(schema, column: str) -> int:
    return int(schema[column].int_domain.max) + 1


def _check_order_key_fits(encoded: Path, n_items: int, backend: Backend) -> None:
    import dask

    ts = split.read_parquet(encoded, backend, [graph.TIME])[graph.TIME]
    largest = max(abs(int(value)) for value in dask.compute(ts.max(), ts.min()))
    if (largest + 1) * n_items >= 2**63:
        raise EtlError(f"timestamps up to {largest} x {n_items} items overflow the int64 order key; "
                       "rescale the time column (e.g. to seconds)")


def _candidates(positives_path: Path, keys, n_items: int, k: int, rng, backend: Backend):
    positives = split.read_parquet(positives_path, backend, graph.PAIR).compute()
    positives = positives.sort_values(USER, kind="stable") if not backend.gpu else positives.sort_values(USER)
    users, items = positives[USER].values, positives[ITEM].values
    sampled = negatives.sample_negatives(keys, users, n_items, graph.FIRST_INDEX, k, rng, backend.xp)
    user_col, item_col, labels = negatives.candidate_lists(users, items, sampled, backend.xp)
    return backend.df.DataFrame({USER: user_col, ITEM: item_col, LABEL: labels})


def _candidate_schema(id_schema):
    from merlin.schema import ColumnSchema, Schema, Tags

    label = ColumnSchema(LABEL, dtype="float32", tags=[Tags.TARGET, Tags.BINARY_CLASSIFICATION])
    return Schema(list(id_schema) + [label])


def _write_merlin(frame, directory: Path, schema, n_files: int, backend: Backend) -> None:
    """Parquet parts plus merlin's schema.pbtxt (tags travel with the data)."""
    from merlin.io import Dataset

    data = Dataset(frame, schema=schema, cpu=not backend.gpu)
    data.to_parquet(str(directory), output_files=n_files, shuffle=None)


def _item_table(workflow, titles: pd.DataFrame | None) -> pd.DataFrame:
    """One row per encoded item: encoded id, raw id, and title/genres where known."""
    from nvtabular.ops import Categorify
    from merlin.dag import Graph

    categorify = next(node.op for node in Graph.get_nodes_by_op_type([workflow.output_node], Categorify)
                      if ITEM in node.op.categories)
    uniques = pd.read_parquet(categorify.categories[ITEM])
    items = pd.DataFrame({ITEM: uniques.index.astype("int64"), "raw_item_id": uniques[ITEM].astype("int64")})
    items = items[items[ITEM] >= graph.FIRST_INDEX].reset_index(drop=True)
    if titles is not None:
        items = items.merge(titles, on="raw_item_id", how="left")
        items[["title", "genres"]] = items[["title", "genres"]].fillna("")
    return items


def _relative_files(out: Path, name: str) -> list[str]:
    files = sorted((out / name).glob("part_*.parquet"), key=lambda p: int(p.stem.split("_")[-1]))
    return [str(f.relative_to(out)) for f in files]


def _feature_spec(out: Path, n_users: int, n_items: int, opts: EtlOptions, dataset: str,
                  held_out: list[str]) -> FeatureSpec:
    source_spec = {"train": [{"type": "parquet", "features": graph.PAIR, "files": _relative_files(out, "train")}]}
    for name in held_out:
        source_spec[name] = [{"type": "parquet", "features": [*graph.PAIR, LABEL],
                              "files": _relative_files(out, name)}]
    return FeatureSpec(
        feature_spec={USER: {"dtype": "int64", "cardinality": n_users},
                      ITEM: {"dtype": "int64", "cardinality": n_items},
                      LABEL: {"dtype": "float32"}},
        source_spec=source_spec,
        channel_spec={USER_CHANNEL: [USER], ITEM_CHANNEL: [ITEM], LABEL_CHANNEL: [LABEL]},
        metadata={"test_samples_per_series": opts.negatives + 1, "first_index": graph.FIRST_INDEX,
                  "workflow": "workflow", "item_table": "items.parquet", "dataset": dataset},
    )


def _stats(counts: dict, n_users: int, n_items: int, opts: EtlOptions, backend: Backend,
           dataset: str, fmt: str) -> dict:
    users, items = n_users - graph.FIRST_INDEX, n_items - graph.FIRST_INDEX
    return {
        "dataset": dataset, "format": fmt, "device": backend.device, "workers": opts.workers,
        "users": users, "items": items, "interactions": counts["interactions"],
        "density": counts["interactions"] / max(1, users * items),
        **{k: v for k, v in counts.items() if k != "interactions"},
        "options": {k: v for k, v in asdict(opts).items() if k in ("min_rating", "min_user_interactions",
                                                                    "freq_threshold", "negatives", "seed")},
    }


# --- command line -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    wf = parser.add_argument_group("workflow")
    wf.add_argument("--min-rating", type=float, help="implicit feedback: keep only interactions rated at least this")
    wf.add_argument("--min-user-interactions", type=int, default=1,
                    help="drop users with fewer interactions (after --min-rating); users left with a single "
                         "interaction keep it in train and get no test row (two: no validation row)")
    wf.add_argument("--freq-threshold", type=int, default=0,
                    help="ids seen fewer times map to Categorify's out-of-vocabulary index 2")
    wf.add_argument("--validation", action="store_true",
                    help="also hold out each user's second-latest interaction as a validation candidate list")
    wf.add_argument("--negatives", type=int, default=100, help="sampled negatives per test/validation user (K)")
    wf.add_argument("--seed", type=int, default=0, help="seed of the negative sampler; same seed, same bytes")
    run_ = parser.add_argument_group("execution")
    run_.add_argument("--output", type=Path, required=True,
                      help="output directory; built beside it and swapped in only when complete")
    run_.add_argument("--device", default="auto", choices=DEVICES,
                      help="gpu: cuDF + dask-cuda; cpu: pandas + dask.distributed; auto: gpu when present")
    run_.add_argument("--workers", type=int, default=0,
                      help="local Dask cluster workers (GPU: one per GPU); 0 runs in this process")
    run_.add_argument("--scheduler-address", help="run on an existing Dask cluster (e.g. tcp://10.0.0.1:8786); its workers must see "
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
        columns=ColumnNames(args.user_col, args.item_col, args.time_col, args.rating_col),
        min_rating=args.min_rating, min_user_interactions=args.min_user_interactions,
        freq_threshold=args.freq_threshold, validation=args.validation, negatives=args.negatives, seed=args.seed,
        device=args.device, workers=args.workers, scheduler_address=args.scheduler_address,
        partition_size=args.partition_size, train_files=args.train_files, progress=not args.quiet)


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
    try:
        stats = run(options_from_args(args))
    except EtlError as exc:
        exit_with(exc, parser.prog)
    except KeyboardInterrupt:
        atomic.abandon_all()
        print(f"{parser.prog}: interrupted; {args.output} left as it was", file=sys.stderr, flush=True)
        os._exit(130)  # without waiting for Dask's threads to finish their partitions
    if not args.quiet:
        print(f"wrote {args.output}: {stats['users']:,} users, {stats['items']:,} items, "
              f"{stats['interactions']:,} interactions, {stats['test_users']:,} test users "
              f"in {stats['seconds']['total']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
