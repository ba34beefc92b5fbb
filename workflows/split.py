"""Leave-one-out by time: hold out each user's latest interaction."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask

from workflows.cluster import Backend
from workflows.graph import FLAGGED, INTERACTION, PAIR, holdout_flag, select_holdout


def to_dataset(ddf, backend: Backend):
    from merlin.io import Dataset

    return Dataset(ddf, cpu=not backend.gpu)


def write_parquet(ddfs: dict[Path, object]) -> None:
    """Write several Dask DataFrames in one pass, so they share their upstream work."""
    dask.compute(*[ddf.to_parquet(str(path), write_index=False, compute=False) for path, ddf in ddfs.items()])


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


def split_latest(interactions: Path, item_cardinality: int, work_dir: Path, name: str,
                 backend: Backend) -> tuple[Path, Path]:
    """Write `name`_positives (user, item: one per eligible user) and `name`_rest (the other
    rows, with timestamps) under work_dir; returns their paths."""
    flagger = holdout_flag(item_cardinality, work_dir / f"{name}_stats")
    source = to_dataset(read_parquet(interactions, backend, INTERACTION), backend)
    flagger.fit(source)
    # Materialised once: both selections below read it instead of redoing the groupby join.
    flagged = work_dir / f"{name}_flagged"
    write_parquet({flagged: flagger.transform(source).to_ddf()[FLAGGED]})
    flagged_data = to_dataset(read_parquet(flagged, backend, FLAGGED), backend)
    positives, rest = work_dir / f"{name}_positives", work_dir / f"{name}_rest"
    write_parquet({
        positives: select_holdout(True).fit_transform(flagged_data).to_ddf()[PAIR],
        rest: select_holdout(False).fit_transform(flagged_data).to_ddf()[INTERACTION],
    })
    shutil.rmtree(flagged)
    return positives, rest
