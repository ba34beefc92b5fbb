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


def test_etl_encoding_is_the_fitted_categorify_transform_with_rare_unseen_and_null_ids(tmp_path):
    """graph.encode applies the fitted vocabulary as Categorify's own transform does: rare ids
    (--freq-threshold) and ids unseen at fit time to OOV (2), nulls to 1."""
    import numpy as np
    from merlin.io import Dataset

    from merlin_ncf.workflows import graph

    fit = pd.DataFrame({"user_id": [1, 1, 2, 2, 2, 3, 4, 4], "item_id": [7, 8, 7, 8, 9, 7, 8, 8]})
    _, workflow = graph.encoding(2, tmp_path / "categories")
    workflow.fit(Dataset(fit, cpu=True))
    rows = pd.DataFrame({"user_id": [4, 3, 99, 1, 2], "item_id": [9, 7, 8, 100, 7], "order_key": np.arange(5)})
    ours = graph.encode(rows, graph.vocabularies(workflow))
    theirs = workflow.transform(Dataset(rows[["user_id", "item_id"]], cpu=True)).to_ddf().compute()
    assert ours["user_id"].tolist() == theirs["user_id"].tolist() and 2 in ours["user_id"].tolist()
    assert ours["item_id"].tolist() == theirs["item_id"].tolist() and 2 in ours["item_id"].tolist()
    assert ours["order_key"].tolist() == list(range(5)) and str(ours["user_id"].dtype) == "int64"

    strings = fit.astype(str)
    _, workflow = graph.encoding(0, tmp_path / "string-categories")
    workflow.fit(Dataset(strings, cpu=True))
    with_null = pd.DataFrame({"user_id": ["1", None, "5"], "item_id": ["7", "8", "9"]})
    ours = graph.encode(with_null, graph.vocabularies(workflow))["user_id"].tolist()
    assert ours == workflow.transform(Dataset(with_null, cpu=True)).to_ddf().compute()["user_id"].tolist()
    assert ours[1:] == [1, 2]
