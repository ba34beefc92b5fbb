"""The peer our ETL is measured against: the same job in plain pandas, as a short script.

It does what NVIDIA DeepLearningExamples' NCF preprocessing does, with this project's split
rule: read the ratings CSV, drop users with fewer than --min-user-interactions, factorize
users and items, sort by (user, time) stably, hold out each user's last interaction (and with
--validation the second-last, for users with three or more, as our ETL does by default), draw
--negatives distinct negatives per held-out user outside the user's items, and write parquet.
Phase times and peak memory are printed as one JSON line (benchmarks/etl.py reads it).

    python benchmarks/etl_pandas_reference.py --input ratings.csv --output /tmp/ref
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

from device import add_device_argument  # benchmarks/device.py
from merlin_ncf.errors import OneLineArgumentParser


def sample_negatives(users: np.ndarray, seen: np.ndarray, n_items: int, negatives: int, rng) -> np.ndarray:
    """Rejection sampling, vectorised: draw for every unfinished user, keep unseen distinct ones."""
    sampled = np.empty((len(users), negatives), dtype=np.int64)
    todo = np.arange(len(users))
    filled = np.zeros(len(users), dtype=np.int64)
    while len(todo):
        draw = rng.integers(0, n_items, size=(len(todo), negatives * 2))
        keys = users[todo, None] * n_items + draw
        ok = ~np.isin(keys, seen)
        for row, user_row in enumerate(todo):
            fresh = pd.unique(draw[row][ok[row]])
            fresh = fresh[~np.isin(fresh, sampled[user_row, :filled[user_row]])]
            take = fresh[:negatives - filled[user_row]]
            sampled[user_row, filled[user_row]:filled[user_row] + len(take)] = take
            filled[user_row] += len(take)
        todo = todo[filled[todo] < negatives]
    return sampled


def candidates(held: pd.DataFrame, sampled: np.ndarray) -> pd.DataFrame:
    """Per user: the held-out positive (label 1), then its negatives (label 0)."""
    negatives = sampled.shape[1]
    items = np.concatenate([held["item"].to_numpy()[:, None], sampled], axis=1)
    return pd.DataFrame({"user": np.repeat(held["user"].to_numpy(), negatives + 1), "item": items.reshape(-1),
                         "label": np.tile(np.r_[1.0, np.zeros(negatives)], len(held)).astype(np.float32)})


def run(ratings: Path, output: Path, min_user_interactions: int, negatives: int, seed: int,
        validation: bool = False) -> dict:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    log = pd.read_csv(ratings, usecols=[0, 1, 3], header=0, names=["user", "item", "time"],
                      dtype={"user": np.int64, "item": np.int64, "time": np.int64})
    lap("read")
    counts = log["user"].map(log["user"].value_counts())
    log = log[counts.to_numpy() >= min_user_interactions]
    lap("filter")
    log["user"] = pd.factorize(log["user"])[0]
    log["item"], items = pd.factorize(log["item"])
    lap("encode")
    log = log.sort_values(["user", "time"], kind="stable")  # ties keep input order
    count = log["user"].map(log["user"].value_counts()).to_numpy()
    last = ~log["user"].duplicated(keep="last").to_numpy()
    held = {"test": log[last & (count >= 2)]}
    train = log[~(last & (count >= 2))]
    if validation:  # the second-last of users with three or more: one row stays in train
        second = ~train["user"].duplicated(keep="last").to_numpy() & (count[~(last & (count >= 2))] >= 3)
        held["validation"], train = train[second], train[~second]
    lap("split")
    n_items = len(items)
    seen = np.unique(log["user"].to_numpy() * n_items + log["item"].to_numpy())
    rng = np.random.default_rng(seed)
    sampled = {name: sample_negatives(rows["user"].to_numpy(), seen, n_items, negatives, rng)
               for name, rows in held.items()}
    lap("negatives")
    output.mkdir(parents=True, exist_ok=True)
    train[["user", "item"]].to_parquet(output / "train.parquet", index=False)
    for name, rows in held.items():
        candidates(rows, sampled[name]).to_parquet(output / f"{name}.parquet", index=False)
    lap("write")
    return {"seconds": dict(seconds, total=round(sum(seconds.values()), 3)), "rows": int(len(log)),
            "test_users": int(len(held["test"])), "lists": list(held),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="ratings CSV: user, item, rating, timestamp with a header")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--min-user-interactions", type=int, default=1)
    parser.add_argument("--negatives", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation", action="store_true",
                        help="also hold out each user's second-last interaction with its negatives (our ETL's default)")
    add_device_argument(parser, help="cpu only: plain pandas has no GPU path (cuda is refused with one line)",
                        devices=("cpu",))
    args = parser.parse_args()
    print(json.dumps(run(args.input, args.output, args.min_user_interactions, args.negatives, args.seed,
                         args.validation)))


if __name__ == "__main__":
    main()
