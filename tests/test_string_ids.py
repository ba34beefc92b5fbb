"""String (and mixed-width integer) ids in generic logs: kept raw through Categorify, in
items.parquet and in the saved workflow."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_command
from merlin_ncf.errors import EtlError
from merlin_ncf.workflows.cluster import Backend, quiet_merlin
from merlin_ncf.workflows.readers import ColumnNames, read_log

quiet_merlin()
CPU = Backend("cpu")
COLUMNS = ColumnNames("user", "sku", "ts", "stars")


def _read(path, columns=COLUMNS) -> pd.DataFrame:
    return read_log(path, "auto", CPU, columns).interactions.compute().reset_index(drop=True)


def test_csv_ids_stay_strings_unless_every_one_is_a_canonical_integer(tmp_path):
    (tmp_path / "log.csv").write_text("user,sku,ts,stars\nalice,007,1,5\nNA,7,2,\nbob,SKU-1,3,4\n")
    frame = _read(tmp_path / "log.csv")
    assert frame["user_id"].tolist() == ["alice", "NA", "bob"]  # "NA" is an id, not a missing value
    assert frame["item_id"].tolist() == ["007", "7", "SKU-1"]  # "007" and "7" stay two items
    assert np.isnan(frame["rating"][1])
    (tmp_path / "ints.csv").write_text("user,sku,ts\n1,-20,1\n30000000000,0,2\n")
    frame = _read(tmp_path / "ints.csv", ColumnNames("user", "sku", "ts", None))
    assert [str(t) for t in frame.dtypes[:2]] == ["int64", "int64"]
    assert frame["user_id"].tolist() == [1, 30_000_000_000] and frame["item_id"].tolist() == [-20, 0]


def test_empty_csv_id_is_refused(tmp_path):
    (tmp_path / "log.csv").write_text("user,sku,ts\nalice,,1\n")
    with pytest.raises(EtlError, match="empty values"):
        _read(tmp_path / "log.csv", ColumnNames("user", "sku", "ts", None))


def test_parquet_mixed_width_integers_read_as_int64_and_mixed_types_refused(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    pd.DataFrame({"user_id": np.array([1, 2], np.int32), "item_id": np.array([5, 6], np.int16),
                  "timestamp": [1, 2]}).to_parquet(parts / "a.parquet", index=False)
    pd.DataFrame({"user_id": np.array([2**40], np.int64), "item_id": np.array([7], np.uint8),
                  "timestamp": [3]}).to_parquet(parts / "b.parquet", index=False)
    frame = read_log(parts, "parquet", CPU).interactions.compute()
    assert [str(t) for t in frame.dtypes[:2]] == ["int64", "int64"] and frame["user_id"].max() == 2**40
    pd.DataFrame({"user_id": ["u9"], "item_id": np.array([7], np.int64), "timestamp": [3]}).to_parquet(
        parts / "c.parquet", index=False)
    with pytest.raises(EtlError, match="integers in .* but strings in"):
        read_log(parts, "parquet", CPU)


def string_log(rng_seed: int = 0, users: int = 40, items: int = 60, per_user: int = 12) -> pd.DataFrame:
    """A log keyed by UUID-like users and SKU items, with some SKUs that look like integers."""
    rng = np.random.default_rng(rng_seed)
    skus = [f"SKU-{i:04d}" if i % 5 else f"{i:05d}" for i in range(items)]
    rows = [(f"user-{u:03d}-x", skus[i], int(t)) for u in range(users)
            for t, i in enumerate(rng.choice(items, per_user, replace=False), start=u * 100)]
    return pd.DataFrame(rows, columns=["customer", "sku", "ts"])


@pytest.fixture(scope="module")
def string_etl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strings")
    log = string_log()
    log.to_csv(tmp / "log.csv", index=False)
    pd.DataFrame({"sku": sorted(set(log["sku"])), "title": [f"Product {s}" for s in sorted(set(log["sku"]))]}
                 ).to_csv(tmp / "products.csv", index=False)
    out = tmp / "etl"
    run_command("workflows/etl.py", "--input", str(tmp / "log.csv"), "--user-col", "customer", "--item-col", "sku",
                "--time-col", "ts", "--item-table", str(tmp / "products.csv"), "--output", str(out),
                "--negatives", "10", "--device", "cpu", "--quiet")
    return log, out


def test_items_table_keeps_string_raw_ids_and_joins_titles(string_etl):
    log, etl = string_etl
    items = pd.read_parquet(etl / "items.parquet")
    assert items["raw_item_id"].map(type).eq(str).all()
    assert set(items["raw_item_id"]) == set(log["sku"]) and "00005" in set(items["raw_item_id"])
    assert (items["title"] == "Product " + items["raw_item_id"]).all()


def test_saved_workflow_maps_raw_string_ids_as_the_etl_did(string_etl):
    import nvtabular as nvt

    log, etl = string_etl
    workflow = nvt.Workflow.load(str(etl / "workflow"))
    latest = log.sort_values("ts").groupby("customer").tail(1).sort_values("customer")
    encoded = workflow.transform(pd.DataFrame({"user_id": latest["customer"].to_numpy(),
                                               "item_id": latest["sku"].to_numpy()})).reset_index(drop=True)
    test = pd.concat(pd.read_parquet(f) for f in sorted((etl / "test").glob("*.parquet")))
    positives = test.iloc[::11].sort_values("user_id").reset_index(drop=True)
    expected = encoded.sort_values("user_id").reset_index(drop=True)
    assert positives["user_id"].tolist() == expected["user_id"].tolist()
    assert positives["item_id"].tolist() == expected["item_id"].tolist()
    unknown = workflow.transform(pd.DataFrame({"user_id": ["nobody"], "item_id": ["SKU-9999"]}))
    assert unknown["user_id"].tolist() == [2] and unknown["item_id"].tolist() == [2]  # out-of-vocabulary
    stats = json.loads((etl / "stats.json").read_text())
    assert stats["users"] == 40 and stats["test_users"] == 40


@pytest.mark.slow
def test_string_ids_end_to_end_from_a_raw_csv_to_served_top_k(string_etl, tmp_path):
    """Raw CSV with string users and SKUs -> etl.py -> training -> export -> tritonserver:
    strings in, strings out, over HTTP and gRPC, with the item table's titles."""
    import subprocess
    import sys

    from merlin_ncf.serving.client import RecommenderClient
    from merlin_ncf.serving.errors import ServingError
    from merlin_ncf.serving.export import export
    from merlin_ncf.serving.serve import TritonServer

    log, etl = string_etl
    run, repo = tmp_path / "run", tmp_path / "repo"
    run_command("models/train_ncf.py", "--data", str(etl), "--output", str(run), "--epochs", "2", "--no-progress",
                "--batch-size", "256", "--factors", "8", "--mlp-layers", "16", "8")
    assert export(etl, run, repo, flavour="python", top_k=5, verify=True, log=lambda *_: None) == "python"
    user = log["customer"].iloc[0]
    seen = set(log.loc[log["customer"] == user, "sku"])
    some = sorted(set(log["sku"]) - seen)[:4]
    with TritonServer(repo, startup_timeout_s=240) as server:
        answers = {}
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with RecommenderClient(url, protocol) as client:
                top = client.recommend(user, top_k=5)
                assert len(top.item_ids) == 5 and all(isinstance(i, str) for i in top.item_ids)
                assert set(top.item_ids) <= set(log["sku"])
                assert top.titles == [f"Product {i}" for i in top.item_ids]
                chosen = client.recommend(user, items=some, top_k=4)
                assert sorted(chosen.item_ids) == some
                scores = client.scores([user], some)
                assert dict(zip(some, scores)) == pytest.approx(dict(zip(chosen.item_ids, chosen.scores)))
                with pytest.raises(ServingError, match="unknown user_id"):
                    client.recommend("no-such-user", top_k=3)
                answers[protocol] = (list(top.item_ids), top.scores.tolist())
        assert answers["http"] == answers["grpc"]
        cli = subprocess.run([sys.executable, "-m", "merlin_ncf.serving.client", "--user", user, "--top-k", "3",
                              "--url", server.grpc_url, "--protocol", "grpc"],
                             capture_output=True, text=True, timeout=120, cwd="/")
        assert cli.returncode == 0, cli.stderr
        assert f"user {user}" in cli.stdout and f"Product {answers['grpc'][0][0]}" in cli.stdout
