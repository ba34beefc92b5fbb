"""The pandas peer of the ETL benchmark (benchmarks/etl_pandas_reference.py) does the job it is
compared on: each user's latest row (ties: later in the input) held out for test, the one
before for validation, K distinct negatives outside the user's items, everything else train."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from conftest import run_command


def test_reference_holds_out_latest_rows_with_distinct_unseen_negatives(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    log = pd.DataFrame({"userId": rng.integers(100, 140, n), "movieId": rng.permutation(n) % 60 + 1000,
                        "rating": 4.0, "timestamp": rng.integers(0, 50, n)})  # many timestamp ties
    log = log.drop_duplicates(["userId", "movieId"]).reset_index(drop=True)
    log.loc[len(log)] = [999, 1000, 4.0, 5]  # a single-row user: train only
    log.to_csv(tmp_path / "ratings.csv", index=False)
    out = tmp_path / "out"
    result = run_command("benchmarks/etl_pandas_reference.py", "--input", str(tmp_path / "ratings.csv"),
                         "--output", str(out), "--validation", "--negatives", "7", timeout=120)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["rows"] == len(log) and stats["lists"] == ["test", "validation"]

    ranked = log.assign(position=range(len(log))).sort_values(["userId", "timestamp", "position"])
    per_user = ranked.groupby("userId")["movieId"].agg(list)
    users, items = pd.factorize(log["userId"]), pd.factorize(log["movieId"])
    raw_user, raw_item = dict(enumerate(users[1])), dict(enumerate(items[1]))
    held = {}
    for name, back in (("test", 1), ("validation", 2)):
        lists = pd.read_parquet(out / f"{name}.parquet")
        assert len(lists) % 8 == 0
        for rows in np.split(lists, len(lists) // 8):
            user = raw_user[rows["user"].iloc[0]]
            assert (rows["user"] == rows["user"].iloc[0]).all() and rows["label"].tolist() == [1.0] + [0.0] * 7
            assert raw_item[rows["item"].iloc[0]] == per_user[user][-back]
            negatives = [raw_item[i] for i in rows["item"].iloc[1:]]
            assert len(set(negatives)) == 7 and not set(negatives) & set(per_user[user])
            held.setdefault(name, []).append(user)
    assert sorted(held["test"]) == sorted(u for u, items_ in per_user.items() if len(items_) >= 2)
    assert sorted(held["validation"]) == sorted(u for u, items_ in per_user.items() if len(items_) >= 3)
    train = pd.read_parquet(out / "train.parquet")
    assert len(train) == len(log) - len(held["test"]) - len(held["validation"])
