"""The saved NVTabular workflow reloads elsewhere and maps raw ids exactly as the ETL did."""

import shutil
import subprocess
import sys
import textwrap

import pandas as pd

from test_etl_split import positives, read_parts
from merlin_ncf.workflows.cluster import Backend
from merlin_ncf.feature_spec import FeatureSpec
from merlin_ncf.workflows.readers import read_log

OOV = 2

RELOAD = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("ignore")
    import nvtabular as nvt, pandas as pd
    workflow = nvt.Workflow.load(sys.argv[1])
    raw = pd.read_parquet(sys.argv[2])
    workflow.transform(raw).to_parquet(sys.argv[3], index=False)
""")


def test_workflow_reloads_after_move_from_another_cwd_and_maps_raw_ids_as_in_training(raw_dir, etl_dir, tmp_path):
    moved = tmp_path / "renamed-etl"
    shutil.copytree(etl_dir, tmp_path / "copy")
    (tmp_path / "copy").rename(moved)
    raw = read_log(raw_dir, "auto", Backend("cpu")).interactions.compute().reset_index(drop=True)
    unseen = pd.DataFrame({"user_id": [raw["user_id"].max() + 1000], "item_id": [raw["item_id"].max() + 1000]})
    pd.concat([raw[["user_id", "item_id"]], unseen], ignore_index=True).to_parquet(tmp_path / "raw.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-c", RELOAD, str(moved / "workflow"), str(tmp_path / "raw.parquet"),
                    str(tmp_path / "encoded.parquet")], cwd=elsewhere, check=True, timeout=300)
    encoded = pd.read_parquet(tmp_path / "encoded.parquet")
    assert list(encoded.columns) == ["user_id", "item_id"]
    assert [str(t) for t in encoded.dtypes] == ["int64", "int64"]
    assert encoded.iloc[-1].tolist() == [OOV, OOV]  # never seen at fit time

    spec = FeatureSpec.load(moved)
    written = [read_parts(spec.files("train"))[["user_id", "item_id"]]]
    written += [positives(read_parts(spec.files(m))).reset_index() for m in ("test", "validation")]
    as_trained = pd.concat(written, ignore_index=True).sort_values(["user_id", "item_id"], ignore_index=True)
    reloaded = encoded.iloc[:-1].sort_values(["user_id", "item_id"], ignore_index=True)
    pd.testing.assert_frame_equal(reloaded, as_trained)

    items = pd.read_parquet(moved / "items.parquet")
    by_raw = encoded.iloc[:-1].assign(raw_item_id=raw["item_id"]).drop_duplicates("raw_item_id")
    merged = items.merge(by_raw, on="raw_item_id", suffixes=("", "_reloaded"))
    assert len(merged) == len(items) and (merged["item_id"] == merged["item_id_reloaded"]).all()
