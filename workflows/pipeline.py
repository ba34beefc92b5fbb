"""The ETL's phases, in order: read, filter, encode, split, negatives, write.

Separate from the command line (workflows/etl.py) so that NVTabular and Merlin are imported
only once the options have been checked: --help and early input errors stay instant.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from merlin_ncf.workflows.cluster import Backend, quiet_merlin

quiet_merlin()

import pandas as pd  # noqa: E402

import dask  # noqa: E402
from dask.utils import parse_bytes  # noqa: E402

from merlin_ncf.workflows import graph, loo, negatives, split, time_split  # noqa: E402
from merlin_ncf.errors import EtlError, one_line  # noqa: E402
from merlin_ncf.feature_spec import FeatureSpec, LABEL_CHANNEL, ITEM_CHANNEL, USER_CHANNEL  # noqa: E402
from merlin_ncf.workflows.options import EtlOptions  # noqa: E402
from merlin_ncf.workflows.graph import ORDER_KEY  # noqa: E402
from merlin_ncf.workflows.readers import (ITEM, RATING, TIME, USER, has_header_csv, movielens_csv_to_parquet,  # noqa: E402
                                          read_item_table, read_log)


LABEL = "label"
PHASES = ("read", "filter", "encode", "split", "negatives", "write")
# Errors pandas/pyarrow raise while parsing a bad log, reported as one line.
PARSE_ERRORS = (ValueError, TypeError, OverflowError, UnicodeDecodeError, KeyError)


class PhaseClock:
    """Per-phase wall times, printed as each phase ends, with a progress bar over phases."""

    def __init__(self, progress: bool):
        from merlin_ncf.progress import progress_bar

        self.seconds: dict[str, float] = {}
        self.bar = progress_bar(total=len(PHASES), desc="etl", unit=" phase", enabled=progress, leave=False)
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


def execute(opts: EtlOptions, source: Path, dataset_name: str, backend: Backend, out: Path,
            clock: PhaseClock) -> dict:
    """Run every phase into `out` (the temporary output directory); returns the stats."""
    work = out / "_work"
    counts: dict[str, int] = {}

    with clock.phase("read") as notes:
        fmt = opts.format if not opts.download or opts.format != "auto" else opts.download
        log = None
        try:
            log = read_log(source, fmt, backend, opts.columns, opts.partition_size)
            if has_header_csv(log) and not backend.gpu:
                first_time, last_time = movielens_csv_to_parquet(log, work / "raw", parse_bytes(opts.partition_size),
                                                                 rating=opts.min_rating is not None)
            else:
                raw = log.interactions if opts.min_rating is not None else log.interactions.drop(columns=RATING,
                                                                                                 errors="ignore")
                first_time, last_time = split.write_parquet({work / "raw": raw}, raw[TIME].min(), raw[TIME].max())
        except PARSE_ERRORS as exc:
            raise EtlError(f"cannot parse {log.ratings_path if log else source}: {one_line(exc)}") from None
        counts["raw_interactions"] = split.count_rows(work / "raw")
        if counts["raw_interactions"] == 0:
            raise EtlError(f"{source} holds no interactions")
        has_rating = RATING in log.interactions.columns
        titles = read_item_table(opts.item_table, opts.columns.item) if opts.item_table else log.items
        first_time = _check_order_key_fits(int(first_time), int(last_time), counts["raw_interactions"])
        notes.append(f"{counts['raw_interactions']:,} interactions ({log.fmt}) from {source}")

    with clock.phase("filter") as notes:
        kept, users, counts["duplicates_dropped"] = _filter(opts, work, has_rating, backend, first_time,
                                                            counts["raw_interactions"])
        counts["interactions"] = int(users[loo.COUNT].sum())
        if counts["interactions"] == 0:
            raise EtlError("no interactions left after --min-rating / --min-user-interactions")
        notes.append(f"{counts['interactions']:,} kept, {counts['duplicates_dropped']:,} repeated pairs dropped")

    with clock.phase("encode") as notes:
        loo_split = opts.split != "time"
        passthrough = [ORDER_KEY, loo.HOLDOUT] if loo_split else [ORDER_KEY]
        etl_workflow, saved_workflow = graph.encoding(opts.freq_threshold, work / "categories", passthrough)
        rows = kept
        if loo_split:  # flagged before encoding, so that the encoded rows go straight to their lists
            kept = loo.flag_all(kept, users, opts.validation)
        if backend.gpu:  # cuDF merges fast: Categorify's own transform
            data = split.to_dataset(kept, backend)
            etl_workflow.fit(data)
            encoded = etl_workflow.transform(data).to_ddf()
        else:  # fitted on the ids alone (no flags computed), applied by a lookup (graph.encode)
            data = split.to_dataset(split.first_row_apart(rows[graph.PAIR]), backend)
            saved_workflow.fit(data)
            encoded = graph.encode_all(kept, graph.vocabularies(saved_workflow))
        saved_workflow.fit_schema(data.schema.select_by_name(graph.PAIR))
        saved_workflow.save(out / "workflow")
        schema = _id_schema(saved_workflow)
        n_users, n_items = (_cardinality(schema, c) for c in graph.PAIR)
        for column, cardinality in zip(("user", "item"), (n_users, n_items)):
            if cardinality <= graph.FIRST_INDEX:
                raise EtlError(f"--freq-threshold {opts.freq_threshold} maps every {column} to the out-of-vocabulary "
                               f"index: no {column} occurs that often; lower it")
        notes.append(f"Categorify: {n_users:,} user and {n_items:,} item indices (3 reserved)")

    with clock.phase("split") as notes:
        held_out = ["test", "validation"] if opts.validation else ["test"]
        if loo_split:
            positives = {name: work / f"{name}_positives" for name in held_out}
            remaining = work / "rest"
            which = {positives["test"]: loo.TEST, remaining: loo.TRAIN}
            if opts.validation:
                which[positives["validation"]] = loo.VALIDATION
            meta = encoded._meta[graph.PAIR]
            keys, = split.write_parquet({path: encoded.map_partitions(loo.list_rows, rows, meta=meta)
                                         for path, rows in which.items()},
                                        _all_pair_keys(encoded, n_items, backend.xp))
        else:
            keys, = split.write_parquet({work / "encoded": encoded[graph.INTERACTION]},
                                        _all_pair_keys(encoded, n_items, backend.xp))
            cutoff = time_split.resolve(opts.cutoff, opts.cutoff_quantile, work / "encoded", backend, first_time,
                                        counts["raw_interactions"])
            positives, remaining, split_counts = time_split.split_at(
                work / "encoded", work, cutoff, first_time, counts["raw_interactions"], backend, opts.validation)
            counts.update(split_counts)
            held_out = list(positives)
        counts["test_users"] = split.count_rows(positives["test"])
        if counts["test_users"] == 0:
            raise EtlError("no user with interactions before the cutoff has one after it: nothing to test"
                           if opts.split == "time" else
                           "no user has two or more interactions: nothing to hold out for test")
        if opts.split == "time":
            notes.append(f"cutoff {counts['cutoff']}: {counts['test_users']:,} test users, "
                         f"{counts['cold_start_users']:,} cold-start users (first seen after it, no list)")
        else:
            notes.append(f"held out the latest interaction of {counts['test_users']:,} users for "
                         f"{' and '.join(held_out)}")

    with clock.phase("negatives") as notes:
        xp = backend.xp
        keys = negatives.unique_sorted_runs(xp.asarray(keys.values if hasattr(keys, "values") else keys), xp)
        rng = xp.random.default_rng(opts.seed)
        for name in held_out:
            candidates = _candidates(positives[name], keys, n_items, opts.negatives, rng, backend)
            counts[f"{name}_users"] = len(candidates) // (opts.negatives + 1)
            _write_merlin(candidates, out / name, _candidate_schema(schema), 1, backend)
        del keys
        notes.append(f"{opts.negatives} per user, seed {opts.seed}")

    with clock.phase("write") as notes:
        counts["train_interactions"] = split.count_rows(remaining)
        n_files = opts.train_files or max(2, math.ceil(counts["train_interactions"] / 2_000_000))
        train = split.read_balanced(remaining, backend, graph.PAIR, n_files)
        _write_merlin(train, out / "train", schema, n_files, backend)
        items = _item_table(saved_workflow, titles)
        items.to_parquet(out / "items.parquet", index=False)
        shutil.rmtree(work)
        spec = _feature_spec(out, n_users, n_items, opts, dataset_name, held_out)
        spec.save(out)
        stats = _stats(counts, n_users, n_items, opts, backend, dataset_name, log.fmt)
        notes.append(f"{counts['train_interactions']:,} train rows in {n_files} files")
    stats["seconds"] = dict(clock.seconds, total=round(sum(clock.seconds.values()), 3))
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _filter(opts: EtlOptions, work: Path, has_rating: bool, backend: Backend, first_time: int,
            n_rows: int):
    """The raw log with order keys, lazily filtered: --min-rating, each (user, item) pair's first
    interaction only, --min-user-interactions. Returns it, its per-user statistics (workflows/loo.py)
    and the number of repeated pairs dropped."""
    if opts.min_rating is not None and not has_rating:
        raise EtlError("--min-rating given but the log has no rating column")
    columns = graph.INTERACTION + ([RATING] if opts.min_rating is not None else [])
    rows = split.read_ordered(work / "raw", backend, columns, first_time, n_rows)
    if opts.min_rating is not None:
        rows = rows[rows[RATING] >= opts.min_rating][graph.INTERACTION]
    hashes = rows.map_partitions(loo.sorted_pair_hash, meta=(None, "uint64"))
    hashes, users = dask.compute(hashes, loo.user_stats(rows))
    repeated = loo.repeated_hashes(hashes.values, backend.xp)
    del hashes
    rated = int(users[loo.COUNT].sum())
    if len(repeated):  # only rows whose pair hash repeats can repeat a pair: checked exactly
        candidate = rows.map_partitions(loo.pair_hash, meta=(None, "uint64")).isin(repeated)
        # One more pass: the candidates, and the statistics of every other row to combine with theirs.
        candidates, others = dask.compute(rows[candidate], loo.user_stats(rows[~candidate]))
        later = loo.later_duplicates(candidates)
        if len(later):
            rows = rows[~rows[ORDER_KEY].isin(later)]
            users = loo.combine_stats(others, candidates[~candidates[ORDER_KEY].isin(later)])
    duplicates = rated - int(users[loo.COUNT].sum())
    if opts.min_user_interactions > 1:
        users = users[users[loo.COUNT] >= opts.min_user_interactions]
        rows = rows[rows[USER].isin(users.index)]
    return rows, users, duplicates


def _id_schema(workflow):
    """The encoded id columns' schema (tags, domain) without the fit-time categories path."""
    from merlin.schema import Schema

    from merlin.schema import ColumnSchema

    return Schema([ColumnSchema(c.name, tags=c.tags, dtype=c.dtype, is_list=c.is_list, is_ragged=c.is_ragged,
                                properties={k: v for k, v in c.properties.items() if k != "cat_path"})
                   for c in workflow.output_schema])


def _cardinality(schema, column: str) -> int:
    return int(schema[column].int_domain.max) + 1


def _check_order_key_fits(first: int, last: int, n_rows: int) -> int:
    """The first timestamp, once sure that (timestamp - first) * n_rows + position fits in int64."""
    if (last - first + 1) * n_rows >= 2**63:
        raise EtlError(f"timestamps spanning {last - first} units x {n_rows} interactions overflow the int64 "
                       "order key; rescale the time column (e.g. to seconds)")
    return first


def _pair_keys(frame, n_items: int, xp):
    return xp.sort(negatives.pair_keys(frame[USER].values, frame[ITEM].values, n_items, xp))


def _all_pair_keys(encoded, n_items: int, xp):
    """The negatives' exclusion keys of every encoded row, lazily, as sorted runs (one per
    partition): computed in the pass that writes the split, so the encoded log is not read a
    second time for them."""
    return encoded.map_partitions(_pair_keys, n_items, xp, meta=("key", "int64"))


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
    uniques = pd.read_parquet(graph.categories_file(workflow, ITEM))
    items = pd.DataFrame({ITEM: uniques.index.astype("int64"), "raw_item_id": uniques[ITEM]})
    items = items[items[ITEM] >= graph.FIRST_INDEX].reset_index(drop=True)
    items["raw_item_id"] = items["raw_item_id"].astype(raw_id_dtype(items["raw_item_id"]))
    if titles is not None:
        try:
            titles = titles.astype({"raw_item_id": items["raw_item_id"].dtype})
        except ValueError:
            raise EtlError("the item table's ids are not integers, unlike the log's") from None
        items = items.merge(titles, on="raw_item_id", how="left")
        items[["title", "genres"]] = items[["title", "genres"]].fillna("")
    return items


def raw_id_dtype(ids) -> str:
    """The raw ids' type as this project writes it (docs/pipeline.md): int64 or string."""
    return "int64" if pd.api.types.is_integer_dtype(ids) else "str"


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
                                                                    "freq_threshold", "negatives", "seed", "split",
                                                                    "cutoff", "cutoff_quantile")},
    }
