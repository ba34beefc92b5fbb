"""The Dataset Feature Specification (feature_spec.yaml) that ties the stages together.

The format is NVIDIA DeepLearningExamples' (feature_spec / source_spec / channel_spec /
metadata). The ETL writes it; training, export and serving find every file through it, so
an ETL output directory is self-describing and relocatable (all paths are relative to it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from merlin_ncf.atomic import atomic_file

FILENAME = "feature_spec.yaml"

# Channel names used by DeepLearningExamples' NCF.
USER_CHANNEL = "user_ch"
ITEM_CHANNEL = "item_ch"
LABEL_CHANNEL = "label_ch"

TRAIN, VALIDATION, TEST = "train", "validation", "test"


class FeatureSpecError(ValueError):
    """The directory is not a usable ETL output."""


@dataclass
class FeatureSpec:
    feature_spec: dict
    source_spec: dict
    channel_spec: dict
    metadata: dict = field(default_factory=dict)
    base_dir: Path = Path(".")

    # --- reading and writing -------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureSpec":
        """Load from a feature_spec.yaml or from the directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise FeatureSpecError(f"{path} not found: is this an ETL output directory?")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise FeatureSpecError(f"{path} is not valid YAML: {exc}") from None
        missing = [k for k in ("feature_spec", "source_spec", "channel_spec") if k not in (raw or {})]
        if missing:
            raise FeatureSpecError(f"{path} lacks {', '.join(missing)}: not a feature specification")
        spec = cls(
            feature_spec=raw["feature_spec"],
            source_spec=raw["source_spec"],
            channel_spec=raw["channel_spec"],
            metadata=raw.get("metadata") or {},
            base_dir=path.parent.resolve(),
        )
        spec.validate()
        return spec

    def to_dict(self) -> dict:
        return {
            "feature_spec": self.feature_spec,
            "source_spec": self.source_spec,
            "channel_spec": self.channel_spec,
            "metadata": self.metadata,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write feature_spec.yaml into `directory` atomically."""
        target = Path(directory) / FILENAME
        with atomic_file(target) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return target

    def validate(self) -> None:
        for channel in (USER_CHANNEL, ITEM_CHANNEL):
            names = self.channel_spec.get(channel)
            if not names or len(names) != 1:
                raise FeatureSpecError(f"channel_spec.{channel} must name exactly one feature")
            if names[0] not in self.feature_spec:
                raise FeatureSpecError(f"channel_spec.{channel} names {names[0]!r}, absent from feature_spec")
            if "cardinality" not in self.feature_spec[names[0]]:
                raise FeatureSpecError(f"feature_spec.{names[0]} has no cardinality")
        if TRAIN not in self.source_spec or TEST not in self.source_spec:
            raise FeatureSpecError("source_spec needs both a 'train' and a 'test' mapping")

    # --- what the stages ask of it ---------------------------------------------------

    @property
    def user_feature(self) -> str:
        return self.channel_spec[USER_CHANNEL][0]

    @property
    def item_feature(self) -> str:
        return self.channel_spec[ITEM_CHANNEL][0]

    @property
    def label_feature(self) -> str:
        return self.channel_spec[LABEL_CHANNEL][0]

    def cardinality(self, feature: str) -> int:
        return int(self.feature_spec[feature]["cardinality"])

    @property
    def num_users(self) -> int:
        """Rows of a user embedding table (Categorify's reserved indices included)."""
        return self.cardinality(self.user_feature)

    @property
    def num_items(self) -> int:
        return self.cardinality(self.item_feature)

    @property
    def first_item_index(self) -> int:
        """Lowest index of a real item; those below are Categorify's padding/null/OOV slots."""
        return int(self.metadata.get("first_index", 0))

    @property
    def test_samples_per_series(self) -> int:
        return int(self.metadata["test_samples_per_series"])

    def has_mapping(self, mapping: str) -> bool:
        return mapping in self.source_spec

    def files(self, mapping: str) -> list[Path]:
        """Absolute paths of every file of a source_spec mapping (train, validation, test)."""
        if mapping not in self.source_spec:
            raise FeatureSpecError(f"source_spec has no {mapping!r} mapping")
        paths = [self.base_dir / f for chunk in self.source_spec[mapping] for f in chunk["files"]]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FeatureSpecError(f"{mapping} files listed in {FILENAME} are missing: {missing[0]}")
        return paths

    def path(self, key: str) -> Path:
        """Absolute path of an artefact named in metadata (e.g. 'workflow', 'item_table')."""
        if key not in self.metadata:
            raise FeatureSpecError(f"{FILENAME} metadata has no {key!r}")
        return self.base_dir / self.metadata[key]

    def fingerprint(self) -> str:
        """sha256 over feature_spec.yaml and every data file it lists (names and bytes): a
        run records it, so export can tell whether a model was trained on this very ETL output."""
        import hashlib

        digest = hashlib.sha256((self.base_dir / FILENAME).read_bytes())
        for mapping in sorted(self.source_spec):
            for path in self.files(mapping):
                digest.update(str(path.relative_to(self.base_dir)).encode() + b"\0")
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
        return digest.hexdigest()
