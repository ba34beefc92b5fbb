"""Time-cutoff split: train is everything before a cutoff, test each user's first interaction after it.

Rows are compared by order key (docs/pipeline.md), so "before the cutoff" is exact:
order_key < (cutoff - first timestamp) * rows  <=>  timestamp < cutoff.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merlin_ncf.errors import EtlError
from merlin_ncf.workflows import split
from merlin_ncf.workflows.cluster import Backend
from merlin_ncf.workflows.options import parse_cutoff
from merlin_ncf.workflows.graph import FIRST_INDEX, INTERACTION, ORDER_KEY, PAIR
from merlin_ncf.workflows.readers import USER


@dataclass(frozen=True)
class Cutoff:
    timestamp: int  # in the log's own time unit; train is strictly before it
    text: str  # as given, or the quantile it came from


def resolve(cutoff: str | None, quantile: float | None, encoded: Path, backend: Backend, first_time: int,
            n_rows: int) -> Cutoff:
    """The cutoff timestamp, given or the `quantile` of the kept interactions' timestamps (exact:
    numpy's 'lower' quantile, so it is always a timestamp of the log)."""
    if (cutoff is None) == (quantile is None):
        raise EtlError("--split time needs exactly one of --cutoff and --cutoff-quantile")
    if cutoff is not None:
        return Cutoff(parse_cutoff(cutoff), cutoff)
    if not 0 < quantile < 1:
        raise EtlError(f"--cutoff-quantile {quantile} must lie strictly between 0 and 1")
    keys = split.read_parquet(encoded, backend, [ORDER_KEY])[ORDER_KEY].compute()
    times = np.asarray(keys.values.get() if backend.gpu else keys.values) // n_rows + first_time
    return Cutoff(int(np.quantile(times, quantile, method="lower")), f"quantile {quantile}")


def split_at(encoded: Path, work: Path, cutoff: Cutoff, first_time: int, n_rows: int, backend: Backend,
             validation: bool) -> tuple[dict[str, Path], Path, dict]:
    """Test positives (each user's first interaction at or after the cutoff, for users with
    interactions before it), validation positives (the latest train interaction of those users,
    where they keep another) and the train rows; returns (positives, train, counts)."""
    key = (cutoff.timestamp - first_time) * n_rows
    if key <= 0 or key >= 2**63:
        raise EtlError(f"--cutoff {cutoff.text} ({cutoff.timestamp}) leaves no interaction before it")
    rows = split.read_parquet(encoded, backend, INTERACTION)
    before, after = work / "before_cutoff", work / "after_cutoff"
    split.write_parquet({before: rows[rows[ORDER_KEY] < key], after: rows[rows[ORDER_KEY] >= key]})
    if split.count_rows(after) == 0:
        raise EtlError(f"--cutoff {cutoff.text} ({cutoff.timestamp}) leaves no interaction after it")
    known = _users(before, backend)
    after_rows = split.read_parquet(after, backend, INTERACTION)
    # Each user's first row after the cutoff: a per-user minimum (one tree reduction, one row
    # per user), then a row-wise match; order keys are unique, so one row per user.
    firsts = after_rows.groupby(USER)[ORDER_KEY].min().compute()
    later = np.sort(_values(firsts.index, backend))
    counts = {"split": "time", "cutoff": cutoff.timestamp, "cutoff_given": cutoff.text,
              "train_before_cutoff": split.count_rows(before),
              "after_cutoff_interactions": split.count_rows(after),
              "cold_start_users": int(len(np.setdiff1d(later, known)))}
    test = work / "test_positives"
    first_rows = after_rows[after_rows[ORDER_KEY].isin(_values(firsts, backend))]
    eligible = first_rows[USER].isin(known) & (first_rows[USER] >= FIRST_INDEX)
    split.write_parquet({test: first_rows[eligible][PAIR]})
    positives, train = {"test": test}, before
    if validation and split.count_rows(test):  # none: the caller reports that nothing is left to test
        with_test = _users(test, backend)
        rows = split.read_parquet(before, backend, INTERACTION)
        mine, others = work / "before_with_test", work / "before_without_test"
        split.write_parquet({mine: rows[rows[USER].isin(with_test)], others: rows[~rows[USER].isin(with_test)]})
        positives["validation"], rest = split.split_latest(mine, work, "validation", backend)
        train = work / "train_rows"
        split.write_parquet({train: backend.dd.concat([split.read_parquet(d, backend, INTERACTION)
                                                        for d in (rest, others)])})
    shutil.rmtree(after)
    return positives, train, counts


def _users(path: Path, backend: Backend) -> np.ndarray:
    return np.sort(_values(split.read_parquet(path, backend, [USER])[USER].unique().compute(), backend))


def _values(ids, backend: Backend) -> np.ndarray:
    return np.asarray(ids.values.get() if backend.gpu else ids.values)
