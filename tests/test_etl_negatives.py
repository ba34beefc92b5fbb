"""The negative sampler's collision check (workflows/negatives.py) against its definition."""

import numpy as np
import pytest

from merlin_ncf.workflows import negatives


def brute_force_bad(history: dict[int, set], users, block):
    """A draw is bad when its user saw the item, or an earlier draw of its row is the same."""
    bad = np.zeros(block.shape, dtype=bool)
    for row, (user, draws) in enumerate(zip(users, block)):
        for column, item in enumerate(draws):
            bad[row, column] = item in history[user] or item in draws[:column]
    return bad


@pytest.mark.parametrize("budget", [1, 50, 10**6])
def test_bad_draws_match_the_definition_in_any_chunking_and_user_order(budget):
    rng = np.random.default_rng(3)
    n_items, n_users = 40, 30
    history = {u: set(rng.choice(np.arange(3, n_items), size=rng.integers(0, 25), replace=False).tolist())
               for u in range(n_users)}
    keys = np.sort(np.array([u * n_items + i for u, items in history.items() for i in items], dtype=np.int64))
    users = rng.permutation(np.r_[np.arange(n_users), [5, 5]])  # unsorted, one user on three rows
    block = rng.integers(3, n_items, size=(len(users), 12))
    got = negatives._bad_draws(keys, users[:, None], block, n_items, np, budget=budget)
    np.testing.assert_array_equal(got, brute_force_bad(history, users, block))


def test_sampled_negatives_are_distinct_and_unseen():
    rng = np.random.default_rng(4)
    n_items, n_users, k = 60, 50, 20
    users = np.repeat(np.arange(n_users), 30)
    keys = np.unique(users * n_items + rng.integers(3, n_items, size=users.size))
    sampled = negatives.sample_negatives(keys, np.arange(n_users), n_items, 3, k, np.random.default_rng(0))
    for user, row in enumerate(sampled):
        assert len(set(row.tolist())) == k and row.min() >= 3
        assert not np.isin(user * n_items + row, keys).any()


def test_unique_sorted_runs_is_np_unique_of_the_concatenated_runs():
    rng = np.random.default_rng(3)
    runs = [np.sort(rng.integers(0, 50, size)) for size in (0, 30, 1, 45)]
    merged = np.concatenate(runs)
    assert negatives.unique_sorted_runs(merged).tolist() == np.unique(merged).tolist()
    assert negatives.unique_sorted_runs(merged[:0]).tolist() == []
