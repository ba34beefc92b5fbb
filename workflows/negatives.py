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



def _contains(sorted_keys, queries, xp: ModuleType):
    pos = xp.searchsorted(sorted_keys, queries)
    pos = xp.minimum(pos, sorted_keys.size - 1)
    return sorted_keys[pos] == queries


def _bad_draws(sorted_keys, users, block, n_items: int, xp: ModuleType):
    """True where a draw repeats an earlier one (in sorted order) of its row, or is one of the
    row's user's items. Looked up in sorted order: with rows ordered by user, the queries are
    then ascending, and the binary searches walk the keys in order (several times faster)."""
    order = xp.argsort(block, axis=1, kind="stable")
    ranked = xp.take_along_axis(block, order, axis=1)
    bad_ranked = xp.zeros(block.shape, dtype=bool)
    bad_ranked[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    if sorted_keys.size:
        bad_ranked |= _contains(sorted_keys, users * n_items + ranked, xp)
    bad = xp.empty_like(bad_ranked)
    xp.put_along_axis(bad, order, bad_ranked, axis=1)
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
