"""The peer our ETL is measured against: the same job in plain pandas, as a short script.

It does what NVIDIA DeepLearningExamples' NCF preprocessing does, with this project's split
rule: read the ratings CSV, drop users with fewer than --min-user-interactions, factorize
users and items, sort by (user, time) stably, hold out each user's last interaction (and with
--validation the second-last, for users with three or more, as our ETL does by default), draw
--negatives distinct negatives per held-out user outside the user's items, and write parquet.
Written as a competent pandas user would: pyarrow's CSV parser, one stable lexsort, the
held-out masks computed once from the sorted columns, and vectorised rejection sampling.
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
    """Rejection sampling, vectorised: redraw, for every row at once, the draws that are one of
    the user's items (`seen`: sorted user * n_items + item keys) or repeat an earlier draw."""
    sampled = rng.integers(0, n_items, size=(len(users), negatives))
    rows = np.arange(len(users))  # rows that may still hold a bad draw
    while len(rows):
        block = sampled[rows]
        keys = users[rows, None] * n_items + block
        found = np.searchsorted(seen, keys)
        bad = seen[np.minimum(found, len(seen) - 1)] == keys
        order = np.argsort(block, axis=1, kind="stable")  # a repeat is bad, its first draw is not
        ranked = np.take_along_axis(block, order, axis=1)
        repeat = np.zeros_like(bad)
        np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
        bad |= repeat
        keep = bad.any(axis=1)
        rows, block, bad = rows[keep], block[keep], bad[keep]
        block[bad] = rng.integers(0, n_items, size=int(bad.sum()))
        sampled[rows] = block
    return sampled


def candidates(users: np.ndarray, items: np.ndarray, sampled: np.ndarray) -> pd.DataFrame:
    """Per user: the held-out positive (label 1), then its negatives (label 0)."""
    negatives = sampled.shape[1]
    return pd.DataFrame({"user": np.repeat(users, negatives + 1),
                         "item": np.concatenate([items[:, None], sampled], axis=1).reshape(-1),
                         "label": np.tile(np.r_[1.0, np.zeros(negatives)], len(users)).astype(np.float32)})


def run(ratings: Path, output: Path, min_user_interactions: int, negatives: int, seed: int,
        validation: bool = False) -> dict:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    log = pd.read_csv(ratings, engine="pyarrow")  # pyarrow's multithreaded parser
    log = log.iloc[:, [0, 1, 3]].set_axis(["user", "item", "time"], axis=1).astype(np.int64)
    lap("read")
    if min_user_interactions > 1:
        sizes = log.groupby("user", sort=False)["user"].transform("size").to_numpy()
        log = log[sizes >= min_user_interactions]
    lap("filter")
    user, _ = pd.factorize(log["user"])
    item, items = pd.factorize(log["item"])
    lap("encode")
    order = np.lexsort((log["time"].to_numpy(), user))  # stable: ties keep input order
    user, item = user[order], item[order]
    count = np.bincount(user)[user]
    last = np.append(user[1:] != user[:-1], True)  # each user's latest row
    lists = {"test": last & (count >= 2)}
    if validation:  # the second-last of users with three or more: one row stays in train
        lists["validation"] = np.append(last[1:], False) & (count >= 3)
    train = ~np.logical_or.reduce(list(lists.values()))
    lap("split")
    n_items = len(items)
    seen = np.unique(user.astype(np.int64) * n_items + item)
    rng = np.random.default_rng(seed)
    sampled = {name: sample_negatives(user[rows].astype(np.int64), seen, n_items, negatives, rng)
               for name, rows in lists.items()}
    lap("negatives")
    output.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user": user[train], "item": item[train]}).to_parquet(output / "train.parquet", index=False)
    for name, rows in lists.items():
        candidates(user[rows], item[rows], sampled[name]).to_parquet(output / f"{name}.parquet", index=False)
    lap("write")
    return {"seconds": dict(seconds, total=round(sum(seconds.values()), 3)), "rows": int(len(user)),
            "test_users": int(lists["test"].sum()), "lists": list(lists),
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
