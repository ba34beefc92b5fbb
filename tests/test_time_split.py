"""--split time: train strictly before the cutoff, one test list per known user from their first
interaction after it, cold-start users counted, the same bytes in one process and on a cluster."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_command

NEGATIVES = 5
CUTOFF = 1_000


def hand_log() -> pd.DataFrame:
    """Users by design: a spans the cutoff, b ends before it, c starts after it (cold start),
    d has one train row and two later ones, e spans it with a tie at the cutoff itself."""
    rows = [("a", "i1", 900), ("a", "i2", 950), ("a", "i3", 990), ("a", "i4", 1_100), ("a", "i5", 1_050),
            ("b", "i1", 100), ("b", "i2", 200), ("b", "i6", 300),
            ("c", "i1", 1_200), ("c", "i2", 1_300),
            ("d", "i3", 500), ("d", "i7", 1_500), ("d", "i8", 1_400),
            ("e", "i6", 700), ("e", "i7", 800), ("e", "i8", CUTOFF), ("e", "i9", CUTOFF)]
    filler = [(f"f{u}", f"i{10 + (u + k) % 12}", 10 + u * 7 + k) for u in range(12) for k in range(3)]
    return pd.DataFrame(rows + filler, columns=["user", "item", "timestamp"])


def raw_lists(etl: Path, name: str) -> pd.DataFrame:
    """A candidate file's lists decoded back to raw ids (the saved workflow's vocabularies)."""
    items = pd.read_parquet(etl / "items.parquet").set_index("item_id")["raw_item_id"]
    users = raw_users(etl)
    frame = pd.concat(pd.read_parquet(f) for f in sorted((etl / name).glob("*.parquet")))
    return pd.DataFrame({"user": users.loc[frame["user_id"]].to_numpy(), "item": items.loc[frame["item_id"]].to_numpy(),
                         "label": frame["label"].to_numpy()})


def raw_users(etl: Path) -> pd.Series:
    """Raw user id by encoded id: Categorify's vocabulary file, indexed by encoded id."""
    return pd.read_parquet(etl / "workflow" / "categories" / "unique.user_id.parquet")["user_id"]


@pytest.fixture(scope="module")
def split_etl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("time")
    hand_log().to_csv(tmp / "log.csv", index=False)
    out = tmp / "etl"
    result = run_command("workflows/etl.py", "--input", str(tmp / "log.csv"), "--user-col", "user", "--item-col",
                         "item", "--output", str(out), "--split", "time", "--cutoff", str(CUTOFF), "--negatives",
                         str(NEGATIVES), "--device", "cpu")
    return tmp, out, result.stdout


def test_train_is_strictly_before_the_cutoff(split_etl):
    _, etl, _ = split_etl
    log = hand_log()
    items = pd.read_parquet(etl / "items.parquet").set_index("item_id")["raw_item_id"]
    train = pd.concat(pd.read_parquet(f) for f in sorted((etl / "train").glob("*.parquet")))
    pairs = set(zip(raw_users(etl).loc[train["user_id"]], items.loc[train["item_id"]]))
    times = log.set_index(["user", "item"])["timestamp"]
    assert all(times[p] < CUTOFF for p in pairs)
    validation = raw_lists(etl, "validation").query("label == 1")
    held = set(zip(validation["user"], validation["item"]))
    expected = {(u, i) for u, i, t in log.itertuples(index=False) if t < CUTOFF} - held
    assert pairs == expected


def test_one_list_per_known_user_from_their_first_interaction_after_the_cutoff(split_etl):
    _, etl, _ = split_etl
    test = raw_lists(etl, "test")
    positives = test.iloc[::NEGATIVES + 1]
    assert (positives["label"] == 1).all() and (test["label"].sum() == len(positives))
    # a: i5 (1050) comes before i4 (1100); d: i8 (1400) before i7; e: the tie at the cutoff is after it
    # (train is strictly before), and i8 is the earlier row of the two.
    assert dict(zip(positives["user"], positives["item"])) == {"a": "i5", "d": "i8", "e": "i8"}
    validation = raw_lists(etl, "validation").iloc[::NEGATIVES + 1]
    # The latest train row of users with a test list, where they keep another (d has one train row).
    assert dict(zip(validation["user"], validation["item"])) == {"a": "i3", "e": "i7"}


def test_cold_start_users_are_counted_and_reported(split_etl):
    _, etl, stdout = split_etl
    stats = json.loads((etl / "stats.json").read_text())
    assert stats["cold_start_users"] == 1 and stats["test_users"] == 3 and stats["cutoff"] == CUTOFF
    assert stats["after_cutoff_interactions"] == 8 and stats["split"] == "time"
    assert "1 cold-start users" in stdout


def test_dates_and_quantiles_pick_the_cutoff(tmp_path):
    from merlin_ncf.workflows.options import parse_cutoff

    assert parse_cutoff("2015-01-01") == 1420070400 and parse_cutoff("1420070400") == 1420070400
    hand_log().to_csv(tmp_path / "log.csv", index=False)
    out = tmp_path / "q"
    run_command("workflows/etl.py", "--input", str(tmp_path / "log.csv"), "--user-col", "user", "--item-col", "item",
                "--output", str(out), "--split", "time", "--cutoff-quantile", "0.9", "--negatives", "3", "--quiet")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["cutoff"] == int(np.quantile(hand_log()["timestamp"], 0.9, method="lower"))


@pytest.mark.parametrize("args, fragment", [
    (["--split", "time"], "exactly one of --cutoff"),
    (["--cutoff", "2015-01-01"], "go with --split time"),
    (["--split", "time", "--cutoff", "next tuesday"], "neither a timestamp"),
    (["--split", "time", "--cutoff", "5"], "no interaction before"),
    (["--split", "time", "--cutoff", "99999"], "no interaction after"),
])
def test_bad_cutoffs_are_one_line_errors(tmp_path, args, fragment):
    hand_log().to_csv(tmp_path / "log.csv", index=False)
    result = run_command("workflows/etl.py", "--input", str(tmp_path / "log.csv"), "--user-col", "user",
                         "--item-col", "item", "--output", str(tmp_path / "out"), "--negatives", "3", "--quiet", *args,
                         check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr


def test_two_worker_cluster_writes_the_same_bytes(split_etl):
    tmp, etl, _ = split_etl
    out = tmp / "cluster"
    run_command("workflows/etl.py", "--input", str(tmp / "log.csv"), "--user-col", "user", "--item-col", "item",
                "--output", str(out), "--split", "time", "--cutoff", str(CUTOFF), "--negatives", str(NEGATIVES),
                "--device", "cpu", "--workers", "2", "--quiet", timeout=600)
    files = sorted(p.relative_to(etl) for p in etl.rglob("*.parquet"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*.parquet")) and len(files) >= 4
    for name in files:
        assert (etl / name).read_bytes() == (out / name).read_bytes(), name


def test_no_user_spanning_the_cutoff_is_a_one_line_error(tmp_path):
    log = pd.DataFrame({"user": ["a", "a", "b", "b"], "item": ["x", "y", "x", "z"], "timestamp": [1, 2, 10, 11]})
    log.to_csv(tmp_path / "log.csv", index=False)
    result = run_command("workflows/etl.py", "--input", str(tmp_path / "log.csv"), "--user-col", "user", "--item-col",
                         "item", "--output", str(tmp_path / "out"), "--negatives", "1", "--quiet", "--split", "time",
                         "--cutoff", "5", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "nothing to test" in result.stderr
