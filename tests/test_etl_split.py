"""The ETL output: leave-one-out by time, negatives, counts, feature spec and determinism."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ETL_NEGATIVES, ETL_SEED, ETL_SIZE, run_command
from merlin_ncf.workflows.cluster import Backend, quiet_merlin
from merlin_ncf.feature_spec import FeatureSpec
from merlin_ncf.workflows.readers import read_log

quiet_merlin()
FIXTURES = Path(__file__).parent / "fixtures"


def read_parts(files) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def encoded_log(raw_dir: Path, etl_dir: Path) -> pd.DataFrame:
    """The raw log with ids mapped by the saved workflow, plus each row's position in the input."""
    import nvtabular as nvt

    raw = read_log(raw_dir, "auto", Backend("cpu")).interactions.compute().reset_index(drop=True)
    encoded = nvt.Workflow.load(str(etl_dir / "workflow")).transform(raw[["user_id", "item_id"]])
    log = pd.DataFrame({"user": encoded["user_id"].to_numpy(), "item": encoded["item_id"].to_numpy(),
                        "timestamp": raw["timestamp"].to_numpy()})
    log["position"] = np.arange(len(log))
    return log


def latest_first(log: pd.DataFrame) -> pd.DataFrame:
    """The documented order: latest timestamp first, ties to the row later in the input."""
    return log.sort_values(["timestamp", "position"], ascending=False)


@pytest.fixture(scope="module")
def spec(etl_dir):
    return FeatureSpec.load(etl_dir)


@pytest.fixture(scope="module")
def log(raw_dir, etl_dir):
    return encoded_log(raw_dir, etl_dir)


@pytest.fixture(scope="module")
def candidates(spec):
    return {name: read_parts(spec.files(name)) for name in ("test", "validation")}


def positives(frame: pd.DataFrame) -> pd.Series:
    return frame[frame["label"] == 1].set_index("user_id")["item_id"]


def test_test_positive_is_each_users_latest_and_validation_the_one_before(log, candidates):
    ranked = latest_first(log)
    latest = ranked.groupby("user")["item"].nth(0)
    second = ranked.groupby("user")["item"].nth(1)
    test, validation = positives(candidates["test"]), positives(candidates["validation"])
    assert len(test) == ETL_SIZE["users"]
    pd.testing.assert_series_equal(test.sort_index(), latest.sort_index(), check_names=False)
    pd.testing.assert_series_equal(validation.sort_index(), second.sort_index(), check_names=False)


def test_candidate_lists_positive_first_then_k_distinct_unseen_negatives(log, candidates, spec):
    k1 = spec.test_samples_per_series
    assert k1 == ETL_NEGATIVES + 1
    seen = set(zip(log["user"], log["item"]))
    for frame in candidates.values():
        assert [str(t) for t in frame.dtypes] == ["int64", "int64", "float32"]
        assert len(frame) % k1 == 0
        users = frame["user_id"].to_numpy().reshape(-1, k1)
        items = frame["item_id"].to_numpy().reshape(-1, k1)
        labels = frame["label"].to_numpy().reshape(-1, k1)
        assert (users == users[:, :1]).all(), "a user's rows must be contiguous"
        assert len(np.unique(users[:, 0])) == len(users)
        assert (labels[:, 0] == 1).all() and (labels[:, 1:] == 0).all()
        negatives = items[:, 1:]
        assert negatives.min() >= spec.first_item_index and negatives.max() < spec.num_items
        assert all(len(set(row)) == ETL_NEGATIVES for row in negatives)
        assert not any((u, i) in seen for u, row in zip(users[:, 0], negatives) for i in row)


def test_counts_add_up_and_train_excludes_held_out(etl_dir, log, candidates, spec):
    train = read_parts(spec.files("train"))
    assert len(spec.files("train")) >= 2, "train is split into several files for streaming"
    held_out = sum(len(c) // spec.test_samples_per_series for c in candidates.values())
    assert len(train) + held_out == len(log) == ETL_SIZE["interactions"]
    train_pairs = set(zip(train["user_id"], train["item_id"]))
    for frame in candidates.values():
        assert not set(zip(*positives(frame).reset_index().to_numpy().T)) & train_pairs
    stats = json.loads((etl_dir / "stats.json").read_text())
    assert stats["users"] == ETL_SIZE["users"] and stats["items"] == log["item"].nunique()
    assert stats["interactions"] == ETL_SIZE["interactions"]
    assert stats["density"] == pytest.approx(stats["interactions"] / (stats["users"] * stats["items"]))
    assert set(stats["seconds"]) >= {"read", "filter", "encode", "split", "negatives", "write", "total"}


def test_feature_spec_matches_the_files(etl_dir, spec, log):
    raw = yaml.safe_load((etl_dir / "feature_spec.yaml").read_text())
    assert list(raw) == ["feature_spec", "source_spec", "channel_spec", "metadata"]
    assert raw["channel_spec"] == {"user_ch": ["user_id"], "item_ch": ["item_id"], "label_ch": ["label"]}
    assert raw["feature_spec"]["label"] == {"dtype": "float32"}
    assert spec.num_users == log["user"].max() + 1 and spec.num_items == log["item"].max() + 1
    for mapping in ("train", "test", "validation"):
        listed = {str(p) for p in spec.files(mapping)}
        assert listed == {str(p) for p in (etl_dir / mapping).glob("part_*.parquet")}
    assert raw["metadata"]["first_index"] == 3
    assert spec.path("workflow").is_dir() and spec.path("item_table").is_file()
    from merlin.io import Dataset
    from merlin.schema import Tags

    schema = Dataset(str(etl_dir / "train"), engine="parquet").schema
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["user_id"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]


def test_item_table_holds_every_encoded_item_with_its_title(etl_dir, spec, raw_dir):
    items = pd.read_parquet(etl_dir / "items.parquet")
    assert list(items["item_id"]) == list(range(spec.first_item_index, spec.num_items))
    titles = read_log(raw_dir, "auto", Backend("cpu")).items.set_index("raw_item_id")["title"]
    assert (items["title"].to_numpy() == titles.loc[items["raw_item_id"]].to_numpy()).all()


def test_same_seed_same_bytes_other_seed_other_negatives(raw_dir, etl_dir, tmp_path):
    common = ["--input", str(raw_dir), "--validation", "--device", "cpu", "--quiet",
              "--negatives", str(ETL_NEGATIVES)]
    run_command("workflows/etl.py", *common, "--output", str(tmp_path / "same"), "--seed", str(ETL_SEED))
    run_command("workflows/etl.py", *common, "--output", str(tmp_path / "other"), "--seed", str(ETL_SEED + 1))
    for name in ("test/part_0.parquet", "validation/part_0.parquet", "train/part_0.parquet"):
        assert (tmp_path / "same" / name).read_bytes() == (etl_dir / name).read_bytes(), name
    same, other = (pd.read_parquet(tmp_path / d / "test/part_0.parquet") for d in ("same", "other"))
    assert (same["label"] == other["label"]).all()
    assert (same["item_id"] != other["item_id"]).mean() > 0.5


def test_single_interaction_users_stay_in_train_and_ties_break_by_input_order(tmp_path):
    """Fixture: user 5 has one interaction; user 3's two latest share a timestamp."""
    out = tmp_path / "etl"
    run_command("workflows/etl.py", "--input", str(FIXTURES / "ml-1m"), "--output", str(out),
                "--negatives", "1", "--device", "cpu", "--quiet", "--no-validation")
    spec = FeatureSpec.load(out)
    assert not spec.has_mapping("validation") and not (out / "validation").exists()
    log = encoded_log(FIXTURES / "ml-1m", out)
    test = positives(read_parts(spec.files("test")))
    train = read_parts(spec.files("train"))
    single = log.groupby("user").filter(lambda g: len(g) == 1)["user"].item()
    assert single not in test.index and single in set(train["user_id"])
    tied = log[log["timestamp"] == 978297001]
    assert test[tied["user"].iloc[0]] == tied["item"].iloc[-1]
    assert len(test) == 4 and len(train) == len(log) - 4


def test_min_rating_then_min_user_interactions(tmp_path):
    out = tmp_path / "etl"
    run_command("workflows/etl.py", "--input", str(FIXTURES / "ml-1m"), "--output", str(out), "--negatives", "1",
                "--min-rating", "4", "--min-user-interactions", "2", "--device", "cpu", "--quiet", "--no-validation")
    raw = read_log(FIXTURES / "ml-1m", "auto", Backend("cpu")).interactions.compute()
    liked = raw[raw["rating"] >= 4]
    kept = liked.groupby("user_id").filter(lambda g: len(g) >= 2)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["interactions"] == len(kept) and stats["raw_interactions"] == len(raw)
    assert stats["users"] == kept["user_id"].nunique() and stats["items"] == kept["item_id"].nunique()
    spec = FeatureSpec.load(out)
    assert len(read_parts(spec.files("train"))) + stats["test_users"] == len(kept)


def test_freq_threshold_sends_rare_ids_to_the_oov_index(tmp_path):
    """Fixture: item 260 and user 5 occur once; with --freq-threshold 2 both map to index 2."""
    import nvtabular as nvt

    out = tmp_path / "etl"
    run_command("workflows/etl.py", "--input", str(FIXTURES / "ml-1m"), "--output", str(out), "--negatives", "1",
                "--freq-threshold", "2", "--device", "cpu", "--quiet")
    workflow = nvt.Workflow.load(str(out / "workflow"))
    mapped = workflow.transform(pd.DataFrame({"user_id": [5, 1], "item_id": [260, 1193]}))
    assert mapped["user_id"].iloc[0] == 2 and mapped["item_id"].iloc[0] == 2
    assert mapped["user_id"].iloc[1] >= 3 and mapped["item_id"].iloc[1] >= 3
    spec = FeatureSpec.load(out)
    assert spec.num_items == 3 + 5 and spec.num_users == 3 + 4
    test = read_parts(spec.files("test"))
    assert 2 not in set(test["user_id"]), "the OOV pseudo-user is never evaluated"
    assert (test.loc[test["label"] == 0, "item_id"] >= 3).all()
    assert 2 not in set(pd.read_parquet(out / "items.parquet")["item_id"])


def test_validation_is_written_by_default_and_needs_three_interactions(tmp_path):
    """Fixture: users 1-3 have 3+ interactions, user 4 two, user 5 one."""
    out = tmp_path / "etl"
    run_command("workflows/etl.py", "--input", str(FIXTURES / "ml-1m"), "--output", str(out),
                "--negatives", "1", "--device", "cpu", "--quiet")
    spec = FeatureSpec.load(out)
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["test_users"], stats["validation_users"]) == (4, 3)
    log = encoded_log(FIXTURES / "ml-1m", out)
    two = log.groupby("user").filter(lambda g: len(g) == 2)["user"].iloc[0]
    assert two in set(positives(read_parts(spec.files("test"))).index)
    assert two not in set(positives(read_parts(spec.files("validation"))).index)
    assert len(read_parts(spec.files("train"))) == len(log) - 7
