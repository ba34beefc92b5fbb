"""workflows/transcode.py: a DeepLearningExamples spec directory into this project's ETL layout,
then trained by models/train_ncf.py and exported by serving/export.py unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_command
from data.dle_examples import NEGATIVES, USERS, interactions, write_ncf, write_two_chunk
from merlin_ncf.atomic import MARKER
from merlin_ncf.workflows.dle_spec import check, load_spec, read_mapping

PER_LIST = NEGATIVES + 1
# Taken out of train in the spec below, so the spec's test lists hold ids the workflow never saw.
COLD_USER = 5


def _cold_item(test: pd.DataFrame) -> int:
    """An item that is some list's positive and another list's negative."""
    lists = test["item"].to_numpy().reshape(-1, PER_LIST)
    return int(np.intersect1d(lists[:, 0], lists[:, 1:]).min())


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    """DLE NCF preprocessing output (parquet chunks) whose train lacks COLD_USER and one item."""
    spec = write_ncf(tmp_path_factory.mktemp("spec") / "ncf", "parquet")
    _, test = interactions()
    ids, labels = pd.read_parquet(spec / "train_data_0.parquet"), pd.read_parquet(spec / "train_data_1.parquet")
    keep = (ids["user"] != COLD_USER) & (ids["item"] != _cold_item(test))
    ids[keep].to_parquet(spec / "train_data_0.parquet", index=False)
    labels[keep].to_parquet(spec / "train_data_1.parquet", index=False)
    return spec


@pytest.fixture(scope="module")
def transcoded(spec_dir) -> Path:
    out = spec_dir.parent / "etl"
    result = run_command("workflows/transcode.py", "--spec", str(spec_dir), "--output", str(out), timeout=300)
    assert "test lists" in result.stdout
    return out


def _decode(etl: Path, frame: pd.DataFrame) -> pd.Series:
    """Encoded item ids back to raw ones through items.parquet (OOV -> NaN)."""
    items = pd.read_parquet(etl / "items.parquet")
    return frame["item_id"].map(dict(zip(items["item_id"], items["raw_item_id"])))


def test_transcoded_directory_is_our_layout(transcoded):
    from merlin_ncf.models.data import load_candidates, open_etl

    assert (transcoded / MARKER).read_text().strip() == "etl"
    data = open_etl(transcoded)  # train schema tags, cardinalities
    assert (data.user_column, data.item_column) == ("user_id", "item_id")
    assert data.spec.test_samples_per_series == PER_LIST and data.first_item == 3
    candidates = load_candidates(data, "test")
    assert candidates.items.shape == (USERS, PER_LIST)
    check(transcoded)  # and it still follows the format's rules


def test_test_lists_are_the_spec_lists_through_the_saved_workflow(spec_dir, transcoded):
    import nvtabular as nvt

    raw = read_mapping(load_spec(spec_dir), "test")
    written = pd.concat(pd.read_parquet(f) for f in sorted((transcoded / "test").glob("part_*.parquet")))
    written = written.reset_index(drop=True)
    assert len(written) == len(raw)
    workflow = nvt.Workflow.load(str(transcoded / "workflow"))
    encoded = workflow.transform(nvt.Dataset(raw[["user", "item"]].rename(columns={"user": "user_id", "item": "item_id"})
                                             .astype("int64"), cpu=True)).to_ddf().compute().reset_index(drop=True)
    np.testing.assert_array_equal(written[["user_id", "item_id"]].to_numpy(), encoded[["user_id", "item_id"]].to_numpy())
    np.testing.assert_array_equal(written["label"].to_numpy(), raw["label"].to_numpy())
    known = written["item_id"] >= 3
    np.testing.assert_array_equal(_decode(transcoded, written)[known].to_numpy(), raw["item"][known].to_numpy())


def test_ids_absent_from_train_go_to_oov_and_are_counted(spec_dir, transcoded):
    _, test = interactions()
    lists = test["item"].to_numpy().reshape(-1, PER_LIST)
    cold = _cold_item(test)
    oov = json.loads((transcoded / "stats.json").read_text())["out_of_vocabulary"]["test"]
    assert oov["users"] == 1
    assert oov["positive_items"] == int((lists[:, 0] == cold).sum()) > 0
    assert oov["negative_items"] == int((lists[:, 1:] == cold).sum()) > 0
    written = pd.read_parquet(transcoded / "test" / "part_0.parquet")
    assert set(written["user_id"].to_numpy().reshape(-1, PER_LIST)[COLD_USER]) == {2}
    items = pd.read_parquet(transcoded / "items.parquet")
    assert cold not in set(items["raw_item_id"]) and (items["item_id"] >= 3).all()


def test_two_chunk_example_drops_train_negatives_and_puts_positives_first(tmp_path):
    spec = write_two_chunk(tmp_path / "two-chunk")
    out = tmp_path / "etl"
    run_command("workflows/transcode.py", "--spec", str(spec), "--output", str(out), "--quiet", timeout=300)
    stats = json.loads((out / "stats.json").read_text())
    train_labels = pd.read_csv(spec / "train_data_1.csv", header=None)[2]
    assert stats["dropped_train_negatives"] == int((train_labels == 0).sum()) > 0
    assert stats["train_interactions"] == int((train_labels == 1).sum())
    written = pd.read_parquet(out / "test" / "part_0.parquet")
    assert (written["label"].to_numpy().reshape(-1, PER_LIST)[:, 0] == 1).all()
    raw = pd.read_csv(spec / "test_data.csv", header=None, names=["user", "item", "label", "gender", "age"])
    positives = raw[raw["label"] == 1].set_index("user")["item"]
    first = written.iloc[::PER_LIST]
    users = pd.read_parquet(out / "workflow" / "categories" / "unique.user_id.parquet")["user_id"]
    np.testing.assert_array_equal(_decode(out, first).to_numpy(), positives.loc[users[first["user_id"]]].to_numpy())


def test_a_list_with_two_positives_is_refused(tmp_path):
    spec = write_ncf(tmp_path / "ncf", "csv")
    labels = pd.read_csv(spec / "test_data_1.csv", header=None)
    labels.iloc[PER_LIST + 2] = 1.0
    labels.to_csv(spec / "test_data_1.csv", header=False, index=False)
    result = run_command("workflows/transcode.py", "--spec", str(spec), "--output", str(tmp_path / "o"), check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "test list 1 (rows 5-9) has 2 positives" in result.stderr


def test_output_never_overlaps_the_spec_nor_replaces_foreign_data(spec_dir, tmp_path):
    inside = run_command("workflows/transcode.py", "--spec", str(spec_dir), "--output", str(spec_dir / "etl"),
                         check=False)
    assert inside.returncode == 2 and "overlaps the input" in inside.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = run_command("workflows/transcode.py", "--spec", str(spec_dir), "--output", str(foreign), check=False)
    assert refused.returncode == 2 and "not written by this command" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "keep me" and sorted(p.name for p in spec_dir.iterdir()) == [
        "feature_spec.yaml", "test_data_0.parquet", "test_data_1.parquet", "train_data_0.parquet",
        "train_data_1.parquet"]


@pytest.mark.slow
def test_transcoded_torch_spec_trains_and_exports(tmp_path):
    """DLE NCF's own torch_tensor output -> transcode -> train_ncf.py -> serving/export.py."""
    spec = write_ncf(tmp_path / "ncf", "torch_tensor")
    etl, run, repo = tmp_path / "etl", tmp_path / "run", tmp_path / "repo"
    run_command("workflows/transcode.py", "--spec", str(spec), "--output", str(etl), "--quiet", timeout=300)
    run_command("models/train_ncf.py", "--data", str(etl), "--output", str(run), "--epochs", "1", "--no-progress",
                "--batch-size", "2000", "--factors", "8", "--mlp-layers", "16", "8", timeout=300)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["loss"])
    run_command("serving/export.py", "--data", str(etl), "--run", str(run), "--output", str(repo), timeout=300)
    assert (repo / "workflow").is_dir() and (repo / "model").is_dir()
    shutil.rmtree(repo)


def test_foreign_spec_is_transcoded_once_into_the_cache_and_never_written_to(spec_dir, transcoded, tmp_path,
                                                                           monkeypatch):
    """What open_etl would call: a foreign spec directory gives its cached transcoded copy."""
    from merlin_ncf.workflows.datasets import CACHE_ENV
    from merlin_ncf.workflows.transcode import etl_directory

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    before = {p.name: p.stat().st_mtime_ns for p in spec_dir.iterdir()}
    first = etl_directory(spec_dir)
    assert first.parent == tmp_path / "cache" / "transcoded" and (first / MARKER).is_file()
    stamp = (first / "stats.json").stat().st_mtime_ns
    assert etl_directory(spec_dir) == first and (first / "stats.json").stat().st_mtime_ns == stamp
    assert {p.name: p.stat().st_mtime_ns for p in spec_dir.iterdir()} == before
    assert etl_directory(transcoded) == transcoded  # this project's output is used where it is


@pytest.mark.parametrize("script, options", [
    ("workflows/transcode.py", {"--spec", "--output", "--overwrite", "--train-files", "--quiet"}),
    ("workflows/check_spec.py", set()),
])
def test_help_and_bad_command_lines(script, options):
    help_text = run_command(script, "--help").stdout
    assert all(option in help_text for option in options) and "usage:" in help_text
    bad = run_command(script, "--no-such-option", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_a_validation_mapping_becomes_validation_lists(tmp_path):
    import yaml

    from merlin_ncf.models.data import open_etl

    spec = write_ncf(tmp_path / "ncf", "csv")
    raw = yaml.safe_load((spec / "feature_spec.yaml").read_text())
    raw["source_spec"]["validation"] = raw["source_spec"]["test"]  # the same files: allowed by the format
    (spec / "feature_spec.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "etl"
    run_command("workflows/transcode.py", "--spec", str(spec), "--output", str(out), "--quiet", timeout=300)
    assert json.loads((out / "stats.json").read_text())["validation_users"] == USERS
    assert open_etl(out).eval_mapping == "validation"
    pd.testing.assert_frame_equal(pd.read_parquet(out / "validation" / "part_0.parquet"),
                                  pd.read_parquet(out / "test" / "part_0.parquet"))


def test_train_ncf_takes_a_foreign_spec_directory_directly(tmp_path, monkeypatch):
    """--data names DLE NCF's own output: training reads its transcoded copy from the cache."""
    from merlin_ncf.workflows.datasets import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    spec = write_ncf(tmp_path / "ncf", "parquet")
    before = sorted(p.name for p in spec.iterdir())
    run = tmp_path / "run"
    run_command("models/train_ncf.py", "--data", str(spec), "--output", str(run), "--epochs", "1", "--no-progress",
                "--batch-size", "2000", "--factors", "8", "--mlp-layers", "16", "8")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["loss"])
    assert sorted(p.name for p in spec.iterdir()) == before
    assert len(list((tmp_path / "cache" / "transcoded").glob("*/feature_spec.yaml"))) == 1
    bad = tmp_path / "bad"
    shutil.copytree(spec, bad)
    next(bad.glob("**/*.parquet")).unlink()
    result = run_command("models/train_ncf.py", "--data", str(bad), "--output", str(tmp_path / "run2"), "--epochs", "1",
                         check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
