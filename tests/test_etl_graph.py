"""The NVTabular workflows of the ETL on hand-made data, partitions that filter to nothing included."""

import dask.dataframe as dd
import pandas as pd

from merlin_ncf.workflows import graph, split
from merlin_ncf.workflows.cluster import Backend, quiet_merlin

quiet_merlin()
from merlin.io import Dataset  # noqa: E402


def dataset(frame: pd.DataFrame, npartitions: int = 2):
    return Dataset(dd.from_pandas(frame, npartitions=npartitions, sort=False), cpu=True)


def rows(data, columns) -> list[tuple]:
    return sorted(map(tuple, data.to_ddf().compute()[columns].to_numpy().tolist()))


def test_filters_drop_rows_even_when_a_partition_empties(tmp_path):
    log = pd.DataFrame({"user_id": [1, 1, 2, 3, 3, 3], "item_id": [1, 2, 1, 1, 2, 3],
                        "order_key": [1, 2, 3, 4, 5, 6], "rating": [5.0, 4.0, 4.5, 1.0, 1.0, 2.0]})
    rated = graph.rating_filter(4.0).fit_transform(dataset(log))  # second partition: nothing passes
    assert rated.to_ddf().map_partitions(len).compute().tolist() == [3, 0]
    assert rows(rated, graph.PAIR) == [(1, 1), (1, 2), (2, 1)]
    # As the ETL chains them: through parquet, whose reader drops the empty partition.
    split.write_parquet({tmp_path / "rated": rated.to_ddf()[graph.INTERACTION]})
    reread = Dataset(split.read_parquet(tmp_path / "rated", Backend("cpu"), graph.INTERACTION), cpu=True)
    active = graph.activity_filter(2, tmp_path / "stats").fit_transform(reread)
    assert rows(active, graph.PAIR) == [(1, 1), (1, 2)]


def test_holdout_is_the_largest_order_key_per_user(tmp_path):
    # user 5: keys 1, 9, 8 -> the row with key 9 (item 7); user 6: one interaction -> kept in train;
    # the second partition (user 6 only) holds no held-out row at all.
    log = pd.DataFrame({"user_id": [5, 5, 5, 6], "item_id": [3, 7, 4, 3], "order_key": [1, 9, 8, 2]})
    flagged = graph.holdout_flag(work_dir=tmp_path).fit_transform(dataset(log))
    held = graph.select_holdout(True).fit_transform(flagged)
    rest = graph.select_holdout(False).fit_transform(flagged)
    assert rows(held, graph.PAIR) == [(5, 7)]
    assert rows(rest, graph.PAIR) == [(5, 3), (5, 4), (6, 3)]


def test_first_of_pair_keeps_each_pairs_earliest_row(tmp_path):
    # (5, 3) three times (earliest key 2), (6, 3) once; one partition ends up with nothing kept.
    log = pd.DataFrame({"user_id": [5, 5, 6, 5], "item_id": [3, 3, 3, 3], "order_key": [7, 4, 1, 2]})
    kept = graph.first_of_pair(tmp_path).fit_transform(dataset(log, npartitions=2))
    assert rows(kept, graph.INTERACTION) == [(5, 3, 2), (6, 3, 1)]
