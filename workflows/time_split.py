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
from merlin_ncf.workflows.graph import FIRST_INDEX, INTERACTION, ORDER_KEY, PAIR, first_of_user
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
    firsts = work / "after_first"
    after_rows = split.to_dataset(split.read_parquet(after, backend, INTERACTION), backend)
    split.write_parquet({firsts: first_of_user(work / "after_stats").fit_transform(after_rows).to_ddf()[INTERACTION]})
    later = _users(after, backend)
    counts = {"split": "time", "cutoff": cutoff.timestamp, "cutoff_given": cutoff.text,
              "train_before_cutoff": split.count_rows(before),
              "after_cutoff_interactions": split.count_rows(after),
              "cold_start_users": int(len(np.setdiff1d(later, known)))}
    test = work / "test_positives"
    first_rows = split.read_parquet(firsts, backend, INTERACTION)
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
    for done in (after, firsts):
        shutil.rmtree(done)
    return positives, train, counts


def _users(path: Path, backend: Backend) -> np.ndarray:
    users = split.read_parquet(path, backend, [USER])[USER].unique().compute()
    return np.sort(np.asarray(users.values.get() if backend.gpu else users.values))
