"""The synthetic generator: seeded, exact sizes, MovieLens-like shape, planted structure."""

import numpy as np
import pandas as pd
import pytest

from conftest import run_command
from merlin_ncf.workflows.synthetic import PRESETS, Generator, SyntheticSpec

# MovieLens-like density (ml-1m: 4.5%): denser logs flatten the popularity skew.
SPEC = SyntheticSpec(interactions=40_000, users=800, items=1500, seed=11)


@pytest.fixture(scope="module")
def drawn():
    generator = Generator(SPEC)
    return generator, pd.concat(list(generator.chunks()), ignore_index=True)


def test_sizes_are_exact_and_pairs_distinct(drawn):
    _, log = drawn
    assert len(log) == SPEC.interactions
    assert log["user_id"].nunique() == SPEC.users
    assert not log.duplicated(["user_id", "item_id"]).any()


def test_timestamps_increase_per_user_with_some_ties(drawn):
    _, log = drawn
    steps = log.groupby("user_id")["timestamp"].diff().dropna()
    assert (steps >= 0).all()
    assert 0.02 < (steps == 0).mean() < 0.3


def test_activity_and_popularity_are_long_tailed(drawn):
    _, log = drawn
    per_user = log.groupby("user_id").size()
    assert per_user.max() > 4 * per_user.median()
    per_item = log.groupby("item_id").size().sort_values(ascending=False)
    assert per_item.iloc[: len(per_item) // 10].sum() > 0.3 * len(log)


def test_planted_factors_steer_choices(drawn):
    generator, log = drawn
    users = log["user_id"].to_numpy() - 1
    items = np.searchsorted(generator.raw_item_ids, log["item_id"].to_numpy())
    observed = np.einsum("ij,ij->i", generator.user_factors[users], generator.item_factors[items]).mean()
    shuffled = np.random.default_rng(0).permutation(items)
    baseline = np.einsum("ij,ij->i", generator.user_factors[users], generator.item_factors[shuffled]).mean()
    assert observed > baseline + 0.3


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    args = ["--interactions", "5000", "--users", "100", "--items", "300", "--format", "ml-20m", "--quiet"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run_command("workflows/synthetic.py", *args, "--seed", seed, "--output", str(tmp_path / name))
    read = {name: (tmp_path / name / "ratings.csv").read_bytes() for name in "abc"}
    assert read["a"] == read["b"] != read["c"]
    assert (tmp_path / "a" / "movies.csv").is_file()


def test_demo_preset_is_the_size_the_makefile_expects():
    demo = PRESETS["demo"]
    assert 90_000 <= demo.interactions <= 110_000 and 1_000 <= demo.items <= 2_000 and demo.users >= 1_000
    assert PRESETS["ml-20m"].users == 138_493 and PRESETS["ml-20m"].items == 26_744
