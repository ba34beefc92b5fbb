"""Leave-one-out by time: hold out each user's latest interaction."""

from __future__ import annotations

from pathlib import Path

import dask

from merlin_ncf.workflows.cluster import Backend
from merlin_ncf.workflows import loo
from merlin_ncf.workflows.graph import INTERACTION, ORDER_KEY, PAIR
from merlin_ncf.workflows.readers import TIME


def to_dataset(ddf, backend: Backend):
    """A merlin Dataset typed from the frame's metadata: scalar columns only here, so merlin's
    schema inference (it computes a partition to look for list columns) is skipped."""
    from merlin.io import Dataset
    from merlin.schema import ColumnSchema, Schema

    schema = Schema([ColumnSchema(name, dtype=dtype) for name, dtype in ddf._meta.dtypes.items()])
    return Dataset(ddf, cpu=not backend.gpu, schema=schema)


def first_row_apart(ddf):
    """The same rows, the first partition's first row as a partition of its own. For
    Workflow.fit: after fitting, merlin transforms the first non-empty partition whole just to
    learn the output dtypes (Categorify's pandas transform: a merge and a sort); one row is
    enough. Categorify's fit does not depend on the partitioning (tests/test_etl_ties.py)."""
    import dask.dataframe as dd

    first = ddf.partitions[0]
    parts = [first.map_partitions(lambda frame: frame.iloc[:1]), first.map_partitions(lambda frame: frame.iloc[1:])]
    return dd.concat(parts + ([ddf.partitions[1:]] if ddf.npartitions > 1 else []))


def write_parquet(ddfs: dict[Path, object], *also) -> tuple:
    """Write several Dask DataFrames in one pass, so they share their upstream work; `also`
    (other Dask collections over the same upstream) are computed in that pass and returned."""
    # Intermediates, read back once or twice: uncompressed, they write and read twice as fast.
    writes = [ddf.to_parquet(str(path), write_index=False, compression=None, compute=False)
              for path, ddf in ddfs.items()]
    return dask.compute(*writes, *also)[len(writes):]


def parquet_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.parquet"), key=lambda f: int(f.stem.split(".")[-1]))


def count_rows(path: Path) -> int:
    """Rows of an intermediate result, from the parquet footers alone."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(path))


def read_parquet(path: Path, backend: Backend, columns: list[str]):
    """An intermediate result, without its empty files: merlin's executor mishandles empty
    partitions (see workflows/graph.py), and a Filter upstream may have left some."""
    import pyarrow.parquet as pq

    files = parquet_files(path)
    non_empty = [str(f) for f in files if pq.ParquetFile(f).metadata.num_rows > 0] or [str(f) for f in files[:1]]
    return backend.dd.read_parquet(non_empty, columns=columns)


def read_ordered(raw: Path, backend: Backend, columns: list[str], first_time: int, n_rows: int):
    """A raw log (parquet files in reading order) with ORDER_KEY = (timestamp - first_time) *
    n_rows + position, the row's number in the input, in place of the timestamp.

    Hand-written: NVTabular has no row-number op and a partition does not know its offset. The
    files' footers give each one's offset, so the key is the same whatever the partitioning.
    """
    import pyarrow.parquet as pq
    from dask.dataframe import from_map

    files = parquet_files(raw)
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    offsets = [sum(counts[:i]) for i in range(len(files))]
    parts = [(str(f), offset) for f, offset, count in zip(files, offsets, counts) if count] or [(str(files[0]), 0)]
    wanted = [c for c in columns if c != ORDER_KEY]
    xp = backend.xp

    def load(part):
        path, offset = part
        frame = backend.df.read_parquet(path, columns=list(dict.fromkeys(wanted + [TIME])))
        key = (frame[TIME].values - first_time) * n_rows + xp.arange(offset, offset + len(frame), dtype="int64")
        # A new frame (one block): selecting columns beside an added one costs pandas a gather.
        return backend.df.DataFrame({c: key if c == ORDER_KEY else frame[c].values for c in columns})

    return from_map(load, parts)


def read_balanced(path: Path, backend: Backend, columns: list[str], n_parts: int):
    """An intermediate result's rows in order as `n_parts` partitions of equal size (to a row):
    the same partitions whatever its files' sizes, so the files written from them do not depend
    on --partition-size or the worker count. Hand-written: Dask repartitions only by index."""
    import pyarrow.parquet as pq
    from dask.dataframe import from_map

    files = parquet_files(path)
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    starts = [sum(counts[:i]) for i in range(len(files))]
    bounds = [sum(counts) * k // n_parts for k in range(n_parts + 1)]
    meta = backend.df.read_parquet(str(files[0]), columns=columns).iloc[:0]

    def load(rows):
        low, high = rows
        pieces = [backend.df.read_parquet(str(f), columns=columns).iloc[max(low - start, 0):high - start]
                  for f, start, count in zip(files, starts, counts) if start < high and start + count > low]
        return backend.df.concat(pieces, ignore_index=True) if pieces else meta

    return from_map(load, list(zip(bounds[:-1], bounds[1:])), meta=meta)


def split_latest(interactions: Path, work_dir: Path, name: str, backend: Backend) -> tuple[Path, Path]:
    """Write `name`_positives (user, item: one per eligible user) and `name`_rest (the other
    rows, with order keys) under work_dir; returns their paths."""
    rows = read_parquet(interactions, backend, INTERACTION)
    users = loo.user_stats(rows).compute()
    flagged = loo.flag_all(rows, users, False)
    held = loo.held_out(flagged, loo.TEST)
    positives, rest = work_dir / f"{name}_positives", work_dir / f"{name}_rest"
    write_parquet({positives: flagged[held][PAIR], rest: flagged[~held][INTERACTION]})
    return positives, rest
