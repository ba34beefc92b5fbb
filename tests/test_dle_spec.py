"""Reading and checking Dataset Feature Specification directories (workflows/dle_spec.py,
workflows/check_spec.py): DeepLearningExamples' own layouts in, one-line errors for bad
specs, and this project's ETL output passing the format's rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import run_command
from data.dle_examples import NEGATIVES, USERS, interactions, write_ncf, write_two_chunk
from merlin_ncf.workflows.dle_spec import check, load_spec, read_mapping
from merlin_ncf.errors import EtlError


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dle")
    for kind in ("torch_tensor", "parquet", "csv"):
        write_ncf(root / f"ncf-{kind}", kind)
    write_two_chunk(root / "two-chunk")
    return root


@pytest.mark.parametrize("kind", ["torch_tensor", "parquet", "csv"])
def test_ncf_preprocessing_layout_reads_back_the_generated_data(examples, kind):
    spec = load_spec(examples / f"ncf-{kind}")
    train, test = interactions()
    got_train, got_test = read_mapping(spec, "train"), read_mapping(spec, "test")
    assert list(got_train.columns) == ["user", "item", "label"]
    np.testing.assert_array_equal(got_train[["user", "item"]].to_numpy(), train.to_numpy())
    assert (got_train["label"] == 1).all()
    np.testing.assert_array_equal(got_test.to_numpy(np.float64), test.to_numpy(np.float64))
    assert check(examples / f"ncf-{kind}")["test"].lists == USERS


def test_two_chunk_example_joins_chunks_and_files_in_order(examples):
    """Train: (gender, age) over two files beside (user, item, label) in a third; test: one
    chunk with the columns in another order. Every row must pair up again."""
    spec = load_spec(examples / "two-chunk")
    train = read_mapping(spec, "train")
    test = read_mapping(spec, "test")
    # gender and age are per-user attributes: any misaligned join would break this.
    for frame in (train, test):
        assert (frame.groupby("user_id")[["user_gender", "user_age"]].nunique() == 1).all().all()
    raw = pd.read_csv(examples / "two-chunk" / "train_data_1.csv", header=None)
    np.testing.assert_array_equal(train[["user_id", "item_id", "label"]].to_numpy(), raw.to_numpy())
    assert len(test) == USERS * (NEGATIVES + 1)
    assert (test.groupby("user_id")["label"].sum() == 1).all()


def _mutate_spec(directory: Path, change) -> Path:
    path = directory / "feature_spec.yaml"
    spec = yaml.safe_load(path.read_text())
    change(spec)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return directory


def _copy(examples: Path, tmp_path: Path, kind: str = "csv") -> Path:
    import shutil

    return Path(shutil.copytree(examples / f"ncf-{kind}", tmp_path / "spec"))


def _interleave_test_lists(directory: Path) -> None:
    """Rows of all lists interleaved (every user's 1st row, then every 2nd ...): right
    length, right labels, but no list is consecutive rows any more."""
    for file in ("test_data_0.csv", "test_data_1.csv"):
        frame = pd.read_csv(directory / file, header=None)
        order = np.arange(len(frame)).reshape(-1, NEGATIVES + 1).T.reshape(-1)
        frame.iloc[order].to_csv(directory / file, header=False, index=False)


def _add_weight_feature(spec: dict) -> None:
    spec["feature_spec"]["weight"] = {"dtype": "torch.float32"}
    spec["source_spec"]["train"][1]["features"].append("weight")


BAD_SPECS = {
    "missing file": (lambda d: (d / "test_data_1.csv").unlink(), "lists test_data_1.csv, which does not exist"),
    "unknown chunk type": (lambda d: _mutate_spec(d, lambda s: s["source_spec"]["train"][0].update(type="avro")),
                           "unknown type 'avro'"),
    "channel names a missing feature": (lambda d: _mutate_spec(d, lambda s: s["channel_spec"].update(item_ch=["sku"])),
                                        "channel_spec.item_ch names 'sku', absent from feature_spec"),
    "feature in two chunks": (lambda d: _mutate_spec(d, lambda s: s["source_spec"]["test"][1].update(features=["item"])),
                              "feature 'item' appears in chunks 0 and 1 of source_spec.test"),
    "id beyond cardinality": (lambda d: _mutate_spec(d, lambda s: s["feature_spec"]["item"].update(cardinality=10)),
                              "beyond the declared cardinality 10"),
    "test not whole lists": (lambda d: _mutate_spec(d, lambda s: s["metadata"].update(test_samples_per_series=7)),
                             "test has 300 rows, not a multiple of test_samples_per_series=7"),
    "test lists not contiguous": (_interleave_test_lists, "each user's 5 candidates must be consecutive rows"),
    "chunk width": (lambda d: _mutate_spec(d, _add_weight_feature), "has 1 columns but the chunk lists 2 features"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_is_one_line_and_exit_2_through_both_commands(examples, tmp_path, case):
    breakage, message = BAD_SPECS[case]
    spec_dir = _copy(examples, tmp_path)
    breakage(spec_dir)
    out = tmp_path / "out"
    for script, args in (("workflows/transcode.py", ["--spec", str(spec_dir), "--output", str(out)]),
                         ("workflows/check_spec.py", [str(spec_dir)])):
        result = run_command(script, *args, check=False, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not out.exists()


def test_torch_file_that_is_not_a_tensor_is_one_line(examples, tmp_path):
    import torch

    spec_dir = _copy(examples, tmp_path, "torch_tensor")
    torch.save({"user": torch.zeros(3)}, spec_dir / "train_data_0.pt")
    with pytest.raises(EtlError, match="holds a dict, not one tensor"):
        check(spec_dir)


def test_project_etl_output_follows_the_format(etl_dir, tmp_path, monkeypatch):
    """The other direction: what workflows/etl.py writes is a valid spec directory (and is
    recognised as ours, so it is never transcoded)."""
    from merlin_ncf.workflows.datasets import CACHE_ENV
    from merlin_ncf.workflows.transcode import etl_directory

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert etl_directory(etl_dir) == etl_dir and not (tmp_path / "cache").exists()
    result = run_command("workflows/check_spec.py", str(etl_dir), timeout=120)
    assert "follows the Dataset Feature Specification rules" in result.stdout
    summary = check(etl_dir)
    stats = json.loads((etl_dir / "stats.json").read_text())
    assert summary["test"].lists == stats["test_users"]
    assert summary["validation"].lists == stats["validation_users"]
    assert summary["train"].rows == stats["train_interactions"]
