"""Filter and leave-one-out as Dask reductions whose results are small, plus row-wise maps.

Hand-written because NVTabular's JoinGroupby + Filter costs a fit pass, a join pass, a written
intermediate and a dtype sample per step (most of the ETL's time); here the ETL reads its log
once per statistic and joins nothing row-sized:

- repeated (user, item) pairs: one 8-byte hash per row finds the candidates, checked exactly
  (the statistics of the other rows come from that same pass);
- per user: interaction count, latest and second-latest order key (one tree reduction whose
  partials hold one row per user), from which the activity filter and the held-out rows follow.

Order keys are unique (they include the row's input position), so "latest" is one row.
Every function takes pandas or cuDF partitions alike.
"""

from __future__ import annotations

from merlin_ncf.workflows.graph import FIRST_INDEX, ORDER_KEY, PAIR
from merlin_ncf.workflows.readers import USER

COUNT, LATEST, SECOND = "count", "latest", "second"
HOLDOUT = "holdout"
# HOLDOUT values: which list a row goes to.
TRAIN, TEST, VALIDATION = 0, 1, 2
NONE = -1  # no second-latest interaction


def pair_hash(frame):
    """A uint64 hash of each row's (user, item): equal pairs, equal hashes."""
    if hasattr(frame, "hash_values"):  # cuDF
        return frame[PAIR].hash_values().astype("uint64")
    import pandas as pd

    if all(pd.api.types.is_integer_dtype(frame[c].dtype) for c in PAIR):
        return pd.Series(_mix(frame[PAIR[0]].to_numpy(), frame[PAIR[1]].to_numpy()), index=frame.index)
    return pd.util.hash_pandas_object(frame[PAIR], index=False)


def _mix(users, items):
    """Integer ids: one multiply-add, then splitmix64's bijective finaliser (a tenth of pandas'
    object hash's time; a rare collision only costs an exact check)."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + items.astype(np.uint64)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def sorted_pair_hash(frame):
    """A partition's pair hashes, sorted: sorted here, in parallel, the whole log's hashes are
    sorted runs that one merge (`repeated_hashes`) orders."""
    hashes = pair_hash(frame)
    if hasattr(hashes, "to_cupy"):  # cuDF
        return hashes.sort_values(ignore_index=True)
    import numpy as np
    import pandas as pd

    return pd.Series(np.sort(hashes.to_numpy()))


def repeated_hashes(sorted_runs, xp):
    """The hashes occurring more than once among the concatenated sorted runs (an array)."""
    from merlin_ncf.workflows.negatives import merge_sorted_runs, unique_sorted_runs

    merged = merge_sorted_runs(sorted_runs, xp)
    return unique_sorted_runs(merged[1:][merged[1:] == merged[:-1]], xp)


def later_duplicates(candidates):
    """Order keys of the rows repeating an earlier (user, item) pair, among `candidates` (a
    frame holding every row of each pair it holds)."""
    ordered = candidates.sort_values(ORDER_KEY)
    return ordered[ordered.duplicated(PAIR, keep="first")][ORDER_KEY]


def _top_two(users, keys, frame_module):
    """Per user (the index): the largest and second-largest key (NONE when there is none)."""
    frame = frame_module.DataFrame({USER: users, ORDER_KEY: keys})
    latest = frame.groupby(USER)[ORDER_KEY].max()
    others = frame[frame[ORDER_KEY].values != frame[USER].map(latest).values]
    second = others.groupby(USER)[ORDER_KEY].max().reindex(latest.index).fillna(NONE).astype("int64")
    return latest, second


def _frame_module(frame):
    import importlib

    return importlib.import_module(type(frame).__module__.split(".")[0])


def _chunk(frame):
    module = _frame_module(frame)
    latest, second = _top_two(frame[USER], frame[ORDER_KEY], module)
    counts = frame.groupby(USER)[ORDER_KEY].size().astype("int64")
    return module.DataFrame({COUNT: counts, LATEST: latest, SECOND: second})


def _combine(partials):
    """Merge per-user partials: counts add up, the top two of all partials' top twos win."""
    module = _frame_module(partials)
    counts = partials.groupby(level=0)[COUNT].sum()
    keys = module.concat([partials[LATEST], partials[SECOND]])
    keys = keys[keys != NONE]
    latest, second = _top_two(keys.index.values, keys.values, module)
    return module.DataFrame({COUNT: counts, LATEST: latest, SECOND: second.reindex(counts.index)})


def user_stats(ddf):
    """A lazy frame indexed by user: COUNT, LATEST and SECOND order keys (NONE if none)."""
    meta = _chunk(ddf._meta)
    return ddf.reduction(_chunk, aggregate=_combine, combine=_combine, meta=meta, split_every=8,
                         token="user-stats")


def combine_stats(stats, rows):
    """Per-user statistics of two disjoint sets of rows: `stats` of one (computed) and the
    other, `rows` (a computed frame)."""
    module = _frame_module(stats)
    return _combine(module.concat([stats, _chunk(rows)]))


def flag(frame, stats, validation: bool):
    """Add HOLDOUT to a partition: TEST for a user's latest row when the user has two or more,
    VALIDATION for the second latest when three or more (one row stays in train), else TRAIN.
    The out-of-vocabulary pseudo-user is left to `held_out` once ids are encoded."""
    per_row = stats.reindex(frame[USER].values)
    count, key = per_row[COUNT].values, frame[ORDER_KEY].values
    test = (key == per_row[LATEST].values) & (count >= 2)
    holdout = test.astype("int8")
    if validation:
        holdout[(key == per_row[SECOND].values) & (count >= 3)] = VALIDATION
    return type(frame)({**{c: frame[c].values for c in frame.columns}, HOLDOUT: holdout})


def flag_all(rows, stats, validation: bool):
    """`flag` over every partition of a Dask frame, with `stats` (computed) sent once."""
    import dask

    return rows.map_partitions(flag, dask.delayed(stats), validation, meta=flag(rows._meta, stats.iloc[:0], validation))


def held_out(frame, which: int):
    """Rows of one list, once encoded: the out-of-vocabulary pseudo-user keeps all in train."""
    return (frame[HOLDOUT] == which) & (frame[USER] >= FIRST_INDEX)


def list_rows(frame, which: int):
    """The (user, item) rows of one list of an encoded, flagged partition: TEST, VALIDATION, or
    TRAIN (every row not held out). One pass over plain arrays: pandas would gather twice."""
    holdout, users = frame[HOLDOUT].values, frame[USER].values
    real = users >= FIRST_INDEX
    rows = (holdout == TRAIN) | ~real if which == TRAIN else (holdout == which) & real
    return type(frame)({c: frame[c].values[rows] for c in PAIR})
