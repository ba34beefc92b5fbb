"""The leave-one-out rule on logs full of ties and repeats: latest by (timestamp, position in
the input), one list per user, each (user, item) pair's first interaction only, whatever the
partitioning. Checked against an independent pandas stable sort (as RecBole orders a log)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from conftest import run_command
from merlin_ncf.feature_spec import FeatureSpec

COLUMNS = ["user_id", "item_id", "timestamp"]


def tied_log(users: int = 40, items: int = 60, per_user: int = 8, seed: int = 0) -> pd.DataFrame:
    """Users with distinct items at few distinct timestamps (most rows tie with another)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, users + 1):
        chosen = rng.choice(np.arange(100, 100 + items), per_user, replace=False)
        times = 1_000 + np.sort(rng.integers(0, 3, per_user))
        rows += [(user, item, time) for item, time in zip(chosen, times)]
    return pd.DataFrame(rows, columns=COLUMNS)


def etl(source: Path, out: Path, *extra: str) -> Path:
    run_command("workflows/etl.py", "--input", str(source), "--output", str(out), "--negatives", "5",
                "--device", "cpu", "--quiet", *extra)
    return out


def raw_positives(out: Path, mapping: str) -> pd.Series:
    """Held-out positives as raw user id -> raw item id."""
    spec = FeatureSpec.load(out)
    frame = pd.concat(map(pd.read_parquet, spec.files(mapping)), ignore_index=True)
    return to_raw(spec, frame[frame["label"] == 1]).set_index("user_id")["item_id"].sort_index()


def to_raw(spec: FeatureSpec, frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in ("user_id", "item_id"):
        vocabulary = pd.read_parquet(spec.path("workflow") / "categories" / f"unique.{column}.parquet")[column]
        frame[column] = vocabulary.loc[frame[column]].to_numpy()
    return frame


def raw_train(out: Path) -> set:
    spec = FeatureSpec.load(out)
    train = to_raw(spec, pd.concat(map(pd.read_parquet, spec.files("train")), ignore_index=True))
    return set(zip(train["user_id"], train["item_id"]))


def reference(log: pd.DataFrame, nth: int) -> pd.Series:
    """pandas: first interaction per pair, then each user's nth latest by (timestamp, position)."""
    log = log.assign(position=np.arange(len(log)))
    first = log.sort_values(["timestamp", "position"], kind="stable").drop_duplicates(["user_id", "item_id"])
    ranked = first.sort_values(["timestamp", "position"], ascending=False, kind="stable")
    rank = ranked.groupby("user_id").cumcount()
    size = ranked.groupby("user_id")["item_id"].transform("size")
    return ranked[(rank == nth) & (size >= 2 + nth)].set_index("user_id")["item_id"].sort_index()


def test_ties_follow_input_order_at_any_partition_size(tmp_path):
    log = tied_log()
    log.to_csv(tmp_path / "log.csv", index=False)
    one = etl(tmp_path / "log.csv", tmp_path / "one")
    for mapping, nth in (("test", 0), ("validation", 1)):
        pd.testing.assert_series_equal(raw_positives(one, mapping), reference(log, nth), check_names=False)
    many = etl(tmp_path / "log.csv", tmp_path / "many", "--partition-size", "1KB")
    for relative in sorted(p.relative_to(one) for p in one.rglob("*.parquet")):
        assert (many / relative).read_bytes() == (one / relative).read_bytes(), relative


def test_one_timestamp_for_everything_holds_out_the_last_rows_in_reading_order(tmp_path):
    """Two parquet files read in sorted order; the test positive is each user's last row."""
    log = tied_log(seed=1).assign(timestamp=5)
    folder = tmp_path / "log"
    folder.mkdir()
    half = len(log) // 2 + 3  # a user's rows straddle the two files
    log.iloc[:half].to_parquet(folder / "a.parquet", index=False)
    log.iloc[half:].to_parquet(folder / "b.parquet", index=False)
    out = etl(folder, tmp_path / "etl")
    test, validation = raw_positives(out, "test"), raw_positives(out, "validation")
    assert len(test) == len(validation) == log["user_id"].nunique()
    pd.testing.assert_series_equal(test, log.groupby("user_id")["item_id"].last(), check_names=False)
    pd.testing.assert_series_equal(validation, reference(log, 1), check_names=False)


def test_each_row_three_times_gives_the_output_of_the_log_once(tmp_path):
    log = tied_log(seed=2)
    log.to_csv(tmp_path / "once.csv", index=False)
    log.loc[log.index.repeat(3)].to_csv(tmp_path / "thrice.csv", index=False)
    once, thrice = etl(tmp_path / "once.csv", tmp_path / "once"), etl(tmp_path / "thrice.csv", tmp_path / "thrice")
    stats = json.loads((thrice / "stats.json").read_text())
    assert stats["test_users"] == stats["validation_users"] == log["user_id"].nunique()
    assert stats["duplicates_dropped"] == 2 * len(log) and stats["interactions"] == len(log)
    for relative in sorted(p.relative_to(once) for p in once.rglob("*.parquet")):
        assert (thrice / relative).read_bytes() == (once / relative).read_bytes(), relative


def test_a_re_rated_item_is_never_both_held_out_and_in_train(tmp_path):
    """Every user rates their first item again, last of all: the repeat is dropped."""
    log = tied_log(seed=3)
    again = log.groupby("user_id").head(1).assign(timestamp=log["timestamp"].max() + 1)
    log = pd.concat([log, again], ignore_index=True)
    log.to_csv(tmp_path / "log.csv", index=False)
    out = etl(tmp_path / "log.csv", tmp_path / "etl")
    train = raw_train(out)
    for mapping, nth in (("test", 0), ("validation", 1)):
        held_out = raw_positives(out, mapping)
        assert not set(held_out.items()) & train
        pd.testing.assert_series_equal(held_out, reference(log, nth), check_names=False)
    assert json.loads((out / "stats.json").read_text())["duplicates_dropped"] == len(again)


def test_partition_size_does_not_change_a_movielens_output(raw_dir, etl_dir, tmp_path):
    out = tmp_path / "small-partitions"
    run_command("workflows/etl.py", "--input", str(raw_dir), "--output", str(out), "--device", "cpu",
                "--partition-size", "64KB", "--negatives", "100", "--seed", "7", "--quiet")
    parts = sorted(p.relative_to(etl_dir) for p in etl_dir.rglob("*.parquet"))
    assert len(parts) >= 6 and parts == sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    for relative in parts:
        assert (out / relative).read_bytes() == (etl_dir / relative).read_bytes(), relative


def test_a_movielens_csv_gives_the_bytes_of_the_same_log_as_a_generic_csv_at_any_block_size(tmp_path):
    """ratings.csv is read by pyarrow's streaming reader (readers.movielens_csv_to_parquet), a
    generic CSV by Dask: ties, repeats and small blocks change nothing."""
    log = tied_log(users=60, seed=5)
    log = pd.concat([log, log.sample(40, random_state=1).assign(timestamp=1_001)], ignore_index=True)
    log.insert(2, "rating", 4.5)
    (tmp_path / "ml").mkdir()
    log.set_axis(["userId", "movieId", "rating", "timestamp"], axis=1).to_csv(tmp_path / "ml" / "ratings.csv",
                                                                           index=False)
    log.to_csv(tmp_path / "log.csv", index=False)
    generic = etl(tmp_path / "log.csv", tmp_path / "generic")
    movielens = etl(tmp_path / "ml", tmp_path / "ml-blocks", "--partition-size", "2KB", "--min-rating", "4")
    parts = sorted(p.relative_to(generic) for p in (generic / "train").glob("*.parquet"))
    parts += [Path(name) / "part_0.parquet" for name in ("test", "validation")]
    for relative in parts:
        assert (movielens / relative).read_bytes() == (generic / relative).read_bytes(), relative
    stats = json.loads((movielens / "stats.json").read_text())
    assert stats["format"] == "ml-20m" and stats["duplicates_dropped"] == 40
    pd.testing.assert_series_equal(raw_positives(movielens, "test"), reference(log, 0), check_names=False)
