"""The NVTabular workflows of the ETL on hand-made data, partitions that filter to nothing included."""

import dask.dataframe as dd
import pandas as pd

from workflows import graph, split
from workflows.cluster import Backend, quiet_merlin

quiet_merlin()
from merlin.io import Dataset  # noqa: E402


def dataset(frame: pd.DataFrame, npartitions: int = 2):
    return Dataset(dd.from_pandas(frame, npartitions=npartitions, sort=False), cpu=True)


def rows(data, columns) -> list[tuple]:
    return sorted(map(tuple, data.to_ddf().compute()[columns].to_numpy().tolist()))


def test_filters_drop_rows_even_when_a_partition_empties(tmp_path):
    log = pd.DataFrame({"user_id": [1, 1, 2, 3, 3, 3], "item_id": [1, 2, 1, 1, 2, 3],
                        "timestamp": [1, 2, 3, 4, 5, 6], "rating": [5.0, 4.0, 4.5, 1.0, 1.0, 2.0]})
    rated = graph.rating_filter(4.0).fit_transform(dataset(log))  # second partition: nothing passes
    assert rated.to_ddf().map_partitions(len).compute().tolist() == [3, 0]
    assert rows(rated, graph.PAIR) == [(1, 1), (1, 2), (2, 1)]
    # As the ETL chains them: through parquet, whose reader drops the empty partition.
    split.write_parquet({tmp_path / "rated": rated.to_ddf()[graph.INTERACTION]})
    reread = Dataset(split.read_parquet(tmp_path / "rated", Backend("cpu"), graph.INTERACTION), cpu=True)
    active = graph.activity_filter(2, tmp_path / "stats").fit_transform(reread)
    assert rows(active, graph.PAIR) == [(1, 1), (1, 2)]


def test_holdout_is_latest_per_user_with_item_tie_break(tmp_path):
    # user 5: tie at t=9 between items 4 and 7 -> 7; user 6: one interaction -> kept in train;
    # the second partition (user 6 only) holds no held-out row at all.
    log = pd.DataFrame({"user_id": [5, 5, 5, 6], "item_id": [3, 7, 4, 3], "timestamp": [1, 9, 9, 2]})
    flagger = graph.holdout_flag(item_cardinality=10, work_dir=tmp_path)
    source = dataset(log)
    flagged = flagger.fit_transform(source)
    held = graph.select_holdout(True).fit_transform(flagged)
    rest = graph.select_holdout(False).fit_transform(flagged)
    assert rows(held, graph.PAIR) == [(5, 7)]
    assert rows(rest, graph.PAIR) == [(5, 3), (5, 4), (6, 3)]

