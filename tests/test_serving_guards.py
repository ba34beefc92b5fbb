"""Serving's guards on what it is given: a private cache for the program the server runs, the
client's top_k range and one-line errors, and export's checks of its inputs and its output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from merlin_ncf.serving.errors import ServingError

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
NOBODY = 65534


# --- the python backend's cache directory (issue 10, item 12) ---------------------------------------


@pytest.fixture
def home_cache_unwritable(tmp_path, monkeypatch) -> Path:
    """~/.cache cannot be used (it lies under a file), and the temp dir is a fresh one."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp / f"merlin-ncf-{os.getuid()}"


def _plant_stub(fallback: Path) -> Path:
    """What another user could leave in a shared fallback: a stub the server would execute."""
    fallback.mkdir(mode=0o777)
    fallback.chmod(0o777)
    planted = fallback / "planted"
    planted.write_text("#!/bin/sh\ntouch planted-ran\n")
    return planted


def test_a_fallback_cache_made_by_another_user_is_refused(home_cache_unwritable):
    from merlin_ncf.serving.server_runtime import find_tritonserver

    _plant_stub(home_cache_unwritable)
    os.chown(home_cache_unwritable, NOBODY, NOBODY)
    with pytest.raises(ServingError, match="belongs to uid 65534"):
        find_tritonserver()


def test_a_world_writable_fallback_cache_is_refused(home_cache_unwritable):
    from merlin_ncf.serving.server_runtime import find_tritonserver

    _plant_stub(home_cache_unwritable)
    with pytest.raises(ServingError, match="mode 0777"):
        find_tritonserver()


def test_the_fallback_cache_is_created_private(home_cache_unwritable):
    from merlin_ncf.serving.server_runtime import find_tritonserver

    installation = find_tritonserver()
    assert installation.backend_dir.parent == home_cache_unwritable
    info = home_cache_unwritable.stat()
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700
    assert (installation.backend_dir / "python" / "triton_python_backend_stub").is_file()


# --- client.py (item 13) -------------------------------------------------------------------------------


def _client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "serving/client.py", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--user", "1", "--top-k", "3000000000", "--url", "127.0.0.1:9"], "--top-k must be between 1 and 2147483647"),
    (["--user", "1", "--top-k", "0", "--url", "127.0.0.1:9"], "--top-k must be between 1"),
    (["--user", "abc", "--items", " , ", "--url", "127.0.0.1:9"], "--items is empty"),  # string ids are valid
    (["--user", "1", "--protocol", "smtp"], "argument --protocol: invalid choice"),
    ([], "the following arguments are required: --user"),
])
def test_client_bad_arguments_are_one_line(args, message):
    done = _client(*args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "usage:" not in done.stderr


def test_recommend_refuses_a_top_k_that_does_not_fit_int32():
    from merlin_ncf.serving.client import RecommenderClient

    with RecommenderClient("127.0.0.1:9") as client, pytest.raises(ServingError, match="top_k must be between 1"):
        client.recommend(1, top_k=3_000_000_000)  # refused before anything is sent


# --- export.py: the run must belong to the ETL output (item 7) ------------------------------------------


def _export_cli(*args: str) -> tuple[int, str]:
    from test_serving import _export_cli as run_in_process

    return run_in_process(*args)


def _copy_run(run: Path, to: Path, **config_changes) -> Path:
    shutil.copytree(run, to)
    config = json.loads((to / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_export_refuses_a_run_of_another_etl_output(etl_dir, trained_run, tmp_path):
    import torch

    from test_serving import _DotModel
    from merlin_ncf.feature_spec import FeatureSpec

    spec = FeatureSpec.load(etl_dir)
    # Tables larger than this ETL output's: every id scores, but most rows were never trained here.
    larger = _copy_run(trained_run, tmp_path / "larger")
    config = json.loads((larger / "config.json").read_text())
    config["model"]["config"].update(nb_users=spec.num_users + 50, nb_items=spec.num_items + 50)
    (larger / "config.json").write_text(json.dumps(config))
    torch.jit.script(_DotModel(spec.num_users + 50, spec.num_items + 50)).save(str(larger / "model.ts"))
    other_data = _copy_run(trained_run, tmp_path / "other-data", data_fingerprint="0" * 64)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(trained_run, incomplete)
    (incomplete / "config.json").unlink()
    output = tmp_path / "repo"
    for run, message in [(larger, f"trained for {spec.num_users + 50} users"), (other_data, "data_fingerprint differs"),
                         (incomplete, "config.json not found")]:
        code, stderr = _export_cli("--data", str(etl_dir), "--run", str(run), "--output", str(output))
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], stderr
        assert not output.exists()


def test_export_accepts_its_own_run_and_an_older_one_with_a_warning(etl_dir, trained_run, tmp_path):
    from merlin_ncf.feature_spec import FeatureSpec

    matching = _copy_run(trained_run, tmp_path / "matching", data_fingerprint=FeatureSpec.load(etl_dir).fingerprint())
    code, stderr = _export_cli("--data", str(etl_dir), "--run", str(matching), "--output", str(tmp_path / "repo"))
    assert code == 0 and stderr == "", stderr
    older = _copy_run(trained_run, tmp_path / "older", data_fingerprint=None)
    code, stderr = _export_cli("--data", str(etl_dir), "--run", str(older), "--output", str(tmp_path / "repo-older"))
    assert code == 0 and stderr.count("\n") == 1 and "records no data_fingerprint" in stderr, stderr


# --- export.py --overwrite (item 1) --------------------------------------------------------------------


def test_export_overwrite_never_replaces_an_input_and_marks_what_it_writes(etl_dir, trained_run, tmp_path):
    from merlin_ncf.atomic import MARKER

    holder = tmp_path / "holder"  # a folder holding the run: replacing it would lose the run
    run = _copy_run(trained_run, holder / "run")
    code, stderr = _export_cli("--data", str(etl_dir), "--run", str(run), "--output", str(holder), "--overwrite")
    assert code == 2 and "overlaps the input" in stderr and (run / "model.ts").is_file(), stderr
    code, stderr = _export_cli("--data", str(etl_dir), "--run", str(run), "--output", str(run / "repo"), "--overwrite")
    assert code == 2 and "overlaps the input" in stderr and not (run / "repo").exists(), stderr

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, stderr = _export_cli("--data", str(etl_dir), "--run", str(run), "--output", str(foreign))
    assert code == 2 and "--overwrite" in stderr and (foreign / "notes.txt").read_text() == "mine", stderr

    repo = tmp_path / "repo"
    assert _export_cli("--data", str(etl_dir), "--run", str(run), "--output", str(repo))[0] == 0
    assert (repo / MARKER).read_text().strip() == "repository"
    code, stderr = _export_cli("--data", str(etl_dir), "--run", str(run), "--output", str(repo))
    assert code == 2 and "pass --overwrite" in stderr, stderr
    # An older repository (no marker): recognised by its layout, replaced with --overwrite.
    (repo / MARKER).unlink()
    (repo / "workflow" / "stale").write_text("")
    assert _export_cli("--data", str(etl_dir), "--run", str(run), "--output", str(repo), "--overwrite")[0] == 0
    assert (repo / MARKER).is_file() and not (repo / "workflow" / "stale").exists()
