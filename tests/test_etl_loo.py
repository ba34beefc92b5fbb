"""The ETL's Dask reductions (workflows/loo.py) on hand-made logs: results must not depend on
how rows fall into partitions, and a partition may hold nothing of interest."""

import dask
import dask.dataframe as dd
import pandas as pd
import pytest

from merlin_ncf.workflows import loo
from merlin_ncf.workflows.graph import FIRST_INDEX, ORDER_KEY, PAIR


def frame(users, items, keys):
    return pd.DataFrame({"user_id": users, "item_id": items, ORDER_KEY: keys})


@pytest.mark.parametrize("npartitions", [1, 2, 4])
def test_user_stats_count_latest_and_second_latest_across_partitions(npartitions):
    # user 5: keys 1, 9, 8, 3 spread over partitions; user 6: a single row; user 7: two rows.
    log = frame([5, 6, 5, 7, 5, 7, 5], [1, 1, 2, 1, 3, 2, 4], [1, 2, 9, 4, 8, 6, 3])
    stats = loo.user_stats(dd.from_pandas(log, npartitions=npartitions, sort=False)).compute().sort_index()
    assert stats.index.tolist() == [5, 6, 7]
    assert stats[loo.COUNT].tolist() == [4, 1, 2]
    assert stats[loo.LATEST].tolist() == [9, 2, 6]
    assert stats[loo.SECOND].tolist() == [8, loo.NONE, 4]


def test_user_stats_take_string_ids():
    log = frame(["b", "a", "b", "b"], ["x", "y", "y", "z"], [5, 1, 7, 2])
    stats = loo.user_stats(dd.from_pandas(log, npartitions=3, sort=False)).compute().sort_index()
    assert stats.loc["b"].tolist() == [3, 7, 5] and stats.loc["a"].tolist() == [1, 1, loo.NONE]


def test_flag_holds_out_latest_for_test_and_second_latest_for_validation():
    log = frame([5, 5, 5, 6, 7, 7], [3, 7, 4, 3, 1, 2], [1, 9, 8, 2, 5, 6])
    stats = loo.user_stats(dd.from_pandas(log, npartitions=2, sort=False)).compute()
    flagged = loo.flag(log, stats, validation=True)
    # user 5 (3 rows): test + validation; user 6 (1 row): train; user 7 (2 rows): test only.
    assert flagged[loo.HOLDOUT].tolist() == [loo.TRAIN, loo.TEST, loo.VALIDATION, loo.TRAIN, loo.TRAIN, loo.TEST]
    assert loo.flag(log, stats, validation=False)[loo.HOLDOUT].tolist() == [0, 1, 0, 0, 0, 1]


def test_out_of_vocabulary_user_is_never_held_out():
    encoded = pd.DataFrame({"user_id": [FIRST_INDEX - 1, FIRST_INDEX], loo.HOLDOUT: [loo.TEST, loo.TEST]})
    assert loo.held_out(encoded, loo.TEST).tolist() == [False, True]


def test_later_duplicates_are_the_repeats_of_each_pairs_earliest_row():
    # (5, 3) three times, earliest key 2; (6, 3) once.
    rows = frame([5, 5, 6, 5], [3, 3, 3, 3], [7, 4, 1, 2])
    assert sorted(loo.later_duplicates(rows).tolist()) == [4, 7]


def test_equal_pairs_hash_equal_across_partitions():
    log = frame([5, 6, 5, 5], [3, 3, 3, 4], [1, 2, 3, 4])
    hashes = dask.compute(dd.from_pandas(log, npartitions=2, sort=False).map_partitions(loo.pair_hash))[0]
    assert hashes.iloc[0] == hashes.iloc[2] and len(set(hashes.tolist())) == 3


def test_user_stats_match_pandas_through_a_multi_level_tree():
    """More partitions than one combine step takes (8): partials of partials are merged too."""
    import numpy as np

    rng = np.random.default_rng(0)
    log = frame(rng.integers(0, 30, 600), rng.integers(0, 50, 600), rng.permutation(600))
    stats = loo.user_stats(dd.from_pandas(log, npartitions=40, sort=False)).compute().sort_index()
    ranked = log.sort_values(ORDER_KEY, ascending=False).groupby("user_id")[ORDER_KEY]
    assert stats[loo.COUNT].tolist() == ranked.size().tolist()
    assert stats[loo.LATEST].tolist() == ranked.nth(0).sort_index().tolist()
    assert stats[loo.SECOND].tolist() == ranked.nth(1).reindex(stats.index, fill_value=loo.NONE).tolist()


def test_repeated_hashes_are_the_hashes_seen_twice_in_any_partitions():
    import numpy as np

    rng = np.random.default_rng(1)
    log = frame(rng.integers(0, 20, 300), rng.integers(0, 20, 300), np.arange(300))
    runs = dd.from_pandas(log, npartitions=7, sort=False).map_partitions(loo.sorted_pair_hash).compute()
    hashes = loo.pair_hash(log)
    expected = np.sort(hashes[hashes.duplicated(keep=False)].unique())
    assert len(expected) and loo.repeated_hashes(runs.to_numpy(), np).tolist() == expected.tolist()


def test_statistics_of_two_disjoint_row_sets_combine_to_those_of_all():
    import numpy as np

    rng = np.random.default_rng(2)
    log = frame(rng.integers(0, 15, 200), rng.integers(0, 50, 200), rng.permutation(200))
    part = rng.random(200) < 0.1  # some users only in one set
    whole = loo.user_stats(dd.from_pandas(log, npartitions=3, sort=False)).compute().sort_index()
    others = loo.user_stats(dd.from_pandas(log[~part], npartitions=3, sort=False)).compute()
    pd.testing.assert_frame_equal(loo.combine_stats(others, log[part]).sort_index(), whole, check_names=False)


def test_list_rows_split_a_partition_into_test_validation_and_train():
    encoded = pd.DataFrame({"user_id": [FIRST_INDEX - 1, FIRST_INDEX, FIRST_INDEX, FIRST_INDEX + 1],
                            "item_id": [10, 11, 12, 13],
                            loo.HOLDOUT: [loo.TEST, loo.TEST, loo.VALIDATION, loo.TRAIN]})
    rows = {which: loo.list_rows(encoded, which) for which in (loo.TEST, loo.VALIDATION, loo.TRAIN)}
    assert rows[loo.TEST]["item_id"].tolist() == [11] and rows[loo.VALIDATION]["item_id"].tolist() == [12]
    assert rows[loo.TRAIN]["item_id"].tolist() == [10, 13]  # the OOV pseudo-user's rows stay in train
    assert all(list(r.columns) == PAIR for r in rows.values())


def test_integer_and_string_pairs_hash_equal_when_equal_and_apart_when_not():
    import numpy as np

    rng = np.random.default_rng(4)
    log = frame(rng.integers(0, 300, 5000), rng.integers(0, 300, 5000), np.arange(5000))
    for ids in (log, log.astype({"user_id": str, "item_id": str})):
        hashes = loo.pair_hash(ids)
        groups = pd.DataFrame({"pair": list(zip(ids["user_id"], ids["item_id"])), "hash": hashes.to_numpy()})
        assert (groups.groupby("pair")["hash"].nunique() == 1).all()
        assert groups["hash"].nunique() == groups["pair"].nunique()  # no collision among these pairs
