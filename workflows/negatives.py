"""Evaluation negatives: for each held-out user, K distinct items the user never interacted with.

Written by hand because NVTabular has no sampler: vectorised rejection sampling over all
users at once against the sorted (user * n_items + item) keys of every interaction.
Works on numpy or cupy arrays alike (pass the module as `xp`).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from merlin_ncf.errors import EtlError


def pair_keys(users, items, n_items: int, xp: ModuleType = np):
    """The int64 key user * n_items + item of each interaction."""
    return users.astype(xp.int64) * n_items + items.astype(xp.int64)


def merge_sorted_runs(runs, xp: ModuleType = np):
    """Concatenated sorted runs (e.g. one per partition, sorted where they were made, in
    parallel) in order: a stable sort merges the runs it finds (timsort), faster than sorting."""
    return xp.sort(runs, kind="stable")


def unique_sorted_runs(runs, xp: ModuleType = np):
    """The distinct values of concatenated sorted runs, in order (np.unique sorts from scratch)."""
    merged = merge_sorted_runs(runs, xp)
    return merged[xp.concatenate([xp.ones(min(1, merged.size), dtype=bool), merged[1:] != merged[:-1]])]



# Bytes of the per-chunk "seen" map in _bad_draws: rows * n_items bytes at a time.
SEEN_MAP_BYTES = 2**25


def _bad_draws(sorted_keys, users, block, n_items: int, xp: ModuleType, budget: int = SEEN_MAP_BYTES):
    """True where a draw is one of its row's user's items, or repeats an earlier draw of its row.

    A chunk of rows at a time, each row's user's items are marked in a (rows, n_items) byte map,
    then the draws are checked and marked column by column: one random access per draw, where
    a binary search over every key (and a sort of each row to find repeats) cost several times
    more at ml-20m size.
    """
    users = users.ravel().astype(xp.int64)
    bad = xp.empty(block.shape, dtype=bool)
    first_key = xp.searchsorted(sorted_keys, users * n_items)
    history = xp.searchsorted(sorted_keys, (users + 1) * n_items) - first_key
    step = max(1, budget // n_items)
    seen = xp.zeros(min(step, block.shape[0]) * n_items, dtype=bool)  # reused: fresh pages cost more than resets
    for low in range(0, block.shape[0], step):
        high = min(low + step, block.shape[0])
        lengths = history[low:high]
        rows = xp.repeat(xp.arange(high - low, dtype=xp.int64), lengths)
        offsets = xp.cumsum(lengths) - lengths  # where each row's items start among `rows`
        positions = xp.arange(rows.size, dtype=xp.int64) + xp.repeat(first_key[low:high] - offsets, lengths)
        marked = rows * n_items + sorted_keys[positions] - users[low:high][rows] * n_items
        seen[marked] = True
        columns = (xp.arange(high - low, dtype=xp.int64)[:, None] * n_items + block[low:high]).T.copy()
        bad_columns = xp.empty(columns.shape, dtype=bool)
        for column, index in enumerate(columns):  # in order: a draw is checked against the earlier ones
            bad_columns[column] = seen[index]
            seen[index] = True
        bad[low:high] = bad_columns.T
        seen[marked] = False
        seen[columns] = False
    return bad


def check_feasible(sorted_keys, users, n_items: int, first_index: int, k: int, xp: ModuleType = np) -> None:
    """Every user needs k items outside their history among the real items."""
    key_users = sorted_keys // n_items
    seen = xp.searchsorted(key_users, users, side="right") - xp.searchsorted(key_users, users, side="left")
    free = (n_items - first_index) - seen
    worst = int(free.min()) if free.size else k
    if worst < k:
        raise EtlError(f"a test user has only {worst} items left to sample as negatives; lower --negatives below that")


def sample_negatives(sorted_keys, users, n_items: int, first_index: int, k: int, rng,
                     xp: ModuleType = np, max_rounds: int = 1000):
    """A (len(users), k) int64 array; row i holds k distinct items in [first_index, n_items)
    that users[i] never interacted with. Only colliding draws are redrawn, so the result
    depends on the seed and the data alone."""
    check_feasible(sorted_keys, users, n_items, first_index, k, xp)
    users = users.astype(xp.int64)[:, None]
    candidates = rng.integers(first_index, n_items, size=(users.shape[0], k), dtype=xp.int64)
    rows = xp.arange(users.shape[0])  # rows that may still hold a bad draw
    for _ in range(max_rounds):
        block = candidates[rows]
        bad = _bad_draws(sorted_keys, users[rows], block, n_items, xp)
        row_bad = bad.any(axis=1)
        rows, block, bad = rows[row_bad], block[row_bad], bad[row_bad]
        if rows.size == 0:
            return candidates
        block[bad] = rng.integers(first_index, n_items, size=int(bad.sum()), dtype=xp.int64)
        candidates[rows] = block
    raise EtlError("negative sampling did not converge: too few items outside the users' histories")


def candidate_lists(users, positives, negatives, xp: ModuleType = np):
    """Rows grouped per user: the positive first (label 1), then its negatives (label 0)."""
    k = negatives.shape[1]
    items = xp.concatenate([positives.astype(xp.int64)[:, None], negatives], axis=1).ravel()
    labels = xp.tile(xp.asarray([1.0] + [0.0] * k, dtype=xp.float32), users.shape[0])
    return xp.repeat(users.astype(xp.int64), k + 1), items, labels
