"""Readers on small fixtures of every MovieLens release format and of generic logs."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merlin_ncf.workflows.cluster import Backend, quiet_merlin
from merlin_ncf.errors import EtlError
from merlin_ncf.workflows.readers import ColumnNames, read_log

quiet_merlin()
FIXTURES = Path(__file__).parent / "fixtures"
CPU = Backend("cpu")

# The same 13 interactions are written in every fixture format (tests/fixtures/*).
EXPECTED = pd.DataFrame(
    [(1, 1193, 5.0, 978300760), (1, 661, 3.0, 978302109), (1, 914, 3.0, 978301968), (1, 3408, 4.0, 978300275),
     (2, 1193, 5.0, 978298413), (2, 661, 4.5, 978299941), (2, 2355, 2.0, 978299000),
     (3, 914, 4.0, 978297000), (3, 3408, 1.0, 978297001), (3, 2355, 5.0, 978297001),
     (4, 1193, 3.0, 978296000), (4, 260, 4.0, 978296500), (5, 661, 4.0, 978295000)],
    columns=["user_id", "item_id", "rating", "timestamp"])
STAR_WARS = "Star Wars: Episode IV - A New Hope (1977)"


def _frame(log) -> pd.DataFrame:
    return log.interactions.compute().reset_index(drop=True)


@pytest.mark.parametrize("directory, fmt, detected, half_stars", [
    ("ml-100k", "auto", "ml-100k", False),
    ("ml-1m", "auto", "ml-1m", False),
    ("ml-10m", "ml-10m", "ml-10m", True),
    ("ml-20m", "auto", "ml-20m", True),
    ("ml-latest-small", "ml-latest-small", "ml-latest-small", True),
    ("ml-latest-small", "auto", "ml-latest-small", True),  # named by its folder, not read as ml-20m
])
def test_movielens_release_reads_interactions_and_titles(directory, fmt, detected, half_stars):
    log = read_log(FIXTURES / directory, fmt, CPU)
    assert log.fmt == detected
    frame = _frame(log)
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert [str(t) for t in frame.dtypes] == ["int64", "int64", "int64", "float64"]
    pd.testing.assert_frame_equal(frame[["user_id", "item_id", "timestamp"]],
                                  EXPECTED[["user_id", "item_id", "timestamp"]])
    expected_rating = EXPECTED["rating"] if half_stars else EXPECTED["rating"].round()
    np.testing.assert_array_equal(frame["rating"], expected_rating)

    items = log.items.set_index("raw_item_id")
    assert len(items) == 6
    assert items.loc[260, "title"] == STAR_WARS  # ':' inside a '::'-separated file
    assert items.loc[2355, "title"] == "Bug's Life, A (1998)"  # ',' inside a quoted CSV field
    assert items.loc[661, "genres"] == "Animation|Children's|Musical"


def test_ratings_file_alone_reads_without_titles():
    log = read_log(FIXTURES / "ml-1m" / "ratings.dat", "auto", CPU)
    assert log.items is None
    assert len(_frame(log)) == len(EXPECTED)


def test_generic_csv_with_named_columns():
    columns = ColumnNames(user="customer", item="product", time="ts", rating="stars")
    log = read_log(FIXTURES / "generic" / "events.csv", "auto", CPU, columns)
    assert log.fmt == "csv"
    frame = _frame(log)
    pd.testing.assert_frame_equal(frame[["user_id", "item_id", "timestamp", "rating"]],
                                  EXPECTED[["user_id", "item_id", "timestamp", "rating"]])


def test_generic_csv_without_rating_column():
    columns = ColumnNames(user="customer", item="product", time="ts", rating=None)
    frame = _frame(read_log(FIXTURES / "generic" / "events.csv", "csv", CPU, columns))
    assert list(frame.columns) == ["user_id", "item_id", "timestamp"]


def test_generic_parquet_with_datetime_timestamps(tmp_path):
    log = EXPECTED.rename(columns={"user_id": "u", "item_id": "i"})
    log["when"] = pd.to_datetime(log.pop("timestamp"), unit="s")
    log.to_parquet(tmp_path / "log.parquet", index=False)
    frame = _frame(read_log(tmp_path / "log.parquet", "auto", CPU, ColumnNames("u", "i", "when", "rating")))
    pd.testing.assert_frame_equal(frame[["user_id", "item_id", "timestamp", "rating"]],
                                  EXPECTED[["user_id", "item_id", "timestamp", "rating"]])


def test_generic_parquet_with_float_ids_is_refused(tmp_path):
    EXPECTED.astype({"user_id": float}).to_parquet(tmp_path / "log.parquet", index=False)
    with pytest.raises(EtlError, match="ids must be integers or strings"):
        read_log(tmp_path / "log.parquet", "parquet", CPU)


def test_missing_columns_are_named():
    with pytest.raises(EtlError, match="lacks column.*user_id"):
        read_log(FIXTURES / "generic" / "events.csv", "csv", CPU)


def test_unrecognised_directory_asks_for_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(EtlError, match="--format"):
        read_log(tmp_path, "auto", CPU)


@pytest.mark.parametrize("fmt", ["ml-100k", "ml-1m", "ml-10m", "ml-20m", "csv", "parquet"])
def test_synthetic_writer_round_trips_through_reader(tmp_path, fmt):
    from merlin_ncf.workflows.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(interactions=3000, users=60, items=120, seed=3)
    generate(tmp_path / fmt, spec, fmt, progress=False)
    log = read_log(tmp_path / fmt, fmt if fmt != "csv" else "auto", CPU)
    frame = _frame(log)
    assert len(frame) == 3000
    assert frame["user_id"].nunique() == 60
    assert not frame.duplicated(["user_id", "item_id"]).any()
    if fmt.startswith("ml-"):
        assert set(frame["item_id"]) <= set(log.items["raw_item_id"])
        assert log.items["title"].str.match(r"Synthetic Movie \d+ \(\d{4}\)").all()
