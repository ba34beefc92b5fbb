"""benchmarks/quality.py end to end on the session's small ETL output: every row scored on
the same lists, the table written as text, markdown, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_command

K = 10
pytestmark = pytest.mark.slow  # trains NeuMF, GMF and (when its venv exists) RecBole for one epoch


@pytest.fixture(scope="module")
def quality(etl_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quality")
    recbole = [] if (REPO / ".venv-recbole" / "bin" / "python").exists() else ["--recbole-python", str(out / "none")]
    result = run_command("benchmarks/quality.py", "--data", str(etl_dir), "--output", str(out),
                         "--models", "popularity", "ease", "itemknn", "neumf", "gmf", "recbole",
                         "--ease-l2", "10", "100", "--train-args=--epochs 1 --batch-size 4000",
                         "--recbole-args=--epochs 1", *recbole, timeout=900)
    return out, result.stdout


def test_quality_table_has_every_row_with_metrics_in_range(quality):
    out, stdout = quality
    rows = json.loads((out / "quality.json").read_text())["rows"]
    names = [row["model"] for row in rows]
    assert names[:5] == ["popularity", "EASE", "ItemKNN", "NeuMF", "GMF"]
    for row in rows:
        assert 0.0 <= row[f"full_recall@{K}"] <= row[f"hr@{K}"] <= 1.0  # 101 candidates vs all items
        assert 0.0 <= row[f"full_ndcg@{K}"] <= row[f"full_recall@{K}"]
        assert row["fit_s"] > 0
        assert row["model"] in stdout
    by_name = {row["model"]: row for row in rows}
    # Item-item co-occurrence beats popularity clearly on the synthetic taste data.
    assert by_name["EASE"][f"hr@{K}"] > by_name["popularity"][f"hr@{K}"] + 0.1
    assert "by validation" in by_name["EASE"]["note"]
    assert by_name["NeuMF"]["train_samples_per_s"] > 0
    markdown = (out / "quality.md").read_text().splitlines()
    assert markdown[0].startswith("| model | sampled HR@10 |") and len(markdown) == 2 + len(rows)
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_popularity_row_agrees_with_a_pandas_count_of_the_lists(quality, etl_dir):
    import numpy as np
    import pandas as pd

    out, _ = quality
    read = lambda split: pd.concat(pd.read_parquet(f) for f in sorted((etl_dir / split).glob("*.parquet")))
    train, lists, validation = read("train"), read("test"), read("validation")
    popularity = train["item_id"].value_counts()
    counts = lists["item_id"].map(popularity).fillna(0).to_numpy().reshape(-1, 101)
    expected = float(((counts[:, 1:] >= counts[:, :1]).sum(axis=1) < K).mean())
    rows = {row["model"]: row for row in json.loads((out / "quality.json").read_text())["rows"]}
    assert rows["popularity"][f"hr@{K}"] == pytest.approx(expected)
    # Full ranking: the positive against every item the user has not touched before it, i.e.
    # neither their training items nor their validation positive (ties count against it).
    positives = lists.iloc[::101]
    before = pd.concat([train, validation.iloc[::101]]).groupby("user_id")["item_id"].agg(set)
    catalogue = pd.Series(np.arange(3, int(yaml.safe_load((etl_dir / "feature_spec.yaml").read_text())
                                         ["feature_spec"]["item_id"]["cardinality"])))
    count = catalogue.map(popularity).fillna(0).to_numpy()
    ranks = []
    for user, item in zip(positives["user_id"], positives["item_id"]):
        eligible = ~catalogue.isin(before.get(user, set()) - {item}).to_numpy() & (catalogue.to_numpy() != item)
        ranks.append(int((count[eligible] >= popularity.get(item, 0)).sum()))
    assert rows["popularity"][f"full_recall@{K}"] == pytest.approx(float(np.mean(np.array(ranks) < K)))


def test_quality_refuses_a_directory_that_is_not_an_etl_output(tmp_path):
    result = run_command("benchmarks/quality.py", "--data", str(tmp_path), check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "quality.py: error:" in result.stderr


def test_include_adds_the_rows_of_an_earlier_run_on_the_same_data_only(quality, etl_dir, tmp_path):
    out, _ = quality
    result = run_command("benchmarks/quality.py", "--data", str(etl_dir), "--models", "popularity",
                         "--include", str(out / "quality.json"))
    assert result.stdout.count("popularity") == 2 and "NeuMF" in result.stdout
    other = json.loads((out / "quality.json").read_text())
    other["info"]["fingerprint"] = "0" * 64  # rows computed on another ETL output
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = run_command("benchmarks/quality.py", "--data", str(etl_dir), "--models",
                          "--include", str(tmp_path / "other.json"), check=False)
    assert refused.returncode == 2 and "other data" in refused.stderr
    older = json.loads((out / "quality.json").read_text())
    del older["info"]["full_ranking"]  # a file from before the test ranking excluded validation positives
    (tmp_path / "older.json").write_text(json.dumps(older))
    refused = run_command("benchmarks/quality.py", "--data", str(etl_dir), "--models",
                          "--include", str(tmp_path / "older.json"), check=False)
    assert refused.returncode == 2 and "full-ranking" in refused.stderr.splitlines()[-1]  # one line: no traceback
    assert "Traceback" not in refused.stderr
