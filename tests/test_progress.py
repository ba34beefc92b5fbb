"""Progress bars are for people at a terminal: a log file or a pipe gets none (tqdm's
carriage-return frames would fill it), without the user having to pass --quiet."""

from __future__ import annotations

import re

from conftest import run_command

BAR = re.compile(r"\d+%\|")  # tqdm's "37%|███" frame


def test_etl_and_synthetic_write_no_progress_bar_into_a_pipe(tmp_path):
    raw = tmp_path / "raw"
    made = run_command("workflows/synthetic.py", "--output", str(raw), "--format", "ml-1m",
                       "--interactions", "3000", "--users", "200", "--items", "100")
    etl = run_command("workflows/etl.py", "--input", str(raw), "--output", str(tmp_path / "etl"),
                      "--negatives", "10")
    for result in (made, etl):
        assert not BAR.search(result.stderr), result.stderr[-500:]
        assert "\r" not in result.stderr
    assert "wrote" in etl.stdout + etl.stderr  # the summary line still comes


def test_training_writes_no_progress_bar_into_a_pipe(etl_dir, tmp_path):
    result = run_command("models/train_ncf.py", "--data", str(etl_dir), "--output", str(tmp_path / "run"),
                         "--factors", "8", "--mlp-layers", "16", "8", "--epochs", "1", "--batch-size", "4000")
    assert not BAR.search(result.stderr), result.stderr[-500:]
    assert "\r" not in result.stderr
