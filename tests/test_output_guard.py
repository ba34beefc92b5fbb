"""The shared rule for what an output may replace (merlin_ncf.atomic.check_replaceable)."""

from __future__ import annotations

import pytest

from merlin_ncf import atomic
from merlin_ncf.errors import UserError


def test_missing_and_empty_targets_may_be_written(tmp_path):
    atomic.check_replaceable(tmp_path / "new", "etl")
    (tmp_path / "empty").mkdir()
    atomic.check_replaceable(tmp_path / "empty", "etl")


def test_a_folder_of_user_files_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "x"
    target.mkdir()
    (target / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="--overwrite"):
        atomic.check_replaceable(target, "etl")
    atomic.check_replaceable(target, "etl", overwrite=True)


def test_only_our_own_kind_is_replaced(tmp_path):
    target = tmp_path / "etl"
    target.mkdir()
    atomic.mark(target, "etl")
    atomic.check_replaceable(target, "etl")
    with pytest.raises(UserError):
        atomic.check_replaceable(target, "run")


def test_legacy_outputs_are_recognised_by_all_their_markers(tmp_path):
    target = tmp_path / "etl"
    target.mkdir()
    (target / "stats.json").write_text("{}")
    with pytest.raises(UserError):
        atomic.check_replaceable(target, "etl", legacy_markers=["stats.json", "feature_spec.yaml"])
    (target / "feature_spec.yaml").write_text("")
    atomic.check_replaceable(target, "etl", legacy_markers=["stats.json", "feature_spec.yaml"])


@pytest.mark.parametrize("relation", ["same", "inside input", "contains input"])
def test_overlap_with_the_input_is_refused_even_with_overwrite(tmp_path, relation):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ratings.csv").write_text("user_id,item_id,timestamp\n")
    target = {"same": data, "inside input": data / "out", "contains input": tmp_path}[relation]
    with pytest.raises(UserError, match="overlaps the input"):
        atomic.check_replaceable(target, "etl", inputs=[data / "ratings.csv" if relation == "contains input" else data],
                                 overwrite=True)


def test_atomic_directory_marks_its_output(tmp_path):
    with atomic.atomic_directory(tmp_path / "out", kind="etl") as tmp:
        (tmp / "a").write_text("1")
    assert atomic.written_by_us(tmp_path / "out", "etl")
    assert (tmp_path / "out" / "a").read_text() == "1"


def test_an_unwritable_parent_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot write"):
        with atomic.atomic_directory("/proc/x/out"):
            pass
