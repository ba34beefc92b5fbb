"""The ETL's options, shared by its command line (etl.py) and its phases (pipeline.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from merlin_ncf.errors import EtlError
from merlin_ncf.workflows.readers import ColumnNames


@dataclass
class EtlOptions:
    output: Path
    input: Path | None = None
    download: str | None = None
    format: str = "auto"
    columns: ColumnNames = field(default_factory=ColumnNames)
    item_table: Path | None = None
    split: str = "leave-one-out"
    cutoff: str | None = None
    cutoff_quantile: float | None = None
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


def parse_cutoff(text: str) -> int:
    """--cutoff as a number in the log's time unit, or an ISO date/time (UTC) for logs in seconds."""
    try:
        return int(text)
    except ValueError:
        pass
    import pandas as pd

    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise EtlError(f"--cutoff {text!r} is neither a timestamp number nor a date such as 2015-01-01") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return math.ceil(stamp.value / 1e9)  # ns -> s; ceil keeps "before 12:00:00.5" including 12:00:00
