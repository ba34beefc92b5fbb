"""Transcode a Dataset Feature Specification directory into this project's ETL layout.

The format's "transcoding" way in: a dataset described by DeepLearningExamples' feature_spec.yaml
(csv, parquet or torch_tensor chunks; e.g. the output of their NCF preprocessing) becomes
train parquet with merlin schema tags, the dataset's own test (and validation) candidate
lists, a fitted NVTabular workflow over its raw user and item ids, items.parquet, stats.json
and this project's feature_spec.yaml (layout: docs/pipeline.md), ready for training and serving.

    python workflows/transcode.py --spec DIR --output ETL_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace


import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from merlin_ncf import atomic
from merlin_ncf.workflows import dle_spec  # noqa: E402
from merlin_ncf.errors import DefaultsHelpFormatter, EtlError, OneLineArgumentParser, UserError, exit_with, run_cli  # noqa: E402
from merlin_ncf.feature_spec import FILENAME, TEST, TRAIN, VALIDATION  # noqa: E402
from merlin_ncf.workflows.readers import ITEM, USER  # noqa: E402

LABEL = "label"
# Categorify's out-of-vocabulary index (docs/pipeline.md): where ids absent from train go.
OOV_INDEX = 2


def transcode(spec_path: Path, output: Path, overwrite: bool = False, train_files: int = 0) -> dict:
    """Write the ETL directory `output` from the spec at `spec_path`; returns its stats."""
    start = time.perf_counter()
    spec = dle_spec.load_spec(spec_path)
    atomic.check_replaceable(output, "etl", inputs=[spec.base_dir], overwrite=overwrite)
    held_out = [m for m in (TEST, VALIDATION) if m in spec.source_spec]
    frames = {m: _read(spec, m) for m in [TRAIN, *held_out]}
    counts = {"spec_train_rows": len(frames[TRAIN])}
    train = _positives(frames[TRAIN])
    counts["dropped_train_negatives"] = counts["spec_train_rows"] - len(train)
    if len(train) == 0:
        raise EtlError(f"source_spec.{TRAIN} holds no positive interactions (label > 0)")
    lists = {m: _positive_first(frames[m], spec, m) for m in held_out}

    from merlin_ncf.workflows.cluster import Backend, quiet_merlin  # NVTabular: only once the spec is sound

    quiet_merlin()
    import nvtabular as nvt

    from merlin_ncf.workflows import graph, pipeline

    backend = Backend("cpu")
    with atomic.atomic_directory(output, kind="etl") as out:
        work = out / "_work"
        _, workflow = graph.encoding(0, work / "categories")
        workflow.fit(nvt.Dataset(train, cpu=True))
        workflow.save(out / "workflow")
        schema = pipeline._id_schema(workflow)
        n_users, n_items = (pipeline._cardinality(schema, c) for c in graph.PAIR)

        encoded_train = _encode(workflow, train)
        n_files = train_files or max(2, math.ceil(len(encoded_train) / 2_000_000))
        pipeline._write_merlin(encoded_train, out / "train", schema, n_files, backend)
        per_list = int(spec.metadata.get(dle_spec.TEST_SAMPLES_PER_SERIES, 0))
        oov = {}
        for name, frame in lists.items():
            encoded = _encode(workflow, frame[graph.PAIR])
            encoded[LABEL] = frame[LABEL].to_numpy(np.float32)
            oov[name] = _oov_counts(encoded, per_list)
            counts[f"{name}_users"] = len(encoded) // per_list
            pipeline._write_merlin(encoded, out / name, pipeline._candidate_schema(schema), 1, backend)
        pipeline._item_table(workflow, None).to_parquet(out / "items.parquet", index=False)
        dataset = spec.base_dir.name
        ours = pipeline._feature_spec(out, n_users, n_items, SimpleNamespace(negatives=per_list - 1), dataset,
                                      held_out)
        ours.metadata["transcoded_from"] = str(spec.base_dir)
        ours.save(out)
        stats = {
            "dataset": dataset, "format": "dle-feature-spec", "device": backend.device,
            "users": n_users - graph.FIRST_INDEX, "items": n_items - graph.FIRST_INDEX,
            "interactions": len(train) + sum(counts[f"{m}_users"] for m in held_out),  # as the ETL counts them
            "train_interactions": len(train), "test_users": counts[f"{TEST}_users"],
            **counts, "out_of_vocabulary": oov, "seconds": {"total": round(time.perf_counter() - start, 3)},
        }
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        shutil.rmtree(work)
    return stats


def etl_directory(path: str | Path) -> Path:
    """The ETL directory to train or serve from: `path` itself when this project's ETL wrote
    it; for a foreign spec directory, its transcoded copy under the cache (made once per
    fingerprint of the spec and its files), so nothing is ever written into `path`."""
    path = Path(path)
    if atomic.written_by_us(path, "etl") or _written_by_our_etl(path):
        return path
    from merlin_ncf.workflows.datasets import cache_dir

    import fcntl

    spec = dle_spec.load_spec(path)
    target = cache_dir() / "transcoded" / spec.fingerprint()[:16]
    target.parent.mkdir(parents=True, exist_ok=True)
    # One transcoding per spec even when every torchrun rank asks at once.
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not atomic.written_by_us(target, "etl"):
            transcode(path, target)
    return target


def _written_by_our_etl(path: Path) -> bool:
    """Outputs of workflows/etl.py from before it wrote the marker: their spec names the workflow."""
    try:
        return "workflow" in (yaml.safe_load((path / FILENAME).read_text()).get("metadata") or {})
    except (OSError, AttributeError, yaml.YAMLError, UnicodeDecodeError):
        return False


def _read(spec, mapping: str) -> pd.DataFrame:
    """One mapping checked against the format's rules, in our column names."""
    frame = dle_spec.read_mapping(spec, mapping)
    dle_spec.check_ids(spec, mapping, frame)
    if mapping != TRAIN:
        dle_spec.check_lists(spec, mapping, frame)
    label = dle_spec.label_feature(spec)
    names = {spec.user_feature: USER, spec.item_feature: ITEM}
    if label in frame.columns:
        names[label] = LABEL
    frame = frame[list(names)].rename(columns=names)
    for column in (USER, ITEM):
        if pd.api.types.is_numeric_dtype(frame[column]):  # the saved workflow takes int64 raw ids (pipeline.md)
            frame[column] = frame[column].astype("int64")
    return frame


def _positives(train: pd.DataFrame) -> pd.DataFrame:
    """Training here samples its own negatives: rows a spec labels negative are dropped."""
    if LABEL in train.columns:
        train = train[train[LABEL].to_numpy() > 0]
    return train[[USER, ITEM]].reset_index(drop=True)


def _positive_first(frame: pd.DataFrame, spec, mapping: str) -> pd.DataFrame:
    """Evaluation here reads each list's positive from its first row: put it there (stable
    within the list). Without a label the NCF convention, positive first, is assumed."""
    per_list = int(spec.metadata[dle_spec.TEST_SAMPLES_PER_SERIES])
    if LABEL not in frame.columns:
        return frame.assign(**{LABEL: np.tile(np.r_[1.0, np.zeros(per_list - 1)], len(frame) // per_list)})
    labels = (frame[LABEL].to_numpy() > 0).reshape(-1, per_list)
    positives = labels.sum(axis=1)
    bad = np.flatnonzero(positives != 1)
    if len(bad):
        first = int(bad[0])
        raise EtlError(f"{mapping} list {first} (rows {first * per_list}-{(first + 1) * per_list - 1}) has "
                       f"{int(positives[first])} positives; each list must hold exactly one (label > 0)")
    order = np.argsort(~labels, axis=1, kind="stable") + (np.arange(len(labels)) * per_list)[:, None]
    frame = frame.iloc[order.reshape(-1)].reset_index(drop=True)
    return frame.assign(**{LABEL: (frame[LABEL].to_numpy() > 0).astype(np.float32)})


def _encode(workflow, frame: pd.DataFrame) -> pd.DataFrame:
    import nvtabular as nvt

    return workflow.transform(nvt.Dataset(frame[[USER, ITEM]], cpu=True)).to_ddf().compute().reset_index(drop=True)


def _oov_counts(encoded: pd.DataFrame, per_list: int) -> dict:
    """Ids of the spec's lists never seen in train all share the OOV index: say how many."""
    users = encoded[USER].to_numpy().reshape(-1, per_list)[:, 0]
    items = encoded[ITEM].to_numpy().reshape(-1, per_list)
    return {"users": int((users == OOV_INDEX).sum()), "positive_items": int((items[:, 0] == OOV_INDEX).sum()),
            "negative_items": int((items[:, 1:] == OOV_INDEX).sum()),
            "lists_with_negative_equal_to_positive": int((items[:, 1:] == items[:, :1]).any(axis=1).sum())}


# --- command line -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True,
                        help=f"directory holding a DeepLearningExamples {FILENAME}, or the YAML file")
    parser.add_argument("--output", type=Path, required=True, help="ETL directory to write (docs/pipeline.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output even if this project did not write it")
    parser.add_argument("--train-files", type=int, default=0, help="train parquet files; 0 = one per ~2M rows, at least 2")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_files < 0:
        parser.error("--train-files must be 0 or more")
    try:
        stats = transcode(args.spec, args.output, args.overwrite, args.train_files)
    except UserError as exc:
        exit_with(exc, parser.prog)
    except KeyboardInterrupt:  # atomic_directory has already removed the partial output
        print(f"{parser.prog}: interrupted; {args.output} left as it was", file=sys.stderr)
        return 130
    if not args.quiet:
        oov = stats["out_of_vocabulary"][TEST]
        print(f"wrote {args.output}: {stats['users']:,} users, {stats['items']:,} items, "
              f"{stats['train_interactions']:,} train interactions, {stats['test_users']:,} test lists "
              f"(not in train: {oov['users']:,} users, {oov['positive_items']:,} positive and "
              f"{oov['negative_items']:,} negative items) in {stats['seconds']['total']:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
