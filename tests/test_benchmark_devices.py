"""Every benchmark takes --device cuda; without a GPU it stops before any work with one line
on stderr and exit code 2 (benchmarks/device.py), never a silent CPU run."""

from __future__ import annotations

import pytest
import torch

from conftest import run_command

# The least each command line needs to get past argparse: anything that fails later than the
# device check (a missing --data) would still be a one-line exit 2, so the message is checked.
BENCHMARKS = {
    "convncf.py": ["--data", "{tmp}/no-data", "--out", "{tmp}/out"],
    "etl.py": [],
    "train.py": [],
    "serving.py": ["--data", "{tmp}/no-data", "--run", "{tmp}/no-run"],
    "soak.py": ["--data", "{tmp}/no-data", "--repository", "{tmp}/no-repo"],
    "quality.py": ["--data", "{tmp}/no-data"],
    "recbole_baseline.py": ["--data", "{tmp}/no-data"],
    "etl_pandas_reference.py": ["--input", "{tmp}/no.csv", "--output", "{tmp}/out"],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: --device cuda runs")
@pytest.mark.parametrize("script", sorted(BENCHMARKS))
def test_device_cuda_without_a_gpu_is_one_line_exit_2(script, tmp_path):
    args = [a.format(tmp=tmp_path) for a in BENCHMARKS[script]]
    result = run_command(f"benchmarks/{script}", *args, "--device", "cuda", timeout=120, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"{script}: error:"), lines
    message = lines[0].lower()
    # Refused for the device, not for the dummy paths; the pandas peer has no cuda choice at all.
    assert ("gpu" in message or "invalid choice: 'cuda'" in message) and "no-data" not in message, lines
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing generated or written before the check
