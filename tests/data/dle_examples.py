"""Tiny Dataset Feature Specification directories in DeepLearningExamples' format, generated.

    python tests/data/dle_examples.py OUT_DIR

writes OUT_DIR/ncf-torch_tensor, ncf-parquet, ncf-csv (the layout of DeepLearningExamples' NCF
preprocessing, convert.py: train positives, test lists of 1 positive + N negatives as
consecutive rows, ids 0-based) and OUT_DIR/two-chunk (the example of the format's
documentation: train in two csv chunks, the first split over two files, the test chunk with
its columns in another order), all from one seeded interaction log.

    python tests/data/dle_examples.py --from-ratings ml-latest-small/ratings.csv OUT_DIR

does what DeepLearningExamples' NCF preprocessing (convert.py) does to a MovieLens release.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

USERS, ITEMS, PER_USER, NEGATIVES = 60, 40, 10, 4
NCF_CHANNELS = {"user_ch": ["user"], "item_ch": ["item"], "label_ch": ["label"]}


def interactions(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train positives and test lists (1 positive + NEGATIVES unseen items, positive first):
    users prefer items near their own 'taste', so a model can learn something."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for user in range(USERS):
        taste = rng.normal(user * ITEMS / USERS, 5.0, size=4 * PER_USER).astype(int) % ITEMS
        items = list(dict.fromkeys(taste.tolist()))[:PER_USER + 1]
        train += [(user, item) for item in items[:-1]]
        unseen = np.setdiff1d(np.arange(ITEMS), items)
        test += [(user, item) for item in [items[-1], *rng.choice(unseen, NEGATIVES, replace=False).tolist()]]
    train = pd.DataFrame(train, columns=["user", "item"])
    test = pd.DataFrame(test, columns=["user", "item"])
    test["label"] = np.tile(np.r_[1.0, np.zeros(NEGATIVES)], USERS).astype(np.float32)
    return train, test


def _save_spec(out: Path, feature_spec: dict, source_spec: dict, channel_spec: dict, per_list: int) -> None:
    spec = {"feature_spec": feature_spec, "source_spec": source_spec, "channel_spec": channel_spec,
            "metadata": {"test_samples_per_series": per_list}}
    (out / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def write_ncf(out: Path, kind: str, seed: int = 0) -> Path:
    """DeepLearningExamples' NCF preprocessing output, as torch_tensor, parquet or csv chunks:
    chunk 0 holds user and item, chunk 1 the label, for train and test alike."""
    train, test = interactions(seed)
    return _write_ncf_chunks(out, kind, train, test, USERS, ITEMS)


def convert_ratings(ratings_csv: Path, out: Path, negatives: int = 100, seed: int = 1) -> Path:
    """What DeepLearningExamples' NCF convert.py does to a MovieLens ratings.csv, on CPU:
    ids factorised to 0-based, duplicates dropped, each user's latest interaction held out,
    `negatives` items per user drawn uniformly from all items minus the user's train items
    (so, as there, a negative may repeat the held-out positive), torch_tensor chunks."""
    log = pd.read_csv(ratings_csv).rename(columns={"userId": "user", "movieId": "item"})
    for column in ("user", "item"):
        log[column] = pd.factorize(log[column])[0]
    n_users, n_items = int(log["user"].max()) + 1, int(log["item"].max()) + 1
    log = log.sort_values("timestamp", kind="stable")[["user", "item"]].drop_duplicates()
    test = log.groupby("user").tail(1).sort_values("user")
    train = log.drop(test.index)
    rng = np.random.default_rng(seed)
    seen = set(zip(train["user"].tolist(), train["item"].tolist()))
    sampled = []
    for user in test["user"].tolist():
        row: list[int] = []
        while len(row) < negatives:
            item = int(rng.integers(0, n_items))
            if (user, item) not in seen:
                row.append(item)
        sampled.append(row)
    items = np.concatenate([test["item"].to_numpy()[:, None], np.array(sampled)], axis=1).reshape(-1)
    lists = pd.DataFrame({"user": np.repeat(test["user"].to_numpy(), negatives + 1), "item": items,
                          "label": np.tile(np.r_[1.0, np.zeros(negatives)], len(test)).astype(np.float32)})
    return _write_ncf_chunks(out, "torch_tensor", train.reset_index(drop=True), lists, n_users, n_items)


def _write_ncf_chunks(out: Path, kind: str, train: pd.DataFrame, test: pd.DataFrame, n_users: int,
                      n_items: int) -> Path:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    train = train.assign(label=np.float32(1.0))
    per_list = len(test) // test["user"].nunique()
    source_spec = {}
    for name, frame in (("train", train), ("test", test)):
        chunks = []
        for number, features in enumerate((["user", "item"], ["label"])):
            values = frame[features]
            if kind == "torch_tensor":
                file = f"{name}_data_{number}.pt"
                dtype = torch.int64 if number == 0 else torch.float32
                torch.save(torch.from_numpy(values.to_numpy()).to(dtype), out / file)
            elif kind == "parquet":
                file = f"{name}_data_{number}.parquet"
                values.to_parquet(out / file, index=False)
            else:
                file = f"{name}_data_{number}.csv"
                values.to_csv(out / file, header=False, index=False)
            chunks.append({"type": kind, "features": features, "files": [file]})
        source_spec[name] = chunks
    feature_spec = {"user": {"dtype": "torch.int64", "cardinality": n_users},
                    "item": {"dtype": "torch.int64", "cardinality": n_items},
                    "label": {"dtype": "torch.float32"}}
    _save_spec(out, feature_spec, source_spec, NCF_CHANNELS, per_list)
    return out


def write_two_chunk(out: Path, seed: int = 0) -> Path:
    """The documentation's example: features user_gender, user_age, user_id, item_id, label;
    train chunk 0 = (user_gender, user_age) over train_data_0_0.csv and train_data_0_1.csv,
    chunk 1 = (user_id, item_id, label) in train_data_1.csv; test one chunk, columns reordered.
    Train also carries some label-0 rows and each test list's positive sits at a random
    position, as the format allows."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    train, test = interactions(seed)
    train["label"] = 1.0
    negatives = pd.DataFrame({"user": rng.integers(0, USERS, 50), "item": rng.integers(0, ITEMS, 50), "label": 0.0})
    train = pd.concat([train, negatives], ignore_index=True)
    test = test.groupby("user", group_keys=False).apply(lambda g: g.sample(frac=1.0, random_state=int(g.name)))
    gender = rng.integers(0, 3, USERS)
    age = rng.integers(18, 80, USERS)
    for frame in (train, test):
        frame["user_gender"], frame["user_age"] = gender[frame["user"]], age[frame["user"]]
        frame.rename(columns={"user": "user_id", "item": "item_id"}, inplace=True)
        frame["label"] = frame["label"].astype(int)
    half = len(train) // 2
    train[["user_gender", "user_age"]].iloc[:half].to_csv(out / "train_data_0_0.csv", header=False, index=False)
    train[["user_gender", "user_age"]].iloc[half:].to_csv(out / "train_data_0_1.csv", header=False, index=False)
    train[["user_id", "item_id", "label"]].to_csv(out / "train_data_1.csv", header=False, index=False)
    test_features = ["user_id", "item_id", "label", "user_gender", "user_age"]
    test[test_features].to_csv(out / "test_data.csv", header=False, index=False)
    feature_spec = {"user_gender": {"dtype": "torch.int8", "cardinality": 3},
                    "user_age": {"dtype": "torch.int8"},
                    "user_id": {"dtype": "torch.int32", "cardinality": USERS},
                    "item_id": {"dtype": "torch.int32", "cardinality": ITEMS},
                    "label": {"dtype": "torch.float32"}}
    source_spec = {
        "train": [{"type": "csv", "features": ["user_gender", "user_age"],
                   "files": ["train_data_0_0.csv", "train_data_0_1.csv"]},
                  {"type": "csv", "features": ["user_id", "item_id", "label"], "files": ["train_data_1.csv"]}],
        "test": [{"type": "csv", "features": test_features, "files": ["test_data.csv"]}],
    }
    # The documentation's channels, plus the three NCF reads (user_ch, item_ch, label_ch).
    channel_spec = {"numeric_inputs": ["user_age"], "categorical_user_inputs": ["user_gender", "user_id"],
                    "categorical_item_inputs": ["item_id"],
                    "user_ch": ["user_id"], "item_ch": ["item_id"], "label_ch": ["label"]}
    _save_spec(out, feature_spec, source_spec, channel_spec, NEGATIVES + 1)
    return out


def write_all(out: Path) -> dict[str, Path]:
    written = {f"ncf-{kind}": write_ncf(out / f"ncf-{kind}", kind) for kind in ("torch_tensor", "parquet", "csv")}
    written["two-chunk"] = write_two_chunk(out / "two-chunk")
    return written


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--from-ratings":
        print(convert_ratings(Path(sys.argv[2]), Path(sys.argv[3])))
    elif len(sys.argv) == 2:
        for name, path in write_all(Path(sys.argv[1])).items():
            print(f"{name}: {path}")
    else:
        sys.exit("usage: python tests/data/dle_examples.py OUT_DIR\n"
                 "       python tests/data/dle_examples.py --from-ratings ratings.csv OUT_DIR")
