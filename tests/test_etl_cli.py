"""The ETL and generator commands: --help, bad input as one-line errors, atomic output."""

import re
import shutil
from pathlib import Path

import pytest

from conftest import run_command
from merlin_ncf.atomic import atomic_directory

FIXTURES = Path(__file__).parent / "fixtures"


def help_entries(help_text: str) -> dict[str, str]:
    """option name -> the text of its help entry (which may wrap onto following lines)."""
    entries = re.split(r"\n(?=  -)", help_text)
    return {m.group(1): entry for entry in entries for m in [re.match(r"\s*(--[a-z-]+)", entry)] if m}


@pytest.mark.parametrize("script, expected", [
    ("workflows/etl.py", {"--input", "--download", "--format", "--user-col", "--item-col", "--time-col",
                          "--rating-col", "--min-rating", "--min-user-interactions", "--freq-threshold",
                          "--validation", "--negatives", "--seed", "--output", "--device", "--workers",
                          "--scheduler-address", "--partition-size", "--train-files", "--quiet",
                          "--overwrite", "--no-validation", "--dashboard"}),
    ("workflows/synthetic.py", {"--output", "--preset", "--interactions", "--users", "--items", "--format",
                                "--seed", "--dim", "--quiet", "--overwrite"}),
])
def test_help_documents_every_option(script, expected):
    entries = help_entries(run_command(script, "--help").stdout)
    assert expected <= set(entries)
    for name in expected:
        description = re.sub(r"--?[a-z-]+( [A-Z_]+)?,?", "", entries[name]).split()
        assert len(description) >= 3, f"{name} has no help text: {entries[name]!r}"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _parquet_parts(directory: Path) -> Path:
    """Two parquet files of one log; the second holds a fractional item id."""
    import pandas as pd

    directory.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10], "timestamp": [1, 2, 3]}).to_parquet(
        directory / "part-0.parquet", index=False)
    pd.DataFrame({"user_id": [2, 3], "item_id": [1001.5, 10.0], "timestamp": [4, 5]}).to_parquet(
        directory / "part-1.parquet", index=False)
    return directory


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name: (arguments, a fragment the one-line message must contain)"""
    generic = _write(tmp / "generic" / "log.csv", "u,i,t\n1,2,3\n")
    return {
        "missing file": (["--input", str(tmp / "nope")], "does not exist"),
        "unknown format": (["--input", str(FIXTURES / "ml-1m"), "--format", "ml-3m"], "invalid choice"),
        "unrecognised directory": (["--input", str(_write(tmp / "odd" / "x.txt", "1\n").parent)], "--format"),
        "missing columns": (["--input", str(generic)], "lacks column"),
        "too many fields": (["--input", str(_write(tmp / "a" / "ratings.dat", "1::2::5::978300760\n1::3::4::9::9\n")
                                         .parent)], "cannot parse"),
        "too few fields": (["--input", str(_write(tmp / "b" / "ratings.dat", "1::2::5::978300760\n1::3\n").parent)],
                           "cannot parse"),
        "non-numeric ids": (["--input", str(_write(tmp / "c" / "ratings.csv",
                                                   "userId,movieId,rating,timestamp\n1,2,5.0,9\nabc,3,4.0,9\n")
                                            .parent)], "cannot parse"),
        "empty file": (["--input", str(_write(tmp / "d" / "u.data", "").parent), "--format", "ml-100k"], ""),
        "header only": (["--input", str(_write(tmp / "e" / "ratings.csv", "userId,movieId,rating,timestamp\n")
                                        .parent)], "no interactions"),
        "everything filtered": (["--input", str(FIXTURES / "ml-1m"), "--min-rating", "6"], "no interactions left"),
        "too many negatives": (["--input", str(FIXTURES / "ml-1m"), "--negatives", "50"], "--negatives"),
        "no gpu": (["--input", str(FIXTURES / "ml-1m"), "--device", "gpu"], "GPU"),
        "offline download": (["--download", "ml-1m"], "cannot download"),
        "negative freq threshold": (["--input", str(FIXTURES / "ml-1m"), "--freq-threshold", "-1"], "--freq-threshold"),
        "negative min interactions": (["--input", str(FIXTURES / "ml-1m"), "--min-user-interactions", "-2"],
                                      "--min-user-interactions"),
        "zero negatives": (["--input", str(FIXTURES / "ml-1m"), "--negatives", "0"], "--negatives"),
        "negative workers": (["--input", str(FIXTURES / "ml-1m"), "--workers", "-1"], "--workers"),
        "every item out of vocabulary": (["--input", str(FIXTURES / "ml-1m"), "--freq-threshold", "100"],
                                         "out-of-vocabulary"),
        "extra fields in a generic csv": (["--input", str(_write(tmp / "f" / "log.csv",
                                                              "user_id,item_id,timestamp\n1,2,3\n1,3,4,9\n"))],
                                          "log.csv"),
        "fractional ids in a later parquet file": (["--input", str(_parquet_parts(tmp / "g"))], "part-1.parquet"),
        "unknown release": (["--download", "ml-3m"], "unknown MovieLens release"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("/unused"))))
def test_bad_input_is_one_line_error_and_leaves_no_output(case, tmp_path, monkeypatch):
    monkeypatch.setenv("MERLIN_NCF_CACHE", str(tmp_path / "cache"))
    args, fragment = bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "etl"
    result = run_command("workflows/etl.py", *args, "--output", str(out), "--quiet", check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("etl.py: error: ") and fragment in lines[0]
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_failed_run_keeps_previous_output(tmp_path):
    out = tmp_path / "etl"
    run_command("workflows/etl.py", "--input", str(FIXTURES / "ml-1m"), "--output", str(out), "--negatives", "1",
                "--quiet")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_command("workflows/etl.py", "--input", str(FIXTURES / "ml-1m"), "--output", str(out),
                         "--min-rating", "6", "--quiet", check=False)
    assert result.returncode == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etl"]


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "result"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("half-written")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "first"
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["result"]


def test_synthetic_bad_arguments_are_one_line(tmp_path):
    result = run_command("workflows/synthetic.py", "--output", str(tmp_path / "x"), "--interactions", "1000",
                         "--users", "2", "--items", "10", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot fit" in result.stderr and not (tmp_path / "x").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_interrupted_run_leaves_previous_output(raw_dir, etl_dir, tmp_path):
    """SIGINT in the middle of a run: the old output stays, no temporary directory remains."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "etl"
    shutil.copytree(etl_dir, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    process = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "workflows/etl.py"),
                                "--input", str(raw_dir), "--output", str(out), "--validation", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".etl.tmp-*/_work")):
        time.sleep(0.05)  # wait until the run is writing its temporary directory
    assert list(tmp_path.glob(".etl.tmp-*")), "the run never started writing"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["etl"]


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("hi\n")
    return path


@pytest.mark.parametrize("script, args", [
    ("workflows/etl.py", ["--input", str(FIXTURES / "ml-1m"), "--negatives", "1"]),
    ("workflows/synthetic.py", ["--preset", "tiny"]),
])
def test_a_folder_of_user_files_is_never_replaced_without_overwrite(tmp_path, script, args):
    out = _user_folder(tmp_path / "x")
    result = run_command(script, *args, "--output", str(out), "--quiet", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--overwrite" in result.stderr
    assert (out / "notes.txt").read_text() == "hi\n" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    run_command(script, *args, "--output", str(out), "--quiet", "--overwrite")
    assert not (out / "notes.txt").exists() and (out / ".merlin-ncf").is_file()
    run_command(script, *args, "--output", str(out), "--quiet")  # our own output: replaced freely


@pytest.mark.parametrize("relation", ["same", "inside", "contains"])
def test_output_overlapping_the_input_is_refused_even_with_overwrite(tmp_path, relation):
    data = tmp_path / "data" / "ml-1m"
    shutil.copytree(FIXTURES / "ml-1m", data)
    out = {"same": data, "inside": data / "etl", "contains": tmp_path / "data"}[relation]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run_command("workflows/etl.py", "--input", str(data), "--output", str(out), "--negatives", "1",
                         "--overwrite", "--quiet", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "overlaps the input" in result.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_legacy_etl_output_without_marker_is_replaced(tmp_path):
    """Outputs written before the marker file are recognised by stats.json + feature_spec.yaml."""
    out = tmp_path / "etl"
    run_command("workflows/etl.py", "--input", str(FIXTURES / "ml-1m"), "--output", str(out), "--negatives", "1",
                "--quiet")
    (out / ".merlin-ncf").unlink()
    run_command("workflows/etl.py", "--input", str(FIXTURES / "ml-1m"), "--output", str(out), "--negatives", "1",
                "--quiet")
    assert (out / ".merlin-ncf").read_text().strip() == "etl"


@pytest.mark.parametrize("script, args", [
    ("workflows/etl.py", ["--input", str(FIXTURES / "ml-1m"), "--negatives", "1"]),
    ("workflows/synthetic.py", ["--preset", "tiny"]),
])
def test_unwritable_output_is_one_line_error(script, args):
    result = run_command(script, *args, "--output", "/proc/merlin-ncf-test/x", "--quiet", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot write" in result.stderr


@pytest.mark.parametrize("script", ["workflows/etl.py", "workflows/synthetic.py", "workflows/transcode.py",
                                    "models/train_ncf.py"])
def test_help_states_each_default_once_and_never_a_placeholder(script):
    for name, text in help_entries(run_command(script, "--help").stdout).items():
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: False)" not in flat, (name, flat)
        assert flat.count("default:") <= 1, (name, flat)
