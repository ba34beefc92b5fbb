"""The ETL's options, shared by its command line (etl.py) and its phases (pipeline.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from merlin_ncf.workflows.readers import ColumnNames


@dataclass
class EtlOptions:
    output: Path
    input: Path | None = None
    download: str | None = None
    format: str = "auto"
    columns: ColumnNames = field(default_factory=ColumnNames)
    min_rating: float | None = None
    min_user_interactions: int = 1
    freq_threshold: int = 0
    validation: bool = True
    negatives: int = 100
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    scheduler_address: str | None = None
    dashboard: str | None = None
    partition_size: str = "32MB"
    train_files: int = 0
    progress: bool = True
    overwrite: bool = False
