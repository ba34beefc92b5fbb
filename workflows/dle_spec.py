"""Read and check any directory in DeepLearningExamples' Dataset Feature Specification format.

The format (feature_spec / source_spec / channel_spec / metadata) is NVIDIA's; this module
reads directories this project did not write: several chunks per mapping, several files per
chunk (rows in file order), columns in their own order per chunk, chunk types csv (no
header), parquet and torch_tensor (`.pt` holding one [rows, features] tensor, as
DeepLearningExamples' NCF preprocessing writes it). Every problem is one EtlError line.

Mappings are read whole into pandas: the chunks of a mapping are columns of the same rows,
joined by position, which needs every chunk in memory in order (DeepLearningExamples' NCF
loader holds them whole on the GPU, too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from merlin_ncf.errors import EtlError
from merlin_ncf.feature_spec import (FILENAME, ITEM_CHANNEL, LABEL_CHANNEL, TEST, TRAIN, USER_CHANNEL, VALIDATION,
                                    FeatureSpec)

# "torch" is accepted as a short name for DeepLearningExamples' "torch_tensor".
CHUNK_TYPES = ("csv", "parquet", "torch_tensor", "torch")
SECTIONS = ("feature_spec", "source_spec", "channel_spec")
# Mappings read as candidate lists of test_samples_per_series rows each.
LIST_MAPPINGS = (TEST, VALIDATION)
TEST_SAMPLES_PER_SERIES = "test_samples_per_series"


def load_spec(path: str | os.PathLike) -> FeatureSpec:
    """Parse and structurally check a feature_spec.yaml (or the directory holding one):
    sections, chunk types, files present, each feature in one chunk per mapping, channels."""
    path = Path(path)
    spec_file = path / FILENAME if path.is_dir() else path
    if not spec_file.is_file():
        raise EtlError(f"{spec_file} not found: give a directory holding {FILENAME}, or the YAML file itself")
    try:
        raw = yaml.safe_load(spec_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise EtlError(f"{spec_file} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise EtlError(f"{spec_file} is not a feature specification (a mapping of {', '.join(SECTIONS)})")
    missing = [s for s in SECTIONS if not isinstance(raw.get(s), dict)]
    if missing:
        raise EtlError(f"{spec_file} lacks the section(s) {', '.join(missing)}")
    spec = FeatureSpec(feature_spec={k: v or {} for k, v in raw["feature_spec"].items()},
                       source_spec=raw["source_spec"], channel_spec=raw["channel_spec"],
                       metadata=raw.get("metadata") or {}, base_dir=spec_file.parent.resolve())
    _check_structure(spec)
    return spec


def _check_structure(spec: FeatureSpec) -> None:
    features = spec.feature_spec
    for name in (TRAIN, TEST):
        if name not in spec.source_spec:
            raise EtlError(f"source_spec has no {name!r} mapping")
    for mapping, chunks in spec.source_spec.items():
        if not isinstance(chunks, list) or not chunks:
            raise EtlError(f"source_spec.{mapping} must be a non-empty list of chunks")
        seen: dict[str, int] = {}
        for number, chunk in enumerate(chunks):
            where = f"source_spec.{mapping} chunk {number}"
            if not isinstance(chunk, dict) or not {"type", "features", "files"} <= set(chunk):
                raise EtlError(f"{where} must have 'type', 'features' and 'files'")
            if chunk["type"] not in CHUNK_TYPES:
                raise EtlError(f"{where} has unknown type {chunk['type']!r}; supported: {', '.join(CHUNK_TYPES)}")
            if not chunk["features"] or not chunk["files"]:
                raise EtlError(f"{where} lists no {'features' if not chunk['features'] else 'files'}")
            for feature in chunk["features"]:
                if feature not in features:
                    raise EtlError(f"{where} lists feature {feature!r}, absent from feature_spec")
                if feature in seen:
                    raise EtlError(f"feature {feature!r} appears in chunks {seen[feature]} and {number} "
                                   f"of source_spec.{mapping}; a feature belongs to exactly one chunk")
                seen[feature] = number
            for file in chunk["files"]:
                if not (spec.base_dir / file).is_file():
                    raise EtlError(f"{where} lists {file}, which does not exist in {spec.base_dir}")
    for channel, names in spec.channel_spec.items():
        for name in names if isinstance(names, list) else [names]:
            if name not in features:
                raise EtlError(f"channel_spec.{channel} names {name!r}, absent from feature_spec")
    for channel in (USER_CHANNEL, ITEM_CHANNEL, LABEL_CHANNEL):
        names = spec.channel_spec.get(channel)
        if names is None and channel == LABEL_CHANNEL:
            continue
        if not isinstance(names, list) or len(names) != 1:
            raise EtlError(f"channel_spec.{channel} must name exactly one feature "
                           "(DeepLearningExamples' NCF channels: user_ch, item_ch, label_ch)")
    for mapping in spec.source_spec:
        present = {f for chunk in spec.source_spec[mapping] for f in chunk["features"]}
        for channel in (USER_CHANNEL, ITEM_CHANNEL):
            if spec.channel_spec[channel][0] not in present:
                raise EtlError(f"source_spec.{mapping} has no chunk with {spec.channel_spec[channel][0]!r} "
                               f"(channel {channel})")
    if any(m in spec.source_spec for m in LIST_MAPPINGS):
        per_list = spec.metadata.get(TEST_SAMPLES_PER_SERIES)
        if isinstance(per_list, bool) or not isinstance(per_list, int) or per_list < 2:
            raise EtlError(f"metadata.{TEST_SAMPLES_PER_SERIES} must be an integer >= 2 "
                           f"(1 positive + negatives), found {per_list!r}")


def label_feature(spec: FeatureSpec) -> str | None:
    names = spec.channel_spec.get(LABEL_CHANNEL)
    return names[0] if names else None


def declared_cardinality(spec: FeatureSpec, feature: str) -> int | None:
    """The declared cardinality, or None where it is absent or 'auto' (derived from the data)."""
    value = spec.feature_spec[feature].get("cardinality")
    if value in (None, "auto"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EtlError(f"feature_spec.{feature}.cardinality must be an integer or 'auto', found {value!r}") from None


# --- reading ------------------------------------------------------------------------------

def read_mapping(spec: FeatureSpec, mapping: str) -> pd.DataFrame:
    """Every feature of one mapping as columns of one frame: chunks side by side, files of a
    chunk one after the other."""
    columns: dict[str, pd.Series] = {}
    rows = None
    for number, chunk in enumerate(spec.source_spec[mapping]):
        where = f"source_spec.{mapping} chunk {number}"
        parts = [_read_file(spec.base_dir / f, chunk["type"], list(chunk["features"]), f"{where} ({f})")
                 for f in chunk["files"]]
        frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
        if rows is not None and len(frame) != rows:
            raise EtlError(f"{where} has {len(frame):,} rows but the chunks before it have {rows:,}: "
                           "chunks of a mapping must hold the same rows")
        rows = len(frame)
        columns.update({name: frame[name] for name in chunk["features"]})
    return pd.DataFrame(columns)


def _read_file(path: Path, kind: str, features: list[str], where: str) -> pd.DataFrame:
    try:
        if kind == "csv":
            frame = pd.read_csv(path, header=None, skipinitialspace=True)
            _check_width(frame.shape[1], features, where)
            frame.columns = features
            return frame
        if kind == "parquet":
            frame = pd.read_parquet(path)
            missing = [f for f in features if f not in frame.columns]
            if missing:
                raise EtlError(f"{where} lacks column(s) {missing}")
            return frame[features]
        return _read_torch(path, features, where)
    except EtlError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser's failure on a user's file is one line
        raise EtlError(f"{where} cannot be read as {kind}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _read_torch(path: Path, features: list[str], where: str) -> pd.DataFrame:
    import torch

    # weights_only: a .pt is a pickle, and a plain tensor needs none of pickle's code execution.
    tensor = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor):
        raise EtlError(f"{where} holds a {type(tensor).__name__}, not one tensor of [rows, features]")
    if tensor.dim() == 1:
        tensor = tensor.reshape(-1, 1)
    if tensor.dim() != 2:
        raise EtlError(f"{where} holds a {tensor.dim()}-d tensor, not [rows, features]")
    _check_width(tensor.shape[1], features, where)
    array = tensor.numpy()
    return pd.DataFrame({name: array[:, i] for i, name in enumerate(features)})


def _check_width(width: int, features: list[str], where: str) -> None:
    if width != len(features):
        raise EtlError(f"{where} has {width} columns but the chunk lists {len(features)} features {features}")


# --- checking the format's rules -----------------------------------------------------------

def check_ids(spec: FeatureSpec, mapping: str, frame: pd.DataFrame) -> None:
    """User and item ids: present, whole numbers, within [0, declared cardinality)."""
    for channel in (USER_CHANNEL, ITEM_CHANNEL):
        feature = spec.channel_spec[channel][0]
        values = frame[feature]
        if values.isna().any():
            raise EtlError(f"{mapping} has missing {feature} values (row {int(values.isna().to_numpy().argmax())})")
        if not pd.api.types.is_numeric_dtype(values):
            if declared_cardinality(spec, feature) is not None:
                raise EtlError(f"{mapping}'s {feature} is not numeric but feature_spec declares a cardinality")
            continue
        array = values.to_numpy()
        if not pd.api.types.is_integer_dtype(values) and not np.array_equal(array, np.round(array)):
            raise EtlError(f"{mapping}'s {feature} holds non-integer ids")
        limit = declared_cardinality(spec, feature)
        if len(array) and array.min() < 0:
            raise EtlError(f"{mapping} has {feature} {array.min()}: ids must be >= 0")
        if limit is not None and len(array) and array.max() >= limit:
            raise EtlError(f"{mapping} has {feature} {int(array.max())}, beyond the declared cardinality {limit} "
                           f"(ids must lie in [0, {limit}))")


def check_lists(spec: FeatureSpec, mapping: str, frame: pd.DataFrame) -> int:
    """A candidate-list mapping is whole lists of test_samples_per_series rows, each one user's;
    returns the number of lists."""
    per_list = int(spec.metadata[TEST_SAMPLES_PER_SERIES])
    if len(frame) == 0 or len(frame) % per_list:
        raise EtlError(f"{mapping} has {len(frame):,} rows, not a multiple of "
                       f"{TEST_SAMPLES_PER_SERIES}={per_list}")
    users = frame[spec.user_feature].to_numpy().reshape(-1, per_list)
    mixed = np.flatnonzero((users != users[:, :1]).any(axis=1))
    if len(mixed):
        first = int(mixed[0])
        raise EtlError(f"{mapping} rows {first * per_list}-{(first + 1) * per_list - 1} mix users "
                       f"{sorted(set(users[first].tolist()))[:3]}: each user's {per_list} candidates must be "
                       "consecutive rows")
    return len(users)


@dataclass
class MappingSummary:
    rows: int
    lists: int | None  # candidate lists, for test and validation


def check(path: str | os.PathLike) -> dict[str, MappingSummary]:
    """Every rule of the format on one directory: structure, every file readable, ids within
    their cardinalities, candidate lists whole and per user. Raises EtlError on the first breach."""
    spec = load_spec(path)
    summary = {}
    for mapping in spec.source_spec:
        frame = read_mapping(spec, mapping)
        check_ids(spec, mapping, frame)
        lists = check_lists(spec, mapping, frame) if mapping in LIST_MAPPINGS else None
        summary[mapping] = MappingSummary(rows=len(frame), lists=lists)
    return summary
