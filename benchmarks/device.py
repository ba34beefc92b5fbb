"""The `--device` option of every benchmark, checked before any work starts.

`cpu` runs on the CPU. `cuda` needs a CUDA GPU: without one the benchmark stops with one line
on stderr and exit code 2 (whether or not its main runs under run_cli), never a silent CPU run. The checks are the stages' own
(models/train_ncf.py choose_device for torch, workflows/cluster.py resolve_device for cuDF),
so a benchmark accepts a device exactly when the stage it measures would.

    from device import add_device_argument, require_device   # benchmarks/ is sys.path[0]
    add_device_argument(parser)
    require_device(args.device)                                # right after parse_args
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merlin_ncf.errors import UserError, exit_with

DEVICES = ("cpu", "cuda")
# What each benchmark runs on the device; "serving" has no GPU path yet (KIND_CPU steps).
STACKS = ("torch", "etl", "serving")


def add_device_argument(parser: argparse.ArgumentParser, help: str = "where to run: cpu, or cuda (needs a CUDA GPU)",
                        devices: tuple[str, ...] = DEVICES) -> None:
    parser.add_argument("--device", choices=devices, default="cpu", help=help)


def require_device(device: str, stack: str = "torch") -> str:
    """Return the device name the measured stage takes, or exit 2 with one line on stderr.

    torch: torch must see a GPU. etl: cuDF must load and see a GPU; the ETL stage calls
    it "gpu". serving: the Triton steps are CPU instance groups, so cuda is refused even
    with a GPU present rather than measured on the CPU under a GPU label."""
    if stack not in STACKS:
        raise ValueError(f"unknown stack {stack!r}")
    try:
        return _check(device, stack)
    except UserError as exc:
        exit_with(exc, Path(sys.argv[0]).name)


def _check(device: str, stack: str) -> str:
    if device == "cpu":
        return device
    if stack == "etl":
        from merlin_ncf.workflows.cluster import resolve_device

        return resolve_device("gpu")
    from merlin_ncf.models.train_ncf import choose_device  # imports torch: only once cuda is asked for

    choose_device(device)
    if stack == "serving":
        raise UserError("--device cuda: the Triton model steps are CPU instance groups (serving/steps.py); "
                        "serving on a GPU is not implemented yet")
    return device
